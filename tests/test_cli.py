"""The `smallcoder` command, run in-process through `cli.main` (plus two real-process checks)."""

from __future__ import annotations

import builtins
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smallcoder import Engine, SamplingParams, format_chat, load
from smallcoder.cli import main

CHECKPOINT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "generation_config.json"}


@pytest.fixture(scope="module")
def tok_dir(small_tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    small_tokenizer.save(folder)
    return folder


@pytest.fixture(scope="module")
def engine(micro_checkpoint) -> Engine:
    model, tokenizer = load(micro_checkpoint)
    return Engine(model, tokenizer)


def _error_line(err: str) -> str:
    """The CLI's one-line error (no traceback)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("smallcoder: error: ")
    return lines[0]


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---- help --------------------------------------------------------------------------------------


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("init", "generate", "chat", "train", "eval", "data", "tokenizer"):
        assert re.search(rf"^    {cmd}\b", out, re.MULTILINE), cmd


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: smallcoder" in capsys.readouterr().out


# ---- init --------------------------------------------------------------------------------------


def _init(tok_dir: Path, out: Path, *extra: str) -> int:
    return main(["init", "--preset", "tiny", "--tokenizer", str(tok_dir), "--out", str(out), *extra])


def test_init_seeds_refusal_and_force(tok_dir, tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert _init(tok_dir, a, "--seed", "3") == 0
    out = capsys.readouterr().out
    assert f"wrote {a}: preset tiny" in out and "seed 3" in out
    assert CHECKPOINT_FILES <= {p.name for p in a.iterdir()}
    model, tok = load(a)
    assert model.config.hidden_size == 256 and model.config.num_hidden_layers == 6
    assert model.config.vocab_size == tok.vocab_size
    assert model.config.eos_token_id == tok.eos_id

    assert _init(tok_dir, b, "--seed", "3") == 0
    assert _init(tok_dir, c, "--seed", "4") == 0
    wa, wb, wc = (load_file(str(d / "model.safetensors")) for d in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["lm_head.weight"], wc["lm_head.weight"])
    assert not torch.equal(wa["model.layers.0.mlp.up_proj.weight"], wc["model.layers.0.mlp.up_proj.weight"])
    capsys.readouterr()

    # a non-empty folder is refused without --force, untouched
    before = _tree(a)
    assert _init(tok_dir, a, "--seed", "4") == 2
    line = _error_line(capsys.readouterr().err)
    assert str(a) in line and "not empty" in line
    assert _tree(a) == before

    # --force replaces it
    assert _init(tok_dir, a, "--seed", "4", "--force") == 0
    wa2 = load_file(str(a / "model.safetensors"))
    assert all(torch.equal(wa2[k], wc[k]) for k in wc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp folders left


def test_init_unknown_preset(tok_dir, tmp_path, capsys):
    code = main(["init", "--preset", "huge", "--tokenizer", str(tok_dir), "--out", str(tmp_path / "x")])
    assert code == 2
    line = _error_line(capsys.readouterr().err)
    assert "unknown preset 'huge'" in line and "smallcoder-303m" in line and "tiny" in line
    assert not (tmp_path / "x").exists()


def test_init_bad_dtype(tok_dir, tmp_path, capsys):
    assert _init(tok_dir, tmp_path / "x", "--dtype", "int4") == 2
    assert "unknown dtype 'int4'" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_init_force_on_a_full_disk_is_one_line_and_keeps_the_old_folder(tok_dir, tmp_path, capsys, monkeypatch):
    """ENOSPC while `init --force` writes the weights (as safetensors reports it): one line, exit 2,
    the old folder intact and no temporary folder left."""
    import smallcoder.checkpoint as ckpt

    a = tmp_path / "a"
    assert _init(tok_dir, a, "--seed", "3") == 0
    before = _tree(a)
    capsys.readouterr()

    def full(*args, **kw):
        raise ckpt.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", full)
    assert _init(tok_dir, a, "--seed", "4", "--force") == 2
    line = _error_line(capsys.readouterr().err)
    assert str(a) in line and "No space left on device" in line
    assert _tree(a) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_init_force_on_a_real_full_tmpfs(tok_dir, tmp_path, capsys):
    """The same on a real 40 MB tmpfs (root only): the second copy of a 25 MB model does not fit."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)],
                                           capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        a = mnt / "a"
        assert _init(tok_dir, a, "--seed", "3") == 0
        before = _tree(a)
        capsys.readouterr()
        assert _init(tok_dir, a, "--seed", "4", "--force") == 2
        line = _error_line(capsys.readouterr().err)
        assert str(a) in line and "No space left on device" in line
        assert _tree(a) == before
        assert sorted(p.name for p in mnt.iterdir()) == ["a"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("sub", ["sub", "sub/deeper"])
def test_init_out_under_a_file_is_one_line(tok_dir, tmp_path, capsys, sub):
    (tmp_path / "file").write_text("not a folder")
    assert _init(tok_dir, tmp_path / "file" / sub) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"{tmp_path / 'file'} is a file, not a folder" in line
    assert (tmp_path / "file").read_text() == "not a folder"


def test_generate_with_a_non_numeric_rms_norm_eps_is_one_line(micro_checkpoint, tmp_path, capsys):
    import json

    model = tmp_path / "m"
    shutil.copytree(micro_checkpoint, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["rms_norm_eps"] = "tiny"
    (model / "config.json").write_text(json.dumps(cfg))
    assert main(["generate", "--model", str(model), "--prompt", "x", "--max-new-tokens", "1"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"{model / 'config.json'}" in line and "'rms_norm_eps'" in line and "'tiny'" in line


# ---- generate ----------------------------------------------------------------------------------

PROMPT = "def add(a, b):"


def test_generate_matches_engine(micro_checkpoint, engine, capsys):
    want = engine.generate([PROMPT], SamplingParams(max_new_tokens=5))[0]
    assert want.text  # a non-trivial comparison
    code = main(["generate", "--model", str(micro_checkpoint), "--prompt", PROMPT, "--max-new-tokens", "5"])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out == want.text + "\n"
    assert captured.err == ""


@pytest.mark.parametrize("kv", ["fp16", "int8"])
def test_generate_kv_cache_choice_reaches_the_engine(micro_checkpoint, small_tokenizer, capsys, monkeypatch, kv):
    """--kv-cache sets the engine's cache dtype; the text is the engine's with that cache."""
    import torch

    from smallcoder import load

    dtype = {"fp16": torch.float16, "int8": torch.int8}[kv]
    model, tok = load(micro_checkpoint)
    want = Engine(model, tok, kv_dtype=dtype).generate([PROMPT], SamplingParams(max_new_tokens=5))[0]
    seen = []
    real = Engine.__init__

    def init(self, *a, **kw):
        real(self, *a, **kw)
        seen.append(self.kv_dtype)

    monkeypatch.setattr(Engine, "__init__", init)
    assert main(["generate", "--model", str(micro_checkpoint), "--prompt", PROMPT, "--max-new-tokens", "5",
                 "--kv-cache", kv]) == 0
    assert capsys.readouterr().out == want.text + "\n"
    assert seen == [dtype]


def test_generate_unknown_kv_cache_is_one_line(micro_checkpoint, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(micro_checkpoint), "--prompt", "x", "--kv-cache", "q4"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--kv-cache" in err and "'q4'" in err and "int8" in err


def record_prompts(monkeypatch) -> list[str]:
    """Make Engine.stream record each prompt it is given; return the list it fills."""
    prompts: list[str] = []
    real_stream = Engine.stream

    def stream(self, prompt, params=None):
        prompts.append(prompt)
        return real_stream(self, prompt, params)

    monkeypatch.setattr(Engine, "stream", stream)
    return prompts


def test_generate_chat_wraps_prompt(micro_checkpoint, engine, capsys, monkeypatch):
    prompts = record_prompts(monkeypatch)
    want = engine.generate([format_chat("hello there")], SamplingParams(max_new_tokens=6))[0]
    code = main(["generate", "--model", str(micro_checkpoint), "--prompt", "hello there", "--chat",
                 "--max-new-tokens", "6"])
    assert code == 0
    assert prompts == ["User: hello there\nAssistant:"]
    assert capsys.readouterr().out == want.text.lstrip() + "\n"


def test_generate_prompt_from_stdin(micro_checkpoint, engine, capsys, monkeypatch):
    text = "for i in range(10):\n"
    want = engine.generate([text], SamplingParams(max_new_tokens=5))[0]
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    assert main(["generate", "--model", str(micro_checkpoint), "--prompt", "-", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == want.text + "\n"


@pytest.mark.parametrize("dtype", ["float8", "int4"])
def test_generate_bad_dtype(micro_checkpoint, capsys, dtype):
    code = main(["generate", "--model", str(micro_checkpoint), "--prompt", "x", "--dtype", dtype])
    assert code == 2
    line = _error_line(capsys.readouterr().err)
    assert f"unknown dtype '{dtype}'" in line and "float32, bfloat16 or float16" in line


def test_generate_prompt_too_long(micro_checkpoint, small_tokenizer, capsys):
    prompt = "The quick brown fox jumps over the lazy dog. " * 30
    n = len(small_tokenizer.encode(prompt))
    assert n > 128
    args = ["generate", "--model", str(micro_checkpoint), "--prompt", prompt, "--max-new-tokens", "4"]
    assert main(args) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"prompt is {n} tokens" in line and "context is 128 tokens" in line
    assert f"{n - 128 + 1} token(s) too long" in line

    assert main(args + ["--truncate"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.endswith("\n")


def test_generate_missing_model(tmp_path, capsys):
    missing = tmp_path / "no-such-checkpoint"
    assert main(["generate", "--model", str(missing), "--prompt", "x"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(missing) in line and "no such file or folder" in line


def test_generate_bad_sampling_value(micro_checkpoint, capsys):
    assert main(["generate", "--model", str(micro_checkpoint), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p must be in (0, 1]" in _error_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", [["serve", "--model", "nowhere"], ["train"]])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_threads_are_checked_alike_by_every_command(command, value, capsys):
    assert main([*command, "--threads", value]) == 2
    assert _error_line(capsys.readouterr().err) == f"smallcoder: error: --threads must be a positive integer, got {value}"


def test_export_without_the_export_extra_is_one_line(micro_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", str(micro_checkpoint), "--format", "gguf", "--out", str(out)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "gguf is not installed" in line and "pip install 'smallcoder[export]'" in line
    assert not out.exists()


# ---- chat --------------------------------------------------------------------------------------


def test_chat_history_and_reset(micro_checkpoint, capsys, monkeypatch):
    lines = iter(["hello", "how are you", "", "/reset", "again"])

    def fake_input(prompt=""):
        print(prompt, end="")
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    prompts, answers = [], []
    real_stream = Engine.stream

    def stream(self, prompt, params=None):
        prompts.append(prompt)
        pieces = []
        for piece in real_stream(self, prompt, params):
            pieces.append(piece)
            yield piece
        answers.append("".join(pieces).strip())

    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr(Engine, "stream", stream)
    code = main(["chat", "--model", str(micro_checkpoint), "--max-new-tokens", "8", "--seed", "0"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"chatting with {micro_checkpoint}")
    assert len(prompts) == 3  # the empty line asks nothing
    assert any(answers), "the model said nothing at all; the history check would be vacuous"
    hello = {"role": "user", "content": "hello"}
    assert prompts[0] == format_chat([hello])
    assert prompts[1] == format_chat([hello, {"role": "assistant", "content": answers[0]},
                                      {"role": "user", "content": "how are you"}])
    assert prompts[1].startswith(prompts[0])
    assert prompts[2] == format_chat([{"role": "user", "content": "again"}])  # /reset cleared it
    assert "(history cleared)" in out
    assert out.count("Assistant: ") == 3
    for answer in answers:
        assert f"Assistant: {answer}\n" in out


def test_chat_system_survives_reset(micro_checkpoint, capsys, monkeypatch):
    lines = iter(["hi", "/reset", "bye", "/quit", "never read"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    prompts = record_prompts(monkeypatch)
    code = main(["chat", "--model", str(micro_checkpoint), "--system", "Be brief.", "--max-new-tokens", "3"])
    assert code == 0
    assert prompts == ["Be brief.\nUser: hi\nAssistant:", "Be brief.\nUser: bye\nAssistant:"]
    assert next(lines) == "never read"


# ---- real processes: the installed script and `python -m` ---------------------------------------


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)


def test_console_script_user_error(tmp_path):
    script = shutil.which("smallcoder", path=str(Path(sys.executable).parent)) or shutil.which("smallcoder")
    if script is None:
        pytest.skip("the smallcoder console script is not installed")
    missing = tmp_path / "missing-model"
    r = _run([script, "generate", "--model", str(missing), "--prompt", "x"])
    assert r.returncode == 2
    assert str(missing) in _error_line(r.stderr)
    assert r.stdout == ""


def test_python_m_user_error(tok_dir, tmp_path):
    r = _run([sys.executable, "-m", "smallcoder", "init", "--preset", "nope", "--tokenizer", str(tok_dir),
              "--out", str(tmp_path / "x")])
    assert r.returncode == 2
    assert "unknown preset 'nope'" in _error_line(r.stderr)


def test_ctrl_c_stops_the_answer_not_the_chat(micro_checkpoint, capsys, monkeypatch):
    """Ctrl-C while an answer streams ends that answer (the engine's stream is closed, which
    cancels it) and the chat goes on; the next answer is the one a fresh chat would give; each
    answer ends with a line saying why it ended and how fast it ran."""
    import signal

    lines = iter(["first", "second"])

    def fake_input(prompt=""):
        print(prompt, end="")
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    real_stream = Engine.stream
    pieces_seen = []

    def stream(self, prompt, params=None):
        inner = real_stream(self, prompt, params)
        try:
            while True:
                piece = next(inner)
                pieces_seen.append(piece)
                if len(pieces_seen) == 2:  # Ctrl-C arrives during the first answer
                    signal.raise_signal(signal.SIGINT)
                yield piece
        except StopIteration as end:
            return end.value
        finally:
            inner.close()

    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr(Engine, "stream", stream)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup
    assert main(["chat", "--model", str(micro_checkpoint), "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    summaries = [x for x in captured.err.splitlines() if x.startswith("[")]
    assert len(summaries) == 2 and summaries[0].startswith("[stopped (Ctrl-C)"), captured.err
    assert re.match(r"\[(end of answer \((EOS|stop string .+)\)|max-new-tokens reached); \d+ tokens(, [\d.]+ tok/s)?; "
                    r"prompt \d+ tokens, first piece [\d.]+ s\]$", summaries[1]), summaries[1]
    assert signal.getsignal(signal.SIGINT) == before  # the handler is put back


def test_generate_verbose_prints_a_summary_on_stderr(micro_checkpoint, capsys):
    assert main(["generate", "--model", str(micro_checkpoint), "--prompt", "def f(", "--max-new-tokens", "5",
                 "--verbose"]) == 0
    captured = capsys.readouterr()
    assert re.fullmatch(r"\[(end of answer \(EOS\)|max-new-tokens reached); \d+ tokens(, [\d.]+ tok/s)?; "
                        r"prompt \d+ tokens, first piece [\d.]+ s\]\n", captured.err), captured.err
    assert main(["generate", "--model", str(micro_checkpoint), "--prompt", "def f(", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().err == ""


def test_help_shows_the_defaults(capsys):
    """Every command's --help names its options' defaults (argparse alone shows none)."""
    for argv, shown in ((["generate"], ["(default: 256)", "(default: float32)", "(default: 0.0)"]),
                        (["chat"], ["(default: 512)", "(default: 0.2)"]),
                        (["init"], ["(default: 0)"]),
                        (["eval"], []), (["train"], []), (["serve"], []), (["data", "pack"], [])):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        out = capsys.readouterr().out
        assert all(s in out for s in shown), (argv, out)
        assert "(default: None)" not in out and "(default: False)" not in out
        assert "default" in out, argv


def test_suggested_commands_run_as_this_one_did(tmp_path, monkeypatch):
    """#17 item 2: the command a message suggests ("chat with it: ...") is the one that works here: bare
    `smallcoder` only where PATH finds this install, else the path it was started by."""
    from smallcoder import cli

    script = tmp_path / ".venv" / "bin" / "smallcoder"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "argv", [".venv/bin/smallcoder", "train"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert cli.program_name() == ".venv/bin/smallcoder"                 # venv not activated
    monkeypatch.setattr(shutil, "which", lambda name: str(script) if name == "smallcoder" else None)
    assert cli.program_name() == "smallcoder"                           # activated: PATH finds this one
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "pkg" / "__main__.py")])
    assert cli.program_name() == f"{sys.executable} -m smallcoder"      # python -m, that python not on PATH


def test_chat_from_a_pipe_shows_each_line_after_its_prompt(micro_checkpoint, capsys, monkeypatch):
    """Piped in, the transcript reads as a terminal session: `User: <line>`, then the answer."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", "--model", str(micro_checkpoint), "--max-new-tokens", "4", "--seed", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:3] == ["", "User: hello"] and out[3].startswith("Assistant: ")


def test_serve_loads_the_model_on_a_thread_that_then_exits():
    """`serve` loads on a passing thread, so the load's OpenMP pool does not stay beside the engine
    thread's (two pools on 2 cores made every decode-step barrier sleep); results and errors come back."""
    import threading

    from smallcoder.errors import SmallCoderError
    from smallcoder.serve.cli import _on_a_passing_thread

    seen = []

    def work():
        seen.append(threading.current_thread())
        return 42

    assert _on_a_passing_thread(work) == 42
    assert seen[0] is not threading.main_thread() and not seen[0].is_alive()

    def fail():
        raise SmallCoderError("runs/x/config.json: file not found")

    with pytest.raises(SmallCoderError, match="file not found"):
        _on_a_passing_thread(fail)
