"""EvalPlus's differential test, run as trusted test code inside the checker's sandbox.

Stdlib only (the checker has no third-party packages). The checker binds `candidate` (the sample's
entry point behind a proxy), `inputs`, `expected` (the canonical solution's outputs on them),
`cpu_limits` (per input, seconds), `atol` and `entry_point`, then runs this file followed by
`evaluate(...)`. The rules are EvalPlus's `unsafe_execute` (evalplus/eval/__init__.py) for
HumanEval: exact equality first; `find_zero` (HumanEval/32) is judged by |poly(xs, out)| <= atol;
a float answer (or a list/tuple of floats) gets atol 1e-6 when the task has none, and once set
it stays set for the later inputs, as there; a non-exact answer passes when it has the expected's
type (and length) and `numpy.allclose(out, exp, rtol=1e-07, atol=atol)` holds, written out here.
The first failing input ends the run (EvalPlus's default fast check). Per-input time limits are
CPU seconds (max(4, 4 x the canonical solution's time), EvalPlus's constants), so a busy machine
does not fail a sample.
"""

import math


def _poly(xs, x):
    """EvalPlus's oracle for HumanEval/32 (evalplus/eval/_special_oracle.py)."""
    return sum([coeff * math.pow(x, i) for i, coeff in enumerate(xs)])


def is_floats(x):
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(i, float) for i in x)
    return False


def _isclose(a, b, rtol, atol):
    """numpy.isclose for two numbers (bools count as 0/1; NaN is never close; equal infinities are)."""
    if not all(isinstance(v, (int, float)) for v in (a, b)):
        raise TypeError(f"not numbers: {type(a).__name__}, {type(b).__name__}")
    a, b = float(a), float(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= atol + rtol * abs(b)


def allclose(a, b, rtol, atol):
    """numpy.allclose on what EvalPlus compares: numbers, or equally long (nested) sequences."""
    a_seq, b_seq = isinstance(a, (list, tuple)), isinstance(b, (list, tuple))
    if a_seq and b_seq:
        if len(a) != len(b):
            if len(a) == 1 or len(b) == 1:  # numpy broadcasts a length-1 axis
                a, b = (a * len(b), b) if len(a) == 1 else (a, b * len(a))
            else:
                raise ValueError(f"shapes differ: {len(a)} and {len(b)}")
        return all(allclose(x, y, rtol, atol) for x, y in zip(a, b))
    if a_seq or b_seq:  # a scalar broadcast against a sequence
        seq, scalar = (a, b) if a_seq else (b, a)
        return all(allclose(x, scalar, rtol, atol) if a_seq else allclose(scalar, x, rtol, atol) for x in seq)
    return _isclose(a, b, rtol, atol)


def evaluate(candidate, inputs, expected, cpu_limits, atol, entry_point):
    """Raise AssertionError at the first input whose output is wrong or too slow."""
    for i, inp in enumerate(inputs):
        candidate.cpu_limit = cpu_limits[i]
        out = candidate(*inp)
        if candidate.last_cpu > cpu_limits[i]:
            raise AssertionError(f"input {i}: took {candidate.last_cpu:.2f} s of CPU, over its "
                                 f"{cpu_limits[i]:.2f} s limit")
        if entry_point == "find_zero":
            assert abs(_poly(*inp, out)) <= atol, f"input {i}: poly(xs, {out!r:.60}) is not within {atol} of 0"
            continue
        exp = expected[i]
        exact_match = out == exp
        if atol == 0 and is_floats(exp):
            atol = 1e-6  # EvalPlus: enforce atol for float comparison (and keep it)
        if not exact_match and atol != 0:
            assert type(out) == type(exp), f"input {i}: a {type(out).__name__}, expected a {type(exp).__name__}"
            if isinstance(exp, (list, tuple)):
                assert len(out) == len(exp), f"input {i}: {len(out)} items, expected {len(exp)}"
            try:
                close = allclose(out, exp, 1e-07, atol)
            except (TypeError, ValueError) as e:
                raise AssertionError(f"input {i}: not comparable with the expected output ({e})") from None
            assert close, f"input {i}: not within atol={atol} of the expected output"
        else:
            assert exact_match, f"input {i}: wrong output"
