"""Checkpoints: safetensors weights with the resolved config in the file's metadata,
plus a training-state file that loads with ``torch.load(..., weights_only=True)``.

Layout of a run directory::

    out_dir/model.safetensors                   newest weights (what sample.py and
                                                dependent runs point at)
    out_dir/checkpoints/step_0001000/           one complete checkpoint
        model.safetensors                       weights + metadata {config, step, task}
        train_state.pt                          optimizer, step, RNG states (tensors/dicts only)
        checksums.json                          sha256 of both files, written with them
    out_dir/latest                              name of the newest complete checkpoint

Writes are atomic: a checkpoint is assembled in a temporary directory (``.step_*``) and
renamed into place, then ``latest`` and ``model.safetensors`` are replaced with
``os.replace``. A crash at any point leaves the previous checkpoint intact.

Recovery does not trust ``latest`` alone: :func:`find_checkpoint` scans the ``step_*``
directories from the newest down and takes the first whose files match their recorded
checksums, so a missing or stale ``latest`` and a truncated or bit-flipped file lose at
most the damaged checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
# Model options added after checkpoints were written, with the value that reproduces the older
# models exactly: a checkpoint whose config lacks one equals a config holding that value.
# ``denoiser``: xAR's per-token head (MAR's design) was its only design before the backbone flow.
LATER_MODEL_KEYS = {"attn_l2_norm": False, "denoiser": "head"}


def fill_later_keys(model: dict, schema: type) -> dict:
    """``model`` (a recorded model config) with each key of :data:`LATER_MODEL_KEYS` that
    ``schema`` has and ``model`` lacks set to its old-behaviour value: an old checkpoint rebuilds
    the model it was trained as, even where the key's default has since changed."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(schema)}
    return {**{k: v for k, v in LATER_MODEL_KEYS.items() if k in fields and k not in model}, **model}


def same_model_config(recorded: dict | None, now: dict | None) -> bool:
    """Equal model configs, reading a key of :data:`LATER_MODEL_KEYS` missing from ``recorded``
    as its old-behaviour value."""
    if recorded is None or now is None:
        return recorded == now
    filled = {**{k: v for k, v in LATER_MODEL_KEYS.items() if k in now}, **recorded}
    return filled == now


STATE = "train_state.pt"
CHECKSUMS = "checksums.json"


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
        sums = {f: file_sha256(os.path.join(tmp, f)) for f in (WEIGHTS, STATE)}
        with open(os.path.join(tmp, CHECKSUMS), "w") as f:
            json.dump(sums, f)
        if os.path.exists(final):  # same step written again (e.g. end == ckpt_every)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except (OSError, SafetensorError, RuntimeError) as e:  # a full disk, a quota, a lost mount
        kept = sorted(d for d in os.listdir(ckpt_root) if d.startswith("step_"))
        raise CheckpointError(
            f"cannot write checkpoint {final} ({type(e).__name__}: {e}); free disk space (or fix the folder) "
            f"and rerun with train.resume=true; the previous checkpoint ({kept[-1] if kept else 'none yet'}) "
            "is intact"
        ) from None
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    point_to(out_dir, final)
    _prune(ckpt_root, keep_last, keep=name)
    return final


def point_to(out_dir: str, ckpt_dir: str) -> None:
    """Make ``latest`` and ``out_dir/model.safetensors`` name checkpoint ``ckpt_dir``."""
    name = os.path.basename(ckpt_dir)
    _atomic_write(os.path.join(out_dir, "latest"), lambda p: open(p, "w").write(name + "\n"))
    _atomic_write(
        os.path.join(out_dir, WEIGHTS), lambda p: shutil.copyfile(os.path.join(ckpt_dir, WEIGHTS), p)
    )


def _prune(ckpt_root: str, keep_last: int, keep: str) -> None:
    steps = sorted(d for d in os.listdir(ckpt_root) if d.startswith("step_"))
    for d in steps[: max(0, len(steps) - max(1, keep_last))]:
        if d != keep:
            shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)


def checkpoint_dirs(out_dir: str) -> list[str]:
    """Names of the ``step_*`` checkpoint directories of a run, oldest first."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(
        d for d in os.listdir(root) if d.startswith("step_") and os.path.isdir(os.path.join(root, d))
    )


def checkpoint_problem(ckpt_dir: str) -> str | None:
    """Why checkpoint directory ``ckpt_dir`` cannot be resumed from, or None when it can.

    Files are compared with the checksums recorded when the checkpoint was written (so a
    flipped bit inside a tensor is caught); checkpoints from before checksums were
    recorded are loaded instead.
    """
    for f in (WEIGHTS, STATE):
        if not os.path.isfile(os.path.join(ckpt_dir, f)):
            return f"{f} is missing"
    sums_path = os.path.join(ckpt_dir, CHECKSUMS)
    if os.path.isfile(sums_path):
        try:
            sums = json.load(open(sums_path))
        except (OSError, ValueError) as e:
            return f"{CHECKSUMS} is unreadable ({e})"
        for f in (WEIGHTS, STATE):
            if file_sha256(os.path.join(ckpt_dir, f)) != sums.get(f):
                return f"{f} does not match the sha256 recorded when it was written (damaged on disk)"
        return None
    try:
        read_weights(os.path.join(ckpt_dir, WEIGHTS))
        read_train_state(ckpt_dir)
    except CheckpointError as e:
        return str(e)
    return None


def find_checkpoint(out_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(newest usable checkpoint directory or None, [(damaged newer directory, why)]).

    Scans every ``step_*`` directory from the newest down; ``latest`` is not needed.
    """
    damaged = []
    root = os.path.join(out_dir, "checkpoints")
    for name in reversed(checkpoint_dirs(out_dir)):
        path = os.path.join(root, name)
        why = checkpoint_problem(path)
        if why is None:
            return path, damaged
        damaged.append((path, why))
    return None, damaged


def latest_checkpoint(out_dir: str) -> str | None:
    """Directory of the newest usable checkpoint in a run directory, or None."""
    return find_checkpoint(out_dir)[0]


def set_aside(path: str) -> str:
    """Rename a damaged checkpoint directory to ``damaged_<name>`` (kept for inspection,
    no longer a ``step_*`` that recovery or pruning would pick up); returns the new path."""
    root, name = os.path.split(path)
    dest = os.path.join(root, f"damaged_{name}")
    k = 1
    while os.path.exists(dest):
        dest, k = os.path.join(root, f"damaged_{name}.{k}"), k + 1
    os.replace(path, dest)
    return dest


def remove_abandoned_writes(out_dir: str) -> list[str]:
    """Delete temporary ``.step_*`` folders and ``.tmp-*`` files that killed writes left
    behind (only call this while holding the run lock); returns what was removed."""
    removed = []
    for folder, prefix in ((os.path.join(out_dir, "checkpoints"), ".step_"), (out_dir, ".tmp-")):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if name.startswith(prefix) or (prefix == ".step_" and name.startswith(".tmp-")):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
                removed.append(path)
    return removed


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


LOCK = "train.lock"


class RunLocked(CheckpointError):
    """Another live process is training into the same out_dir."""


@contextlib.contextmanager
def run_lock(out_dir: str, log=print):
    """Hold ``out_dir/train.lock`` (an exclusive ``flock``, the file names the pid) while a
    run writes into ``out_dir``. A second run into the same folder is refused while the
    first is alive; the kernel drops the lock when its holder dies, so the lock file a
    killed run left behind is taken over (Linux/macOS file locks). A folder the lock itself
    created is removed again when the run leaves it empty (a refused config writes nothing)."""
    import fcntl

    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunLocked(
                f"another training (pid {holder}) is writing into {out_dir}; wait for it to finish or choose "
                f"another out_dir (nothing was changed). If no such process runs, delete {path}"
            ) from None
        try:  # the file we locked may have been removed by a finishing holder: lock the new one
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
    if previous:
        log(f"took over {path} left by pid {previous}, which no longer holds it")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield path
    finally:
        os.remove(path)
        os.close(fd)
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)
