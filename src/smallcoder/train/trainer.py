"""The curriculum trainer: `Trainer(recipe, out).run()` trains every stage into OUT, resumably.

Output folder (OUT)::

    run.json, .lock               the run's recipe and its lock (runfolder.py)
    tokenizer-<hash>/, data/      the trained tokenizer and the packed stage data, cached (stagedata.py)
    checkpoints/step-0000120/     resume points (runstate.py)
    stage-<name>/                 the model at the end of each stage (HF folder, tokenizer included)
    final/                        the model at the end (chat-ready HF folder)
    metrics.jsonl, loss.png       (metrics.py); learning.json (report.py)

`setup()` prepares a run (lock, data, model, resume point, optimizer) into a `RunContext`; the
stage loop runs `train_step()` for each optimizer step and logs, evaluates and checkpoints
between steps.

Exact resume: everything that decides the next step is in the checkpoint (fp32 weights, AdamW
moments and step counts, the loader's cursors, the stage and step, every RNG); the LR is a pure
function of the step and data order a pure function of (seed, step, cursor). So a resumed run
computes exactly what the uninterrupted one would have (CPU, same thread count).

Loss: each micro-batch adds `model(ids, labels=labels) / num_loss_tokens_of_the_whole_global_step * world_size`
(DDP averages gradients over ranks), so a step's gradient is that of its mean loss per trained
token whatever the micro-batch split (see smallcoder.data.mixture and .distributed). A step whose
loss or gradient norm is not finite makes no update; more than run.nonfinite_patience of them in
a row, or one at a stage's end, stop the run with one line and nothing diverged saved.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checks import integer
from ..errors import SmallCoderError
from ..fsutil import folder_lock
from .context import RunContext
from .distributed import all_reduce_sum, from_main
from .evaluation import validation_loss
from .hardware import bf16_is_fast, device_peak_flops, keep_freed_memory, measure_cpu_peak
from .interrupt import StopRequest, TrainingInterrupted
from .metrics import MetricsLog, Window
from .optim import apply_stage, build_optimizer, kind, set_lr
from .recipe import Recipe
from .report import log_side, measure, read_report, write_report
from .rng import rng_state, seed_all, set_rng_state
from .runfolder import check_out, claim_out, run_record, starts_over
from .runstate import (
    RunState,
    StageResult,
    list_checkpoints,
    load_optimizer,
    load_resume_point,
    save_checkpoint,
    save_model_folder,
)
from .schedule import lr_at
from .stagedata import prepare_data, stage_seed

LOG_LINES = 20               # progress lines per run printed where there is no progress bar
SFT_PAD_MULTIPLE = 64        # SFT batches are padded to their longest record, rounded up to this


@dataclass
class TrainResult:
    out: Path
    final: Path
    stages: list[StageResult]
    wall_s: float
    eos_share: float | None     # the learning report's share of held-out answers ending with EOS
    report: dict[str, Any]      # OUT/learning.json: {"before": ..., "after": ...} (report.py)
    steps: int


@dataclass
class StepOutcome:
    """One optimizer step as the loop sees it (loss and gradient norm the same on every rank)."""

    loss: float          # mean loss per trained token of the global batch
    grad_norm: float     # before clipping
    finite: bool         # both finite: the update was made
    tokens: int          # real tokens of the global batch
    num_loss_tokens: int


def accumulate_gradients(model: torch.nn.Module, forward: Any, step: Any, info: Any,
                         autocast: Any = contextlib.nullcontext) -> float:
    """Forward and backward every micro-batch of a loader `Step`; returns this rank's summed loss.

    Each micro-batch adds the gradient of `model(ids, labels) / step.num_loss_tokens * world_size`, so the
    accumulated gradient is that of the whole global step's mean loss per trained token, however
    the step is split into micro-batches and ranks (DDP averages over ranks; `no_sync` skips the
    all-reduce until the last micro-batch).
    """
    from .distributed import no_sync

    n_mb = len(step.micro_batches)
    scale = info.world_size / max(step.num_loss_tokens, 1)
    local = torch.zeros((), dtype=torch.float64, device=info.device)
    for m, mb in enumerate(step.micro_batches):
        with no_sync(model, enabled=m < n_mb - 1):
            with autocast():
                ls = forward(mb["input_ids"].to(info.device, non_blocking=True),
                             labels=mb["labels"].to(info.device, non_blocking=True))
            (ls * scale).backward()
        local += ls.detach().double()
    return float(local)


def build_model(recipe: Recipe, tokenizer: Any) -> tuple[Any, torch.nn.Module]:
    """(config, fp32 model): the recipe's architecture freshly initialised, or its init checkpoint
    (whose config.json decides the shape; the context widened to the longest stage)."""
    from ..checkpoint import load, new_model

    config = recipe.model.config(tokenizer.vocab_size, tokenizer.eos_id, recipe.max_seq_len)
    if not recipe.model.init:
        return config, new_model(config, seed=recipe.run.seed, dtype=torch.float32)
    model, _ = load(recipe.model.init, with_tokenizer=False)
    cfg = model.config
    if cfg.vocab_size < tokenizer.vocab_size:
        raise SmallCoderError(f"model.init {recipe.model.init}: vocab_size {cfg.vocab_size} is smaller "
                              f"than the tokenizer's {tokenizer.vocab_size}")
    config = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, recipe.max_seq_len))
    model.config = config
    return config, model.float()


def diverged_message(ctx: RunContext, si: int, k: int, loss: float, grad_norm: float, times: int,
                     stage_end: bool, what: str = "loss") -> str:
    """The one-line error of a run whose loss (or gradient norm) stopped being finite."""
    data, patience = ctx.stages[si], ctx.recipe.run.nonfinite_patience
    ckpts = list_checkpoints(ctx.out)
    why = (f"{times} step(s) in a row, more than run.nonfinite_patience = {patience}" if times > patience
           else "and a stage may not end on a skipped step")
    if what != "loss":
        why = "after the update"
    return (f"training diverged at step {k + 1} of stage {data.spec.name!r} ({data.steps} steps): {what} "
            f"{loss:g}, gradient norm {grad_norm:g}, not finite ({why}); nothing was saved from the diverged "
            f"state (newest checkpoint: {ckpts[-1][1] if ckpts else 'none'}); lower stages.{si}.lr "
            f"(now {data.spec.lr:g}) or raise run.nonfinite_patience")


class Trainer:
    """Runs a recipe into OUT; `run()` trains every stage (resuming when asked) and returns a TrainResult."""

    def __init__(self, recipe: Recipe, out: str | Path, *, resume: bool = False, force: bool = False,
                 resume_or_start: bool = False,
                 max_steps: int | None = None, peak_tflops: float | None = None,
                 progress: bool | None = None) -> None:
        if max_steps is not None:
            integer(max_steps, "--max-steps")
        if peak_tflops is not None and not peak_tflops > 0:
            raise SmallCoderError(f"--peak-tflops must be positive, got {peak_tflops!r}")
        self.recipe = recipe
        self.out = Path(out)
        self.resume = resume
        self.force = force
        self.resume_or_start = resume_or_start  # with resume: start a new run where OUT holds none
        self.max_steps = max_steps
        self.peak_tflops = peak_tflops
        self.progress = (sys.stderr.isatty() if progress is None else progress)
        self.context: RunContext | None = None  # the last run's, once it is set up
        self.stop = StopRequest()  # entered while the stages train

    @property
    def autocast_bf16(self) -> bool | None:
        """Whether the last run trained under bf16 autocast (None before one is set up)."""
        return None if self.context is None else self.context.autocast_bf16

    def run(self) -> TrainResult:
        t_start = time.perf_counter()
        ctx = self.context = self.setup()
        try:
            if ctx.before is not None:  # a fresh run: its report starts anew
                write_report(self.out, {"before": ctx.before})
            self.train_stages(ctx)
            final = self.out / "final"
            save_model_folder(ctx, final)
            report = self.report_after(ctx, final) if ctx.info.is_main else {}
            ctx.metrics.plot()
            eos_share = (report.get("after") or {}).get("eos_share")
            return TrainResult(self.out, final, list(ctx.state.stage_results), time.perf_counter() - t_start,
                               eos_share, report, ctx.state.global_step)
        finally:
            ctx.close()

    def report_after(self, ctx: RunContext, final: Path) -> dict[str, Any]:
        """The learning report's "after" side, written beside the "before" side; rank 0. It measures
        the trained model in memory (the weights final/ holds); under FSDP2, whose rank 0 holds only
        shards, final/ loaded as a plain model."""
        from .distributed import unwrap

        print("learning report: measuring the final model", file=sys.stderr, flush=True)
        if ctx.fsdp:
            from ..checkpoint import load

            model, _ = load(final, device=ctx.info.device, with_tokenizer=False)
        else:
            model = unwrap(ctx.model)
        after = measure(model, ctx.tokenizer, ctx.stages, ctx.recipe.run, ctx.info.device)
        del model
        log_side("after", after)
        report = write_report(self.out, {**read_report(self.out), "after": after})
        if after["eos_share"] is not None:
            ctx.metrics.write({"step": ctx.state.global_step, "event": "eos_check", "eos_share": after["eos_share"],
                               "prompts": len(after["answers"])})
        return report

    # -- set-up ------------------------------------------------------------------------------------

    def setup(self) -> RunContext:
        """Lock and check OUT, prepare the data and the model, find the resume point, build the
        optimizer; only then (with --force) clear the previous run. The caller closes the context."""
        from .distributed import init_distributed, shutdown

        t_start = time.perf_counter()
        info = init_distributed(self.recipe.run.device)
        if info.device.type == "cpu":
            keep_freed_memory()
        held = contextlib.ExitStack()  # the run lock on OUT, released however the run ends
        try:
            return self._setup(info, held, t_start)
        except BaseException:
            held.close()
            shutdown(info)
            raise

    def _setup(self, info: Any, held: contextlib.ExitStack, t_start: float) -> RunContext:
        from .distributed import unwrap, wrap_model

        recipe, run = self.recipe, self.recipe.run
        recipe.check_world_size(info.world_size)  # before any work: a torchrun that cannot split a batch
        record = run_record(recipe.raw, self.max_steps)

        def lock_and_check() -> None:  # the run, not each rank, excludes other runs
            check_out(self.out, record, self.resume, self.force, self.resume_or_start)  # a refused OUT gets no lock file
            held.enter_context(folder_lock(self.out, "training run"))
            check_out(self.out, record, self.resume, self.force, self.resume_or_start)  # again, now that no other run can write

        from_main(info, lock_and_check)
        start_over = starts_over(self.out, self.resume, self.force)
        seed_all(run.seed)
        progress = self.progress and info.is_main
        tokenizer, stages = prepare_data(recipe, self.out, info, self.max_steps, progress)
        if info.is_main:
            print(f"tokenizer and data ready in {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
        config, model = build_model(recipe, tokenizer)
        state, resume_from = RunState(), None
        if self.resume and not start_over:
            state, resume_from = load_resume_point(self.out, model, info, len(stages))
        before = None
        if resume_from is None and info.is_main:  # the learning report's first side, on the untrained model
            print("learning report: measuring the model before training", file=sys.stderr, flush=True)
            before = measure(model.to(info.device), tokenizer, stages, run, info.device)
            log_side("before", before)

        autocast_bf16 = run.dtype == "bfloat16" and bf16_is_fast(info.device)
        if run.dtype == "bfloat16" and not autocast_bf16 and info.is_main:
            print(f"note: training in float32 on {info.device}: bf16 is only fast with native support "
                  "(CUDA, or a CPU with AVX512-BF16/AMX); without it a bf16 step is many times slower",
                  file=sys.stderr)
        fsdp = run.strategy == "fsdp2" and info.backend is not None
        model = wrap_model(model, info, run.strategy)
        forward = torch.compile(model) if run.compile else model
        model.train()
        # the optimizer the checkpoint holds: its stage's, or at a stage's first step the one
        # before's (that stage's start then rebuilds it, as without the interruption)
        holder = state.stage - 1 if state.step_in_stage == 0 and state.stage > 0 else state.stage
        optimizer = build_optimizer(model, stages[min(holder, len(stages) - 1)].spec, fsdp)
        if resume_from is not None:
            load_optimizer(model, optimizer, resume_from, fsdp)
            if state.rng:
                set_rng_state(state.rng)
        # everything that can refuse this run has run: only now may --force delete the old outputs
        from .muon import grouping

        groups = {d.spec.name: {"optimizer": d.spec.optimizer, **grouping(unwrap(model), d.spec.optimizer)}
                  for d in stages}
        from_main(info, lambda: claim_out(self.out, record, start_over, {"optimizer_groups": groups}))

        if self.peak_tflops is not None:
            peak, peak_src = self.peak_tflops * 1e12, f"--peak-tflops {self.peak_tflops:g}"
        else:
            peak, peak_src = device_peak_flops(info.device, autocast_bf16)
        if info.is_main:
            print(f"model: {unwrap(model).num_parameters():,} parameters ({config.hidden_size} hidden x "
                  f"{config.num_hidden_layers} layers, vocab {config.vocab_size:,}); {len(stages)} stage(s), "
                  f"{sum(d.steps for d in stages):,} steps; {info.device}, {info.world_size} process(es), "
                  f"{'bf16 autocast' if autocast_bf16 else 'float32'}; MFU peak: {peak_src}", file=sys.stderr)
        metrics = MetricsLog(self.out, info.is_main)
        metrics.keep_until(state.global_step)  # a resumed run logs the steps after its checkpoint anew
        return RunContext(recipe=recipe, out=self.out, info=info, tokenizer=tokenizer, config=config, stages=stages,
                          model=model, forward=forward, optimizer=optimizer, state=state,
                          autocast_bf16=autocast_bf16, fsdp=fsdp, peak=peak, peak_src=peak_src,
                          metrics=metrics, progress=progress, held=held, before=before)

    # -- the loop ----------------------------------------------------------------------------------

    def train_stages(self, ctx: RunContext) -> None:
        """Every stage from the resume point on."""
        from tqdm import tqdm

        state = ctx.state
        # a kill between a stage's end checkpoint and its stage-<name>/ folder: write it now
        if state.stage > 0 and state.step_in_stage == 0:
            save_model_folder(ctx, ctx.out / f"stage-{ctx.stages[state.stage - 1].spec.name}")
        with tqdm(total=sum(d.steps for d in ctx.stages), initial=state.global_step, unit="step", file=sys.stderr,
                  disable=not ctx.progress, dynamic_ncols=True) as bar, StopRequest() as self.stop:
            for si in range(state.stage, len(ctx.stages)):
                self.train_stage(ctx, si, bar)

    def train_stage(self, ctx: RunContext, si: int, bar: Any) -> None:
        """One stage's steps; logs, evaluates and checkpoints between them, and ends the stage."""
        data, st, state, run = ctx.stages[si], ctx.stages[si].spec, ctx.state, ctx.recipe.run
        loader = self._start_stage(ctx, si)
        fpt = ctx.config.flops_per_token(st.seq_len)
        window, last_val, nonfinite = Window(), None, 0
        while state.step_in_stage < data.steps:
            k = state.step_in_stage
            lr = lr_at(k, data.steps, peak=st.lr, min_lr=st.min_lr, schedule=st.schedule, warmup=st.warmup,
                       decay=st.decay)
            step = self.train_step(ctx, loader, lr, st.grad_clip)
            nonfinite = 0 if step.finite else nonfinite + 1
            state.step_in_stage += 1
            state.global_step += 1
            state.tokens += step.tokens
            window.add(step.loss, step.num_loss_tokens, step.tokens, step.finite)
            bar.update(1)
            stage_end, g = state.step_in_stage == data.steps, state.global_step
            if not step.finite:
                self._skipped(ctx, si, k, step, nonfinite, stage_end, bar)
            val = None
            if stage_end or (run.eval_every and g % run.eval_every == 0):
                val = last_val = validation_loss(ctx, data)
                if not math.isfinite(val):
                    raise SmallCoderError(diverged_message(ctx, si, k, val, step.grad_norm, 1, stage_end,
                                                           what="validation loss"))
            if stage_end or (run.log_every and g % run.log_every == 0) or val is not None:
                self._log(ctx, st.name, window, lr, step.grad_norm, val, fpt, bar)
            if stage_end:
                self._end_stage(ctx, si, window.last_loss, last_val, bar)
                return self._stop_if_asked(ctx, None)
            if run.checkpoint_every and g % run.checkpoint_every == 0 and nonfinite == 0:
                save_checkpoint(ctx, state.to_dict(loader=loader.state_dict(), rng=rng_state()))
            if nonfinite == 0:
                self._stop_if_asked(ctx, loader)

    def _stop_if_asked(self, ctx: RunContext, loader: Any) -> None:
        """After a step: when asked to stop (on any rank), checkpoint here and end the run."""
        if not self.stop.agreed(ctx.info):
            return
        state = ctx.state
        if loader is not None and not any(s == state.global_step for s, _ in list_checkpoints(ctx.out)):
            save_checkpoint(ctx, state.to_dict(loader=loader.state_dict(), rng=rng_state()))
        saved = next(p for s, p in reversed(list_checkpoints(ctx.out)) if s == state.global_step)
        raise TrainingInterrupted(f"stopped at step {state.global_step} as asked; resumable checkpoint {saved}; "
                                  f"continue with: smallcoder train {ctx.recipe.path} --out {ctx.out} --resume "
                                  "(and the same --set options)")

    def train_step(self, ctx: RunContext, loader: Any, lr: float, grad_clip: float) -> StepOutcome:
        """One optimizer step at `lr`: the loader's next global batch forward and backward, the
        gradient clipped, and the update made only when the loss and the gradient norm are finite."""
        set_lr(ctx.optimizer, lr)
        step = loader.next_step()
        local = accumulate_gradients(ctx.model, ctx.forward, step, ctx.info, ctx.autocast)
        clip = grad_clip if grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), clip))
        loss = all_reduce_sum(local, ctx.info) / max(step.num_loss_tokens, 1)  # the same on every rank
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)  # a skipped step: the weights stay those of the last finite one
        return StepOutcome(loss, grad_norm, finite, step.tokens, step.num_loss_tokens)

    def _start_stage(self, ctx: RunContext, si: int) -> Any:
        """The stage's optimizer settings and its mixture loader (at the resume cursor mid-stage)."""
        from ..data.mixture import Component, MixtureLoader

        data, st, state = ctx.stages[si], ctx.stages[si].spec, ctx.state
        if state.step_in_stage == 0:
            state.stage_start_tokens = state.tokens
            # a stage that switches optimizer (AdamW SFT after Muon pre-training) starts a new one
            if si > 0 and (not st.carry_optimizer or kind(ctx.optimizer) != st.optimizer):
                ctx.optimizer = build_optimizer(ctx.model, st, ctx.fsdp)
            if st.optimizer == "muon" and ctx.info.is_main:
                from .distributed import unwrap
                from .muon import describe

                print(f"stage {st.name}: {describe(unwrap(ctx.model))}", file=sys.stderr)
        apply_stage(ctx.optimizer, st)
        loader = MixtureLoader([Component(s.name, s.train, s.weight) for s in data.sources],
                               seq_len=st.seq_len, global_batch=st.global_batch,
                               micro_batch=st.micro_batch_on(ctx.info.world_size),
                               seed=stage_seed(ctx.recipe.run.seed, st), pad_id=ctx.tokenizer.eos_id,
                               rank=ctx.info.rank, world_size=ctx.info.world_size,
                               pad_to_multiple_of=SFT_PAD_MULTIPLE if st.sft else None, fim=data.fim)
        if state.step_in_stage > 0:
            loader.load_state_dict(state.loader)
        if state.step_in_stage == 0 and self.peak_tflops is None and ctx.info.device.type == "cpu":
            ctx.peak = measure_cpu_peak()  # a shared CPU's speed drifts: re-measure per stage
        return loader

    def _skipped(self, ctx: RunContext, si: int, k: int, step: StepOutcome, times: int, stage_end: bool,
                 bar: Any) -> None:
        """A non-finite step: logged, then the run stops past the patience (or at a stage's end)."""
        patience = ctx.recipe.run.nonfinite_patience
        ctx.metrics.write({"step": ctx.state.global_step, "stage": ctx.stages[si].spec.name, "event": "nonfinite",
                           "loss": step.loss, "grad_norm": step.grad_norm})
        if times > patience or stage_end:
            raise SmallCoderError(diverged_message(ctx, si, k, step.loss, step.grad_norm, times, stage_end))
        if ctx.info.is_main:
            bar.write(f"warning: step {ctx.state.global_step}: loss {step.loss:g}, gradient norm "
                      f"{step.grad_norm:g}; skipped its update ({times} in a row, run.nonfinite_patience = "
                      f"{patience})", file=sys.stderr)

    def _log(self, ctx: RunContext, stage: str, window: Window, lr: float, grad_norm: float,
             val: float | None, fpt: float, bar: Any) -> None:
        """One metrics line for the window of steps since the last one."""
        state = ctx.state
        loss, tps = window.close()
        rec = {"step": state.global_step, "stage": stage, "stage_step": state.step_in_stage, "tokens": state.tokens,
               "loss": None if loss is None else round(loss, 6), "lr": lr, "grad_norm": round(grad_norm, 6),
               "tokens_per_s": round(tps, 1)}
        if val is not None:
            rec["val_loss"] = round(val, 6)
        if ctx.peak:
            rec["mfu"] = round(tps * fpt / ctx.peak, 5)
        ctx.metrics.write(rec)
        shown = "-" if window.last_loss is None else f"{window.last_loss:.3f}"
        text = f"{stage} loss {shown} lr {lr:.2e} {tps:,.0f} tok/s"
        bar.set_postfix_str(text, refresh=False)
        total = sum(d.steps for d in ctx.stages)
        every = max(1, total // LOG_LINES)  # no bar (a file, a pipe): about LOG_LINES lines a run
        if ctx.info.is_main and not ctx.progress and (state.global_step % every < ctx.recipe.run.log_every
                                                       or val is not None):
            val_text = "" if val is None else f" val {val:.3f}"
            print(f"step {state.global_step}/{total}: {text}{val_text}", file=sys.stderr, flush=True)

    def _end_stage(self, ctx: RunContext, si: int, train_loss: float | None, val_loss: float | None,
                   bar: Any) -> None:
        """Record the stage's result, checkpoint at the boundary, and write stage-<name>/."""
        data, state = ctx.stages[si], ctx.state
        state.stage_results.append(StageResult(data.spec.name, data.steps, state.tokens - state.stage_start_tokens,
                                               train_loss, val_loss))
        state.stage, state.step_in_stage, state.loader = si + 1, 0, None
        save_checkpoint(ctx, state.to_dict(rng=rng_state()))
        save_model_folder(ctx, ctx.out / f"stage-{data.spec.name}")
        ctx.metrics.plot()
        if ctx.info.is_main:
            bar.write(f"stage {data.spec.name} done: {data.steps} steps, train loss {train_loss:.4f}, "
                      f"val loss {val_loss:.4f}", file=sys.stderr)
