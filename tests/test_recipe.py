"""Recipes: validation errors name the file and field, --set overrides, the packaged recipes, LR schedules."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest

from smallcoder.errors import SmallCoderError
from smallcoder.train.recipe import apply_override, load_recipe, packaged_recipe, parse_value
from smallcoder.train.schedule import lr_at, warmup_steps

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    (tmp_path / "code.jsonl").write_text(json.dumps({"text": "def f():\n    return 1\n"}) + "\n")
    (tmp_path / "tok").mkdir(exist_ok=True)
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


BASE = """
[model]
preset = "tiny"
tokenizer = "tok"
[run]
seed = 1
[[stages]]
name = "base"
tokens = 1000
seq_len = 32
global_batch_tokens = 128
micro_batch = 2
[[stages.sources]]
source = "docs.jsonl"
weight = 0.5
[[stages.sources]]
source = "code.jsonl"
weight = 0.5
"""


def test_valid_recipe_parses(tmp_path):
    r = load_recipe(_write(tmp_path, BASE))
    st = r.stages[0]
    assert (st.name, st.tokens, st.global_batch, st.micro_batch) == ("base", 1000, 4, 2)
    assert [s.name for s in st.sources] == ["docs", "code"]
    assert st.sources[0].spec.path == str(tmp_path / "docs.jsonl")  # relative to the recipe's folder
    assert r.model.tokenizer.path == str(tmp_path / "tok")
    assert r.run.seed == 1


@pytest.mark.parametrize("old,new,field,words", [
    ("micro_batch = 2", "micro_batch = 2\nbogus = 1", "stages[0].bogus", "unknown field"),
    ("tokens = 1000", "tokens = -5", "stages[0].tokens", "-5"),
    ("tokens = 1000", "tokens = 0", "stages[0].tokens", "0"),
    ('source = "docs.jsonl"', 'source = "missing.jsonl"', "stages[0].sources[0]", "missing.jsonl"),
    ("weight = 0.5\n[[stages.sources]]", "weight = 0.6\n[[stages.sources]]", "stages[0].sources", "sum to 1"),
    ("weight = 0.5\n[[stages.sources]]", "weight = -1\n[[stages.sources]]", "stages[0].sources[0].weight", "-1"),
    ("global_batch_tokens = 128", "global_batch_tokens = 100", "stages[0].global_batch_tokens", "multiple"),
    ("micro_batch = 2", "micro_batch = 3", "stages[0].global_batch_tokens", "divisible"),
    ("seed = 1", "seed = 1\ncolour = 2", "run.colour", "unknown field"),
    ('preset = "tiny"', 'preset = "huge"', "model.preset", "huge"),
    ('preset = "tiny"', 'preset = "tiny"\nhidden_sise = 3', "model.hidden_sise", "unknown field"),
    ('name = "base"', 'name = "base"\nschedule = "linear"', "stages[0].schedule", "linear"),
])
def test_errors_name_file_and_field(tmp_path, old, new, field, words):
    assert old in BASE
    path = _write(tmp_path, BASE.replace(old, new, 1))
    with pytest.raises(SmallCoderError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: {field}"), msg
    assert words in msg


def test_sft_stage_sources(tmp_path):
    path = _write(tmp_path, BASE.replace('name = "base"', 'name = "base"\nsft = true'))
    r = load_recipe(path)  # jsonl sources of an SFT stage are read as conversations in `messages`
    assert all(s.spec.messages_field == "messages" for s in r.stages[0].sources)
    (tmp_path / "notes.txt").write_text("plain text")
    with pytest.raises(SmallCoderError, match=r"r\.toml: stages\[0\]\.sources\[0\]: .*plain documents"):
        load_recipe(path, ['stages.0.sources=[{source = "notes.txt"}]'])
    with pytest.raises(SmallCoderError, match=r"stages\[0\]\.sources\[0\]: .*holds conversations"):
        load_recipe(_write(tmp_path, BASE), ['stages.0.sources=[{source = "builtin:sft"}]'])


def test_missing_recipe_and_bad_toml(tmp_path):
    with pytest.raises(SmallCoderError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(SmallCoderError, match=r"bad\.toml: not valid TOML"):
        load_recipe(bad)


def test_overrides(tmp_path):
    path = _write(tmp_path, BASE)
    r = load_recipe(path, ["stages.0.tokens=200000", "run.seed=3", "model.preset=smallcoder-303m",
                           "stages.0.sources.1.weight=0.5", "stages.0.lr=1e-3", "run.compile=true"])
    assert r.stages[0].tokens == 200000 and r.run.seed == 3 and r.run.compile is True
    assert r.model.preset == "smallcoder-303m" and r.stages[0].lr == 1e-3
    # overrides are validated like the file
    with pytest.raises(SmallCoderError, match=r"r\.toml: stages\[0\]\.tokens: .*-1"):
        load_recipe(path, ["stages.0.tokens=-1"])
    with pytest.raises(SmallCoderError, match=r"r\.toml: stages\[0\]\.sources: weights must sum to 1"):
        load_recipe(path, ["stages.0.sources.0.weight=0.9"])
    with pytest.raises(SmallCoderError, match="index 5 is out of range"):
        load_recipe(path, ["stages.5.tokens=1"])
    with pytest.raises(SmallCoderError, match="expected KEY=VALUE"):
        load_recipe(path, ["stages.0.tokens"])
    with pytest.raises(SmallCoderError, match="is a list; index it with a number"):
        load_recipe(path, ["stages.first.tokens=1"])


def test_parse_value_and_apply():
    assert parse_value("3") == 3 and parse_value("1e-3") == 1e-3 and parse_value("true") is True
    assert parse_value('"x y"') == "x y" and parse_value("tiny") == "tiny" and parse_value("[1, 2]") == [1, 2]
    raw = {"a": [{"b": 1}]}
    apply_override(raw, "a.0.b=2", "f")
    apply_override(raw, "c.d=x", "f")
    assert raw == {"a": [{"b": 2}], "c": {"d": "x"}}
    with pytest.raises(SmallCoderError, match="not a table"):
        apply_override(raw, "a.0.b.c=1", "f")


def test_defaults_table(tmp_path):
    text = BASE.replace("[[stages]]", "[defaults]\nlr = 0.01\nmin_lr = 0.001\n\n[[stages]]", 1)
    r = load_recipe(_write(tmp_path, text))
    assert r.stages[0].lr == 0.01
    r = load_recipe(tmp_path / "r.toml", ["stages.0.lr=0.02"])
    assert r.stages[0].lr == 0.02


def test_fim_fields(tmp_path):
    """fim_rate (0 = off, the default) and fim_spm_rate are stage fields, settable in [defaults];
    an SFT stage refuses FIM (its conversations keep the EOS-fix mask)."""
    r = load_recipe(_write(tmp_path, BASE))
    assert (r.stages[0].fim_rate, r.stages[0].fim_spm_rate) == (0.0, 0.5)
    text = BASE.replace("[[stages]]", "[defaults]\nfim_rate = 0.5\nfim_spm_rate = 1.0\n\n[[stages]]", 1)
    r = load_recipe(_write(tmp_path, text))
    assert (r.stages[0].fim_rate, r.stages[0].fim_spm_rate) == (0.5, 1.0)
    assert load_recipe(tmp_path / "r.toml", ["stages.0.fim_rate=0"]).stages[0].fim_rate == 0
    path = _write(tmp_path, BASE.replace('name = "base"', 'name = "base"\nsft = true\nfim_rate = 0.25'))
    with pytest.raises(SmallCoderError) as e:
        load_recipe(path, ['stages.0.sources=[{source = "builtin:sft"}]'])
    assert str(e.value) == (f"{path}: stages[0].fim_rate: 0.25 on an SFT stage: FIM transforms packed "
                            "documents, and an SFT stage's conversations keep their EOS-fix loss mask; set "
                            "fim_rate = 0 on this stage")


def test_packaged_recipes():
    assert packaged_recipe("tiny").resolve() == (RECIPES / "tiny.toml").resolve()
    tiny = load_recipe(packaged_recipe("tiny"))
    assert [s.name for s in tiny.stages] == ["language", "code", "math", "sft"]
    assert all(src.spec.kind == "builtin" for s in tiny.stages for src in s.sources)
    assert tiny.stages[-1].sft and tiny.model.tokenizer.train_on
    assert [s.fim_rate for s in tiny.stages] == [0.0, 0.5, 0.0, 0.0]  # FIM in the code stage
    big = load_recipe(RECIPES / "smallcoder-303m.toml")
    assert [s.tokens for s in big.stages] == [6_300_000_000, 7_500_000_000, 10_000_000_000, 6_000_000_000]
    assert {s.name: s.weight for s in big.stages[1].sources} == {"nemotron-synthetic-code": 0.6,
                                                                 "starcoderdata": 0.4}
    assert all(s.seq_len == 1024 for s in big.stages) and big.run.dtype == "bfloat16"
    assert big.model.preset == "smallcoder-303m" and big.stages[3].sft
    assert [(s.fim_rate, s.fim_spm_rate) for s in big.stages][1] == (0.5, 0.5)  # our extension: the card is silent
    assert [s.fim_rate for s in big.stages] == [0.0, 0.5, 0.0, 0.0]
    assert sum(s.tokens for s in big.stages) == 29_800_000_000
    with pytest.raises(SmallCoderError, match="no packaged recipe"):
        packaged_recipe("nope")


# ---- schedules -----------------------------------------------------------------------------------


def test_wsd_schedule():
    total, peak, low = 100, 1e-3, 1e-4
    lrs = [lr_at(s, total, peak=peak, min_lr=low, schedule="wsd", warmup=10, decay=0.2) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / 10) and lrs[9] == pytest.approx(peak)
    assert all(a < b for a, b in pairwise(lrs[:10]))          # linear warmup
    assert all(x == peak for x in lrs[10:80])                         # stable
    assert all(a > b for a, b in pairwise(lrs[80:]))             # decay
    assert lrs[-1] == pytest.approx(low) and lrs[80] < peak
    assert lrs[90] == pytest.approx(peak + (low - peak) * 11 / 20)


def test_cosine_schedule_and_warmup_fraction():
    total, peak, low = 50, 2e-3, 2e-4
    lrs = [lr_at(s, total, peak=peak, min_lr=low, schedule="cosine", warmup=0.1) for s in range(total)]
    assert warmup_steps(0.1, total) == 5
    assert lrs[4] == pytest.approx(peak) and lrs[-1] == pytest.approx(low)
    mid = 5 + (total - 5 - 1) / 2  # halfway through the cosine: the mean of peak and min
    assert lr_at(int(mid), total, peak=peak, min_lr=low, schedule="cosine", warmup=5) == pytest.approx(
        (peak + low) / 2, rel=0.05)
    assert all(a >= b for a, b in pairwise(lrs[5:]))
    with pytest.raises(SmallCoderError):
        lr_at(50, total, peak=peak, min_lr=low)
    with pytest.raises(SmallCoderError):
        warmup_steps(1.5, 10)
    assert lr_at(0, 1, peak=peak, min_lr=low, warmup=0, decay=0.0) == peak


# ---- every field's bound lives with its spec --------------------------------------------------------


@pytest.mark.parametrize("override,field,value", [
    ("run.seed=-3", "run.seed", "-3"),
    ("run.keep_last=0", "run.keep_last", "0"),
    ("run.eval_every=-1", "run.eval_every", "-1"),
    ("run.val_fraction=0.7", "run.val_fraction", "0.7"),
    ("run.val_docs=true", "run.val_docs", "True"),
    ('run.dtype="fp8"', "run.dtype", "fp8"),
    ('run.device="tpu"', "run.device", "tpu"),
    ('run.strategy="zero3"', "run.strategy", "zero3"),
    ("run.compile=1", "run.compile", "1"),
    ("stages.0.seq_len=1", "stages[0].seq_len", "1"),
    ("stages.0.micro_batch=0", "stages[0].micro_batch", "0"),
    ("stages.0.decay=1.5", "stages[0].decay", "1.5"),
    ("stages.0.lr=0", "stages[0].lr", "0"),
    ("stages.0.weight_decay=-0.1", "stages[0].weight_decay", "-0.1"),
    ("stages.0.grad_clip=nan", "stages[0].grad_clip", "nan"),
    ('stages.0.sft="yes"', "stages[0].sft", "yes"),
    ("stages.0.warmup=-2", "stages[0].warmup", "-2"),
    ("stages.0.min_lr=1.0", "stages[0].min_lr", "1.0"),
    ('stages.0.name="a b"', "stages[0].name", "a b"),
    ("stages.0.sources.1.weight=0", "stages[0].sources[1].weight", "0"),
    ("stages.0.fim_rate=1.5", "stages[0].fim_rate", "1.5"),
    ('stages.0.fim_rate="half"', "stages[0].fim_rate", "half"),
    ("stages.0.fim_spm_rate=-0.1", "stages[0].fim_spm_rate", "-0.1"),
])
def test_each_bad_field_names_file_field_and_value(tmp_path, override, field, value):
    path = _write(tmp_path, BASE)
    with pytest.raises(SmallCoderError) as e:
        load_recipe(path, [override])
    msg = str(e.value)
    assert msg.startswith(f"{path}: {field}: "), msg
    assert value in msg and "\n" not in msg


def test_specs_check_their_fields_when_built_in_code():
    from smallcoder.train.specs import RunSpec, StageSource, StageSpec

    with pytest.raises(SmallCoderError, match=r"^keep_last must be a positive integer, got 0$"):
        RunSpec(keep_last=0)
    with pytest.raises(SmallCoderError, match=r"^dtype must be one of float32, bfloat16, got 'fp16'$"):
        RunSpec(dtype="fp16")
    with pytest.raises(SmallCoderError, match=r"^weight must be a number > 0, got -1$"):
        StageSource("a", None, -1)
    src = StageSource("a", None, 1)
    assert isinstance(src.weight, float)
    with pytest.raises(SmallCoderError, match=r"^min_lr: 0.5 is above lr 0.1$"):
        StageSpec("s", (src,), 100, seq_len=8, global_batch_tokens=16, micro_batch=1, lr=0.1, min_lr=0.5)
    with pytest.raises(SmallCoderError, match=r"^sources: weights must sum to 1, got 2"):
        StageSpec("s", (src, StageSource("b", None, 1)), 100, seq_len=8, global_batch_tokens=16, micro_batch=1)
    with pytest.raises(SmallCoderError, match=r"^sources\[1\]\.name: 'a' is used twice"):
        StageSpec("s", (StageSource("a", None, 0.5), StageSource("a", None, 0.5)), 100, seq_len=8,
                  global_batch_tokens=16, micro_batch=1)


def test_benchmark_data_is_a_recipe_field(tmp_path, monkeypatch):
    """Where decontamination reads the benchmarks: "auto" (SMALLCODER_DATA, else ../shared/data),
    "hub", or a folder named relative to the recipe, whatever the working folder is."""
    path = _write(tmp_path, BASE)
    (tmp_path / "bench").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("SMALLCODER_DATA", str(tmp_path / "tok"))
    run = load_recipe(path).run
    assert run.benchmark_data == "auto" and run.benchmark_dir() == tmp_path / "tok"
    assert load_recipe(path, ["run.benchmark_data=bench"]).run.benchmark_dir() == tmp_path / "bench"
    assert load_recipe(path, ["run.benchmark_data=hub"]).run.benchmark_dir() is None
    with pytest.raises(SmallCoderError) as e:
        load_recipe(path, ["run.benchmark_data=missing"])
    msg = str(e.value)
    assert msg.startswith(f"{path}: run.benchmark_data: ") and "missing" in msg and "no such folder" in msg


def test_recipes_load_with_the_tomli_backport_where_tomllib_is_missing():
    """Python 3.10 has no tomllib: the recipe module then uses `tomli` (a dependency there)."""
    import subprocess
    import sys

    from smallcoder.train import recipe

    code = ("import sys\n"
            "try:\n    import tomllib as parser\nexcept ModuleNotFoundError:\n    import tomli as parser\n"
            "sys.modules['tomli'] = parser\n"     # the backport: the same API as tomllib
            "sys.modules['tomllib'] = None\n"     # what Python 3.10 lacks
            "from smallcoder.train import recipe\n"
            "assert recipe.tomllib is parser, recipe.tomllib\n"
            "print(len(recipe.load_recipe(recipe.packaged_recipe('tiny')).stages))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "4", out.stderr
    pyproject = recipe.tomllib.loads((RECIPES.parent / "pyproject.toml").read_text())
    assert pyproject["project"]["requires-python"] == ">=3.10"
    assert "tomli>=2; python_version < '3.11'" in pyproject["project"]["dependencies"]
