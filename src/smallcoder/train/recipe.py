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

    [defaults]                       # stage fields shared by every stage (a stage may override them)
    seq_len = 1024

    [[stages]]                       # one per stage, run in order (at least one)
    name = "base"
    tokens = 6_300_000_000           # token budget (SFT: answer+prompt tokens, padding excluded)
    seq_len = 1024
    global_batch_tokens = 524_288    # tokens per optimizer step = seq_len x global batch sequences
    micro_batch = 8                  # sequences per forward/backward on one process
    schedule = "wsd"                 # wsd | cosine
    warmup = 0.01                    # steps (int) or a fraction of the stage (float < 1)
    decay = 0.2                      # wsd: the final fraction that decays to min_lr
    lr = 3e-4
    min_lr = 3e-5
    weight_decay = 0.1
    grad_clip = 1.0
    sft = false                      # conversations with the card's EOS-fix loss mask
    carry_optimizer = true           # keep AdamW moments from the previous stage
    decontaminate = false            # drop documents sharing a 13-gram with HumanEval/MBPP/GSM8k
    [[stages.sources]]               # a data source (smallcoder.data.sources) plus its weight
    source = "card:fineweb-edu"
    weight = 1.0
    name = "fineweb"                 # optional; names the packed data folder

Command-line overrides (`smallcoder train --set KEY=VALUE`, repeatable) address keys with a
dotted path, list items by index: `--set stages.0.tokens=200000`, `--set run.seed=3`,
`--set model.preset=tiny`, `--set stages.1.sources.0.weight=0.5`. VALUE is read as a TOML
value (`3`, `1e-3`, `true`, `"text"`, `[1, 2]`); anything that is not valid TOML is taken as a
plain string, so `model.preset=tiny` needs no quotes. The whole recipe is validated again after
the overrides, and errors name the file and the field: `recipes/x.toml: stages[1].lr: ...`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from ..errors import SmallCoderError

STAGE_KEYS = ("name", "sources", "tokens", "seq_len", "global_batch_tokens", "micro_batch", "schedule",
              "warmup", "decay", "lr", "min_lr", "weight_decay", "grad_clip", "sft", "carry_optimizer",
              "decontaminate")
RUN_KEYS = ("seed", "dtype", "device", "compile", "strategy", "keep_last", "checkpoint_every", "eval_every",
            "eval_batches", "log_every", "val_fraction", "val_docs", "nonfinite_patience")
TOKENIZER_KEYS = ("train_on", "vocab_size", "limit")
STRATEGIES = ("ddp", "fsdp2", "none")
DEVICES = ("auto", "cpu", "cuda")
RUN_DTYPES = ("float32", "bfloat16")
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class TokenizerSpec:
    """Either `path` (load it) or `train_on` + `vocab_size` (train one on those sources)."""

    path: str | None = None
    train_on: tuple[Any, ...] = ()  # SourceSpec
    vocab_size: int = 8192
    limit: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    preset: str | None
    overrides: dict[str, Any]
    tokenizer: TokenizerSpec
    init: str | None = None

    def config(self, vocab_size: int, eos_id: int, min_context: int) -> Any:
        """The ModelConfig: preset + overrides, the tokenizer's vocabulary and EOS, context >= the stages'."""
        from ..config import ModelConfig, preset

        base = preset(self.preset) if self.preset else ModelConfig()
        cfg = base.replace(**self.overrides)
        want_vocab = self.overrides.get("vocab_size", vocab_size)
        if want_vocab < vocab_size:
            raise SmallCoderError(f"model.vocab_size {want_vocab} is smaller than the tokenizer's {vocab_size}")
        cfg = cfg.replace(vocab_size=want_vocab, bos_token_id=eos_id, eos_token_id=eos_id)
        if cfg.max_position_embeddings < min_context:
            cfg = cfg.replace(max_position_embeddings=min_context)
        return cfg


@dataclass(frozen=True)
class RunSpec:
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    compile: bool = False
    strategy: str = "ddp"
    keep_last: int = 3
    checkpoint_every: int = 100
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    val_fraction: float = 0.02
    val_docs: int = 200
    nonfinite_patience: int = 0


@dataclass(frozen=True)
class StageSource:
    """One mixture component: where the data comes from and its share of the stage's records."""

    name: str
    spec: Any  # smallcoder.data.sources.SourceSpec
    weight: float


@dataclass(frozen=True)
class StageSpec:
    name: str
    sources: tuple[StageSource, ...]
    tokens: int
    seq_len: int = 1024
    global_batch_tokens: int = 524_288
    micro_batch: int = 8
    schedule: str = "wsd"
    warmup: int | float = 0.01
    decay: float = 0.2
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    sft: bool = False
    carry_optimizer: bool = True
    decontaminate: bool = False

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step."""
        return self.global_batch_tokens // self.seq_len


@dataclass(frozen=True)
class Recipe:
    path: str
    model: ModelSpec
    run: RunSpec
    stages: tuple[StageSpec, ...]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)  # the TOML after overrides

    @property
    def max_seq_len(self) -> int:
        return max(s.seq_len for s in self.stages)


# ---- overrides -----------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A TOML literal (`3`, `1e-3`, `true`, `"x"`, `[1, 2]`), else the text itself as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str, where: str) -> None:
    """Apply one `dotted.path=value` to the raw recipe dict in place."""
    key, sep, value = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SmallCoderError(f"--set {assignment!r}: expected KEY=VALUE, e.g. stages.0.tokens=200000")
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[:i + 1])
        if isinstance(node, list):
            if not part.lstrip("-").isdigit():
                raise SmallCoderError(f"{where}: --set {key}: {'.'.join(parts[:i]) or 'top level'} is a list; "
                                      f"index it with a number, got {part!r}")
            idx = int(part)
            if not -len(node) <= idx < len(node):
                raise SmallCoderError(f"{where}: --set {key}: index {idx} is out of range "
                                      f"({'.'.join(parts[:i])} has {len(node)} item(s))")
            if last:
                node[idx] = parse_value(value)
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = parse_value(value)
            else:
                node = node.setdefault(part, {})
        else:
            raise SmallCoderError(f"{where}: --set {key}: {here} cannot be set, "
                                  f"{'.'.join(parts[:i])} is a {type(node).__name__}, not a table")


# ---- validation helpers ---------------------------------------------------------------------------


def _int(v: Any, where: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise SmallCoderError(f"{where}: must be an integer >= {minimum}, got {v!r}")
    return v


def _num(v: Any, where: str, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v < minimum or (strict and v == minimum):
        op = ">" if strict else ">="
        raise SmallCoderError(f"{where}: must be a number {op} {minimum}, got {v!r}")
    return float(v)


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise SmallCoderError(f"{where}: must be true or false, got {v!r}")
    return v


def _choice(v: Any, where: str, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise SmallCoderError(f"{where}: must be one of {', '.join(choices)}, got {v!r}")
    return v


def _table(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise SmallCoderError(f"{where}: must be a table, got {type(v).__name__} {v!r:.60}")
    return v


def _check_keys(d: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in d:
        if key not in known:
            raise SmallCoderError(f"{where}.{key}: unknown field (known: {', '.join(known)})" if where
                                  else f"{key}: unknown field (known: {', '.join(known)})")


def slug(text: str) -> str:
    """A folder-safe name."""
    s = _SLUG.sub("-", text).strip("-.")
    return s or "source"


def _default_source_name(spec: Any) -> str:
    if spec.kind == "builtin":
        return str(spec.name)
    if spec.label:
        return slug(spec.label)
    if spec.kind == "hub":
        return slug(str(spec.name).split("/")[-1] + (f"-{spec.config}" if spec.config else ""))
    p = Path(str(spec.path))
    return slug(p.name.split(".")[0] if p.name else p.parent.name)


def _local_source_missing(spec: Any) -> bool:
    from ..data.sources import LOCAL_KINDS

    return spec.kind in LOCAL_KINDS and not Path(str(spec.path)).exists()


def _source(d: Any, where: str, base_dir: Path) -> tuple[Any, float | None, str | None]:
    from ..data.sources import parse_source, rebase_source, source_from_dict

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
    if _local_source_missing(spec):
        raise SmallCoderError(f"{where}: source file or folder {spec.path} does not exist")
    if weight is not None:
        weight = _num(weight, f"{where}.weight", 0.0, strict=True)
    return spec, weight, name


# ---- parsing -------------------------------------------------------------------------------------


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
    from ..data.pack import MAX_VOCAB
    from ..tokenizer_train import MIN_VOCAB_SIZE

    vocab = _int(t.get("vocab_size", 8192), f"{where}.vocab_size", MIN_VOCAB_SIZE)
    if vocab > MAX_VOCAB:
        raise SmallCoderError(f"{where}.vocab_size: {vocab} does not fit uint16 token shards (at most {MAX_VOCAB})")
    limit = t.get("limit")
    if limit is not None:
        limit = _int(limit, f"{where}.limit")
    return TokenizerSpec(train_on=specs, vocab_size=vocab, limit=limit)


def _model(d: dict[str, Any], where: str, base_dir: Path) -> ModelSpec:
    from ..config import PRESETS, ModelConfig

    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    known = ("preset", "tokenizer", "init", *fields)
    _check_keys(d, known, where)
    name = d.get("preset")
    if name is not None and name not in PRESETS:
        raise SmallCoderError(f"{where}.preset: unknown preset {name!r} (choose one of {', '.join(PRESETS)})")
    overrides = {k: v for k, v in d.items() if k in fields}
    for k in ("bos_token_id", "eos_token_id"):
        if k in overrides:
            raise SmallCoderError(f"{where}.{k}: comes from the tokenizer's <|endoftext|>; remove it")
    try:
        (PRESETS[name] if name else ModelConfig()).replace(**overrides)
    except SmallCoderError as e:
        raise SmallCoderError(f"{where}: {e}") from None
    except TypeError as e:
        raise SmallCoderError(f"{where}: {e}") from None
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


def _run(d: dict[str, Any], where: str) -> RunSpec:
    _check_keys(d, RUN_KEYS, where)
    r = RunSpec()
    kw: dict[str, Any] = {}
    for key, value in d.items():
        w = f"{where}.{key}"
        if key == "seed":
            kw[key] = _int(value, w, 0)
        elif key == "dtype":
            kw[key] = _choice(value, w, RUN_DTYPES)
        elif key == "device":
            if not isinstance(value, str) or not (value in DEVICES or value.startswith("cuda:")):
                raise SmallCoderError(f"{w}: must be auto, cpu, cuda or cuda:N, got {value!r}")
            kw[key] = value
        elif key == "strategy":
            kw[key] = _choice(value, w, STRATEGIES)
        elif key == "compile":
            kw[key] = _bool(value, w)
        elif key in ("keep_last", "eval_batches", "val_docs"):
            kw[key] = _int(value, w, 1)
        elif key in ("checkpoint_every", "eval_every", "log_every", "nonfinite_patience"):
            kw[key] = _int(value, w, 0)
        elif key == "val_fraction":
            kw[key] = _num(value, w)
            if kw[key] >= 0.5:
                raise SmallCoderError(f"{w}: must be below 0.5, got {value!r}")
    return dataclasses.replace(r, **kw)


def _stage(d: dict[str, Any], i: int, where: str, base_dir: Path) -> StageSpec:
    _check_keys(d, STAGE_KEYS, where)
    name = d.get("name", f"stage{i + 1}")
    if not isinstance(name, str) or not name or slug(name) != name:
        raise SmallCoderError(f"{where}.name: must be a non-empty name of letters, digits, '.', '_' or '-', "
                              f"got {name!r}")
    if "tokens" not in d:
        raise SmallCoderError(f"{where}.tokens: missing (the stage's token budget)")
    kw: dict[str, Any] = {"name": name, "tokens": _int(d["tokens"], f"{where}.tokens")}
    for key in ("seq_len", "global_batch_tokens", "micro_batch"):
        if key in d:
            kw[key] = _int(d[key], f"{where}.{key}", 2 if key == "seq_len" else 1)
    for key in ("lr", "min_lr", "weight_decay", "decay", "grad_clip"):
        if key in d:
            kw[key] = _num(d[key], f"{where}.{key}", 0.0, strict=key == "lr")
    if kw.get("decay", 0) > 1:
        raise SmallCoderError(f"{where}.decay: must be a fraction in [0, 1], got {d['decay']!r}")
    for key in ("sft", "carry_optimizer", "decontaminate"):
        if key in d:
            kw[key] = _bool(d[key], f"{where}.{key}")
    if "schedule" in d:
        from .schedule import SCHEDULES

        kw["schedule"] = _choice(d["schedule"], f"{where}.schedule", SCHEDULES)
    if "warmup" in d:
        from .schedule import warmup_steps

        try:
            warmup_steps(d["warmup"], 1)
        except SmallCoderError as e:
            raise SmallCoderError(f"{where}.warmup: {e}") from None
        kw["warmup"] = d["warmup"]
    stage = StageSpec(sources=(), **kw)
    if stage.min_lr > stage.lr:
        raise SmallCoderError(f"{where}.min_lr: {stage.min_lr} is above lr {stage.lr}")
    if stage.global_batch_tokens % stage.seq_len:
        raise SmallCoderError(f"{where}.global_batch_tokens: {stage.global_batch_tokens} is not a multiple of "
                              f"seq_len {stage.seq_len}")
    if stage.global_batch % stage.micro_batch:
        raise SmallCoderError(f"{where}.global_batch_tokens: {stage.global_batch} sequences per step "
                              f"({stage.global_batch_tokens} / seq_len {stage.seq_len}) is not divisible by "
                              f"micro_batch {stage.micro_batch}")
    raw_sources = d.get("sources")
    if not isinstance(raw_sources, list) or not raw_sources:
        raise SmallCoderError(f"{where}.sources: must be a non-empty list of source tables, got {raw_sources!r:.60}")
    sources: list[StageSource] = []
    for j, s in enumerate(raw_sources):
        w = f"{where}.sources[{j}]"
        spec, weight, sname = _source(s, w, base_dir)
        if weight is None:
            if len(raw_sources) > 1:
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
        sname = slug(sname) if sname else _default_source_name(spec)
        if any(x.name == sname for x in sources):
            raise SmallCoderError(f"{w}.name: {sname!r} is used twice in this stage; give each source a name")
        sources.append(StageSource(sname, spec, weight))
    total = sum(s.weight for s in sources)
    if abs(total - 1.0) > 1e-6:
        detail = ", ".join(f"{s.name}={s.weight:g}" for s in sources)
        raise SmallCoderError(f"{where}.sources: weights must sum to 1, got {total:.6g} ({detail})")
    return dataclasses.replace(stage, sources=tuple(sources))


def parse_recipe(raw: dict[str, Any], path: str | Path, base_dir: str | Path | None = None) -> Recipe:
    """Validate a recipe dict (TOML already parsed, overrides applied); errors name `path` and the field."""
    path = str(path)
    base = Path(base_dir) if base_dir is not None else Path(path).parent
    try:
        _check_keys(raw, ("model", "run", "defaults", "stages"), "")
        model = _model(_table(raw.get("model", {}), "model"), "model", base)
        run = _run(_table(raw.get("run", {}), "run"), "run")
        defaults = _table(raw.get("defaults", {}), "defaults")
        _check_keys(defaults, tuple(k for k in STAGE_KEYS if k != "name"), "defaults")
        stages_raw = raw.get("stages")
        if not isinstance(stages_raw, list) or not stages_raw:
            raise SmallCoderError("stages: at least one [[stages]] table is needed")
        stages = []
        for i, s in enumerate(stages_raw):
            w = f"stages[{i}]"
            stages.append(_stage({**defaults, **_table(s, w)}, i, w, base))
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
