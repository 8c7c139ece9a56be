"""lessons_lib.source.code_lines, on code whose lines are counted here by hand."""

import pytest

from lessons_lib.source import code_lines


def two_lines(x):
    """A docstring
    over two lines."""
    # a comment

    y = x + 1  # a comment after code counts: the line holds code
    return y


class Three:
    """Doc."""

    def f(self):
        '''Doc of a method.'''
        return 1


def test_counts_code_and_leaves_out_docstrings_comments_and_blank_lines():
    assert code_lines(two_lines) == 3            # def, y = ..., return
    assert code_lines(Three) == 3                # class, def, return
    assert code_lines(two_lines, Three) == 6


def test_a_string_that_is_not_a_docstring_counts():
    def f():
        x = 1
        "not a docstring: it comes after code"
        return x
    assert code_lines(f) == 4


def test_rejects_what_has_no_source_lines_to_count():
    with pytest.raises(ValueError, match="functions or classes"):
        code_lines(3)
    with pytest.raises(ValueError, match="at least one"):
        code_lines()
