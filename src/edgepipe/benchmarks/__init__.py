"""Benchmarks: the latency/accuracy harness, the run report, and its Markdown rendering."""
