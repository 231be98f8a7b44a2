"""The sample side of a checked run: run the sample's code, then answer the checker's calls.

Runs inside the sandbox as the sample's own process, with `codec.py` executed into the same
globals first (the launcher passes both sources on the command line: the package is not
reachable in there). Nothing here is trusted: the sample can rewrite any of it at run time,
and that changes nothing, because the only thing that leaves this process is what `encode`
can express, and the checker decodes it into plain values of its own.

Protocol (length-prefixed JSON on two inherited pipes): after the sample's code and the
benchmark's sample-side setup ran, send {"ready": true}; then for each {"call": name, "args":
[...], "kwargs": [[k, v], ...], "cpu_limit": seconds or null} answer {"return": value, "cpu": s},
{"raise": [type name, message], "cpu": s} or {"unsupported": why, "cpu": s}. End of file on the
call pipe ends the process.
"""

import os
import resource
import sys
import time
import traceback

MAX_MESSAGE = 256 << 20  # calls come from the trusted side; this only bounds a broken one


def _read(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "surrogatepass")


def _exception_text(exc):
    try:
        return str(exc)[:2000]
    except BaseException:  # noqa: BLE001 - a hostile __str__
        return "(message not printable)"


def _set_cpu_limit(seconds):
    """Lower the soft CPU limit to this call's budget (the hard limit stays the run's)."""
    if seconds is None:
        return
    used = time.process_time()
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    want = int(used + seconds) + 1
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (want, hard))


def main(call_fd, reply_fd, sample_path, setup_path):
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(_read(sample_path), "sample.py", "exec"), namespace)  # noqa: S102 - an error ends the run here
    if setup_path and os.path.exists(setup_path):
        exec(compile(_read(setup_path), "test_setup.py", "exec"), namespace)  # noqa: S102
    send(reply_fd, dumps_message({"ready": True}))  # noqa: F821 - from codec.py

    def resolve(name):
        if name not in namespace:
            raise NameError(f"name {name!r} is not defined")
        return namespace[name]

    while True:
        data = recv(call_fd, MAX_MESSAGE)  # noqa: F821
        if data is None:
            return
        call = loads_message(data)  # noqa: F821
        start = time.process_time()
        try:
            args = [decode(a, resolve) for a in call["args"]]  # noqa: F821
            kwargs = {k: decode(v, resolve) for k, v in call["kwargs"]}  # noqa: F821
            function = resolve(call["call"])
            _set_cpu_limit(call.get("cpu_limit"))
            result = function(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - the checker decides what it means
            reply = {"raise": [type(exc).__name__, _exception_text(exc)]}
        else:
            try:
                reply = {"return": encode(result)}  # noqa: F821
            except CodecError as exc:  # noqa: F821
                reply = {"unsupported": str(exc)}
            except RecursionError:
                reply = {"unsupported": "the value is nested too deeply"}
        reply["cpu"] = time.process_time() - start
        send(reply_fd, dumps_message(reply))  # noqa: F821


if __name__ == "smallcoder_worker":
    try:
        main(int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - the sample's own error: shown as its traceback
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
