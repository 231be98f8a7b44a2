"""Deciding once how samples are launched here, and reporting what really is in effect.

A harmless probe program runs through the whole launch chain (namespaces, private mounts, uid
switch, rlimits) and reports what it sees from the inside; the first set-up whose probe passes
is used, in this order of preference: private mounts, then without; a one-off uid (as root),
then the harness's own. Where something is not available (non-root without user namespaces, no
`unshare`, no interpreter an unprivileged uid can run, a kernel that refuses a mount) the
sandbox falls back and `protections()` says so, so the report never claims more than was seen.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

from ...errors import SmallCoderError
from .spec import Limits, Setup, rlimits
from .supervise import SAFE_PATH, execute
from .uids import UID_BASE, UID_SPAN, world_writable_folders

NAMESPACE_FLAGS = ("--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "--ipc")
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime")
_RLIMITS = ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE")
_INFO = ("import json, os, site, sys, sysconfig; p = sysconfig.get_paths(); print(json.dumps({"
         "'prefix': sys.prefix, 'base_prefix': sys.base_prefix, 'exec_prefix': sys.exec_prefix, "
         "'base_exec_prefix': sys.base_exec_prefix, 'executable': os.path.realpath(sys.executable), "
         "'site': [*site.getsitepackages(), p['purelib'], p['platlib']]}))")

_PROBE = r"""
import errno, json, os, resource, socket, sys
names = @NAMES@
hidden = @HIDDEN@
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)

def size(path):
    try:
        st = os.statvfs(path)
        return st.f_blocks * st.f_frsize
    except OSError:
        return None

def read_only(folder):
    try:
        open(os.path.join(folder, ".smallcoder-probe"), "w").close()
    except OSError as e:
        return e.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    return False

def empty(folder):
    try:
        return not os.listdir(folder)
    except OSError:
        return True

print(json.dumps({
    "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "pid": os.getpid(), "ifaces": [n for _, n in socket.if_nameindex()],
    "rlimits": {n: list(resource.getrlimit(getattr(resource, n))) for n in names},
    "env": sorted(os.environ), "isolated": sys.flags.isolated, "version": sys.version.split()[0],
    "no_new_privs": status.get("NoNewPrivs", "").strip() == "1",
    "cap_eff": int(status.get("CapEff", "ffff").strip(), 16),
    "stdin": os.path.realpath("/proc/self/fd/0"),
    "procs_visible": sum(p.isdigit() for p in os.listdir("/proc")),
    "root": sorted(os.listdir("/")), "tmp_bytes": size("/tmp"), "shm_bytes": size("/dev/shm"),
    "work_bytes": size("."), "hidden_visible": [p for p in hidden if os.path.lexists(p)],
    "python_read_only": read_only(sys.prefix), "site_packages": [p for p in @SITE@ if not empty(p)],
}))
"""

_lock = threading.Lock()
_cache: Setup | None = None


def setup() -> Setup:
    """The launch set-up of this machine, probed on first use."""
    global _cache
    with _lock:
        if _cache is None:
            _cache = _detect()
        return _cache


def _namespace_prefix(root: bool) -> tuple[tuple[str, ...], str]:
    """The unshare command line that works here, or () and why not."""
    unshare = shutil.which("unshare", path=SAFE_PATH + ":/usr/sbin:/sbin")
    if unshare is None:
        return (), "no unshare command"
    prefix = (unshare, *(() if root else ("--user", "--map-root-user")), *NAMESPACE_FLAGS)
    try:
        done = subprocess.run([*prefix, "--", sys.executable, "-I", "-S", "-c", ""],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return (), f"unshare failed: {exc}"
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip().splitlines()
        return (), f"unshare not permitted: {message[-1] if message else done.returncode}"
    return prefix, ""


def _interpreters() -> list[str]:
    """Candidate interpreters for samples, the harness's own base installation first."""
    found: list[str] = []
    candidates = [getattr(sys, "_base_executable", ""), sys.executable, "/usr/bin/python3",
                  "/usr/local/bin/python3", shutil.which("python3", path=SAFE_PATH) or ""]
    for path in candidates:
        real = os.path.realpath(path) if path else ""
        if real and os.path.isfile(real) and os.access(real, os.X_OK) and real not in found:
            found.append(real)
    return found


def _interpreter_info(interpreter: str) -> dict | None:
    try:
        done = subprocess.run([interpreter, "-I", "-c", _INFO], stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=30, check=False, env={"PATH": SAFE_PATH, "LANG": "C.UTF-8"})
        return json.loads(done.stdout.decode().strip().splitlines()[-1]) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def _under(path: str, folders: list[str]) -> bool:
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)


def mount_spec(info: dict) -> dict:
    """What the sample's private root holds: system folders and the interpreter's installation,
    read-only, with its site-packages masked (third-party packages and whatever data they ship
    stay out of reach; samples get the standard library)."""
    symlinks, binds = [], []
    for name in SYSTEM_DIRS:
        path = "/" + name
        if os.path.islink(path):
            symlinks.append([path, os.readlink(path)])
        elif os.path.isdir(path):
            binds.append(path)
    for key in ("prefix", "base_prefix", "exec_prefix", "base_exec_prefix"):
        real = os.path.realpath(info[key])
        if os.path.isdir(real) and not _under(real, binds):
            binds.append(real)
    hide = sorted({os.path.realpath(p) for p in info["site"] if _under(os.path.realpath(p), binds)})
    return {"binds": binds, "symlinks": symlinks, "hide": hide,
            "etc": [p for p in ETC_FILES if os.path.lexists(p)]}


def _detect() -> Setup:
    """Probe the launch chain with a harmless program and record what really took effect."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        raise SmallCoderError(f"the sandbox needs Linux (/proc, rlimits), this is {sys.platform}")
    root = os.geteuid() == 0
    prefix, ns_problem = _namespace_prefix(root)
    limits = Limits(timeout=30.0)
    strays = tuple(world_writable_folders())
    tried: list[str] = []
    for switch_uid in ((True, False) if root else (False,)):
        for interpreter in _interpreters():
            info = _interpreter_info(interpreter)
            spec = mount_spec(info) if info and prefix else None
            for mounts in ((spec, None) if spec else (None,)):
                candidate = Setup(interpreter, prefix, switch_uid, mounts, {}, strays)
                code = (_PROBE.replace("@NAMES@", repr(_RLIMITS))
                        .replace("@HIDDEN@", repr([os.path.abspath(__file__), "/run", "/var", "/home"]))
                        .replace("@SITE@", repr((mounts or {}).get("hide", []))))
                result, stdout = execute(candidate, code, limits, keep_stdout=True)
                label = f"{interpreter}{' as a sample uid' if switch_uid else ''}" \
                        f"{' with private mounts' if mounts else ''}"
                try:
                    probe = json.loads(stdout.decode().strip().splitlines()[0])
                except (ValueError, IndexError):
                    tried.append(f"{label}: {result.status} {result.detail}")
                    continue
                if result.status == "passed":
                    report = _report(candidate, probe, limits, root, ns_problem, tried)
                    return Setup(interpreter, prefix, switch_uid, mounts, report, strays)
                tried.append(f"{label}: {result.status} {result.detail}")
    raise SmallCoderError("the sandbox cannot run a harmless probe program: " + "; ".join(tried))


def _report(setup: Setup, probe: dict, limits: Limits, root: bool, ns_problem: str,
            tried: list[str]) -> dict[str, bool | str]:
    expected = rlimits(limits, setup.switch_uid)
    rl = {name: probe["rlimits"].get(name) == expected[name] for name in _RLIMITS}
    if not root:  # the user's process count (part of the budget) may have moved since the probe
        seen, want = probe["rlimits"]["RLIMIT_NPROC"][0], expected["RLIMIT_NPROC"][0]
        rl["RLIMIT_NPROC"] = 0 < seen <= want + 64
    ns = bool(setup.unshare)
    own_uid = setup.switch_uid and probe["uid"] >= UID_BASE and probe["euid"] == probe["uid"]
    mounted = setup.mounts is not None
    allowed = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "dev", "proc", "tmp"}
    allowed |= {p.split("/")[1] for p in (setup.mounts or {}).get("binds", [])}
    allowed |= {tempfile_top()}

    def private(size: int | None) -> bool:
        return mounted and size is not None and abs(size - limits.disk_bytes) <= 1 << 16

    report: dict[str, bool | str] = {
        "harness_root": root,
        "unprivileged_uid": own_uid or not root,
        "separate_uid_per_sample": own_uid,
        "network_namespace": ns and probe["ifaces"] == ["lo"],
        "pid_namespace": ns and probe["pid"] <= 3,
        "private_proc": ns and probe["procs_visible"] <= 3,
        "ipc_namespace": ns and "--ipc" in setup.unshare,
        "private_mounts": mounted and set(probe["root"]) <= allowed,
        "host_files_hidden": mounted and not probe["hidden_visible"],
        "private_tmp": private(probe["tmp_bytes"]),
        "private_dev_shm": private(probe["shm_bytes"]),
        "bounded_work_folder": private(probe["work_bytes"]),
        "python_read_only": mounted and bool(probe["python_read_only"]),
        "site_packages_hidden": mounted and not probe["site_packages"],
        "no_capabilities": probe["cap_eff"] == 0,
        "no_new_privs": bool(probe["no_new_privs"]),
        "rlimit_as": rl["RLIMIT_AS"],
        "rlimit_cpu": rl["RLIMIT_CPU"],
        "rlimit_nproc": rl["RLIMIT_NPROC"] and (own_uid or not root),
        "rlimit_fsize": rl["RLIMIT_FSIZE"],
        "rlimit_nofile": rl["RLIMIT_NOFILE"],
        "rlimit_core": rl["RLIMIT_CORE"],
        "isolated_mode": probe["isolated"] == 1,
        "scrubbed_env": set(probe["env"]) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE"},
        "stdin_devnull": probe["stdin"] == "/dev/null",
        "process_group_kill": True,
        "dies_with_harness": True,  # the lifeline pipe (tests kill a harness to show it)
        "uid_sweep": own_uid,
        "stray_file_cleanup": own_uid,  # with private mounts there is nothing to clean on the host
        "verdict_outside_sample": True,  # code benchmarks: the trusted checker decides
        "interpreter": f"{setup.interpreter} (Python {probe['version']})",
        "namespaces": " ".join(os.path.basename(a) if i == 0 else a
                               for i, a in enumerate(setup.unshare)) if ns else ns_problem,
    }
    if not mounted:
        report["mounts"] = "no private mounts here: " + ("; ".join(t for t in tried if "private mounts" in t)
                                                         or ns_problem or "not tried")
    if own_uid:
        report["sample_uid"] = f"one-off uid per sample in {UID_BASE}-{UID_BASE + UID_SPAN - 1}"
    elif root:
        report["sample_uid"] = ("root: no interpreter runs as an unprivileged uid here ("
                                + "; ".join(tried) + "), so RLIMIT_NPROC is ignored and files are "
                                "not protected")
    elif mounted:
        report["sample_uid"] = (f"the harness's own uid {os.getuid()} (root of a user namespace, without "
                                "capabilities); its files are not visible to the sample (private mounts); "
                                "RLIMIT_NPROC is the user's current process count plus max_processes")
    else:
        report["sample_uid"] = (f"the harness's own uid {os.getuid()}: the sample can touch this "
                                "user's files; RLIMIT_NPROC is the user's current process count "
                                "plus max_processes")
    return report


def tempfile_top() -> str:
    """The first path component of the folder the work folders are made in."""
    import tempfile

    return os.path.realpath(tempfile.gettempdir()).split("/")[1]
