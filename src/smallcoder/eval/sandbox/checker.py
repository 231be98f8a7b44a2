"""The trusted side of a checked run: the benchmark's own test code, with the sample behind proxies.

Runs in a sandbox of its own (another one-off uid, its own namespaces), so neither the sample nor
a broken test can reach the host, and the sample cannot reach this process: the two share only
the call and reply pipes. The test code runs here exactly as written (HumanEval's
`check(candidate)`, MBPP's asserts, EvalPlus's differential comparison), with the names it calls
bound to `Candidate` proxies: each call sends its arguments to the sample and gets back a plain
value through the strict codec. A patched builtin, a jumped line or a forged `__eq__` in the
sample changes nothing here. The verdict goes to the harness on a pipe the sample never sees.

Job (job.json in the work folder): setup (benchmark code run first: a HumanEval prompt's imports
and helpers), test (the test code), functions (names that live in the sample), refs (names of
objects the sample-side setup made, passed to the sample by reference), values (encoded plain
values bound before the test runs), collect (a name whose value goes back with the verdict),
max_reply_bytes. Verdict: {"verdict": "passed" | "failed" | "fault", "detail": ..., "collected":
...}; "fault" means the sample broke the protocol or went away, and the harness says how.

Stdlib only, `codec.py` executed into the same globals first (see the launcher).
"""

import builtins
import json
import os
import sys
import traceback

# builtin exceptions a sample's raise is re-raised as, so a test's `except ValueError` behaves as
# it would in one process; anything else arrives as CandidateError
_EXCEPTIONS = {name: obj for name, obj in vars(builtins).items()
               if isinstance(obj, type) and issubclass(obj, Exception) and not issubclass(obj, Warning)}


class SampleFault(BaseException):
    """The sample died, sent something that is not a reply, or a value over the limit."""


class SampleExit(BaseException):
    """The sample's function raised SystemExit/KeyboardInterrupt: in one process this would have
    ended the program before the tests finished, so no test code may catch it."""


class CandidateError(Exception):
    """The sample's function raised an exception of a type that is not a builtin."""


class Remote:
    """An object that lives in the sample's process (made by the sample-side setup)."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"<object {self.name} in the sample>"


class Channel:
    def __init__(self, call_fd, reply_fd, limit):
        self.call_fd, self.reply_fd, self.limit = call_fd, reply_fd, limit
        self.fault = None   # the first protocol fault; sticks even if test code swallows it
        self.gone = False   # the fault is that the sample's process ended
        self.calls = 0

    def fail(self, why):
        if self.fault is None:
            self.fault = why
        raise SampleFault(self.fault)

    def receive(self):
        if self.fault is not None:
            raise SampleFault(self.fault)
        try:
            data = recv(self.reply_fd, self.limit)  # noqa: F821 - from codec.py
        except CodecError as exc:  # noqa: F821
            self.fail(f"the sample sent a bad reply: {exc}")
        except OSError as exc:
            self.fail(f"the reply pipe failed: {exc}")
        if data is None:
            self.gone = True
            self.fail("the sample's process ended before answering")
        try:
            return loads_message(data)  # noqa: F821
        except CodecError as exc:  # noqa: F821
            self.fail(f"the sample sent a bad reply: {exc}")

    def call(self, name, args, kwargs, cpu_limit):
        if self.fault is not None:
            raise SampleFault(self.fault)
        ref = lambda v: v.name if isinstance(v, Remote) else None
        message = {"call": name, "args": [encode(a, ref) for a in args],  # noqa: F821
                   "kwargs": [[str(k), encode(v, ref)] for k, v in kwargs.items()],  # noqa: F821
                   "cpu_limit": cpu_limit}
        try:
            send(self.call_fd, dumps_message(message))  # noqa: F821
        except OSError:
            self.gone = True
            self.fail("the sample's process ended before the call")
        self.calls += 1
        reply = self.receive()
        cpu = reply.get("cpu")
        cpu = float(cpu) if type(cpu) in (int, float) else 0.0
        if "return" in reply:
            try:
                return decode(reply["return"]), cpu  # noqa: F821
            except CodecError as exc:  # noqa: F821
                self.fail(f"{name} returned something that is not a plain value ({exc})")
            except RecursionError:
                self.fail(f"{name} returned a value nested too deeply")
        if "unsupported" in reply:
            raise TypeError(f"{name} returned a value that is not plain data ({str(reply['unsupported'])[:300]})")
        raised = reply.get("raise")
        if type(raised) is list and len(raised) == 2 and all(type(x) is str for x in raised):
            kind, text = raised
            if kind in ("SystemExit", "KeyboardInterrupt", "GeneratorExit"):
                raise SampleExit(f"{name} raised {kind}")
            cls = _EXCEPTIONS.get(kind)
            if cls is not None:
                try:
                    error = cls(text)
                except Exception:  # noqa: BLE001 - e.g. UnicodeDecodeError needs five arguments
                    error = CandidateError(f"{kind}: {text}")
            else:
                error = CandidateError(f"{kind}: {text}")
            error.smallcoder_from_sample = name
            raise error
        self.fail("the sample sent a reply of no known kind")


class Candidate:
    """Stands for a function of the sample: calling it calls the sample's function."""

    def __init__(self, channel, name):
        self._channel, self.__name__ = channel, name
        self.cpu_limit = None   # per-call CPU budget (EvalPlus-style limits); None: the run's
        self.last_cpu = 0.0     # CPU seconds the last call took, as the sample reported it

    def __call__(self, *args, **kwargs):
        value, self.last_cpu = self._channel.call(self.__name__, args, kwargs, self.cpu_limit)
        return value

    def __repr__(self):
        return f"<function {self.__name__} of the sample>"


def _describe(exc):
    """One line for a failed test: the exception and, for a sample's raise, whose it was."""
    line = traceback.format_exception_only(type(exc), exc)[-1].strip()
    if isinstance(exc, CandidateError):
        line = str(exc)
    origin = getattr(exc, "smallcoder_from_sample", None)
    if origin is not None:
        return f"{line} (raised by the sample's {origin})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "test.py"]
    if frames and isinstance(exc, AssertionError):
        return f"{line} (test line {frames[-1].lineno})"
    return line


def run(job, call_fd, reply_fd):
    channel = Channel(call_fd, reply_fd, int(job["max_reply_bytes"]))
    try:
        ready = channel.receive()
    except SampleFault:
        return {"verdict": "fault", "detail": channel.fault, "gone": channel.gone}
    if ready != {"ready": True}:
        return {"verdict": "fault", "detail": "the sample did not start the protocol"}
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    if job.get("setup"):
        exec(compile(job["setup"], "setup.py", "exec"), namespace)  # noqa: S102 - benchmark code, in its sandbox
    for name, value in job.get("values", {}).items():
        namespace[name] = decode(value)  # noqa: F821
    for name in job.get("refs", []):
        namespace[name] = Remote(name)
    for name in job["functions"]:
        namespace[name] = Candidate(channel, name)
    result = {"verdict": "passed", "detail": ""}
    try:
        exec(compile(job["test"], "test.py", "exec"), namespace)  # noqa: S102 - benchmark code, in its sandbox
    except SampleFault:
        pass
    except SampleExit as exc:
        result = {"verdict": "failed", "detail": f"{exc} (the program would have ended before its tests)"}
    except BaseException as exc:  # noqa: BLE001 - a failed test, whatever it raised
        result = {"verdict": "failed", "detail": _describe(exc)}
    if channel.fault is not None:  # a fault is the verdict even if the test code swallowed it
        return {"verdict": "fault", "detail": channel.fault, "gone": channel.gone, "calls": channel.calls}
    result["calls"] = channel.calls
    if job.get("collect") and result["verdict"] == "passed":
        result["collected"] = encode(namespace.get(job["collect"]))  # noqa: F821
    return result


if __name__ == "smallcoder_checker":
    call_fd, reply_fd, verdict_fd = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    with open(sys.argv[6], "rb") as f:
        job = json.loads(f.read())
    try:
        verdict = run(job, call_fd, reply_fd)
    except BaseException as exc:  # noqa: BLE001 - a broken job or benchmark: the harness's error
        verdict = {"verdict": "error", "detail": "".join(traceback.format_exception_only(type(exc), exc)).strip()}
    send(verdict_fd, dumps_message(verdict))  # noqa: F821
    sys.stdout.flush()
    os._exit(0)
