"""bench/bench_calibration_size.py: its size parsing and checks (the measurement itself is a benchmark)."""

import pytest

from testing_utils import REPO_ROOT


@pytest.fixture
def parse_sizes(monkeypatch):
    monkeypatch.syspath_prepend(REPO_ROOT)
    from bench.bench_calibration_size import parse_sizes

    return parse_sizes


def test_sizes_become_sorted_window_counts(parse_sizes):
    assert parse_sizes("8192, 2048,2048", 256, 651) == [8, 32]


@pytest.mark.parametrize(
    "text, message", [("", "none given"), ("1000", "multiples"), ("2048,x", "integers"), ("262144", "651 full")]
)
def test_bad_sizes_are_refused(parse_sizes, text, message):
    with pytest.raises(ValueError, match=message):
        parse_sizes(text, 256, 651)
