"""The curriculum trainer on a micro model: end to end, exact kill-and-resume, corrupt-checkpoint
fallback, loss normalisation across micro-batches, and the output-folder rules."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from smallcoder.errors import SmallCoderError
from smallcoder.train.recipe import load_recipe
from smallcoder.train.runstate import COMPLETE, find_resume_checkpoint, list_checkpoints, verify_checkpoint
from smallcoder.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "a", "small", "model", "learns", "to", "add", "numbers", "and", "print", "lists", "in", "python", "code", "with", "functions", "loops", "and", "return", "values"]


def _data(folder: Path) -> None:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "prose.jsonl", "w") as f:
        f.writelines(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(40))}) + "\n" for _ in range(120))
    with open(folder / "code.jsonl", "w") as f:
        f.writelines(json.dumps({"text": f"def add_{i}(a, b):\n    return a + b + {i}\n\nfor i in range({i}):\n"
                                        f"    print(add_{i}(i, {i}))\n"}) + "\n" for i in range(120))
    with open(folder / "chat.jsonl", "w") as f:
        for i in range(120):
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"add {a} and {b}"},
                                             {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]}) + "\n")


RECIPE = """
[model]
tokenizer = "tok"
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
num_key_value_heads = 2
intermediate_size = 64
max_position_embeddings = 320

[run]
seed = 7
checkpoint_every = {ckpt}
keep_last = {keep}
eval_every = 3
eval_batches = 1
log_every = 2
val_docs = 8

[defaults]
seq_len = 32
global_batch_tokens = 128
micro_batch = 2
lr = 3e-3
min_lr = 3e-4
warmup = 2

[[stages]]
name = "prose"
tokens = {tokens}
[[stages.sources]]
source = "data/prose.jsonl"

[[stages]]
name = "code"
tokens = {tokens}
carry_optimizer = false
schedule = "cosine"
[[stages.sources]]
source = "data/code.jsonl"
weight = 0.75
[[stages.sources]]
source = "data/prose.jsonl"
weight = 0.25

[[stages]]
name = "math"
tokens = {tokens}
[[stages.sources]]
source = "data/prose.jsonl"

[[stages]]
name = "sft"
sft = true
tokens = {tokens}
[[stages.sources]]
source = "data/chat.jsonl"
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def workdir(tmp_path, small_tokenizer) -> Path:
    _data(tmp_path / "data")
    (tmp_path / "tok").mkdir()
    small_tokenizer.save(tmp_path / "tok")
    return tmp_path


def _recipe(workdir: Path, ckpt: int = 3, keep: int = 2, tokens: int = 768, name: str = "micro.toml") -> Path:
    p = workdir / name
    p.write_text(RECIPE.format(ckpt=ckpt, keep=keep, tokens=tokens))
    return p


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from smallcoder.checkpoint import read_weights

    return read_weights(folder)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "smallcoder", "train", *args, "--threads", "1"], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    return out


# ---- end to end ----------------------------------------------------------------------------------


def test_four_stages_end_to_end(workdir):
    recipe = load_recipe(_recipe(workdir))
    out = workdir / "run"
    result = Trainer(recipe, out, progress=False).run()
    assert [s.name for s in result.stages] == ["prose", "code", "math", "sft"]
    # 768 tokens / 128 per step; SFT: 768 / (4 records x their mean length)
    assert [s.steps for s in result.stages[:3]] == [6, 6, 6] and result.stages[3].steps > 6
    assert all(s.val_loss is not None and s.train_loss is not None for s in result.stages)
    # final/ loads with our loader and with transformers, and they agree
    from smallcoder import load

    model, tok = load(out / "final")
    assert tok.vocab_size == model.config.vocab_size
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "final").eval()
    ids = torch.tensor([tok.encode("def add(a, b):")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-4)
    gen = json.loads((out / "final" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_id
    for name in ("prose", "code", "math", "sft"):
        assert (out / f"stage-{name}" / "model.safetensors").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert {"step", "stage", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(train_lines[-1])
    assert any("val_loss" in x for x in train_lines)
    assert train_lines[-1]["step"] == result.steps and train_lines[-1]["stage"] == "sft"
    eos = [x for x in lines if x.get("event") == "eos_check"]
    assert eos and 0 <= eos[0]["eos_share"] <= 1 and eos[0]["prompts"] == 8  # this SFT data is all prose
    # the learning report: the same measurements before the first step and on final/
    report = json.loads((out / "learning.json").read_text())
    assert result.report == report and result.eos_share == report["after"]["eos_share"]
    for side in ("before", "after"):
        assert list(report[side]["loss"]) == ["prose", "code", "math", "sft"]
        assert report[side]["kinds"]["prose"]["prompts"] == 8 and len(report[side]["answers"]) == 8
        assert report[side]["samples"][0]["prompt"].endswith("compute Fibonacci numbers.")
    assert all(report["after"]["loss"][k] < report["before"]["loss"][k] for k in report["before"]["loss"])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # keep_last=2: only the two newest resume points remain, each complete and valid
    ckpts = list_checkpoints(out)
    assert [s for s, _ in ckpts] == [result.steps - result.steps % 3, result.steps]
    assert all(verify_checkpoint(p) is None for _, p in ckpts)
    # a second fresh run into the same folder is refused
    with pytest.raises(SmallCoderError, match="--resume.*--force"):
        Trainer(recipe, out, progress=False).run()


def test_loss_normalised_over_the_whole_step(workdir, small_tokenizer, micro_config):
    """One SFT step as 1 micro-batch of 4 or 4 micro-batches of 1 gives the same gradient and loss."""
    from smallcoder import new_model
    from smallcoder.data.mixture import Component, MixtureLoader
    from smallcoder.data.pack import TokenDataset, pack_examples
    from smallcoder.data.sft import encode_conversations
    from smallcoder.data.sources import iter_conversations, parse_source
    from smallcoder.train.distributed import init_distributed
    from smallcoder.train.trainer import accumulate_gradients

    convs = list(iter_conversations(parse_source(str(workdir / "data" / "chat.jsonl"), messages_field="messages")))
    pack_examples(encode_conversations(convs, small_tokenizer), small_tokenizer, workdir / "pack", 64,
                  progress=False)
    ds = TokenDataset(workdir / "pack")
    info = init_distributed("cpu")
    results = []
    for mb in (4, 1):
        loader = MixtureLoader([Component("chat", ds, 1.0)], seq_len=64, global_batch=4, micro_batch=mb, seed=3,
                               pad_id=small_tokenizer.eos_id)
        step = loader.next_step()
        assert len(step.micro_batches) == 4 // mb
        model = new_model(micro_config, seed=0)
        loss = accumulate_gradients(model, model, step, info) / step.num_loss_tokens
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss4, g4), (loss1, g1) = results
    assert loss4 == pytest.approx(loss1, rel=1e-6)
    for name in g4:
        torch.testing.assert_close(g4[name], g1[name], rtol=1e-5, atol=1e-7)
    # and it is the mean loss per trained token of the whole step: check against one plain batch
    from smallcoder.data.sft import collate

    model = new_model(micro_config, seed=0)
    batch = collate([ds[i] for _, i in step.records], 64, small_tokenizer.eos_id)
    ref = model(batch["input_ids"], labels=batch["labels"]) / batch["num_loss_tokens"]
    assert float(ref.detach()) == pytest.approx(loss1, rel=1e-6)
    # records differ in length, so a mean of per-micro-batch means would not be this number
    per_mb = [model(m["input_ids"], labels=m["labels"]).item() / m["num_loss_tokens"] for m in step.micro_batches]
    assert sum(per_mb) / len(per_mb) != pytest.approx(loss1, rel=1e-6)


# ---- resume --------------------------------------------------------------------------------------


MUON = ["--set", "stages.0.optimizer=muon", "--set", "stages.2.optimizer=muon", "--set", "stages.2.muon_lr=0.01"]


@pytest.mark.parametrize("optimizers", ["adamw", "muon"])
def test_kill_and_resume_is_bit_identical(workdir, optimizers):
    """A SIGKILL at a random moment, then --resume: the final weights equal an uninterrupted run's.
    `muon`: Muon on stages 1 and 3, AdamW on 2 and 4, so its state and both switches are resumed too."""
    recipe = _recipe(workdir, ckpt=1, keep=3, tokens=1536)  # 12 steps a stage, a checkpoint each step
    extra = MUON if optimizers == "muon" else []
    ref = _cli([str(recipe), "--out", str(workdir / "ref"), *extra], workdir)
    ref_out = _finish(ref)
    assert ("stage prose: muon on 14 matrices" in ref_out) == (optimizers == "muon"), ref_out
    groups = json.loads((workdir / "ref" / "run.json").read_text())["optimizer_groups"]  # the recipe dump
    muon = ["model.layers.*.self_attn.q_proj.weight", "model.layers.*.self_attn.k_proj.weight",
            "model.layers.*.self_attn.v_proj.weight", "model.layers.*.self_attn.o_proj.weight",
            "model.layers.*.mlp.gate_proj.weight", "model.layers.*.mlp.up_proj.weight",
            "model.layers.*.mlp.down_proj.weight"]
    assert [g["optimizer"] for g in groups.values()] == (["muon", "adamw"] * 2 if extra else ["adamw"] * 4)
    assert groups["prose"].get("muon", []) == (muon if extra else [])
    assert "model.embed_tokens.weight" in groups["prose"]["adamw"] and "lm_head.weight" in groups["prose"]["adamw"]
    assert set(groups["code"]["adamw"]) >= set(muon)  # an AdamW stage steps the matrices with AdamW
    reference = _weights(workdir / "ref" / "final")
    seed = int(time.time() * 1000) % 10_000
    rng = random.Random(seed)
    for attempt in range(3):
        out = workdir / f"killed{attempt}"
        proc = _cli([str(recipe), "--out", str(out), *extra], workdir)
        deadline = time.monotonic() + 120
        while not list_checkpoints(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        if not (out / "final").exists():
            break  # killed mid-run
    else:
        pytest.fail(f"the run always finished before the kill (seed {seed})")
    assert proc.returncode == -signal.SIGKILL
    before = {p.name for _, p in list_checkpoints(out)}
    out_text = _finish(_cli([str(recipe), "--out", str(out), "--resume", *extra], workdir))
    assert "resuming from" in out_text, out_text
    assert _same(_weights(out / "final"), reference), f"kill seed {seed}: resumed weights differ"
    assert before  # the kill came after the first checkpoint


def test_resume_from_a_checkpoint_inside_a_muon_stage_is_bit_identical(workdir):
    """Deterministic twin of the kill test: resume from a checkpoint in the middle of a Muon stage
    (Muon's momentum and the AdamW part's moments both restored) and from one at a switch."""
    recipe = _recipe(workdir, ckpt=1, keep=100, tokens=1536)
    _finish(_cli([str(recipe), "--out", str(workdir / "ref"), *MUON], workdir))
    reference = _weights(workdir / "ref" / "final")
    for k in (6, 24):  # mid "prose" (Muon); "code" -> "math", AdamW -> Muon
        out = workdir / f"from{k}"
        shutil.copytree(workdir / "ref", out, ignore=shutil.ignore_patterns("final", "stage-*"))
        for c in (out / "checkpoints").iterdir():
            if int(c.name.split("-")[1]) > k:
                shutil.rmtree(c)
        _finish(_cli([str(recipe), "--out", str(out), "--resume", *MUON], workdir))
        assert _same(_weights(out / "final"), reference), f"resumed from step {k}: weights differ"


@pytest.mark.parametrize("damage", ["truncate", "no_marker"])
def test_corrupt_newest_checkpoint_falls_back(workdir, damage, capsys):
    recipe = load_recipe(_recipe(workdir, ckpt=2, keep=100))
    out = workdir / "run"
    Trainer(recipe, out, progress=False).run()
    reference = _weights(out / "final")
    ckpts = list_checkpoints(out)
    newest = ckpts[-1][1]
    if damage == "truncate":
        f = newest / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        (newest / COMPLETE).unlink()
    kept = {p.name: {f.name: f.read_bytes() for f in p.iterdir()} for _, p in ckpts[:-1]}
    damaged = {f.name: f.read_bytes() for f in newest.iterdir()}
    assert find_resume_checkpoint(out)[0] == ckpts[-2][1]
    # the newest checkpoint is the end of the run; drop the outputs written after it so the resume redoes them
    import shutil

    shutil.rmtree(out / "final")
    shutil.rmtree(out / "stage-sft")
    capsys.readouterr()
    Trainer(recipe, out, resume=True, progress=False).run()
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is not usable" in err and "falling back" in err
    assert _same(_weights(out / "final"), reference)
    # nothing was deleted: older checkpoints unchanged, the damaged one moved aside intact
    for name, files in kept.items():
        assert {f.name: f.read_bytes() for f in (out / "checkpoints" / name).iterdir()} == files
    aside = out / "checkpoints" / "corrupt" / newest.name
    assert {f.name: f.read_bytes() for f in aside.iterdir()} == damaged
    assert verify_checkpoint(newest) is None  # rewritten by the resumed run


def test_resume_refuses_a_changed_recipe(workdir):
    path = _recipe(workdir)
    out = workdir / "run"
    Trainer(load_recipe(path), out, max_steps=1, progress=False).run()
    with pytest.raises(SmallCoderError, match="different recipe.*stages"):
        Trainer(load_recipe(path, ["stages.0.lr=0.1"]), out, resume=True, max_steps=1, progress=False).run()
    # --force starts over (and keeps the packed data)
    Trainer(load_recipe(path), out, force=True, max_steps=1, progress=False).run()
    assert (out / "final" / "config.json").is_file()


def test_cli_train_help_and_errors(workdir):
    from smallcoder.cli import main

    assert main(["train", str(workdir / "missing.toml"), "--out", str(workdir / "x")]) == 2
    bad = workdir / "bad.toml"
    bad.write_text(RECIPE.format(ckpt=1, keep=1, tokens=-3))
    assert main(["train", str(bad), "--out", str(workdir / "x")]) == 2
    assert main(["train", str(_recipe(workdir)), "--out", str(workdir / "x"), "--threads", "0"]) == 2
    assert not (workdir / "x").exists()  # refused before anything was written


def test_sft_only_recipe_from_an_init_checkpoint(workdir, micro_checkpoint):
    """A recipe may start from a checkpoint (its config.json fixes the shape) and run SFT alone."""
    text = f"""
[model]
tokenizer = "tok"
init = "{micro_checkpoint}"
[run]
checkpoint_every = 0
[[stages]]
name = "chat"
sft = true
tokens = 256
seq_len = 64
global_batch_tokens = 256
micro_batch = 2
[[stages.sources]]
source = "data/chat.jsonl"
"""
    path = workdir / "sft_only.toml"
    path.write_text(text)
    out = workdir / "sft_run"
    result = Trainer(load_recipe(path), out, max_steps=2, progress=False).run()
    assert result.steps == 2 and result.eos_share is not None
    start, end = _weights(micro_checkpoint), _weights(out / "final")
    assert start.keys() == end.keys() and not _same(start, end)
    bad = workdir / "bad_init.toml"
    bad.write_text(text.replace("[model]", "[model]\npreset = \"tiny\""))
    with pytest.raises(SmallCoderError, match=r"bad_init\.toml: model\.init: .*remove preset"):
        load_recipe(bad)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_on_cpu_only_where_it_is_native(workdir, monkeypatch, capsys, native):
    """run.dtype = bfloat16 autocasts on a CPU with AVX512-BF16/AMX and falls back to fp32 (with a
    note) elsewhere; the saved weights stay fp32 either way."""
    import smallcoder.train.hardware as trainer_mod

    monkeypatch.setattr(trainer_mod, "cpu_has_native_bf16", lambda: native)
    calls = []
    real = torch.autocast

    def spy(*a, **kw):
        calls.append(kw.get("dtype"))
        return real(*a, **kw)

    monkeypatch.setattr(torch, "autocast", spy)
    recipe = load_recipe(_recipe(workdir), ["run.dtype=\"bfloat16\""])
    out = workdir / "run"
    trainer = Trainer(recipe, out, max_steps=2, progress=False)
    trainer.run()
    assert trainer.autocast_bf16 is native
    assert (torch.bfloat16 in calls) is native
    assert ("note: training in float32" in capsys.readouterr().err) is not native
    from smallcoder import load

    model, _ = load(out / "final")
    assert next(model.parameters()).dtype == torch.float32
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert lines and all(x["loss"] == x["loss"] for x in lines)  # finite, not NaN


def test_keep_freed_memory_stops_page_faults(monkeypatch):
    """With the trainer's malloc setting a freed 64 MB block is reused, not faulted in again.

    Measured in a fresh interpreter, where the trainer applies it: the heap of this long-lived
    test process is not the state the setting is made for.
    """
    import ctypes.util

    from smallcoder.train.trainer import keep_freed_memory

    monkeypatch.setenv("SMALLCODER_MALLOC_TUNING", "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("SMALLCODER_MALLOC_TUNING")
    if not ctypes.util.find_library("c") or sys.platform != "linux":
        pytest.skip("glibc malloc only")
    code = """
import resource, torch
from smallcoder.train.trainer import keep_freed_memory

def faults_of_a_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20)  # 64 MB, written and freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_a_block()
default = [faults_of_a_block() for _ in range(3)]
assert keep_freed_memory()
for _ in range(4):  # the heap settles in a few blocks (small objects take the first freed one)
    faults_of_a_block()
print(min(default), max(faults_of_a_block() for _ in range(3)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    default, kept = map(int, out.stdout.split())
    assert default > 8000  # glibc's default: a fresh mmap every time, 16k pages faulted in
    assert kept < 1000


# ---- data safety -----------------------------------------------------------------------------------


def _strict_lines(path: Path) -> list[dict]:
    """metrics.jsonl read by a strict parser: NaN / Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("smallcoder: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _main_train(args: list[str]) -> int:
    from smallcoder.cli import main

    return main(["train", *args, "--threads", "1"])


def test_a_diverging_run_stops_with_one_line_and_saves_nothing_diverged(workdir, capsys):
    """--set defaults.lr=1e30: the loss turns NaN; the run stops (exit 2, one line), writes no stage
    or final model, keeps only finite checkpoints, never reports EOS success, and its
    metrics.jsonl stays strict JSON."""
    out = workdir / "run"
    rc = _main_train([str(_recipe(workdir, ckpt=1)), "--out", str(out), "--set", "defaults.lr=1e30"])
    captured = capsys.readouterr()
    assert rc == 2
    line = _error_line(captured.err)
    assert "training diverged at step" in line and "not finite" in line and "stages.0.lr" in line
    assert "answers ending with EOS" not in captured.out and "trained" not in captured.out
    assert not (out / "final").exists() and not list(out.glob("stage-*"))
    for _, folder in list_checkpoints(out):
        assert all(bool(torch.isfinite(t).all()) for t in _weights(folder).values()), folder
    lines = _strict_lines(out / "metrics.jsonl")
    bad = [x for x in lines if x.get("event") == "nonfinite"]
    assert len(bad) == 1 and (bad[0]["loss"] is None or bad[0]["grad_norm"] is None)


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_nonfinite_patience_skips_the_update_then_stops(workdir, monkeypatch, capsys, what):
    """run.nonfinite_patience = 1: one non-finite step is skipped (no optimizer update, no checkpoint
    at it) and the run completes; two in a row stop it, and so does one at a stage's last step."""
    import smallcoder.train.trainer as trainer_mod

    real = trainer_mod.accumulate_gradients
    bad_steps: set[int] = set()
    calls = {"n": 0}

    def flaky(model, forward, step, info, autocast=None):
        calls["n"] += 1
        loss = real(model, forward, step, info, autocast)
        if calls["n"] in bad_steps:
            if what == "loss":
                return float("nan")
            for p in model.parameters():
                p.grad.fill_(float("inf"))
        return loss

    monkeypatch.setattr(trainer_mod, "accumulate_gradients", flaky)
    path = _recipe(workdir, ckpt=1, keep=100)
    bad_steps.update({4})
    out = workdir / "ok"
    Trainer(load_recipe(path, ["run.nonfinite_patience=1"]), out, max_steps=6, progress=False).run()
    assert "skipped its update" in capsys.readouterr().err
    steps = [s for s, _ in list_checkpoints(out)]
    assert 4 not in steps and 5 in steps
    from safetensors.torch import load_file

    optim = load_file(str(out / "checkpoints" / "step-0000005" / "optimizer.safetensors"))
    assert {float(v) for k, v in optim.items() if k.endswith(".step")} == {4.0}  # 5 steps, 4 updates
    lines = _strict_lines(out / "metrics.jsonl")
    assert [x["step"] for x in lines if x.get("event") == "nonfinite"] == [4]
    assert all(bool(torch.isfinite(t).all()) for t in _weights(out / "final").values())

    for bad, match in (({3, 4}, "2 step.s. in a row, more than run.nonfinite_patience = 1"),
                       ({6}, "a stage may not end on a skipped step")):
        calls["n"] = 0
        bad_steps.clear()
        bad_steps.update(bad)
        out = workdir / f"bad{min(bad)}"
        with pytest.raises(SmallCoderError, match=match):
            Trainer(load_recipe(path, ["run.nonfinite_patience=1"]), out, max_steps=6, progress=False).run()
        assert not list(out.glob("stage-*")) and not (out / "final").exists()
        _strict_lines(out / "metrics.jsonl")


def test_second_run_on_one_out_is_refused_naming_the_holder(workdir, capsys):
    """A running `smallcoder train` holds OUT/.lock; a second run on that --out gets one line naming
    its pid and touches nothing; once the first is killed (its lock dies with it), a run proceeds."""
    recipe = _recipe(workdir, ckpt=1000, tokens=200_000)  # long enough to still run while we try
    out = workdir / "run"
    first = _cli([str(recipe), "--out", str(out)], workdir)
    try:
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline and first.poll() is None:
            lock = out / ".lock"
            if lock.exists() and f"pid {first.pid} " in lock.read_text():
                break
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[0]
        assert _main_train([str(recipe), "--out", str(out), "--force", "--max-steps", "1"]) == 2
        line = _error_line(capsys.readouterr().err)
        assert f"another training run is using this folder (pid {first.pid} on " in line
        # the refused run wrote nothing (its run.json would say max_steps 1) and the first one runs on
        assert not (out / "run.json").exists() or json.loads((out / "run.json").read_text())["max_steps"] is None
        assert first.poll() is None
    finally:
        first.kill()
        first.communicate()
    assert _main_train([str(recipe), "--out", str(out), "--force", "--max-steps", "1"]) == 0


@pytest.mark.parametrize("damage", ["truncate", "overwrite_in_place", "no_index", "bad_heldout", "oov"])
def test_damaged_packed_cache_is_rebuilt(workdir, capsys, damage):
    """A packed-data cache damaged in any way (sizes, bytes overwritten in place with the same size
    and mtime, its index, its held-out file, ids past the vocabulary with a matching checksum) is
    detected before training reads it and packed again; the resumed run ends bit-identical."""
    recipe = load_recipe(_recipe(workdir, ckpt=2, keep=100))
    ref = workdir / "ref"
    Trainer(recipe, ref, progress=False).run()
    reference = _weights(ref / "final")
    out = workdir / "run"
    Trainer(recipe, out, max_steps=None, progress=False).run()
    import shutil

    from smallcoder.data.pack import INDEX_FILE

    sft = next((out / "data" / "sft").iterdir())
    prose = next((out / "data" / "prose").iterdir())
    shard = prose / "train" / "tokens-00000.bin"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-64])
    elif damage == "overwrite_in_place":
        st = shard.stat()
        data = bytearray(shard.read_bytes())
        data[100:108] = bytes(8)
        with open(shard, "r+b") as f:
            f.write(data)
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif damage == "no_index":
        (prose / "train" / INDEX_FILE).unlink()
    elif damage == "bad_heldout":
        (sft / "heldout.jsonl").write_text("{not json\n")
    else:
        import hashlib

        data = bytearray(shard.read_bytes())
        data[0:2] = (60000).to_bytes(2, "little")
        shard.write_bytes(data)
        index = json.loads((prose / "train" / INDEX_FILE).read_text())
        index["shards"][0]["sha256"]["tokens"] = hashlib.sha256(data).hexdigest()
        (prose / "train" / INDEX_FILE).write_text(json.dumps(index))
    for name in ("final", "stage-sft", "stage-math", "stage-code", "stage-prose"):
        shutil.rmtree(out / name)
    shutil.rmtree(out / "checkpoints")
    capsys.readouterr()
    Trainer(recipe, out, force=True, progress=False).run()
    err = capsys.readouterr().err
    assert "is damaged" in err and "packing it again" in err
    assert _same(_weights(out / "final"), reference)


def test_force_checks_before_it_deletes(workdir, monkeypatch):
    """--force deletes the old run only once the new one is ready to train: a run that fails while
    preparing (here: building the model) leaves the old checkpoints, stages and final in place."""
    import smallcoder.checkpoint as ckpt_mod

    path = _recipe(workdir, ckpt=2)
    out = workdir / "run"
    Trainer(load_recipe(path), out, max_steps=2, progress=False).run()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and "data" not in p.parts}

    def broken(*a, **kw):
        raise SmallCoderError("no memory for the model")

    monkeypatch.setattr(ckpt_mod, "new_model", broken)
    with pytest.raises(SmallCoderError, match="no memory"):
        Trainer(load_recipe(path, ["run.seed=8"]), out, force=True, max_steps=2, progress=False).run()
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and "data" not in p.parts}
    assert after == before
    monkeypatch.undo()
    Trainer(load_recipe(path, ["run.seed=8"]), out, force=True, max_steps=2, progress=False).run()
    assert json.loads((out / "run.json").read_text())["recipe"]["run"]["seed"] == 8


def test_disk_full_while_writing_a_checkpoint_is_one_line(workdir, monkeypatch, capsys):
    """ENOSPC in the middle of a checkpoint (as safetensors reports it): exit 2 with one line naming
    the checkpoint; earlier checkpoints intact and no half-written folder left."""
    import smallcoder.checkpoint as ckpt_mod

    real = ckpt_mod.save_file
    calls = {"n": 0}

    def fill_up(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint's weights
            raise ckpt_mod.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(*a, **kw)

    monkeypatch.setattr(ckpt_mod, "save_file", fill_up)
    out = workdir / "run"
    assert _main_train([str(_recipe(workdir, ckpt=1, keep=100)), "--out", str(out)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"{out / 'checkpoints' / 'step-0000002'}: could not write it (No space left on device)" in line
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-0000001"] and verify_checkpoint(out / "checkpoints" / "step-0000001") is None


@pytest.mark.parametrize("text, what", [
    ("{not json", "not valid JSON"), ("[1, 2]", "expected an object"), ('{"max_steps": null}', "expected an object"),
    ('{"recipe": 3, "max_steps": null}', "expected an object"), ('{"recipe": {}}', "expected an object"),
    ('{"recipe": {}, "max_steps": "9"}', "expected an object"), ("\xff\xfe", "not valid JSON")])
def test_invalid_run_json_is_one_line(workdir, capsys, text, what):
    path = _recipe(workdir, ckpt=1)
    out = workdir / "run"
    Trainer(load_recipe(path), out, max_steps=1, progress=False).run()
    (out / "run.json").write_bytes(text.encode("latin-1"))
    capsys.readouterr()
    assert _main_train([str(path), "--out", str(out), "--resume", "--max-steps", "1"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"{out / 'run.json'}: " in line and ("unreadable or not valid JSON" if what == "not valid JSON" else what) in line


@pytest.mark.parametrize("sub", ["", "sub"])
def test_train_out_under_a_file_is_one_line(workdir, capsys, sub):
    (workdir / "file").write_text("x")
    assert _main_train([str(_recipe(workdir)), "--out", str(workdir / "file" / sub)]) == 2
    assert "is a file, not a folder" in _error_line(capsys.readouterr().err)


def test_saving_builds_no_model_to_hold_the_weights(workdir, monkeypatch):
    """Checkpoints, stage and final folders are written from the gathered state dict: the only
    model a run builds is the one it trains (none on the meta device just to be saved)."""
    from smallcoder.model import SmallCoder

    built = []
    real = SmallCoder.__init__

    def spy(self, *a, **kw):
        built.append(torch.empty(()).device.type)
        real(self, *a, **kw)

    monkeypatch.setattr(SmallCoder, "__init__", spy)
    out = workdir / "run"
    Trainer(load_recipe(_recipe(workdir, ckpt=1)), out, max_steps=2, progress=False).run()
    assert len(list_checkpoints(out)) == 2 and (out / "stage-sft" / "config.json").is_file()
    assert built == ["cpu"]


def test_training_library_imports_no_cli_module():
    """Dependencies run one way: smallcoder.train's library modules never import a CLI module
    (smallcoder.cli, any *.cli); only train/cli.py, the command, may."""
    import ast

    root = REPO / "src" / "smallcoder"
    offenders = []
    for path in sorted((root / "train").glob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.module else [a.name for a in node.names]
                if any(n == "cli" or n.endswith(".cli") for n in names):
                    offenders.append(f"{path.name}:{node.lineno}")
            elif isinstance(node, ast.Import) and any(a.name.endswith(".cli") for a in node.names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_setup_returns_a_context_its_parts_work_on(workdir):
    """`setup()` prepares everything a step needs into a RunContext, so evaluation, one
    `train_step` and saving work on it without `run()` (they no longer read attributes that
    only `run()` created); closing it releases OUT for the next run."""
    from smallcoder.train.context import RunContext
    from smallcoder.train.evaluation import validation_loss
    from smallcoder.train.runstate import save_model_folder

    out = workdir / "run"
    trainer = Trainer(load_recipe(_recipe(workdir)), out, max_steps=2, progress=False)
    ctx = trainer.setup()
    try:
        assert isinstance(ctx, RunContext) and ctx.state.global_step == 0 and len(ctx.stages) == 4
        before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
        val = validation_loss(ctx, ctx.stages[0])
        assert 0 < val < 20
        loader = trainer._start_stage(ctx, 0)
        step = trainer.train_step(ctx, loader, lr=1e-3, grad_clip=1.0)
        assert step.finite and step.tokens > 0 and step.num_loss_tokens > 0 and step.grad_norm > 0
        assert not _same(before, ctx.model.state_dict())  # the update was made
        save_model_folder(ctx, out / "probe")
        assert (out / "probe" / "config.json").is_file()
    finally:
        ctx.close()
    # the lock is released, and a run that saved no checkpoint may simply be started again
    Trainer(load_recipe(_recipe(workdir)), out, max_steps=1, progress=False).setup().close()


# ---- the first hour (#17): --resume, failed starts, finished runs, metrics rows, ranks ----------


def test_resume_where_there_is_no_run_is_refused(workdir, capsys):
    """A mistyped --out with --resume never silently starts a new full run; --resume-or-start does,
    and a second --resume-or-start then resumes it."""
    path = _recipe(workdir)
    for out in (workdir / "typo", workdir / "empty"):
        if out.name == "empty":
            out.mkdir()
        assert _main_train([str(path), "--out", str(out), "--resume", "--max-steps", "1"]) == 2
        line = _error_line(capsys.readouterr().err)
        assert f"{out}: --resume, but there is no run to resume there" in line and "--resume-or-start" in line
        assert not (out / "run.json").exists() and not (out / ".lock").exists()
    out = workdir / "relaunched"
    assert _main_train([str(path), "--out", str(out), "--resume-or-start", "--max-steps", "1"]) == 0
    assert (out / "final" / "config.json").is_file()
    assert _main_train([str(path), "--out", str(out), "--resume-or-start", "--max-steps", "1"]) == 0
    assert "resuming from" in capsys.readouterr().err


def test_a_start_that_failed_before_saving_anything_can_be_started_again(workdir, monkeypatch):
    """A run that fails after claiming OUT but before its first checkpoint leaves run.json (and
    caches); the corrected rerun, even with another recipe, needs no --force, and the failed
    attempt's metrics are gone. A run that saved a checkpoint still needs --force."""
    import smallcoder.train.trainer as trainer_mod

    path = _recipe(workdir, ckpt=50)
    out = workdir / "run"

    def broken(*a, **kw):
        raise SmallCoderError("the loader broke")

    monkeypatch.setattr(trainer_mod.Trainer, "_start_stage", broken)
    with pytest.raises(SmallCoderError, match="the loader broke"):
        Trainer(load_recipe(path), out, max_steps=1, progress=False).run()
    assert (out / "run.json").is_file() and not list_checkpoints(out)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # as if a step had been logged
    monkeypatch.undo()
    Trainer(load_recipe(path, ["run.seed=8"]), out, max_steps=1, progress=False).run()
    assert json.loads((out / "run.json").read_text())["recipe"]["run"]["seed"] == 8
    assert all(r.get("loss") != 9.0 for r in _strict_lines(out / "metrics.jsonl"))
    with pytest.raises(SmallCoderError, match="not an empty folder.*--force"):
        Trainer(load_recipe(path, ["run.seed=9"]), out, max_steps=1, progress=False).run()


def test_resuming_a_finished_run_says_so_and_keeps_one_line_per_step(workdir, capsys):
    """--resume of a run that is done says every stage is done (never "stage 5/4"); a run
    resumed from an earlier checkpoint logs the later steps once, not twice."""
    import shutil

    path = _recipe(workdir, ckpt=1, keep=20)
    out = workdir / "run"
    Trainer(load_recipe(path), out, max_steps=3, progress=False).run()
    whole = _strict_lines(out / "metrics.jsonl")
    capsys.readouterr()
    Trainer(load_recipe(path), out, resume=True, max_steps=3, progress=False).run()
    err = capsys.readouterr().err
    assert "all 4 stages are done (step 12)" in err and "stage 5/4" not in err
    def rows(lines):  # the per-step rows, without their timings
        return [(r["step"], r.get("stage"), r.get("loss"), r.get("val_loss")) for r in lines if "event" not in r]

    done = _strict_lines(out / "metrics.jsonl")
    assert rows(done) == rows(whole) and sum(r.get("event") == "eos_check" for r in done) == 1
    # back to the checkpoint at step 5 (stage 2, mid-stage): the later steps are trained and logged again
    for step, folder in list_checkpoints(out):
        if step > 5:
            shutil.rmtree(folder)
    for name in ("final", "stage-code", "stage-math", "stage-sft"):
        shutil.rmtree(out / name)
    Trainer(load_recipe(path), out, resume=True, max_steps=3, progress=False).run()
    again = _strict_lines(out / "metrics.jsonl")
    # each step logged once, validation losses as uninterrupted (a train loss after the resume
    # averages only the steps since it, so the first one may differ)
    assert [(r[0], r[1], r[3]) for r in rows(again)] == [(r[0], r[1], r[3]) for r in rows(whole)]
    assert sum(r.get("event") == "eos_check" for r in again) == 1


@pytest.mark.parametrize("recipe", ["tiny", "smallcoder-303m"])
def test_the_shipped_recipes_split_over_1_2_and_4_ranks(recipe):
    from smallcoder.train.recipe import packaged_recipe

    r = load_recipe(packaged_recipe(recipe))
    for world in (1, 2, 4):
        r.check_world_size(world)
        for st in r.stages:
            micro = st.micro_batch_on(world)
            assert micro <= st.micro_batch and (st.global_batch // world) % micro == 0


def test_a_batch_that_cannot_split_over_the_ranks_is_refused_before_any_work(workdir, monkeypatch):
    """Refused at the start of setup(), naming the field (nothing is packed, no lock, no run.json)."""
    import smallcoder.train.distributed as D

    real = D.init_distributed

    def three_ranks(device):
        info = real(device)
        info.world_size = 3
        return info

    monkeypatch.setattr(D, "init_distributed", three_ranks)
    out = workdir / "run"
    with pytest.raises(SmallCoderError) as e:
        Trainer(load_recipe(_recipe(workdir)), out, progress=False).setup()
    assert str(e.value) == (f"{workdir / 'micro.toml'}: stages[0].global_batch_tokens: 4 sequences per step "
                            "(128 / seq_len 32) do not split evenly over 3 ranks (this run has 3 processes)")
    assert not out.exists()


def test_ctrl_c_finishes_the_step_saves_a_checkpoint_and_says_how_to_resume(workdir, monkeypatch, capsys):
    """SIGINT (or SIGTERM) mid-run: the step in flight completes, a valid checkpoint at that step is
    written, the command ends with exit 130 and one line naming it; --resume then finishes the run."""
    import os
    import signal as sig

    from smallcoder.train import trainer as trainer_mod

    path = _recipe(workdir, ckpt=50)
    out = workdir / "run"
    real = trainer_mod.Trainer.train_step
    calls = []

    def step_then_ctrl_c(self, *a, **kw):
        result = real(self, *a, **kw)
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), sig.SIGINT)  # as a terminal's Ctrl-C arrives, during step 5
        return result

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step_then_ctrl_c)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup
    assert _main_train([str(path), "--out", str(out), "--max-steps", "3"]) == 130
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("smallcoder: ")]
    ckpt = out / "checkpoints" / "step-0000005"
    assert lines == [(f"smallcoder: stopped: stopped at step 5 as asked; resumable checkpoint {ckpt}; continue with: "
                      f"smallcoder train {path} --out {out} --resume (and the same --set options)")]
    assert "SIGINT: stopping after this step" in err and "Traceback" not in err
    assert verify_checkpoint(ckpt) is None and len(calls) == 5
    assert signal.getsignal(signal.SIGINT) == before  # handlers put back
    monkeypatch.undo()
    assert _main_train([str(path), "--out", str(out), "--max-steps", "3", "--resume"]) == 0
    assert (out / "final" / "config.json").is_file()


def test_without_a_progress_bar_the_run_prints_progress_lines(workdir, capsys):
    """Piped to a file there is no bar, so about LOG_LINES step lines (and every validation) go to stderr."""
    from smallcoder.train.trainer import LOG_LINES

    Trainer(load_recipe(_recipe(workdir, tokens=1536)), workdir / "run", progress=False).run()
    import re

    err = capsys.readouterr().err
    steps = [m.groups() for m in re.finditer(r"^step (\d+)/(\d+): (\w+) loss ", err, re.MULTILINE)]
    total = int(steps[-1][1])
    assert {t for _, t, _ in steps} == {str(total)} and steps[-1][:2] == (str(total), str(total))
    assert LOG_LINES // 2 <= len(steps) <= total and [s for *_, s in steps][-1] == "sft"
    assert "learning report (before training)" in err and "learning report (after training)" in err
