"""Checkers for chapter 08's exercises."""

from ._core import Case, CheckFailed, compare_close, compare_equal, run_cases  # noqa: F401

__all__: list[str] = []
