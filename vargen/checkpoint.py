"""Checkpoints: safetensors weights with the resolved config in the file's metadata,
plus a training-state file that loads with ``torch.load(..., weights_only=True)``; and loading
a trained component back from its weights file (:func:`load_component`, :func:`load_checked`,
:func:`load_tokenizer_for`, the memoised :func:`load_cached` that samplers use).

This module sits below ``tokenizers/``, ``models/``, ``sampling/`` and ``train/``: it imports only
the config and the registries, so everything that loads a checkpoint imports it downward.

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
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vargen.config import from_dict
from vargen.registry import REGISTRIES, TASKS, import_components

WEIGHTS = "model.safetensors"
# Model options added after checkpoints were written, with the value that reproduces the older
# models exactly: a checkpoint whose config lacks one equals a config holding that value.
# ``denoiser``: xAR's per-token head (MAR's design) was its only design before the backbone flow.
LATER_MODEL_KEYS = {"attn_l2_norm": False, "final_norm": True, "denoiser": "head"}


def with_later_keys(recorded: dict, known) -> dict:
    """A checkpoint's recorded model config with each key of :data:`LATER_MODEL_KEYS` that its
    schema knows (``known``: field names) but the record lacks set to its old-behaviour value,
    so an older checkpoint rebuilds the model it was trained as (e.g. TarFlow's ``final_norm``)."""
    return {**{k: v for k, v in LATER_MODEL_KEYS.items() if k in known and k not in recorded}, **recorded}


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
    import fcntl  # POSIX only: loading checkpoints must still import where there is no fcntl

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


# --------------------------------------------------------------------------------------
# Loading trained components
# --------------------------------------------------------------------------------------


def model_registry(schema: type):
    """The registry a run schema's ``model`` section names (TOKENIZERS, MODELS, ...)."""
    f = {f.name: f for f in dataclasses.fields(schema)}["model"]
    return REGISTRIES[f.metadata["registry"]]


def _with_later_model_keys(raw: dict) -> dict:
    """``raw`` (a stored run config) with model keys added since it was written at their old
    values (:func:`with_later_keys`); unchanged when its task or model is unknown (validation
    then names the problem)."""
    import_components()  # the registries know every task and model
    model = raw.get("model")
    try:
        schema = model_registry(TASKS.get(raw["task"]).schema).get(model["name"]).schema
    except (KeyError, TypeError):
        return raw
    known = {f.name for f in dataclasses.fields(schema)}
    return {**raw, "model": with_later_keys(dict(model), known)}


def load_component(path: str, device="cpu"):
    """Rebuild a trained component from one weights file (or run dir); returns (module, cfg).

    The config stored in the file is validated again, so a checkpoint written by an older
    schema fails with a message naming the key. A generator's tokenizer is checked by hash.
    """
    wpath = resolve_weights_path(path)
    state, meta = read_weights(wpath)
    try:
        cfg = from_dict(_with_later_model_keys(meta["config"]))  # imports the registering packages
    except ValueError as e:
        raise CheckpointError(f"checkpoint {wpath}: its stored config is not valid here: {e}") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"checkpoint {wpath} holds non-finite weights ({len(bad)} tensors, e.g. {bad[:3]}): its "
            "training diverged; use an earlier checkpoint (out_dir/checkpoints/step_*) or retrain with a "
            "lower train.lr"
        )
    module = model_registry(TASKS.get(cfg.task).schema).build(cfg.model)
    load_state_into(module, state, wpath)
    return module.to(device).eval(), cfg


_CACHE: OrderedDict = OrderedDict()  # (real path, mtime_ns, size, device) -> (module, cfg)
CACHE_SIZE = 8  # components kept loaded (drafts, classifiers); the least recently used goes first


def load_cached(path: str, device="cpu"):
    """:func:`load_component`, memoised on (file, its mtime and size, device): the one cache for
    samplers that load a helper model (a draft, a classifier) when first called. The module is
    shared between callers, so they must not change its weights; a rewritten file loads anew."""
    wpath = os.path.realpath(resolve_weights_path(path))
    st = os.stat(wpath)
    key = (wpath, st.st_mtime_ns, st.st_size, str(torch.device(device)))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    _CACHE[key] = load_component(wpath, device)
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return _CACHE[key]


def load_checked(path: str, want_sha256: str, what: str, user: str, device="cpu"):
    """``load_component`` of a run another run was built on, verified against its recorded hash.

    ``what`` names the loaded component and ``user`` the run that depends on it, for the message.
    """
    path = resolve_weights_path(path)
    if want_sha256 and file_sha256(path) != want_sha256:
        raise CheckpointError(
            f"{what} {path} changed since the {user} was trained (sha256 differs from "
            f"{want_sha256[:12]}...); retrain the {user} or restore that {what}"
        )
    return load_component(path, device)


def load_tokenizer_for(gen_cfg, device="cpu"):
    """The tokenizer a generator was trained on, verified against the recorded hash."""
    tok, _ = load_checked(gen_cfg.tokenizer_ckpt, gen_cfg.tokenizer_sha256, "tokenizer", "generator", device)
    return tok
