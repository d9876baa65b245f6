"""Messages of the shared argument checks name the parameter, the options and the value."""

import math
from pathlib import Path

import pytest

from ephys_gpt.validation import check_number, check_option, validate_type


def test_validate_type():
    assert validate_type(3, "int", "n") == 3
    assert validate_type(Path("a"), "path-like", "p") == Path("a")
    assert validate_type(None, ("int", None), "n") is None
    with pytest.raises(TypeError, match=r"n must be int, got True \(bool\)"):
        validate_type(True, "int", "n")
    with pytest.raises(TypeError, match=r"x must be numeric or None, got 'a' \(str\)"):
        validate_type("a", ("numeric", None), "x")


def test_check_option_hints():
    assert check_option("mag", ["mag", "grad"], "picks") == "mag"
    with pytest.raises(ValueError, match=r"picks must be one of 'mag', 'grad'; got 'mags'\. "
                                         r"Did you mean 'mag'\?"):
        check_option("mags", ["mag", "grad"], "picks")


def test_check_number():
    assert check_number(2.5, "s", low=0, low_inclusive=False) == 2.5
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="seconds must be a finite number"):
            check_number(bad, "seconds")
    with pytest.raises(ValueError, match=r"seconds must be > 0, got 0"):
        check_number(0, "seconds", low=0, low_inclusive=False)
    with pytest.raises(ValueError, match=r"ratio must be >= 0 and < 1"):
        check_number(1.0, "ratio", low=0, high=1, high_inclusive=False)
    with pytest.raises(TypeError, match="n must be int"):
        check_number(1.5, "n", integer=True)
