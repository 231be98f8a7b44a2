"""The output folder's rules: one run per folder, --resume continues it, --force starts over.

    OUT/run.json   the recipe as run (after --set) and --max-steps; a resume must match it
    OUT/.lock      held (flock) by the running `smallcoder train`; a second run is refused

The checks change nothing (`check_out`); with --force the previous run's outputs are deleted
only by `claim_out`, once the new run has its data, tokenizer and model ready, so a run that
cannot start never deletes anything. The data and tokenizer caches are kept.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import SmallCoderError
from ..fsutil import LOCK_FILE, atomic_write_text, refuse_used_folder
from .metrics import METRICS_FILE, PLOT_FILE
from .report import REPORT_FILE
from .runstate import CKPT_DIR, list_checkpoints
from .stagedata import digest

RUN_FILE = "run.json"


def run_record(raw_recipe: dict[str, Any], max_steps: int | None) -> dict[str, Any]:
    """What run.json holds: the recipe as run and --max-steps, as plain JSON values."""
    return json.loads(json.dumps({"recipe": raw_recipe, "max_steps": max_steps}, default=str))


def read_run_record(path: Path) -> dict[str, Any]:
    """OUT/run.json: {"recipe": the recipe as run, "max_steps": int or null}; one line if it is not."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise SmallCoderError(f"{path}: unreadable or not valid JSON ({e}); it records the recipe this run "
                              "used: restore it, or start over with --force") from None
    steps = saved.get("max_steps", "missing") if isinstance(saved, dict) else None
    if not isinstance(saved, dict) or not isinstance(saved.get("recipe"), dict) \
            or not (steps is None or (isinstance(steps, int) and not isinstance(steps, bool))):
        raise SmallCoderError(f"{path}: expected an object with 'recipe' (an object) and 'max_steps' (an integer "
                              f"or null), got {json.dumps(saved)[:80]}; restore it, or start over with --force")
    return saved


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path + '.' if path else ''}{k} is only in {'the saved run' if k in a else 'this one'}"
            if digest(a[k]) != digest(b[k]):
                return _first_difference(a[k], b[k], f"{path + '.' if path else ''}{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if digest(x) != digest(y):
                return _first_difference(x, y, f"{path}.{i}")
    return f"{path or 'run'}: {json.dumps(a, default=str)[:80]} then, {json.dumps(b, default=str)[:80]} now"


def saved_nothing(out: Path) -> bool:
    """Whether OUT holds a run that stopped before it saved anything (its run.json, the data and
    tokenizer caches, perhaps metrics; no checkpoint, stage or final model): a new start there
    loses nothing, so it needs no --force."""
    ckpts = out / CKPT_DIR
    return ((out / RUN_FILE).is_file() and not (out / "final").exists() and not any(out.glob("stage-*"))
            and not (ckpts.is_dir() and any(ckpts.iterdir())))


def starts_over(out: Path, resume: bool, force: bool) -> bool:
    """Whether this run replaces the previous one in OUT: --force, or a new start over a run that
    saved nothing; never a --resume of a run that is there."""
    if resume and (out / RUN_FILE).exists():
        return False
    return force or saved_nothing(out)


def check_out(out: Path, record: dict[str, Any], resume: bool, force: bool, start_if_absent: bool = False) -> None:
    """Refuse a fresh run into a used OUT, a --resume where there is no run (a mistyped --out;
    `start_if_absent` starts one instead), or a resume with another recipe; changes nothing (with
    --force the old outputs are only deleted by `claim_out`, once everything is ready)."""
    used = out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir())
    if resume and not (out / RUN_FILE).exists() and not (used and list_checkpoints(out)):
        if not start_if_absent:
            raise SmallCoderError(f"{out}: --resume, but there is no run to resume there ({RUN_FILE} is missing); "
                                  "check --out, or leave out --resume to start a new run (--resume-or-start "
                                  "does either)")
        resume = False
    if resume and used and (out / RUN_FILE).exists():
        saved = read_run_record(out / RUN_FILE)
        saved = {k: saved.get(k) for k in record}  # what was run; not what it derived (optimizer_groups)
        if digest(saved) != digest(record):
            diff = _first_difference(saved, record)
            raise SmallCoderError(f"{out / RUN_FILE}: the run in {out} used a different recipe or --max-steps "
                                  f"({diff}); resume with the same recipe and --set options, or use a new --out")
        return
    if not resume and not saved_nothing(out):
        refuse_used_folder(out, overwrite=force, ignore={LOCK_FILE},
                           hint="pass --resume to continue the run in it, or --force to start over "
                                "(checkpoints there are then deleted)")


def claim_out(out: Path, record: dict[str, Any], start_over: bool, derived: dict[str, Any] | None = None) -> None:
    """Write run.json (the record, and `derived`: what the run made of it, such as each stage's
    optimizer grouping); when `start_over`, first delete the previous run's outputs (checkpoints,
    stage and final models, metrics, plot, learning report; not the data and tokenizer caches). Rank 0,
    once the data, the tokenizer and the model are ready."""
    if start_over:
        for name in (CKPT_DIR, "final"):
            shutil.rmtree(out / name, ignore_errors=True)
        for p in out.glob("stage-*"):
            shutil.rmtree(p, ignore_errors=True)
        for name in (METRICS_FILE, PLOT_FILE, REPORT_FILE, RUN_FILE):
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
    atomic_write_text(out / RUN_FILE, json.dumps({**record, **(derived or {})}, indent=1) + "\n")
