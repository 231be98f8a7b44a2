"""benchmarks/decode.py's decode rate: paired rounds, and never a rate from a non-positive
difference (a noisy run once printed 127,000,000,000 tok/s from t(128) - t(1) <= 0)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "decode.py"


@pytest.fixture(scope="module")
def decode_rate():
    spec = importlib.util.spec_from_file_location("bench_decode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.decode_rate


def test_rate_is_the_median_of_the_positive_paired_differences(decode_rate):
    # rounds: t(1), t(128); the second round's difference is negative and left out
    assert decode_rate([1.0, 1.0, 1.0, 1.0], [2.27, 0.5, 3.54, 2.27], 128) == pytest.approx(127 / 1.27)


def test_no_positive_difference_gives_no_rate(decode_rate):
    assert decode_rate([1.0, 2.0], [1.0, 1.5], 128) is None
    assert decode_rate([], [], 128) is None
