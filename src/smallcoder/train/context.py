"""The run context: everything `Trainer.setup()` prepares and the loop, the checkpoints and the
in-training evaluation read, in one typed object (none of them works from half-set attributes)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..tokenizer import Tokenizer
    from .distributed import DistInfo
    from .metrics import MetricsLog
    from .recipe import Recipe
    from .runstate import RunState
    from .stagedata import StageData


@dataclass
class RunContext:
    recipe: Recipe
    out: Path
    info: DistInfo
    tokenizer: Tokenizer
    config: ModelConfig         # the architecture trained (an init checkpoint's, context widened)
    stages: list[StageData]     # every stage's data, packed and verified, and its step count
    model: torch.nn.Module      # on the device, wrapped for the strategy (DDP / FSDP2); unwrap() gives the SmallCoder
    forward: Callable[..., Any]  # the model, or torch.compile(model) with run.compile
    optimizer: torch.optim.Optimizer
    state: RunState             # where the run stands (fresh, or read from the resume checkpoint)
    autocast_bf16: bool         # run.dtype = bfloat16 and the device multiplies bf16 natively
    fsdp: bool                  # parameters are FSDP2 DTensors (optimizer state is gathered to save)
    peak: float | None          # device peak FLOP/s for MFU (None: unknown)
    peak_src: str               # where that number comes from
    metrics: MetricsLog
    progress: bool              # show the progress bar (rank 0, a terminal or asked for)
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # the OUT lock
    before: dict[str, Any] | None = None  # the learning report's "before" side (a fresh run's rank 0)

    def autocast(self) -> Any:
        """The forward's autocast: bf16 where `autocast_bf16`, else nothing."""
        if self.autocast_bf16:
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def close(self) -> None:
        """Release the lock on OUT and leave the process group."""
        from .distributed import shutdown

        try:
            self.held.close()
        finally:
            shutdown(self.info)
