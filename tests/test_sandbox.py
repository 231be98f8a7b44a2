"""The sandbox for generated code: hostile programs fail alone and leave the host untouched.

Hostile programs run only after `protections()` (a harmless probe) shows the uid switch, the
PID namespace and the rlimits in effect; they run in one `run_many` batch interleaved with
normal programs, whose results must stay correct.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("the sandbox needs Linux", allow_module_level=True)

from conftest import program

from smallcoder import SmallCoderError
from smallcoder.eval import sandbox
from smallcoder.eval.sandbox import ExecResult, Limits, protections, run_many, run_program, supervise

FAST = Limits(timeout=5.0, cpu_seconds=5)
HOSTILE = Limits(timeout=2.0, cpu_seconds=2, memory_bytes=256 << 20, max_processes=8,
                 max_file_bytes=1 << 20, max_open_files=64, max_output_bytes=64 << 10)
SECRET_NAME = "SMALLCODER_TEST_SECRET"



# ---------------------------------------------------------------------------------------------
# the probe and normal programs


def test_protections_report_is_typed_and_cached():
    report = protections()
    assert report is not protections() and report == protections()
    for key in ("unprivileged_uid", "network_namespace", "pid_namespace", "rlimit_as", "rlimit_cpu",
                "rlimit_nproc", "rlimit_fsize", "rlimit_nofile", "rlimit_core", "scrubbed_env",
                "isolated_mode", "interpreter", "namespaces"):
        assert isinstance(report[key], (bool, str)), key
    for key in ("rlimit_as", "rlimit_cpu", "rlimit_fsize", "rlimit_nofile", "rlimit_core",
                "scrubbed_env", "isolated_mode", "stdin_devnull"):
        assert report[key] is True, (key, report)
    if os.geteuid() == 0:  # CI: root must never run samples as root when an interpreter allows
        assert report["unprivileged_uid"] is True, report["sample_uid"]


def test_harmless_program_sees_limits_uid_and_clean_environment():
    """Before anything hostile: the uid switch, rlimits, env, stdin and cwd really are in effect."""
    limits = Limits(timeout=10.0, cpu_seconds=7, memory_bytes=300 << 20, max_processes=9,
                    max_file_bytes=3 << 20, max_open_files=40)
    prot = protections()
    code = program("""
        import os, resource, sys
        assert sys.flags.isolated == 1
        assert resource.getrlimit(resource.RLIMIT_AS) == (@AS@, @AS@)
        assert resource.getrlimit(resource.RLIMIT_CPU) == (7, 8)
        assert resource.getrlimit(resource.RLIMIT_FSIZE) == (@FSIZE@, @FSIZE@)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (40, 40)
        assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
        if @OWN_UID@:
            assert resource.getrlimit(resource.RLIMIT_NPROC) == (9, 9)
            assert os.getuid() >= 0x70000000 and os.geteuid() == os.getuid(), os.getuid()
            assert os.getgroups() == []
        assert set(os.environ) <= {"PATH", "HOME", "TMPDIR", "LANG"}, sorted(os.environ)
        assert os.environ["HOME"] == os.getcwd()
        assert sys.stdin.read() == ""
        with open("scratch.txt", "w") as f:
            f.write("ok")
        assert os.listdir(".") and os.path.basename(os.getcwd()).startswith("smallcoder-sandbox-")
    """, AS=300 << 20, FSIZE=3 << 20, OWN_UID=bool(prot["separate_uid_per_sample"]))
    result = run_program(code, limits)
    assert result.status == "passed", result


def test_normal_programs_pass_fail_and_count_output():
    codes = [
        "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('hello')\n",
        "def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5, 'add is wrong'\n",
        "def broken(:\n    pass\n",
        "import os\nos._exit(0)\nassert False\n",
        "import sys\nsys.exit(0)\nassert False\n",
        "raise SystemExit(3)\n",
        "x = 1\nif x:",  # the appended footer must not rescue an unfinished block
    ]
    r = run_many(codes, FAST, workers=2)
    assert [x.status for x in r] == ["passed", "failed", "failed", "failed", "failed", "failed",
                                     "failed"], r
    assert r[0].stdout_bytes == len("hello\n") and r[0].returncode == 0 and r[0].detail == ""
    assert r[1].detail == "AssertionError: add is wrong" and r[1].returncode == 1
    assert r[2].detail.startswith("SyntaxError")
    assert "before the end of the program" in r[3].detail and r[3].returncode == 0
    assert "before the end of the program" in r[4].detail
    assert r[5].returncode == 3
    assert r[6].detail.startswith("IndentationError")
    assert all(isinstance(x, ExecResult) and 0 < x.duration < 5 for x in r)


def test_results_keep_input_order_and_progress_works():
    codes = [f"import time\ntime.sleep({0.3 if i % 2 == 0 else 0})\nassert {i} % 3 != 0\n"
             for i in range(6)]
    r = run_many(codes, FAST, workers=3, progress=True)
    assert [x.status for x in r] == ["failed" if i % 3 == 0 else "passed" for i in range(6)]
    assert run_many([], FAST) == []


def test_bad_arguments_name_the_field_and_value():
    with pytest.raises(SmallCoderError, match=r"Limits\.timeout.*-1"):
        Limits(timeout=-1)
    with pytest.raises(SmallCoderError, match=r"Limits\.memory_bytes.*'big'"):
        Limits(memory_bytes="big")  # type: ignore[arg-type]
    with pytest.raises(SmallCoderError, match=r"codes\[1\] must be str, got bytes"):
        run_many(["pass", b"pass"])  # type: ignore[list-item]
    with pytest.raises(SmallCoderError, match=r"workers.*0"):
        run_many(["pass"], workers=0)
    with pytest.raises(SmallCoderError, match=r"code must be str"):
        run_program(None)  # type: ignore[arg-type]


def test_harness_problem_is_an_error_result(monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", "/nonexistent/smallcoder-sandbox-test")
    monkeypatch.setattr(supervise, "_workroot", lambda setup: tempfile.gettempdir())
    result = run_program("pass\n", FAST)
    assert result.status == "error" and "sandbox harness" in result.detail, result


# ---------------------------------------------------------------------------------------------
# hostile programs, one batch


def _require_containment() -> dict:
    prot = protections()
    missing = [k for k in ("unprivileged_uid", "rlimit_nproc", "rlimit_as", "rlimit_fsize")
               if prot[k] is not True]
    if not (prot["pid_namespace"] or prot["separate_uid_per_sample"]):
        missing.append("pid_namespace or separate_uid_per_sample")
    if missing:
        pytest.skip(f"hostile programs need {', '.join(missing)}; here: {prot['sample_uid']}, "
                    f"namespaces: {prot['namespaces']}")
    if not prot["separate_uid_per_sample"]:
        pytest.skip("the canary and kill checks need a sample uid other than the harness's "
                    f"({prot['sample_uid']})")
    return prot


def _leftovers(base: str) -> list[str]:
    """Processes whose command line or working folder lies under the batch's work root."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(f"/proc/{name}/cwd")
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (base in cmdline or cwd.startswith(base)):
            found.append(f"{name}: {cmdline[:120]} (cwd {cwd})")
    return found


@pytest.fixture(scope="module")
def hostile_batch():
    """Run every hostile program and the normal ones in one batch; keep what the checks need."""
    prot = _require_containment()
    base = tempfile.mkdtemp(prefix="sandbox-test-root-", dir="/tmp")
    os.chmod(base, 0o711)  # sample uids may traverse it to their own folder, not list or write
    guard = tempfile.mkdtemp(prefix="sandbox-test-canary-", dir="/tmp")
    os.chmod(guard, 0o755)  # readable, so only ownership stands between the sample and the file
    canary = Path(guard) / "canary.txt"
    canary.write_text("keep me")
    os.chmod(canary, 0o644)
    stray = f"/tmp/sandbox-test-stray-{uuid.uuid4().hex}"
    secret = f"s3cret-{uuid.uuid4().hex}"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    samples = {
        "ok_first": ("assert sorted([3, 1, 2]) == [1, 2, 3]\n", "passed"),
        "fork_bomb": (program("""
            import os, sys
            bomb = "import os\\nwhile True:\\n    try:\\n        os.fork()\\n    except OSError:\\n        pass\\n"
            os.execv(sys.executable, [sys.executable, "-c", bomb, os.getcwd()])
            """), {"timeout", "killed", "failed"}),
        "fork_counted": (program("""
            import os, time
            n = 0
            try:
                while n < 1000:
                    if os.fork() == 0:
                        time.sleep(60)
                        os._exit(0)
                    n += 1
            except OSError:
                pass
            raise SystemExit(f"forks {n}")
            """), "failed"),
        "memory_bomb": ("hog = []\nwhile True:\n    hog.append(bytearray(64 << 20))\n", "killed"),
        "fail_mid": ("def f(x):\n    return x * 2\n\nassert f(2) == 5\n", "failed"),
        "infinite_loop": ("while True:\n    pass\n", {"timeout", "killed"}),
        "long_sleep": ("import time\ntime.sleep(3600)\n", "timeout"),
        "kill_parent": (program("""
            import os, signal
            refused = 0
            attempts = [lambda: os.kill(os.getppid(), signal.SIGKILL),
                        lambda: os.kill(@TEST_PID@, signal.SIGKILL),
                        lambda: os.killpg(1, signal.SIGKILL),
                        lambda: os.kill(-1, signal.SIGKILL),
                        lambda: os.kill(1, signal.SIGKILL)]
            for attempt in attempts:
                try:
                    attempt()
                except OSError:
                    refused += 1
            assert refused == len(attempts), refused
            """, TEST_PID=os.getpid()), "passed"),
        "kill_own_group": ("import os, signal\nos.killpg(os.getpgid(0), signal.SIGKILL)\n", "killed"),
        "delete_outside": (program("""
            import os, shutil
            try:
                os.remove(@CANARY@)
            finally:
                shutil.rmtree(@GUARD@, ignore_errors=True)
            """, CANARY=str(canary), GUARD=guard), "failed"),
        "huge_file": ("with open('huge.bin', 'wb') as f:\n    while True:\n        f.write(b'x' * 65536)\n",
                      "killed"),
        "read_secret": (program("""
            import os
            assert @SECRET@ not in "".join(os.environ.values()), "secret in environ"
            for pid in os.listdir("/proc"):
                try:
                    with open(f"/proc/{pid}/environ", "rb") as f:
                        assert @SECRET@.encode() not in f.read(), pid
                except OSError:
                    pass
            """, SECRET=secret), "passed"),
        "socket": (program("""
            import socket
            s = socket.create_connection(("127.0.0.1", @PORT@), timeout=1)
            s.sendall(b"escaped")
            """, PORT=port), "failed"),
        "ok_middle": ("print('x' * 99)\n", "passed"),
        "flood_stdout": ("while True:\n    print('y' * 4096)\n", "killed"),
        "shell": (program("""
            import os, subprocess
            os.system("sh -c 'touch " + @STRAY@ + "; rm -f " + @CANARY@ + "; sleep 300 &'")
            subprocess.run(["sh", "-c", "echo pwned > " + @CANARY@])
            """, STRAY=stray, CANARY=str(canary)), "passed"),
        "recursion": ("def f(n):\n    return f(n + 1)\n\nf(0)\n", "failed"),
        "syntax": ("def f(:\n", "failed"),
        "exit_early": ("import os\nos._exit(0)\nassert 1 == 2\n", "failed"),
        "ignore_sigterm": (program("""
            import signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(0.05)
            """), "timeout"),
        "daemon": (program("""
            import os, sys, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    code = "import os, time\\nos.setsid()\\ntime.sleep(300)"
                    os.execv(sys.executable, [sys.executable, "-c", code, os.getcwd()])
                os._exit(0)
            time.sleep(0.3)
            """), "passed"),
        "ok_last": ("import math\nassert math.isqrt(10**6) == 1000\nprint(42)\n", "passed"),
    }
    names = list(samples)
    mp = pytest.MonkeyPatch()
    mp.setenv(SECRET_NAME, secret)
    mp.setattr(tempfile, "tempdir", base)
    try:
        try:
            results = run_many([samples[n][0] for n in names], HOSTILE, workers=2)
        finally:
            mp.undo()
        leftovers = _leftovers(base)
        try:
            conn, _ = listener.accept()
            conn.close()
            connected = True
        except BlockingIOError:
            connected = False
        yield {
            "prot": prot,
            "results": dict(zip(names, results)),
            "expected": {n: samples[n][1] for n in names},
            "canary": canary, "canary_text": canary.read_text() if canary.exists() else None,
            "stray_exists": os.path.lexists(stray), "leftovers": leftovers,
            "base_left": os.listdir(base), "connected": connected, "secret": secret,
        }
    finally:
        listener.close()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(guard, ignore_errors=True)
        if os.path.lexists(stray):
            os.unlink(stray)


def test_every_hostile_sample_fails_alone_and_normal_ones_stay_correct(hostile_batch):
    results, expected = hostile_batch["results"], hostile_batch["expected"]
    wrong = {n: (r.status, r.detail) for n, r in results.items()
             if r.status not in ({expected[n]} if isinstance(expected[n], str) else expected[n])}
    assert not wrong, wrong
    assert results["ok_middle"].stdout_bytes == 100 and results["ok_last"].stdout_bytes == 3
    assert results["fail_mid"].detail == "AssertionError"
    assert results["syntax"].detail.startswith("SyntaxError")
    assert "before the end of the program" in results["exit_early"].detail


def test_resource_limits_name_what_was_hit(hostile_batch):
    r = hostile_batch["results"]
    assert r["memory_bomb"].detail.startswith("memory limit"), r["memory_bomb"]
    assert r["huge_file"].detail.startswith("file size limit"), r["huge_file"]
    assert r["flood_stdout"].detail.startswith("output limit"), r["flood_stdout"]
    assert HOSTILE.max_output_bytes < r["flood_stdout"].stdout_bytes <= HOSTILE.max_output_bytes + (1 << 17)
    assert r["recursion"].detail.startswith("RecursionError"), r["recursion"]
    assert r["kill_own_group"].detail == "killed by SIGKILL", r["kill_own_group"]
    # the counted fork bomb stops below the process budget (its own process included)
    forks = int(r["fork_counted"].detail.split()[-1])
    assert 0 < forks < HOSTILE.max_processes, r["fork_counted"]
    for name in ("long_sleep", "ignore_sigterm"):
        assert r[name].detail == "wall-clock timeout after 2 s"
        assert 2.0 <= r[name].duration < 4.0, r[name]


def test_host_is_untouched(hostile_batch):
    b = hostile_batch
    assert b["canary_text"] == "keep me", "a sample deleted or rewrote a file outside its folder"
    # with private mounts the host's file is not even visible; without, ownership protects it
    refused = "FileNotFoundError" if b["prot"]["private_mounts"] else "PermissionError"
    assert b["results"]["delete_outside"].detail.startswith(refused), b["results"]["delete_outside"]
    assert not b["stray_exists"], "a file a sample's shell wrote in /tmp outlived the sample"
    assert b["leftovers"] == [], "sample processes outlived run_many"
    assert b["base_left"] == [], "work folders were left behind"


def test_socket_cannot_reach_the_host(hostile_batch):
    if not hostile_batch["prot"]["network_namespace"]:
        pytest.skip(f"no network namespace here: {hostile_batch['prot']['namespaces']}")
    assert not hostile_batch["connected"], "a sample connected to a port on the host"
    assert "Network is unreachable" in hostile_batch["results"]["socket"].detail


# ---------------------------------------------------------------------------------------------
# the fallback when the harness is not root


def test_non_root_fallback_reports_and_runs(tmp_path_factory):
    """As `nobody`: no uid switch, namespaces through a user namespace where the kernel allows."""
    runuser = shutil.which("runuser")
    if os.geteuid() != 0 or runuser is None or not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("needs root, runuser and /usr/bin/python3 to run a check as nobody")
    folder = Path(tempfile.mkdtemp(prefix="sandbox-test-nobody-", dir="/tmp"))
    try:
        os.chmod(folder, 0o755)
        shutil.copytree(Path(sandbox.__file__).parents[2], folder / "smallcoder")
        for path in [folder, *folder.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        script = program("""
            import json, sys, tempfile
            tempfile.tempdir = "/tmp"
            sys.path.insert(0, @PATH@)
            from smallcoder.eval import sandbox as sb
            fast = sb.Limits(timeout=10, cpu_seconds=5)
            r = sb.run_many(["assert 1 + 1 == 2\\n", "assert 1 + 1 == 3\\n", "import os\\nos._exit(0)\\n"], fast)
            print(json.dumps({"prot": sb.protections(), "status": [x.status for x in r]}))
            """, PATH=str(folder))
        done = subprocess.run([runuser, "-u", "nobody", "--", "/usr/bin/python3", "-I", "-c", script],
                              capture_output=True, text=True, timeout=60, cwd="/tmp", check=False,
                              env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        assert done.returncode == 0, done.stderr[-2000:]
        report = json.loads(done.stdout.splitlines()[-1])
        prot = report["prot"]
        assert report["status"] == ["passed", "failed", "failed"]
        assert prot["harness_root"] is False and prot["separate_uid_per_sample"] is False
        assert prot["unprivileged_uid"] is True and prot["stray_file_cleanup"] is False
        assert "nobody" in prot["sample_uid"] or "own uid" in prot["sample_uid"]
        if prot["namespaces"].startswith("unshare"):
            assert "--user" in prot["namespaces"] and prot["network_namespace"] is True
        else:
            assert prot["network_namespace"] is False and prot["namespaces"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
