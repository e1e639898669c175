"""Process-group setup for ``torchrun`` (gloo on CPU, nccl on CUDA) and small helpers.

A plain ``python train.py`` is a world of one and never touches torch.distributed.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size), (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup(device_pref: str = "auto") -> torch.device:
    """Initialise the process group when launched by torchrun; return this rank's device."""
    if device_pref.startswith("cuda"):
        index = int(device_pref.split(":")[1]) if ":" in device_pref else 0
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device_pref} but CUDA is not available here (torch.cuda.is_available() is False); "
                "set device=cpu, or device=auto to use a GPU only when there is one"
            )
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device_pref} but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    n = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = (
        torch.cuda.is_available() and device_pref in ("auto", "cuda") or device_pref.startswith("cuda:")
    )
    if device_pref == "cpu":
        use_cuda = False
    if n > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        if device_pref.startswith("cuda:") and n == 1:
            return torch.device(device_pref)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_true(flag: bool, device) -> bool:
    """True on every rank iff ``flag`` is true on every rank."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def max_param_divergence(model: torch.nn.Module) -> float:
    """Largest |difference| of any parameter between this rank and rank 0 (0 if one process)."""
    if world()[1] == 1:
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff.item())
