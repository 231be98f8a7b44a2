"""Data-parallel training equals single-process training: 2 CPU processes under torchrun (gloo).

The workers run a small script written to a temp folder: a micro SmallCoder trained for 3 AdamW
steps on the real loss path (MixtureLoader slices of the global batch, `sft.collate` / `model(ids, labels=...)`
normalised by the global count of trained tokens, gradient accumulation under `no_sync`, grad
clipping that is active), once in a plain process and once per strategy under torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from smallcoder import ModelConfig, SmallCoderError, new_model
from smallcoder.train import distributed as D

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID")
STEPS = 3

SCRIPT = textwrap.dedent('''
    """Train a micro SmallCoder for a few steps per strategy; rank 0 saves the weights, each rank a report."""
    import argparse
    import json
    import os

    import numpy as np
    import torch

    torch.set_num_threads(1)
    from smallcoder import ModelConfig, new_model
    from smallcoder.data.mixture import Component, MixtureLoader
    from smallcoder.train.distributed import (all_reduce_sum, barrier, broadcast_object, full_state_dict,
                                              init_distributed, no_sync, shutdown, wrap_model)

    SEQ, VOCAB = 16, 300
    CONFIG = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=SEQ)


    class Records:
        def __init__(self, kind, records):
            self.kind, self.seq_len, self.records = kind, SEQ, records

        def __len__(self):
            return len(self.records)

        def __getitem__(self, i):
            return self.records[i]


    def components():
        rng = np.random.default_rng(0)
        packed = [(rng.integers(1, VOCAB, SEQ).astype(np.uint16), None) for _ in range(12)]
        sft = []
        for _ in range(12):  # short records whose answer closes them: each rank trains a different count
            n = int(rng.integers(4, SEQ + 1))
            mask = np.zeros(n, np.uint8)
            mask[int(rng.integers(1, n)):] = 1
            sft.append((rng.integers(1, VOCAB, n).astype(np.uint16), mask))
        return [Component("code", Records("packed", packed), 0.5), Component("chat", Records("sft", sft), 0.5)]


    def train(spec, info, steps):
        strategy, _, optimizer = spec.partition("+")  # "ddp+muon": Muon on the matrices, AdamW on the rest
        model = wrap_model(new_model(CONFIG, seed=0), info, strategy)
        if optimizer == "muon":
            from smallcoder.train.muon import Muon, MuonAdamW, named_split

            matrices, rest = named_split(model)
            opt = MuonAdamW(Muon([p for _, p in matrices], lr=1e-2, weight_decay=0.1),
                            torch.optim.AdamW([p for _, p in rest], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1))
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        # global batch 8 in micro-batches of 2: 4 accumulated micro-steps alone, 2 per rank on 2 ranks
        loader = MixtureLoader(components(), seq_len=SEQ, global_batch=8, micro_batch=2, seed=3, pad_id=0,
                               rank=info.rank, world_size=info.world_size)
        losses, norms, local_counts = [], [], []
        for _ in range(steps):
            step = loader.next_step()
            total = 0.0
            for i, mb in enumerate(step.micro_batches):
                with no_sync(model, enabled=i < len(step.micro_batches) - 1):
                    loss_sum = model(mb["input_ids"].to(info.device), labels=mb["labels"].to(info.device))
                    loss = loss_sum / step.num_loss_tokens * info.world_size
                    loss.backward()
                total += loss.item() / info.world_size
            local_counts.append(sum(mb["num_loss_tokens"] for mb in step.micro_batches))
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # norms here are ~1: clipping acts
            norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(all_reduce_sum(total, info))
        return full_state_dict(model, info), {"losses": losses, "norms": norms, "local_counts": local_counts}


    def main():
        ap = argparse.ArgumentParser()
        ap.add_argument("--strategies", required=True)
        ap.add_argument("--out", required=True)
        ap.add_argument("--steps", type=int, default=3)
        ap.add_argument("--tag", required=True)
        args = ap.parse_args()
        info = init_distributed("cpu")
        report = {"rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank,
                  "backend": info.backend, "device": str(info.device), "is_main": info.is_main,
                  "group": torch.distributed.is_initialized(), "rank_sum": all_reduce_sum(info.rank + 1, info),
                  "broadcast": broadcast_object({"from": info.rank}, info, src=info.world_size - 1), "runs": {}}
        for strategy in args.strategies.split(","):
            state, stats = train(strategy, info, args.steps)
            stats["keys"] = sorted(state)
            report["runs"][strategy] = stats
            if info.is_main:
                tmp = os.path.join(args.out, f".{strategy}.pt.tmp")
                torch.save({k: v.clone() for k, v in state.items()}, tmp)
                os.replace(tmp, os.path.join(args.out, f"{strategy}.pt"))
        barrier(info)
        shutdown(info)
        with open(os.path.join(args.out, f"{args.tag}-report{info.rank}.json"), "w") as f:
            json.dump(report, f)


    if __name__ == "__main__":
        main()
''')


def _fsdp2_available() -> str | None:
    """None when FSDP2 can run here, else why not."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        return f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard ({e})"
    return None


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=240,
                          check=False)
    if proc.returncode != 0:
        errors = "\n".join(line for line in proc.stderr.splitlines() if "Error" in line)  # each rank's cause
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- errors\n{errors[-3000:]}\n--- stdout\n"
                    f"{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-5000:]}")


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Reference (one plain process) and 2-process torchrun results, in one folder."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip(f"torch {torch.__version__} was built without torch.distributed / gloo")
    work = tmp_path_factory.mktemp("dist")
    (work / "out").mkdir()
    (work / "dist_train.py").write_text(SCRIPT)
    _run([sys.executable, "dist_train.py", "--strategies", "none,none+muon", "--out", "out", "--steps", str(STEPS),
          "--tag", "single"], work)
    strategies = "ddp,ddp+muon,fsdp2,fsdp2+muon" if _fsdp2_available() is None else "ddp,ddp+muon"
    _run([*_torchrun(2), "dist_train.py", "--strategies", strategies, "--out", "out", "--steps", str(STEPS),
          "--tag", "torchrun"], work)
    return work / "out"


def _report(out: Path, tag: str, rank: int = 0) -> dict:
    return json.loads((out / f"{tag}-report{rank}.json").read_text())


def test_reference_run_is_single_process(runs: Path) -> None:
    ref = _report(runs, "single")
    assert (ref["rank"], ref["world_size"], ref["backend"], ref["group"], ref["is_main"]) == (0, 1, None, False, True)
    assert ref["rank_sum"] == 1.0 and ref["broadcast"] == {"from": 0}


def test_torchrun_collectives(runs: Path) -> None:
    reports = [_report(runs, "torchrun", r) for r in (0, 1)]
    for r, rep in enumerate(reports):
        assert (rep["rank"], rep["local_rank"], rep["world_size"], rep["backend"]) == (r, r, 2, "gloo")
        assert rep["is_main"] is (r == 0) and rep["group"] is True and rep["device"] == "cpu"
        assert rep["rank_sum"] == 3.0  # 1 + 2
        assert rep["broadcast"] == {"from": 1}  # src=1's object reached rank 0 too


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "ddp+muon", "fsdp2+muon"])
def test_two_processes_match_single_process(runs: Path, strategy: str) -> None:
    """Also with Muon (`+muon`): under DDP each rank orthogonalizes the same all-reduced whole
    gradients; under FSDP2 each gathers the whole matrix and keeps its own shard of the update."""
    if strategy.startswith("fsdp2") and (why := _fsdp2_available()):
        pytest.skip(why)
    single = "none+muon" if strategy.endswith("+muon") else "none"
    ref_state = torch.load(runs / f"{single}.pt")
    state = torch.load(runs / f"{strategy}.pt")
    assert sorted(state) == sorted(ref_state)
    for key, ref in ref_state.items():
        assert state[key].device.type == "cpu" and not hasattr(state[key], "placements"), key  # plain, unsharded
        torch.testing.assert_close(state[key], ref, rtol=1e-6, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    ref_run = _report(runs, "single")["runs"][single]
    rank_runs = [_report(runs, "torchrun", r)["runs"][strategy] for r in (0, 1)]
    assert rank_runs[0]["losses"] == rank_runs[1]["losses"]  # all-reduced: one global loss
    assert rank_runs[0]["losses"] == pytest.approx(ref_run["losses"], rel=1e-6)
    assert rank_runs[0]["norms"] == pytest.approx(ref_run["norms"], rel=1e-5)
    assert all(n > 0.5 for n in ref_run["norms"])  # clipping was active on every step
    # the ranks trained different numbers of tokens, so per-rank normalisation would have shown
    assert any(a != b for a, b in zip(rank_runs[0]["local_counts"], rank_runs[1]["local_counts"]))
    assert [a + b for a, b in zip(rank_runs[0]["local_counts"], rank_runs[1]["local_counts"])] == \
        ref_run["local_counts"]
    init = new_model(ModelConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=16),
                     seed=0).state_dict()
    moved = max((ref_state[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-2  # training moved the weights far beyond the tolerance
    if single != "none":  # and Muon moved the matrices otherwise than AdamW
        adamw = torch.load(runs / "none.pt")
        assert (ref_state["model.layers.0.mlp.up_proj.weight"] - adamw["model.layers.0.mlp.up_proj.weight"]).abs().max() > 1e-3


# ---- single process: no torchrun environment ---------------------------------------------------

@pytest.fixture
def no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)


def _micro():
    return new_model(ModelConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, intermediate_size=32, max_position_embeddings=8), seed=0)


def test_init_without_torchrun_is_single_process(no_torchrun_env: None) -> None:
    info = D.init_distributed("cpu")
    assert info == D.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None,
                              is_main=True)
    assert not torch.distributed.is_initialized()
    auto = D.init_distributed()  # "auto": CUDA only when there is one
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert D.all_reduce_sum(2.5, info) == 2.5
    assert D.broadcast_object({"a": 1}, info) == {"a": 1}
    D.barrier(info)
    D.shutdown(info)
    model = _micro()
    for strategy in D.STRATEGIES:  # nothing to shard or sync across one process
        assert D.wrap_model(model, info, strategy) is model
    assert D.unwrap(model) is model
    with D.no_sync(model, enabled=True):
        model(torch.tensor([[1, 2, 3]])).sum().backward()
    assert model.lm_head.weight.grad is not None
    state = D.full_state_dict(model, info)
    assert sorted(state) == sorted(model.state_dict()) and all(v.device.type == "cpu" for v in state.values())


def test_unknown_strategy_and_device(no_torchrun_env: None) -> None:
    info = D.init_distributed("cpu")
    with pytest.raises(SmallCoderError, match="unknown distributed strategy 'zero3'.*ddp, fsdp2, none"):
        D.wrap_model(_micro(), info, "zero3")
    with pytest.raises(SmallCoderError, match="unknown device 'tpu'"):
        D.init_distributed("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SmallCoderError, match="device 'cuda'.*no CUDA"):
            D.init_distributed("cuda")


def test_bad_torchrun_environment(no_torchrun_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SmallCoderError, match="MASTER_ADDR, MASTER_PORT not set"):
        D.init_distributed("cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setenv("RANK", "first")
    with pytest.raises(SmallCoderError, match="RANK='first' must be an integer"):
        D.init_distributed("cpu")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(SmallCoderError, match="RANK=2 is outside WORLD_SIZE=2"):
        D.init_distributed("cpu")
    assert not torch.distributed.is_initialized()


# ---- the trainer under torchrun ----------------------------------------------------------------

TRAIN_RECIPE = """\
[model]
preset = "tiny"
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
intermediate_size = 64
tokenizer = "{tokenizer}"

[run]
seed = 0
device = "cpu"
strategy = "ddp"
checkpoint_every = 0
eval_every = 0
eval_batches = 1
log_every = 1
val_fraction = 0.1
val_docs = 4

[[stages]]
name = "base"
tokens = 256                # 2 optimizer steps of 4 x 32 tokens
seq_len = 32
global_batch_tokens = 128
micro_batch = 1             # 4 accumulated micro-steps alone, 2 per rank on 2 ranks
schedule = "cosine"
warmup = 0
lr = 1e-3
min_lr = 1e-4
grad_clip = 0.5
[[stages.sources]]
source = "jsonl:docs.jsonl"
weight = 1.0
"""


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory, small_tokenizer) -> Path:
    if not (REPO / "src" / "smallcoder" / "train" / "trainer.py").exists():
        pytest.skip("the trainer (smallcoder.train.trainer) is not there yet")
    import random

    work = tmp_path_factory.mktemp("train")
    (work / "tokenizer").mkdir()
    small_tokenizer.save(work / "tokenizer")
    rng = random.Random(0)
    words = ["def", "return", "for", "in", "range", "print", "self", "value", "index", "the", "quick", "brown", "fox", "data", "model"]
    with open(work / "docs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": " ".join(rng.choice(words) for _ in range(40))}) + "\n" for _ in range(60))
    (work / "recipe.toml").write_text(TRAIN_RECIPE.format(tokenizer=work / "tokenizer"))
    return work


def _final_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "final" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_trainer_under_torchrun_matches_single_process(train_folder: Path, strategy: str) -> None:
    """`torchrun --nproc-per-node 2 -m smallcoder train` ends with the single-process run's weights."""
    if strategy == "fsdp2" and (why := _fsdp2_available()):
        pytest.skip(why)
    single = train_folder / "single"
    if not (single / "final").exists():
        _run([sys.executable, "-m", "smallcoder", "train", "recipe.toml", "--out", "single"], train_folder)
    out = f"torchrun-{strategy}"
    _run([*_torchrun(2), "-m", "smallcoder", "train", "recipe.toml", "--out", out,
          "--set", f"run.strategy={strategy}"], train_folder)
    ref, got = _final_weights(single), _final_weights(train_folder / out)
    assert sorted(got) == sorted(ref)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-6, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    init = new_model(ModelConfig.from_file(single / "final" / "config.json"), seed=0).state_dict()
    assert max((ref[k] - init[k]).abs().max().item() for k in ref) > 1e-4  # 2 steps at lr 1e-3 moved them
    logs = [json.loads(line) for line in (train_folder / out / "metrics.jsonl").read_text().splitlines()]
    ref_logs = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == len(ref_logs)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "fsdp2+muon"])
def test_resume_under_torchrun_is_bit_identical(train_folder: Path, strategy: str) -> None:
    """A 2-process run resumed from its step-1 checkpoint (weights, AdamW's or Muon's state gathered
    from and scattered back to the FSDP2 shards, loader, RNGs) ends with the uninterrupted run's weights."""
    import shutil

    if strategy.startswith("fsdp2") and (why := _fsdp2_available()):
        pytest.skip(why)
    name, (strategy, _, optimizer) = strategy, strategy.partition("+")
    args = ["recipe.toml", "--set", f"run.strategy={strategy}", "--set", "run.checkpoint_every=1",
            "--set", f"stages.0.optimizer={optimizer or 'adamw'}"]
    whole, resumed = train_folder / f"whole-{name}", train_folder / f"resumed-{name}"
    _run([*_torchrun(2), "-m", "smallcoder", "train", *args, "--out", whole.name], train_folder)
    shutil.copytree(whole, resumed)
    for name in ("final", "stage-base", "checkpoints/step-0000002"):
        shutil.rmtree(resumed / name)
    _run([*_torchrun(2), "-m", "smallcoder", "train", *args, "--out", resumed.name, "--resume"], train_folder)
    ref, got = _final_weights(whole), _final_weights(resumed)
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    state = json.loads((resumed / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["stage"] == 1


def test_the_strategies_are_one_list():
    """`run.strategy` in a recipe and `wrap_model` accept the same names: one tuple, in specs.py."""
    from smallcoder.train import specs

    assert D.STRATEGIES is specs.STRATEGIES
