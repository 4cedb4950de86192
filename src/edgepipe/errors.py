"""The error hierarchy. Every error a user can cause is an `EdgepipeError` with an exit code."""

from __future__ import annotations

from pathlib import Path


class EdgepipeError(Exception):
    """Base class. `exit_code` is what the CLI returns: 1 failure, 2 bad input, 3 gate failed."""

    exit_code = 1


class InputError(EdgepipeError):
    """Bad input the user can fix: a missing file, a wrong column, a corrupt model."""

    exit_code = 2


class RecipeError(InputError):
    """A recipe with one or more problems; each names the key to fix."""

    def __init__(self, problems: list[str], source: str = "recipe") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n{lines}")


class StageError(EdgepipeError):
    """A stage failed; raised from its cause."""

    def __init__(self, stage: str, run_dir: Path, message: str) -> None:
        self.stage = stage
        self.run_dir = run_dir
        super().__init__(f"stage {stage} failed: {message} (run folder: {run_dir})")


class ExportParityError(EdgepipeError):
    """The exported model disagrees with PyTorch beyond the tolerance."""


class BackendUnavailableError(EdgepipeError):
    """A backend that cannot run here; the message says why and how to install it."""

    exit_code = 2


class GateFailedError(EdgepipeError):
    """An accuracy or latency gate failed."""

    exit_code = 3
