"""fsutil: folder replacement that a crash at any line leaves with the old or the new folder, the
recovery of leftovers, one-line errors for refused writes and file paths, and the run lock."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from smallcoder import fsutil
from smallcoder.errors import SmallCoderError

OLD = {"a.txt": "old a", "b.txt": "old b"}
NEW = {"a.txt": "new a", "c.txt": "new c", "d.txt": "new d"}
TRACED = (str(Path(fsutil.__file__).resolve()), str(Path(__import__("shutil").__file__).resolve()))


def _write(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def _state(folder: Path) -> str:
    """'old', 'new', 'missing' or a description of anything else under the target name."""
    if not os.path.lexists(folder):
        return "missing"
    files = {p.name: p.read_text() for p in folder.iterdir()}
    return "old" if files == OLD else "new" if files == NEW else f"mixed {sorted(files)}"


def _leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


def _crash_at_line(target: Path, k: int, exchange: bool) -> bool:
    """Replace `target` with NEW in a forked child that `os._exit`s at its k-th traced line
    (fsutil and shutil); True when the child crashed, False when it finished."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            if not exchange:
                fsutil._exchange = lambda a, b: False
            count = 0

            def tracer(frame, event, arg):
                nonlocal count
                if frame.f_code.co_filename not in TRACED:
                    return None
                if event == "line":
                    count += 1
                    if count == k:
                        os._exit(9)
                return tracer

            sys.settrace(tracer)
            threading.settrace(tracer)
            with fsutil.atomic_folder(target, overwrite=True) as tmp:
                _write(tmp, NEW)
            sys.settrace(None)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 9), f"child failed at line {k} (exit {code})"
    return code == 9


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
@pytest.mark.parametrize("start", ["old", "missing"])
def test_crash_at_every_line_leaves_old_or_new(tmp_path, exchange, start):
    """Crash the replacement at each line it runs: the target holds the old or the new folder at
    once (with rename-exchange), or after the recovery that the next use runs (two renames)."""
    if exchange and fsutil._renameat2() is None:
        pytest.skip("no renameat2 here")
    target = tmp_path / "out"
    seen_after = set()
    k = 0
    while True:
        k += 1
        assert k < 5000, "the replacement never finished"
        fsutil.shutil.rmtree(target, ignore_errors=True)
        if start == "old":
            _write(target, OLD)
        crashed = _crash_at_line(target, k, exchange)
        now = _state(target)
        if exchange or start == "missing":
            assert now in (start, "new"), f"crash at line {k}: target is {now}"
        fsutil.recover_folder(target)
        after = _state(target)
        assert after in (start, "new"), f"crash at line {k}: after recovery the target is {after}"
        assert _leftovers(target) == [], f"crash at line {k}: leftovers {_leftovers(target)}"
        seen_after.add(after)
        if not crashed:
            assert after == "new"
            break
    assert seen_after == {start, "new"} and k > 10  # the crashes did hit both sides of the commit


def test_interrupted_two_rename_replacement_is_restored_on_next_use(tmp_path):
    """The state a crash between the fallback's two renames leaves: the next atomic_folder (or a
    reader's recover_folder) puts the old folder back before anything else happens."""
    target = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    _write(tmp_path / f".out.old-{dead}", OLD)
    _write(tmp_path / f".out.tmp-{dead}", NEW)
    with (
        pytest.raises(SmallCoderError, match="not empty"),
        fsutil.atomic_folder(target),  # no overwrite: the restored old folder is kept
    ):
        pass
    assert _state(target) == "old" and _leftovers(target) == []


def test_leftovers_of_a_live_process_are_left_alone(tmp_path):
    target = tmp_path / "out"
    with subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE) as p:
        _write(tmp_path / f".out.tmp-{p.pid}", NEW)
        fsutil.recover_folder(target)
        assert _leftovers(target) == [f".out.tmp-{p.pid}"]
        p.stdin.close()
    fsutil.recover_folder(target)
    assert _leftovers(target) == []


def test_failed_exchange_keeps_the_old_folder(tmp_path, monkeypatch):
    target = tmp_path / "out"
    _write(target, OLD)

    def refuse(a, b):
        raise OSError(errno.EIO, "Input/output error", str(a))

    monkeypatch.setattr(fsutil, "_exchange", refuse)
    with (
        pytest.raises(SmallCoderError, match=r"out: could not write it \(Input/output error"),
        fsutil.atomic_folder(target, overwrite=True) as tmp,
    ):
        _write(tmp, NEW)
    assert _state(target) == "old" and _leftovers(target) == []


@pytest.mark.parametrize("wrapped", [False, True], ids=["OSError", "library-error"])
def test_disk_full_is_one_line_and_keeps_the_old_folder(tmp_path, wrapped):
    target = tmp_path / "out"
    _write(target, OLD)
    with (
        pytest.raises(SmallCoderError, match="out: could not write it .No space left on device"),
        fsutil.atomic_folder(target, overwrite=True) as tmp,
    ):
        (tmp / "a.txt").write_text("half")
        if wrapped:  # what safetensors and tokenizers raise
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")  # noqa: TRY002
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "a.txt"))
    assert _state(target) == "old" and _leftovers(target) == []
    with (
        pytest.raises(SmallCoderError, match="could not write it .Disk quota"),
        fsutil.atomic_path(tmp_path / "f.json"),
    ):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert not list(tmp_path.glob(".f.json*"))
    with pytest.raises(ValueError), fsutil.atomic_folder(target, overwrite=True):  # other errors pass unchanged
        raise ValueError("x")


def test_a_path_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file" / "sub", tmp_path / "file" / "sub" / "deeper"):
        with (
            pytest.raises(SmallCoderError, match=r"cannot create the folder: .*file is a file, not a folder"),
            fsutil.atomic_folder(path),
        ):
            pass
        with pytest.raises(SmallCoderError, match="is a file, not a folder"):
            fsutil.atomic_write_text(path / "x.json", "{}")
    with pytest.raises(SmallCoderError, match="is a file, not a folder"):
        fsutil.make_folder(tmp_path / "file")


def test_folder_lock_excludes_a_second_holder_and_dies_with_its_process(tmp_path):
    folder = tmp_path / "run"
    code = ("import sys; from smallcoder.fsutil import folder_lock\n"
            "with folder_lock(sys.argv[1], 'training run'):\n"
            "    print('locked', flush=True); sys.stdin.read()\n")
    env = {**os.environ, "PYTHONPATH": str(Path(fsutil.__file__).parents[1])}
    with subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=env) as holder:
        assert holder.stdout.readline().strip() == "locked"
        with (
            pytest.raises(SmallCoderError, match=rf"another training run is using this folder \(pid {holder.pid} "),
            fsutil.folder_lock(folder, "training run"),
        ):
            pass
        holder.kill()  # a crashed holder does not block the next run
    with (
        fsutil.folder_lock(folder, "training run"), pytest.raises(SmallCoderError, match=f"pid {os.getpid()} "),
        fsutil.folder_lock(folder, "training run"),  # a second open file is a second holder
    ):
        pass


def test_readers_restore_an_interrupted_replacement_first(tmp_path, micro_checkpoint, small_tokenizer):
    """`load` and `TokenDataset` put back a folder that a crash between the two renames left as
    .NAME.old-PID, before they read it."""
    import shutil

    from smallcoder import load
    from smallcoder.data.pack import TokenDataset, pack_texts

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    shutil.copytree(micro_checkpoint, tmp_path / f".model.old-{dead}")
    model, _ = load(tmp_path / "model")
    assert model.config.hidden_size == 64 and _leftovers(tmp_path / "model") == []
    pack_texts(["def f(): return 1"] * 20, small_tokenizer, tmp_path / f".pack.old-{dead}", seq_len=8,
               progress=False)
    assert len(TokenDataset(tmp_path / "pack")) > 0


# ---- one rule for "never write over a used folder", one cache root ----------------------------------


def test_every_writer_refuses_a_used_folder_in_the_same_words(tmp_path, capsys):
    """The library (atomic_folder, the built-in corpus) and the commands (data builtin, data pack,
    tokenizer train, init, quantize, train) say the same line, before any slow work (the missing
    tokenizer or model is never reached); the folder is left as it was."""
    from smallcoder.cli import main
    from smallcoder.data import builtin

    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    rule = f"{used}: exists and is not an empty folder (it holds keep.txt); will not write over a folder that is not empty"
    for write in (lambda: fsutil.refuse_used_folder(used),
                  lambda: fsutil.atomic_folder(used).__enter__(),
                  lambda: builtin.build_builtin(used, math_problems=1, progress=False)):
        with pytest.raises(SmallCoderError) as e:
            write()
        assert str(e.value) == f"{rule} (use --force / overwrite=True to replace it)"
    for argv in (["data", "builtin", "--out", str(used)],
                 ["data", "pack", "--input", "builtin:code", "--tokenizer", str(tmp_path / "no-tok"), "--out", str(used)],
                 ["tokenizer", "train", "--input", "builtin:code", "--vocab-size", "300", "--out", str(used)],
                 ["init", "--preset", "smallcoder-303m", "--tokenizer", str(tmp_path / "no-tok"), "--out", str(used)],
                 ["quantize", "--model", str(tmp_path / "no-model"), "--out", str(used)],
                 ["train", "--out", str(used)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("smallcoder: error: ") and rule in err and "\n" not in err.strip(), argv
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    fsutil.refuse_used_folder(used, ignore={"keep.txt"})  # e.g. a run folder's own lock file
    fsutil.refuse_used_folder(used, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SmallCoderError, match="file: exists and is a file, not a folder"):
        fsutil.refuse_used_folder(tmp_path / "file", overwrite=True)


def test_one_cache_root_for_every_cache(tmp_path, monkeypatch):
    """$SMALLCODER_CACHE, else $SMALLCODER_HOME (the built-in corpus's documented name), else
    $XDG_CACHE_HOME/smallcoder, else ~/.cache/smallcoder; the corpus, kernels and EvalPlus ground
    truth all follow it."""
    from smallcoder import kernels
    from smallcoder.data import builtin
    from smallcoder.eval import humanevalplus

    for name in ("SMALLCODER_CACHE", "SMALLCODER_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    expected = tmp_path / "user" / ".cache" / "smallcoder"
    for name, value in ((None, None), ("XDG_CACHE_HOME", "xdg"), ("SMALLCODER_HOME", "home"),
                        ("SMALLCODER_CACHE", "cache")):
        if name:
            monkeypatch.setenv(name, str(tmp_path / value))
            expected = tmp_path / value / ("smallcoder" if name == "XDG_CACHE_HOME" else "")
        assert fsutil.cache_root() == expected
        assert builtin.default_builtin_dir(3).parent == expected
        assert kernels.library_path().parent == expected
        assert humanevalplus._cache_folder().parent == expected / "evalplus"


@pytest.mark.parametrize("wrapped", [False, True])
def test_the_loss_plot_is_written_through_the_shared_atomic_writer(tmp_path, monkeypatch, wrapped):
    """A failed or disk-full PNG write leaves the previous loss.png whole and no temp file beside it."""
    import json

    import matplotlib.figure

    from smallcoder.train.plot import plot_metrics

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": i, "loss": 5.0 - i / 10, "tokens": 100 * i, "stage": "a"}) + "\n"
                               for i in range(1, 6)))
    out = plot_metrics(metrics, tmp_path / "loss.png")
    before = out.read_bytes()
    assert before.startswith(b"\x89PNG")

    def full(self, fname, **kw):
        Path(fname).write_bytes(b"\x89PNG half")
        raise RuntimeError("No space left on device (os error 28)") if wrapped else OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    with pytest.raises(SmallCoderError, match=r"loss\.png: could not write it \(No space left on device"):
        plot_metrics(metrics, out)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]


def test_the_loss_plot_smooths_within_stages_and_shows_the_learning_rate(tmp_path):
    import json

    from smallcoder.train.plot import plot_metrics, smooth

    values, stages = [4.0, 2.0, 4.0, 2.0, 9.0, 9.0], ["a", "a", "a", "a", "b", "b"]
    got = smooth(values, stages, weight=0.5)
    assert got[0] == 4.0 and 2.0 < got[3] < 4.0  # smoothed inside a stage
    assert got[4] == 9.0 and got[5] == 9.0  # a new stage starts afresh, never pulled by the last one
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": i, "stage": s, "tokens": 100 * i, "loss": v, "lr": 1e-3 * (i % 3),
                                           **({"val_loss": v} if i % 2 else {})}) + "\n"
                               for i, (v, s) in enumerate(zip(values, stages), 1)))
    out = plot_metrics(metrics, tmp_path / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
