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


def test_wiki_calibration_never_shares_a_window_with_the_held_out_text(monkeypatch, smollm2_path):
    """`--calibration_data wiki`: the held-out windows are the same as with C4, and no calibration window is one."""
    from transformers import AutoTokenizer

    monkeypatch.syspath_prepend(REPO_ROOT)
    from bench.bench_calibration_size import calibration_and_held_out

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    c4_calibration, held_out_c4, _ = calibration_and_held_out(tokenizer, "c4", 256, 24, False)
    calibration, held_out, _ = calibration_and_held_out(tokenizer, "wiki", 256, 24, False)
    assert held_out.equal(held_out_c4) and held_out.shape == (24, 256)
    assert calibration.shape[0] >= 512  # room for the 128k-token size
    held = {tuple(row.tolist()) for row in held_out}
    assert not held & {tuple(row.tolist()) for row in calibration}
    assert not calibration[:8].equal(c4_calibration[:8])
    with pytest.raises(ValueError, match="leaves no Wikipedia window"):
        calibration_and_held_out(tokenizer, "wiki", 256, 10_000, False)
