"""The resumable run state: checkpoints under OUT/checkpoints/step-N/ and how a run resumes from one.

A checkpoint folder holds the model as a Hugging Face folder (fp32 weights, the tokenizer),
`optimizer.safetensors` (AdamW moments and step counts, by parameter name), `trainer_state.json`
(stage, step, tokens, the loader's cursors, every RNG, the finished stages' results) and, written
last, `COMPLETE`: the size and sha256 of every other file. A folder without a matching COMPLETE
is not a checkpoint. Checkpoints are written with `atomic_folder` at optimizer-step boundaries
only, so a SIGKILL at any moment leaves the previous ones intact; on resume a damaged newest one
is moved to checkpoints/corrupt/ (never deleted) and the previous one used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import SmallCoderError
from ..fsutil import atomic_folder

if TYPE_CHECKING:
    from .context import RunContext

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
CKPT_PREFIX = "step-"
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.safetensors"
STATE_VERSION = 1


@dataclass
class StageResult:
    name: str
    steps: int
    tokens: int
    train_loss: float | None
    val_loss: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunState:
    """Where the run stands; everything that decides the next step besides the weights, the
    optimizer and the RNGs (the LR is a pure function of the step, the data order of seed, step
    and the loader's cursors). Saved as trainer_state.json."""

    version: int = STATE_VERSION
    stage: int = 0              # index of the stage being trained (len(stages) once all are done)
    step_in_stage: int = 0
    global_step: int = 0
    tokens: int = 0             # real tokens trained so far, all stages
    loader: dict[str, Any] | None = None   # MixtureLoader.state_dict() mid-stage, None at a boundary
    rng: dict[str, Any] | None = None      # rng.rng_state() when saved
    stage_results: list[StageResult] = field(default_factory=list)
    stage_start_tokens: int = 0

    def to_dict(self, **changes: Any) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["stage_results"] = [r.to_dict() for r in self.stage_results]
        return {**d, **changes}

    @classmethod
    def from_file(cls, path: Path) -> RunState:
        """Read trainer_state.json; one line naming the file and the field if it is not one."""
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SmallCoderError(f"{path}: unreadable or not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("version") != STATE_VERSION:
            got = d.get("version") if isinstance(d, dict) else type(d).__name__
            raise SmallCoderError(f"{path}: version {got!r} is not {STATE_VERSION}")
        for name in ("stage", "step_in_stage", "global_step", "tokens", "stage_start_tokens"):
            value = d.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SmallCoderError(f"{path}: field {name!r} must be an integer >= 0, got {value!r:.40}")
        try:
            results = [StageResult(**r) for r in d.get("stage_results", [])]
        except TypeError as e:
            raise SmallCoderError(f"{path}: field 'stage_results': {e}") from None
        known = {f.name for f in dataclasses.fields(cls)} - {"stage_results"}
        return cls(**{k: v for k, v in d.items() if k in known}, stage_results=results)


# ---- finding and verifying checkpoints ------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:07d}"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_complete(folder: Path) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != COMPLETE}
    (folder / COMPLETE).write_text(json.dumps({"files": files}, indent=1) + "\n")


def verify_checkpoint(folder: Path) -> str | None:
    """None when `folder` is a complete checkpoint (marker present, every file's size and sha256 match), else why not."""
    marker = folder / COMPLETE
    if not marker.is_file():
        return f"no {COMPLETE} marker"
    try:
        listed = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        return f"unreadable {COMPLETE} marker ({e})"
    for name in (STATE_FILE, OPTIM_FILE, "config.json"):
        if name not in listed:
            return f"{COMPLETE} does not list {name}"
    for name, info in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != info.get("bytes"):
            return f"{name} is {size} bytes, {COMPLETE} says {info.get('bytes')}"
        if _sha256_file(path) != info.get("sha256"):
            return f"{name} does not match its sha256 in {COMPLETE}"
    return None


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step-N folder under OUT/checkpoints, oldest first."""
    root = out / CKPT_DIR
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(CKPT_PREFIX) and p.name[len(CKPT_PREFIX):].isdigit():
                found.append((int(p.name[len(CKPT_PREFIX):]), p))
    return sorted(found)


def find_resume_checkpoint(out: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest valid checkpoint, and the (folder, reason) of newer ones that are not valid."""
    bad = []
    for _, folder in reversed(list_checkpoints(out)):
        reason = verify_checkpoint(folder)
        if reason is None:
            return folder, bad
        bad.append((folder, reason))
    return None, bad


def pick_resume_checkpoint(out: Path) -> Path | None:
    """The newest valid checkpoint; each newer damaged one is moved to checkpoints/corrupt/ (kept
    whole, under a fresh name) with a warning. Rank 0 only: it changes the folder."""
    found, bad = find_resume_checkpoint(out)
    for folder, reason in bad:
        aside = out / CKPT_DIR / "corrupt" / folder.name
        aside.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        while aside.exists():
            n += 1
            aside = aside.with_name(f"{folder.name}.{n}")
        os.rename(folder, aside)
        print(f"warning: checkpoint {folder} is not usable ({reason}); moved it to {aside} and "
              "falling back to the previous one", file=sys.stderr)
    return found


def load_resume_point(out: Path, model: torch.nn.Module, info: Any, n_stages: int) -> tuple[RunState, Path | None]:
    """The state of the newest valid checkpoint in OUT, its fp32 weights loaded into `model`, and
    its folder (rank 0 chooses, setting damaged ones aside); a fresh state and None if there is none."""
    from ..checkpoint import load_model_weights, read_weights
    from .distributed import from_main

    chosen = from_main(info, lambda: pick_resume_checkpoint(out))
    if chosen is None:
        if info.is_main:
            print(f"no checkpoint in {out / CKPT_DIR}; starting from the beginning", file=sys.stderr)
        return RunState(), None
    state = RunState.from_file(chosen / STATE_FILE)
    load_model_weights(model, read_weights(chosen), torch.float32, source=str(chosen))
    if info.is_main and state.stage >= n_stages:
        print(f"resuming from {chosen}: all {n_stages} stages are done (step {state.global_step}); "
              "finishing the run (final model, EOS check)", file=sys.stderr)
    elif info.is_main:
        print(f"resuming from {chosen} (stage {state.stage + 1}/{n_stages}, step {state.global_step})",
              file=sys.stderr)
    return state, chosen


# ---- optimizer state ------------------------------------------------------------------------------


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      fsdp: bool) -> dict[str, torch.Tensor]:
    """The optimizer's state as CPU tensors named `<parameter>.<key>` (AdamW: step, exp_avg,
    exp_avg_sq; Muon: momentum_buffer).
    Under FSDP2 a collective (the shards are gathered): every rank calls it."""
    from .distributed import unwrap

    tensors: dict[str, torch.Tensor] = {}
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        sd = get_optimizer_state_dict(model, list(getattr(optimizer, "parts", (optimizer,))),
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        for name, st in sd.get("state", {}).items():
            for k, v in st.items():
                tensors[f"{name}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        return tensors
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            for k, v in st.items():
                tensors[f"{names[id(p)]}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    return tensors


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path, fsdp: bool) -> None:
    """Put a checkpoint's optimizer.safetensors into `optimizer` (FSDP2: scattered to the shards)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .distributed import unwrap

    try:
        tensors = load_file(str(folder / OPTIM_FILE))
    except (SafetensorError, OSError) as e:
        raise SmallCoderError(f"{folder / OPTIM_FILE}: unreadable ({e})") from None
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            name, _, k = key.rpartition(".")
            state.setdefault(name, {})[k] = t
        full = {"state": state, "param_groups": [
            {**{k: v for k, v in g.items() if k != "params"},
             "params": [n for n, p in unwrap(model).named_parameters() if any(p is q for q in g["params"])]}
            for g in optimizer.param_groups]}
        set_optimizer_state_dict(model, list(getattr(optimizer, "parts", (optimizer,))), full, options=StateDictOptions(full_state_dict=True))
        return
    from .muon import Muon

    parts = getattr(optimizer, "parts", (optimizer,))  # MuonAdamW: each parameter's own optimizer
    owner = {id(p): part for part in parts for g in part.param_groups for p in g["params"]}
    for name, p in unwrap(model).named_parameters():
        part = owner.get(id(p))
        if part is None:
            continue
        keys, other = ((("momentum_buffer",), "exp_avg") if isinstance(part, Muon)
                       else (("step", "exp_avg", "exp_avg_sq"), "momentum_buffer"))
        if f"{name}.{other}" in tensors:
            raise SmallCoderError(f"{folder / OPTIM_FILE}: {name} has {other} (another optimizer's state) but "
                                  f"this stage's optimizer keeps {', '.join(keys)}")
        if not any(f"{name}.{k}" in tensors for k in keys):
            continue  # never stepped
        st = {}
        for k in keys:
            t = tensors.get(f"{name}.{k}")
            if t is None:
                raise SmallCoderError(f"{folder / OPTIM_FILE}: tensor {name}.{k} is missing")
            st[k] = t if k == "step" else t.to(p.device)
        part.state[p] = st


# ---- writing ---------------------------------------------------------------------------------------


def check_finite(sd: dict[str, torch.Tensor], folder: Path) -> None:
    """Never write non-finite weights as a checkpoint or model folder."""
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise SmallCoderError(f"{folder}: not written: weight {bad} holds non-finite values (the training "
                              "diverged); lower the learning rate")


def save_checkpoint(ctx: RunContext, state: dict[str, Any]) -> None:
    """Write OUT/checkpoints/step-N atomically (COMPLETE marker last), then prune to keep_last.
    Every rank calls it (gathering the weights is a collective); rank 0 writes."""
    from safetensors.torch import save_file

    from ..checkpoint import save_weights
    from .distributed import barrier, full_state_dict

    sd = full_state_dict(ctx.model, ctx.info)
    optim = optimizer_tensors(ctx.model, ctx.optimizer, ctx.fsdp)
    if ctx.info.is_main:
        folder = ctx.out / CKPT_DIR / checkpoint_name(state["global_step"])
        check_finite(sd, folder)
        if folder.exists():  # a resumed run reached an existing checkpoint again: keep the old one
            log.warning("%s exists already; not overwriting it", folder)
        else:
            with atomic_folder(folder) as tmp:
                save_weights(sd, ctx.config, ctx.tokenizer, tmp, overwrite=True)
                save_file(optim, str(tmp / OPTIM_FILE), metadata={"format": "pt"})
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
                _write_complete(tmp)
            prune(ctx.out, ctx.recipe.run.keep_last)
    barrier(ctx.info)


def prune(out: Path, keep: int) -> None:
    """Delete valid checkpoints older than the newest `keep` (invalid ones are never deleted)."""
    ckpts = [(s, p) for s, p in list_checkpoints(out) if (p / COMPLETE).is_file()]
    for _, p in ckpts[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def save_model_folder(ctx: RunContext, folder: Path) -> None:
    """The model as a Hugging Face folder (stage-<name>/, final/), unless one is there already.
    Every rank calls it; rank 0 writes."""
    from ..checkpoint import save_weights
    from .distributed import barrier, full_state_dict

    sd = full_state_dict(ctx.model, ctx.info)
    if ctx.info.is_main and not (folder / "config.json").exists():
        check_finite(sd, folder)
        save_weights(sd, ctx.config, ctx.tokenizer, folder, overwrite=True)
    barrier(ctx.info)
