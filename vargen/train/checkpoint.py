"""Checkpoints: safetensors weights with the resolved config in the file's metadata,
plus a training-state file that loads with ``torch.load(..., weights_only=True)``.

Layout of a run directory::

    out_dir/model.safetensors                   newest weights (what sample.py and
                                                dependent runs point at)
    out_dir/checkpoints/step_0001000/           one complete checkpoint
        model.safetensors                       weights + metadata {config, step, task}
        train_state.pt                          optimizer, step, RNG states (tensors/dicts only)
    out_dir/latest                              name of the newest complete checkpoint

Writes are atomic: a checkpoint is assembled in a temporary directory and renamed into
place, then ``latest`` and ``model.safetensors`` are replaced with ``os.replace``. A
crash at any point leaves the previous checkpoint intact and ``latest`` pointing at it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
STATE = "train_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: str, write_fn) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _weights_payload(model: torch.nn.Module) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_weights(path: str, model: torch.nn.Module, config: dict, step: int, task: str) -> None:
    """Write weights + config metadata to ``path`` atomically."""
    meta = {"config": json.dumps(config), "step": str(step), "task": task, "format": "vargen-1"}
    _atomic_write(path, lambda tmp: save_file(_weights_payload(model), tmp, metadata=meta))


def save_checkpoint(
    out_dir: str,
    model: torch.nn.Module,
    train_state: dict,
    config: dict,
    step: int,
    task: str,
    keep_last: int = 2,
) -> str:
    """Write a complete checkpoint for ``step``; returns its directory."""
    ckpt_root = os.path.join(out_dir, "checkpoints")
    os.makedirs(ckpt_root, exist_ok=True)
    name = f"step_{step:07d}"
    final = os.path.join(ckpt_root, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=ckpt_root)
    try:
        meta = {"config": json.dumps(config), "step": str(step), "task": task, "format": "vargen-1"}
        save_file(_weights_payload(model), os.path.join(tmp, WEIGHTS), metadata=meta)
        torch.save({**train_state, "step": step}, os.path.join(tmp, STATE))
        if os.path.exists(final):  # same step written again (e.g. end == ckpt_every)
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    _atomic_write(os.path.join(out_dir, "latest"), lambda p: open(p, "w").write(name + "\n"))
    _atomic_write(os.path.join(out_dir, WEIGHTS), lambda p: shutil.copyfile(os.path.join(final, WEIGHTS), p))
    _prune(ckpt_root, keep_last, keep=name)
    return final


def _prune(ckpt_root: str, keep_last: int, keep: str) -> None:
    steps = sorted(d for d in os.listdir(ckpt_root) if d.startswith("step_"))
    for d in steps[: max(0, len(steps) - max(1, keep_last))]:
        if d != keep:
            shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)


def latest_checkpoint(out_dir: str) -> str | None:
    """Directory of the newest complete checkpoint in a run directory, or None."""
    pointer = os.path.join(out_dir, "latest")
    if not os.path.isfile(pointer):
        return None
    name = open(pointer).read().strip()
    path = os.path.join(out_dir, "checkpoints", name)
    if not os.path.isdir(path):
        raise CheckpointError(
            f"{pointer} names {name}, which is missing from {os.path.dirname(path)}; "
            "delete the 'latest' file to start over, or restore the checkpoint"
        )
    return path


def resolve_weights_path(path: str) -> str:
    """Accept a weights file, a checkpoint directory or a run directory."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, WEIGHTS)):
            return os.path.join(path, WEIGHTS)
        raise CheckpointError(f"no {WEIGHTS} in {path}: is it a vargen run directory that finished a save?")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def read_weights(path: str) -> tuple[dict, dict]:
    """(state_dict, metadata) of a weights file; metadata['config'] decoded to a dict."""
    path = resolve_weights_path(path)
    try:
        state = load_file(path)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a safetensors file ({e}); "
            "point to another checkpoint or retrain"
        ) from None
    if "config" not in meta:
        raise CheckpointError(
            f"checkpoint {path} has no vargen config in its metadata (not written by vargen?)"
        )
    try:
        meta["config"] = json.loads(meta["config"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: config metadata is not valid JSON ({e})") from None
    return state, meta


def load_state_into(model: torch.nn.Module, state: dict, path: str) -> None:
    """Load weights, turning a mismatch into a message that names the file and the keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}")
        if shape:
            parts.append(
                "shape mismatch "
                + ", ".join(
                    f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in shape[:5]
                )
            )
        raise CheckpointError(f"checkpoint {path} does not match the model: {'; '.join(parts)}")
    model.load_state_dict(state)


def read_train_state(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, STATE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"training state {path} cannot be loaded ({type(e).__name__}: {e}); "
            "delete that checkpoint directory to resume from the one before it"
        ) from None
