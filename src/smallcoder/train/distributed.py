"""Data-parallel scale-out on torch's own engine: torchrun start-up, DDP or FSDP2 wrapping, collectives.

`torchrun --nproc-per-node N -m smallcoder train ...` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; `init_distributed` reads them (gloo on CPU, NCCL on
CUDA) and without them returns a single-process `DistInfo` with no process group, so the same
trainer code runs either way. Every helper here is a no-op (or the identity) in a single process.

Order of use in the trainer::

    info = init_distributed(device)
    model = new_model(...).to(info.device)
    model = wrap_model(model, info, strategy)      # before building the optimizer: FSDP2 swaps the
    optimizer = AdamW(model.parameters(), ...)     # parameters for sharded DTensors; before compile
    for step in loader:                            # loader built with rank / world_size from info
        for i, mb in enumerate(step.micro_batches):
            with no_sync(model, enabled=i < len(step.micro_batches) - 1):
                loss_sum = model(mb["input_ids"].to(info.device), labels=mb["labels"].to(info.device))
                loss = loss_sum / step.num_loss_tokens * info.world_size
                loss.backward()
        clip_grad_norm_(model.parameters(), 1.0); optimizer.step(); optimizer.zero_grad()
    state = full_state_dict(model, info)           # collective: every rank calls it
    if info.is_main: save(...)

Gradient normalisation: the mixture loader gives each rank its contiguous slice of the global
batch and `Step.num_loss_tokens`, the count of trained labels in the WHOLE global batch (the same
number on every rank). DDP all-reduces gradients as an AVERAGE over ranks (FSDP2's reduce-scatter
averages too), so each rank's loss is `loss_sum / global_count * world_size`: the average of the
ranks' gradients is then sum over ranks of d(loss_sum_r / global_count), which is exactly the
single-process gradient of the whole global batch's mean loss per trained token. Dividing by the
rank's own count instead would weight ranks with few trained tokens (short SFT answers) more.
Multiplying and dividing by a power-of-two world size is exact in floating point, so 2-process
weights match the single-process ones up to the order of the gradient sums.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..checks import known
from ..errors import SmallCoderError
from .specs import STRATEGIES  # the recipe's `run.strategy` choices, defined once there

T = TypeVar("T")

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistInfo:
    """Where this process sits in the job; `backend` is None when there is no process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    is_main: bool


def _env_int(name: str, minimum: int) -> int:
    raw = os.environ.get(name)
    try:
        value = int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SmallCoderError(f"environment variable {name}={raw!r} must be an integer "
                              "(set by torchrun)") from None
    if value < minimum:
        raise SmallCoderError(f"environment variable {name}={raw!r} must be >= {minimum}")
    return value


def _pick_device(device: str, local_rank: int, distributed: bool) -> torch.device:
    """'auto' -> CUDA when available else CPU; under torchrun a CUDA process takes GPU `local_rank`."""
    if not isinstance(device, str):
        raise SmallCoderError(f"device must be a string ('auto', 'cpu', 'cuda' or 'cuda:N'), got {device!r}")
    name = device.strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise SmallCoderError(f"device {device!r}: this torch build sees no CUDA GPU "
                                  f"(torch {torch.__version__}); train on the CPU with --set run.device=cpu (or "
                                  "run.device = \"auto\" in the recipe)")
        if distributed:
            if name != "cuda":
                raise SmallCoderError(f"device {device!r}: under torchrun give 'cuda' (each process takes "
                                      "GPU LOCAL_RANK), not a fixed index")
            index = local_rank
        else:
            try:
                index = int(name.split(":", 1)[1]) if ":" in name else 0
            except ValueError:
                raise SmallCoderError(f"device {device!r}: the GPU index must be an integer") from None
        if not 0 <= index < torch.cuda.device_count():
            raise SmallCoderError(f"device {device!r}: GPU {index} does not exist "
                                  f"({torch.cuda.device_count()} visible)")
        return torch.device("cuda", index)
    raise SmallCoderError(f"unknown device {device!r}; choose 'auto', 'cpu', 'cuda' or 'cuda:N'")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun job described by the environment, or describe a lone process.

    A process group is made only when RANK and WORLD_SIZE are set (torchrun always sets them,
    also for one process, so FSDP2 can be tried on one GPU); an existing group is reused.
    """
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ and not dist.is_initialized():
        dev = _pick_device(device, 0, distributed=False)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(rank=0, world_size=1, local_rank=0, device=dev, backend=None, is_main=True)
    if not dist.is_available():
        raise SmallCoderError(f"RANK/WORLD_SIZE are set but this torch build ({torch.__version__}) "
                              "has no torch.distributed")
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        dev = _pick_device(device, local_rank, distributed=True)
        backend = str(dist.get_backend())
    else:
        missing = [v for v in _TORCHRUN_VARS if v not in os.environ and v != "LOCAL_RANK"]
        if missing:
            raise SmallCoderError(f"incomplete torchrun environment: {', '.join(missing)} not set "
                                  "(launch with `torchrun --nproc-per-node N -m smallcoder train ...`)")
        world_size = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        if rank >= world_size:
            raise SmallCoderError(f"environment variable RANK={rank} is outside WORLD_SIZE={world_size}")
        local_rank = _env_int("LOCAL_RANK", 0) if "LOCAL_RANK" in os.environ else rank
        dev = _pick_device(device, local_rank, distributed=True)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group(backend, rank=rank, world_size=world_size, device_id=dev)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
                    backend=backend, is_main=rank == 0)


def _fsdp_module_cls() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return None
    return FSDPModule


def unwrap(model: nn.Module) -> nn.Module:
    """The SmallCoder inside any torch.compile / DDP wrappers (FSDP2 shards in place: no wrapper)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    while True:
        if isinstance(model, DDP):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def wrap_model(model: nn.Module, info: DistInfo, strategy: str = "ddp") -> nn.Module:
    """Move `model` to the rank's device and make it data-parallel by `strategy`.

    "ddp": DistributedDataParallel (full replicas, gradients all-reduced; what the 303M model needs).
    "fsdp2": `fully_shard` on each decoder layer, then on the root (embeddings, final norm, head),
    so parameters, gradients and AdamW state are sharded; for models whose replicas don't fit.
    "none": unchanged. Without a process group every strategy returns the model unchanged (one
    process holds everything anyway); under torchrun with one process fsdp2 is still applied.
    Build the optimizer from the returned model's parameters, and compile after wrapping.
    """
    known(strategy, "distributed strategy", STRATEGIES)
    model = model.to(info.device)
    if strategy == "none" or info.backend is None:
        return model
    if strategy == "ddp":
        if info.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=device_ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    root = unwrap(model)
    trunk = getattr(root, "model", None)
    for layer in getattr(trunk, "layers", ()):
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)
    return model


@contextlib.contextmanager
def no_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce inside the block (non-final micro-steps of an accumulated step).

    Gradients still accumulate locally; the final micro-step (run with enabled=False) syncs the
    sum. DDP: `model.no_sync()`; FSDP2: `set_requires_gradient_sync(False)`; otherwise nothing.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not enabled:
        yield
        return
    inner = model
    while not isinstance(inner, DDP) and isinstance(getattr(inner, "_orig_mod", None), nn.Module):
        inner = inner._orig_mod
    if isinstance(inner, DDP):
        with inner.no_sync():
            yield
        return
    fsdp = _fsdp_module_cls()
    root = unwrap(model)
    if fsdp is not None and isinstance(root, fsdp):
        root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            root.set_requires_gradient_sync(True)
        return
    yield


def full_state_dict(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The whole model's weights as CPU tensors under the SmallCoder's own (HF) key names, for saving.

    A collective under FSDP2: every rank must call it; the shards are gathered and only rank 0
    gets the tensors (other ranks get {}). Otherwise every rank gets them; on CPU the tensors
    share storage with the live parameters (no 1.2 GB copy for the 303M model), so save them
    before the next optimizer step.
    """
    root = unwrap(model)
    fsdp = _fsdp_module_cls()
    if fsdp is not None and isinstance(root, fsdp):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if info.is_main else {}
    return {k: v.detach().to("cpu") for k, v in root.state_dict().items()}


def all_reduce_sum(value: float, info: DistInfo) -> float:
    """`value` summed over ranks (float64 on the wire); the value itself in a single process."""
    if info.backend is None or info.world_size == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank (e.g. the resume step chosen by rank 0)."""
    if info.backend is None or info.world_size == 1:
        return obj
    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=info.device if info.device.type == "cuda" else None)
    return box[0]


def from_main(info: DistInfo, fn: Callable[[], T]) -> T:
    """`fn()` run on rank 0 alone (a check, a lock, a choice that changes OUT), its picklable
    result on every rank; a SmallCoderError raised there is raised on every rank, so no rank
    waits for one that has stopped."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except SmallCoderError as e:
            error = str(e)
    result, error = broadcast_object((result, error), info)
    if error:
        raise SmallCoderError(error)
    return result  # type: ignore[return-value]


def barrier(info: DistInfo) -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint)."""
    if info.backend is None or info.world_size == 1:
        return
    if info.device.type == "cuda":
        dist.barrier(device_ids=[info.device.index])
    else:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leave the process group (torch warns at exit when a group is left open)."""
    if info.backend is not None and dist.is_initialized():
        dist.destroy_process_group()
