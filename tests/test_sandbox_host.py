"""The sandbox hides the host: private mounts, bounded scratch space, no host sockets, no
leftovers, samples that die with the harness, clean-up of any tree, verdicts a busy machine
does not change (issue #12)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("the sandbox needs Linux", allow_module_level=True)

from conftest import program

from smallcoder.eval.sandbox import Limits, protections, run_many, run_program, uids

SRC = Path(__file__).resolve().parents[1] / "src"


def _need(*keys: str) -> dict:
    prot = protections()
    missing = [k for k in keys if prot.get(k) is not True]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} here ({prot.get('mounts') or prot.get('namespaces')})")
    return prot



def test_the_report_claims_only_what_the_probe_saw():
    prot = protections()
    for key in ("private_mounts", "host_files_hidden", "private_tmp", "private_dev_shm", "bounded_work_folder",
                "python_read_only", "site_packages_hidden", "no_capabilities", "dies_with_harness"):
        assert isinstance(prot[key], bool), key
    if os.geteuid() == 0 and prot["namespaces"].startswith("unshare"):  # CI: all of it must hold
        assert all(prot[k] for k in ("private_mounts", "host_files_hidden", "private_tmp", "private_dev_shm",
                                     "python_read_only", "site_packages_hidden")), prot


def test_the_sample_sees_only_its_folder_and_a_read_only_python():
    _need("private_mounts")
    code = program("""
        import os, sys
        assert not os.path.exists(@SRC@), "the harness's code is visible"
        assert not os.path.exists(@DATA@), "the benchmark data is visible"
        for path in ("/run", "/var", "/home", "/srv", "/mnt", "/opt"):
            assert not os.path.exists(path), path
        assert sorted(os.listdir(os.getcwd())) == ["sample.py"], os.listdir(os.getcwd())
        expected = [os.getcwd().split("/")[2]] if os.getcwd().startswith("/tmp/") else []
        assert os.listdir("/tmp") == expected, os.listdir("/tmp")
        for folder in (sys.prefix, "/usr", "/etc", "/"):
            try:
                open(os.path.join(folder, "planted"), "w").close()
            except OSError:
                continue
            raise AssertionError(f"{folder} is writable")
        import json, ssl, sqlite3, decimal  # the standard library works
        assert sys.path and all(not os.listdir(p) for p in sys.path if p.endswith(("site-packages", "dist-packages")))
    """, SRC=str(SRC), DATA=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    r = run_program(code, Limits(timeout=30.0))
    assert r.status == "passed", r


def test_a_host_unix_socket_is_out_of_reach(tmp_path):
    _need("private_mounts")
    folder = Path(tempfile.mkdtemp(prefix="sandbox-sock-", dir="/tmp"))
    os.chmod(folder, 0o1777)
    path = str(folder / "open.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    os.chmod(path, 0o777)
    listener.listen(4)
    listener.setblocking(False)
    try:
        code = program("""
            import socket
            s = socket.socket(socket.AF_UNIX)
            s.connect(@PATH@)
            s.sendall(b"escaped")
        """, PATH=path)
        r = run_program(code, Limits(timeout=30.0))
        with pytest.raises(BlockingIOError):
            listener.accept()
        assert r.status == "failed" and "FileNotFoundError" in r.detail, r
    finally:
        listener.close()
        os.unlink(path)
        os.rmdir(folder)


def test_world_writable_folders_keep_nothing_from_a_sample():
    """A sample plants a file in every folder it can write; the next sample finds none of them
    and neither does the host (/run/lock, /var/tmp, /dev/shm, /tmp ...)."""
    _need("private_mounts")
    marker = f"planted-{uuid.uuid4().hex}"
    plant = program("""
        import os
        planted = 0
        for top in ("/", "/tmp", "/var", "/var/tmp", "/run", "/run/lock", "/dev", "/dev/shm", "/var/lock"):
            try:
                with open(os.path.join(top, @NAME@), "w") as f:
                    f.write("x")
                planted += 1
            except OSError:
                pass
        print(planted)
    """, NAME=marker)
    look = program("""
        import os
        for top in ("/", "/tmp", "/var/tmp", "/run/lock", "/dev/shm", "/var/lock"):
            assert not os.path.exists(os.path.join(top, @NAME@)), top
    """, NAME=marker)
    first, second = run_many([plant], Limits(timeout=30.0)), run_many([look], Limits(timeout=30.0))
    assert first[0].status == "passed" and second[0].status == "passed", (first, second)
    host = [f for f in uids.world_writable_folders() + ["/tmp", "/var/tmp", "/dev/shm"]
            if os.path.lexists(os.path.join(f, marker))]
    assert host == [], host


def test_scratch_space_is_bounded_and_private():
    """/tmp, /dev/shm and the work folder are small private tmpfs: filling them stops at the limit,
    costs the host nothing, and honest samples in the same batch still pass."""
    _need("private_tmp", "private_dev_shm", "bounded_work_folder")
    limits = Limits(timeout=60.0, disk_bytes=8 << 20, max_file_bytes=64 << 20)
    fill = program("""
        import errno, os
        written = {}
        for folder in ("/tmp", "/dev/shm", os.environ["TMPDIR"]):
            n = 0
            try:
                with open(os.path.join(folder, "fill.bin"), "wb") as f:
                    while n < (256 << 20):
                        f.write(b"x" * (1 << 20))
                        n += 1 << 20
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
            written[folder] = n
        assert all(v <= (8 << 20) for v in written.values()), written
    """)
    honest = program("""
        import os
        path = os.path.join(os.environ["TMPDIR"], "data.bin")
        with open(path, "wb") as f:
            f.write(b"y" * (2 << 20))
        assert os.path.getsize(path) == 2 << 20
        with open("/tmp/t.txt", "w") as f:
            f.write("ok")
    """)
    shm_before = os.statvfs("/dev/shm").f_bfree
    results = run_many([fill, honest, fill, honest, honest, fill], limits, workers=3)
    assert [r.status for r in results] == ["passed"] * 6, results
    assert os.statvfs("/dev/shm").f_bfree >= shm_before - (64 << 20) // os.statvfs("/dev/shm").f_frsize


def _harness(work_root: str, codes: list[str]) -> subprocess.Popen:
    script = program("""
        import sys, tempfile
        sys.path.insert(0, @SRC@)
        tempfile.tempdir = @ROOT@
        from smallcoder.eval.sandbox import Limits, run_many
        run_many(@CODES@, Limits(timeout=600.0, cpu_seconds=600), workers=len(@CODES@))
    """, SRC=str(SRC), ROOT=work_root, CODES=codes)
    return subprocess.Popen([sys.executable, "-c", script], start_new_session=True)


def _sample_processes(work_root: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and cwd.startswith(work_root):
            found.append(int(name))
    return found


def _wait_for(condition, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_samples_die_with_the_harness(how):
    root = tempfile.mkdtemp(prefix="sandbox-orphans-", dir="/tmp")
    os.chmod(root, 0o711)
    sleeper = "import time\ntime.sleep(3600)\n"
    daemon = program("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            time.sleep(3600)
        time.sleep(3600)
    """)
    harness = _harness(root, [sleeper, daemon])
    try:
        assert _wait_for(lambda: len(_sample_processes(root)) >= 3), "the samples never started"
        os.kill(harness.pid, how)
        harness.wait(timeout=60)
        assert _wait_for(lambda: not _sample_processes(root)), f"orphaned samples: {_sample_processes(root)}"
    finally:
        if harness.poll() is None:
            harness.kill()
        for pid in _sample_processes(root):
            os.kill(pid, signal.SIGKILL)
        uids.remove_tree(root)


def test_deep_trees_do_not_crash_the_run_and_are_removed(tmp_path):
    deep = program("""
        import os
        for base in (".", "/tmp"):
            os.chdir(base)
            for i in range(3000):
                os.mkdir("d")
                os.chdir("d")
        print("built")
    """)
    r = run_program(deep, Limits(timeout=60.0, max_open_files=64))
    assert r.status == "passed", r
    # the clean-up itself, on the host: 3,000 levels, an unreadable folder, a link out
    top = tmp_path / "tree"
    outside = tmp_path / "keep.txt"
    outside.write_text("keep")
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        os.mkdir("tree", dir_fd=fd)
        cur = os.open("tree", os.O_RDONLY, dir_fd=fd)
        for i in range(3000):
            os.mkdir("d", dir_fd=cur)
            nxt = os.open("d", os.O_RDONLY, dir_fd=cur)
            os.close(cur)
            cur = nxt
        os.symlink(str(outside), "link", dir_fd=cur)
        os.mkdir("locked", dir_fd=cur)
        os.chmod("locked", 0, dir_fd=cur)
        os.close(cur)
    finally:
        os.close(fd)
    uids.remove_tree(str(top))
    assert not top.exists() and outside.read_text() == "keep"


def test_cpu_time_decides_not_the_clock_on_a_busy_machine():
    """An honest sample needing ~1 s of CPU passes with a 3 s CPU limit while four busy loops
    compete for the cores; an endless loop is stopped by CPU time, a sleeper by the clock."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(4)]
    try:
        work = program("""
            import time
            start = time.process_time()
            n = 0
            while time.process_time() - start < 1.0:
                n += 1
            assert n > 0
        """)
        busy, sleepy = Limits(timeout=120.0, cpu_seconds=3), Limits(timeout=3.0, cpu_seconds=3)
        results = run_many([work, work, "while True:\n    pass\n", "import time\ntime.sleep(600)\n"],
                           [busy, busy, busy, sleepy], workers=4)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert [r.status for r in results[:2]] == ["passed", "passed"], results[:2]
    assert results[2].status == "killed" and "CPU time limit" in results[2].detail, results[2]
    assert results[3].status == "timeout", results[3]
    assert all(r.cpu_seconds is None or r.cpu_seconds < 4 for r in results[:3])


def test_no_capabilities_even_as_uid_zero_in_a_user_namespace():
    """Run as `nobody` (no uid switch, a user namespace): the sample is uid 0 there but holds no
    capability and sees the same private view."""
    import shutil

    runuser = shutil.which("runuser")
    if os.geteuid() != 0 or runuser is None or not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("needs root, runuser and /usr/bin/python3 to run a check as nobody")
    folder = Path(tempfile.mkdtemp(prefix="sandbox-test-nobody-", dir="/tmp"))
    try:
        shutil.copytree(SRC / "smallcoder", folder / "smallcoder")
        for path in [folder, *folder.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        (folder / "probe.py").write_text(program("""
            status = open("/proc/self/status").read()
            assert "CapEff:\t0000000000000000" in status, status
            open("/etc/planted", "w")
        """))
        os.chmod(folder / "probe.py", 0o644)
        script = program("""
            import json, sys, tempfile
            tempfile.tempdir = "/tmp"
            sys.path.insert(0, @PATH@)
            from smallcoder.eval import sandbox as sb
            r = sb.run_program(open(@PROBE@).read(), sb.Limits(timeout=30))
            print(json.dumps({"prot": sb.protections(), "status": r.status, "detail": r.detail}))
        """, PATH=str(folder), PROBE=str(folder / "probe.py"))
        done = subprocess.run([runuser, "-u", "nobody", "--", "/usr/bin/python3", "-I", "-c", script],
                              capture_output=True, text=True, timeout=120, cwd="/tmp", check=False,
                              env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        assert done.returncode == 0, done.stderr[-2000:]
        report = json.loads(done.stdout.splitlines()[-1])
        if not report["prot"]["private_mounts"]:
            pytest.skip(f"no user namespaces for nobody here: {report['prot'].get('mounts')}")
        assert report["prot"]["no_capabilities"] is True
        assert report["status"] == "failed" and "Read-only file system" in report["detail"], report
    finally:
        uids.remove_tree(str(folder))
