"""The README's examples, run in order in a fresh folder as a new user would, each one's output held
to what the README prints (rules: readme_examples.py). So an example can no longer collide with
the one before it, name a file that is not there, or print what the code no longer prints.

The run (marked `readme`, left out of the default `pytest`; `.ci/run` runs it after the suite, and
`pytest -m readme` runs it here): a fresh folder with `../shared` beside it (a link to this
checkout's), the package's venv first on PATH (what `source .venv/bin/activate` does), the user's
caches. It trains the quick start's model, so it takes minutes. `smallcoder serve` runs in the
background on a free port (the commands after it are pointed there) until the examples end; a
`chat` reads the lines the README shows after `User: `. With `SMALLCODER_README_RECORD=FILE` every
command's actual output is written to FILE (JSON lines); `python tests/readme_examples.py FILE` then
puts each output that no longer matches into README.md (check the diff; re-add `...` elisions).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO
from readme_examples import Block, Command, blocks, mismatch

SHARED = REPO.parent / "shared"
LIVENESS_S = 3600  # a bound on a hung command, not a speed target


def test_readme_blocks_parse():
    """Fast: every example block parses, and every skipped block says why (runs in the default suite)."""
    found, skipped = blocks((REPO / "README.md").read_text(encoding="utf-8"))
    commands = [c for b in found if b.kind == "shell" for c in b.commands]
    assert commands[0].program == "train", "the first example is the quick start's main job"
    assert len(commands) >= 20 and all(c.text.strip() for c in commands)
    assert all(reason.strip() for _, reason in skipped)
    for c in commands:
        assert "/tmp/" not in c.text, f"README.md:{c.line}: examples write under the run folder, not /tmp"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A `smallcoder serve` example, kept running in the background until the examples end."""

    def __init__(self, command: Command, cwd: Path, env: dict[str, str], port: int):
        self.proc = subprocess.Popen(["bash", "-c", f"exec {command.text} --port {port}"], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = port

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("serving "):
                self.ready.set()
        self.ready.set()

    def wait_ready(self) -> None:
        self.ready.wait(LIVENESS_S)
        deadline = time.monotonic() + LIVENESS_S
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("the server example exited:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _stdin_for(command: Command) -> str | None:
    if command.program != "chat":
        return None
    return "".join(line[len("User: "):] + "\n" for line in command.expected if line.startswith("User: "))


def _check(command: Command, status: int, output: str, record, problems: list[str]) -> None:
    """Note how the command's run differs from the README (all are reported at the end, so one run
    shows every stale example; the later ones usually still run on what the earlier ones wrote)."""
    lines = output.splitlines()
    if record:
        record.write(json.dumps({"line": command.line, "command": command.text, "status": status, "output": lines}) + "\n")
    problem = mismatch(command.expected, lines, command.program)
    if status != command.expected_status:
        problem = f"exit status {status}, expected {command.expected_status}"
    if problem:
        problems.append(f"README.md:{command.line}: `{command.text.splitlines()[0]}`: {problem}\n"
                        f"--- its output ---\n{output[-3000:]}")


@pytest.mark.readme
def test_readme_examples_run_in_order(tmp_path):
    if not (SHARED / "data").is_dir():
        pytest.skip(f"{SHARED / 'data'} absent: the examples read the StarCoder tokenizer and benchmarks there")
    found, _ = blocks((REPO / "README.md").read_text(encoding="utf-8"))
    project = tmp_path / "smallcoder"
    project.mkdir()
    (tmp_path / "shared").symlink_to(SHARED)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONUNBUFFERED="1", COLUMNS="120")
    env.pop("SMALLCODER_DATA", None)
    record_path = os.environ.get("SMALLCODER_README_RECORD")
    record = open(record_path, "w", encoding="utf-8") if record_path else None  # noqa: SIM115
    servers: list[_Server] = []
    problems: list[str] = []
    try:
        for block in found:
            _run_block(block, project, env, servers, record, problems)
    finally:
        for server in servers:
            server.stop()
        if record:
            record.close()
    if problems:
        pytest.fail(f"{len(problems)} README example(s) differ from what they print:\n\n" + "\n\n".join(problems),
                    pytrace=False)


def _run_block(block: Block, project: Path, env: dict[str, str], servers: list[_Server], record,
               problems: list[str]) -> None:
    if block.kind == "python":
        for server in servers:  # the client examples talk to the server the README started
            block.source = block.source.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
        r = subprocess.run([sys.executable, "-c", block.source], check=False, cwd=project, env=env, capture_output=True,
                           text=True, timeout=LIVENESS_S)
        if r.returncode != 0:
            problems.append(f"README.md:{block.line}: the python example failed:\n{r.stderr[-3000:]}")
        return
    for command in block.commands:
        for server in servers:
            command.text = command.text.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
        if command.program == "serve":
            server = _Server(command, project, env, _free_port())
            servers.append(server)
            server.wait_ready()
            banner = [line for line in server.lines if not line.startswith(("INFO:", "WARNING:"))]
            _check(command, 0, "\n".join(banner[:len(command.expected)]) + "\n", record, problems)
            continue
        r = subprocess.run(["bash", "-c", command.text], check=False, cwd=project, env=env, input=_stdin_for(command),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=LIVENESS_S)
        _check(command, r.returncode, re.sub(r"\r", "", r.stdout), record, problems)


def test_masking_keeps_the_words_and_drops_what_varies():
    """The comparison rules: numbers, durations and a model's text (over any lines) are masked;
    any other change of wording, order or line count is a difference."""
    from readme_examples import mismatch

    chat = ["chatting with m (float32)", "", "User: hi", "Assistant: a b", "[end of answer (EOS); 3 tokens, 9.1 tok/s]"]
    ran = ["chatting with m (float32)", "", "User: hi", "Assistant: x", "y", "", "z",
           "[end of answer (EOS); 12 tokens, 1,230.5 tok/s]"]
    assert mismatch(chat, ran, "chat") is None
    assert mismatch(chat, ran[:-1] + ["[max-new-tokens reached; 12 tokens, 1.0 tok/s]"], "chat") is not None
    assert mismatch(["trained x into runs/t: 152 steps in 1 min 4 s"], ["trained x into runs/t: 9 steps in 49 s"],
                    "train") is None
    assert mismatch(["wrote runs/a: 3 files"], ["wrote runs/b: 3 files"], "data") is not None
    assert mismatch(["a", "...", "z"], ["a", "b", "c", "z"], "train") is None
    assert mismatch(["a", "...", "z"], ["a", "b"], "train") is not None
    assert mismatch(['{"id":"cmpl-1","text":"foo","n":3}'], ['{"id":"cmpl-2","text":"bar","n":4}'], "curl") is None
    assert mismatch(['{"text":"foo","stop":true}'], ['{"text":"bar","stop":false}'], "curl") is not None
