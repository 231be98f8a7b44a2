"""FIM in the trainer: a stage's fim_rate reaches its training batches and never its validation,
a resumed run computes exactly what an uninterrupted one does, a change of rate reuses the packed
data, and a tokenizer without the FIM tokens is refused before anything is packed."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from smallcoder.errors import SmallCoderError
from smallcoder.prompts import FIM_TOKENS
from smallcoder.train.recipe import load_recipe
from smallcoder.train.runstate import list_checkpoints
from smallcoder.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = """
[model]
tokenizer = "{tokenizer}"
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
num_key_value_heads = 2
intermediate_size = 64

[run]
seed = 5
checkpoint_every = 2
keep_last = 100
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
tokens = 768
[[stages.sources]]
source = "data/prose.jsonl"

[[stages]]
name = "code"
tokens = 768
fim_rate = {rate}
[[stages.sources]]
source = "data/code.jsonl"
weight = 0.75
[[stages.sources]]
source = "data/prose.jsonl"
weight = 0.25
"""
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "small", "models", "learn", "to", "add", "numbers"]


@pytest.fixture
def workdir(tmp_path, small_tokenizer) -> Path:
    """Prose and code documents, the conftest tokenizer (no FIM tokens) in tok/, and one trained
    here with StarCoder's specials (FIM included) in fimtok/."""
    from smallcoder.tokenizer_train import train_tokenizer

    rng = random.Random(0)
    prose = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(120)]
    code = [f"def add_{i}(a, b):\n    return a + b + {i}\n\nfor i in range({i}):\n    print(add_{i}(i, {i}))\n"
            for i in range(120)]
    (tmp_path / "data").mkdir()
    for name, docs in (("prose", prose), ("code", code)):
        (tmp_path / "data" / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for name in ("tok", "fimtok"):
        (tmp_path / name).mkdir()
    small_tokenizer.save(tmp_path / "tok")
    train_tokenizer(prose + code, 400).save(tmp_path / "fimtok")
    return tmp_path


def _recipe(workdir: Path, rate: float, tokenizer: str = "fimtok"):
    path = workdir / f"fim-{rate}-{tokenizer}.toml"
    path.write_text(RECIPE.format(rate=rate, tokenizer=tokenizer))
    return load_recipe(path)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from smallcoder.checkpoint import read_weights

    return read_weights(folder)


def test_fim_reaches_training_not_validation_and_resumes_exactly(workdir, monkeypatch):
    from smallcoder.data import sft
    from smallcoder.data.mixture import MixtureLoader
    from smallcoder.tokenizer import Tokenizer

    sentinels = {Tokenizer.load(workdir / "fimtok").token_to_id(t) for t in FIM_TOKENS}
    trained: dict[str, list[set[int]]] = {"prose": [], "code": []}
    validated: list[set[int]] = []
    real_step, real_collate = MixtureLoader.next_step, sft.collate

    def spy_step(self):
        step = real_step(self)
        stage = "code" if len(self.components) == 2 else "prose"
        trained[stage] += [set(mb["input_ids"].flatten().tolist()) for mb in step.micro_batches]
        return step

    def spy_collate(records, *a, **kw):  # the validation's batches (the loader holds its own `collate`)
        batch = real_collate(records, *a, **kw)
        validated.append(set(batch["input_ids"].flatten().tolist()))
        return batch

    monkeypatch.setattr(MixtureLoader, "next_step", spy_step)
    monkeypatch.setattr(sft, "collate", spy_collate)
    recipe = _recipe(workdir, 1.0)
    ref = workdir / "ref"
    result = Trainer(recipe, ref, progress=False).run()
    assert [s.steps for s in result.stages] == [6, 6] and all(s.val_loss is not None for s in result.stages)
    assert all(batch & sentinels for batch in trained["code"])     # fim_rate 1: every code batch holds FIM examples
    assert not any(batch & sentinels for batch in trained["prose"])  # the stage without fim_rate: none
    assert validated and not any(batch & sentinels for batch in validated)  # validation stays left-to-right
    # the same tokens per step as without FIM (the records keep their length)
    lines = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [x["tokens"] for x in lines if "tokens" in x][-1] == 12 * 128
    # resume mid-stage from step 8 (the code stage's second step): the same examples, the same weights
    reference = _weights(ref / "final")
    for step, folder in list_checkpoints(ref):
        if step > 8:
            shutil.rmtree(folder)
    shutil.rmtree(ref / "final")
    shutil.rmtree(ref / "stage-code")
    seen = len(trained["code"])
    Trainer(recipe, ref, resume=True, progress=False).run()
    resumed = _weights(ref / "final")
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert trained["code"][seen:] == trained["code"][2 * 2:seen]  # steps 9..12 saw the batches they saw before


def test_changing_fim_rate_reuses_the_packed_data(workdir, capsys):
    from smallcoder.train.distributed import init_distributed
    from smallcoder.train.stagedata import prepare_data

    info = init_distributed("cpu")
    out = workdir / "run"
    _, plain = prepare_data(_recipe(workdir, 0.0), out, info, None, False)
    assert "packing stage code" in capsys.readouterr().err
    _, fim = prepare_data(_recipe(workdir, 0.5), out, info, None, False)
    assert "packing" not in capsys.readouterr().err
    assert [s.folder for d in plain for s in d.sources] == [s.folder for d in fim for s in d.sources]
    assert plain[1].fim is None and fim[1].fim.describe() == {"rate": 0.5, "spm_rate": 0.5}
    assert fim[0].fim is None and fim[1].steps == plain[1].steps


def test_fim_with_a_tokenizer_without_fim_tokens_is_one_line_before_packing(workdir, capsys):
    from smallcoder.cli import main

    recipe = _recipe(workdir, 0.5, tokenizer="tok")
    out = workdir / "run"
    with pytest.raises(SmallCoderError) as e:
        Trainer(recipe, out, progress=False).run()
    msg = str(e.value)
    assert msg == (f"{recipe.path}: stages[1].fim_rate = 0.5: FIM needs <fim_prefix>, <fim_suffix>, <fim_middle> "
                   "as single tokens of the tokenizer, which lacks <fim_suffix>, <fim_middle>; use a tokenizer "
                   "with them (StarCoder's, or one `smallcoder tokenizer train` made) or set fim_rate = 0")
    assert not (out / "data").exists() and not (out / "final").exists()
    capsys.readouterr()
    assert main(["train", recipe.path, "--out", str(workdir / "cli"), "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("smallcoder: error: ") and "stages[1].fim_rate = 0.5" in err[-1]
