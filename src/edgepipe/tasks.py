"""The tasks edgepipe compresses for: every stage is registered per (stage kind, task)."""

from __future__ import annotations

from enum import Enum


class Task(str, Enum):
    TEXT = "text-classification"
    TOKEN = "token-classification"
    IMAGE = "image-classification"
    LM = "causal-lm"

    def __str__(self) -> str:
        return self.value


TASKS = tuple(t.value for t in Task)
