"""The pipeline: recipe schema, data, stages, runner, manifest and CLI."""
