"""The one training loop every trainable component goes through.

A trainable component is an ``nn.Module`` with ``loss(x, y) -> dict``; the loop
optimises ``out["loss"]`` with AdamW (warmup + cosine), logs every other scalar, writes
atomic checkpoints and resumes exactly: the batch of step s is a pure function of
(seed, s), and the optimizer state, step and RNG states are restored, so the losses
after a resume equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
from tqdm.auto import tqdm

from vargen import distributed as D
from vargen.checkpoint import (
    WEIGHTS,
    CheckpointError,
    checkpoint_dirs,
    file_sha256,
    find_checkpoint,
    latest_checkpoint,
    load_state_into,
    point_to,
    read_train_state,
    read_weights,
    remove_abandoned_writes,
    same_model_config,
    save_checkpoint,
    set_aside,
)
from vargen.config import to_plain
from vargen.io import log_path, read_log
from vargen.train.visuals import TrainingVisuals


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


class _LossModule(torch.nn.Module):
    """Routes DDP's forward through ``model.loss`` so gradient sync hooks fire."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model.loss(x, y)


def lr_at(step: int, tc) -> float:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    span = max(1, tc.steps - tc.warmup_steps)
    frac = min(1.0, (step - tc.warmup_steps) / span)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Indices of the global batch of ``step``: epoch e is a permutation seeded by (seed, e)."""
    per_epoch = max(1, n // batch)
    epoch, j = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    if batch > n:  # tiny sets: repeat the permutation
        perm = perm.repeat(math.ceil(batch / n))
    return perm[j * batch : (j + 1) * batch]


def _rng_state() -> dict:
    state = {"rng_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])


def _truncate_log(out_dir: str, upto_step: int) -> None:
    rows = [r for r in read_log(out_dir) if r.get("step", 0) <= upto_step]
    with open(log_path(out_dir), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _scalars(out: dict) -> dict:
    return {k: float(v.detach().float().item()) if torch.is_tensor(v) else float(v) for k, v in out.items()}


@torch.no_grad()
def heldout_metrics(model, x: torch.Tensor, y: torch.Tensor, device, batch: int = 512) -> dict:
    """``model.loss`` averaged over a held-out set, in eval mode, leaving the RNG untouched."""
    was_training = model.training
    model.eval()
    sums, n = {}, 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in range(0, x.shape[0], batch):
            out = _scalars(model.loss(x[i : i + batch].to(device), y[i : i + batch].to(device)))
            k = min(batch, x.shape[0] - i)
            for key, v in out.items():
                sums[key] = sums.get(key, 0.0) + v * k
            n += k
    model.train(was_training)
    return {f"heldout_{k}": v / n for k, v in sums.items()}


def write_run_config(out_dir: str, config: dict) -> None:
    """``out_dir/config.yaml``: the resolved config of the run (shapes filled in)."""
    from omegaconf import OmegaConf

    path = os.path.join(out_dir, "config.yaml")
    tmp = path + ".tmp"
    OmegaConf.save(OmegaConf.create(config), tmp)
    os.replace(tmp, path)


def _float_buffers(model) -> dict:
    """Copies of the floating-point buffers (EMA codebooks, running stats) before a step."""
    return {k: b.detach().clone() for k, b in model.named_buffers() if b.is_floating_point()}


def _check_finite_weights(model, step: int) -> None:
    """Refuse to save weights holding NaN/inf (a checkpoint must always be a good one)."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingError(
            f"at step {step} the weights hold non-finite values ({len(bad)} tensors, e.g. {bad[:3]}); this "
            "checkpoint was not written. Lower train.lr or set train.grad_clip, then rerun with "
            "train.resume=true"
        )


def _resume(model, opt, config: dict, out_dir: str, resume: bool, rank: int, log) -> tuple[int, dict]:
    """Restore the newest usable checkpoint when ``resume``; returns (step to start from,
    the restored training state or {}).

    Refuses to start from step 0 over existing checkpoints, and to resume when every
    checkpoint is damaged, so no good checkpoint is ever overwritten.
    """
    present = checkpoint_dirs(out_dir)
    ckpt_root = os.path.join(out_dir, "checkpoints")
    if not resume:
        if present:
            raise TrainingError(
                f"{out_dir} already holds checkpoints ({', '.join(present[-3:])}); pass train.resume=true to "
                f"continue from the newest usable one, choose another out_dir, or delete {ckpt_root} to "
                "start over (nothing was overwritten)"
            )
        if rank == 0:
            remove_abandoned_writes(out_dir)
            if os.path.exists(log_path(out_dir)):
                os.remove(log_path(out_dir))
        return 0, {}
    existing, damaged = find_checkpoint(out_dir)
    if existing is None and damaged:
        reasons = "; ".join(f"{path}: {why}" for path, why in damaged)
        raise CheckpointError(
            f"train.resume=true but no checkpoint in {ckpt_root} is usable ({reasons}); restore one, "
            f"or delete {ckpt_root} to start over, or choose another out_dir (nothing was overwritten)"
        )
    if rank == 0:
        for path in remove_abandoned_writes(out_dir):
            log(f"removed {path}, left by an interrupted checkpoint write")
    if existing is None:
        log(f"train.resume=true but {out_dir} has no checkpoint yet: starting from step 0")
        if rank == 0 and os.path.exists(log_path(out_dir)):
            os.remove(log_path(out_dir))
        return 0, {}
    state, meta = read_weights(os.path.join(existing, WEIGHTS))
    if not same_model_config(meta["config"].get("model"), config.get("model")):
        raise CheckpointError(
            f"cannot resume from {existing}: its model config {meta['config'].get('model')} differs "
            f"from this run's {config.get('model')}"
        )
    for key, recorded in meta["config"].items():  # runs this one was built on (tokenizer, teacher)
        now = config.get(key)
        if key.endswith("_sha256") and recorded and now and now != recorded:
            what = key[: -len("_sha256")]
            raise CheckpointError(
                f"cannot resume from {existing}: the {what} {config.get(what + '_ckpt', '')} changed since "
                f"that checkpoint was written (sha256 {now[:12]}... vs {recorded[:12]}... recorded); "
                f"restore the {what} it was trained on, or train into a new out_dir"
            )
    load_state_into(model, state, os.path.join(existing, WEIGHTS))
    ts = read_train_state(existing)
    try:
        opt.load_state_dict(ts["optimizer"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state in {existing} does not match the model: {e}") from None
    _set_rng_state(ts)
    start = int(ts["step"])
    if rank == 0:
        for path, why in damaged:
            log(f"checkpoint {path} is damaged ({why}); moved to {set_aside(path)}")
        top = os.path.join(out_dir, WEIGHTS)
        want = file_sha256(os.path.join(existing, WEIGHTS))
        stale_top = not os.path.isfile(top) or file_sha256(top) != want
        if damaged or stale_top or os.path.basename(existing) != _read_latest(out_dir):
            point_to(out_dir, existing)  # what sample.py reads matches what training continues from
        _truncate_log(out_dir, start)
    if D.world()[1] > 1:  # rank 0 has repointed 'latest' before anyone saves
        torch.distributed.barrier()
    log(f"resumed from {existing} at step {start}")
    return start, ts


def _read_latest(out_dir: str) -> str | None:
    path = os.path.join(out_dir, "latest")
    return open(path).read().strip() if os.path.isfile(path) else None


def fit(
    model,
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    run_cfg,
    device,
    task: str,
    log=print,
    heldout=None,
    sample_fn=None,
):
    """Train ``model`` on (x_all, y_all) as configured in ``run_cfg.train``; returns the model.

    ``heldout`` = (x, y) adds ``heldout_*`` metrics to the log every ``train.eval_every`` steps
    (and redraws ``loss.png``); ``sample_fn(model) -> images`` (generators) is drawn to
    ``samples/step_N.png`` every ``train.sample_every`` steps (see :mod:`vargen.train.visuals`).
    """
    tc, out_dir = run_cfg.train, run_cfg.out_dir
    rank, world_size = D.world()
    if tc.batch_size % world_size:
        raise TrainingError(f"train.batch_size={tc.batch_size} is not divisible by {world_size} processes")
    config = to_plain(run_cfg)
    os.makedirs(out_dir, exist_ok=True)
    model.to(device).train()
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr,
        betas=tuple(tc.betas),
    )

    start, resumed = _resume(model, opt, config, out_dir, tc.resume, rank, log)
    if rank == 0:  # only now that the run is accepted: a refused command leaves the record alone
        write_run_config(out_dir, config)
    visuals = TrainingVisuals(out_dir, sample_fn, tc.sample_every, log) if rank == 0 else None
    skipped, consecutive = int(resumed.get("skipped_nonfinite", 0)), 0
    runner = _LossModule(model)
    if tc.compile:
        if device.type == "cuda":
            runner = torch.compile(runner)
        else:
            log("train.compile=true is ignored on CPU")
    if world_size > 1:
        runner = torch.nn.parallel.DistributedDataParallel(
            runner, device_ids=[device.index] if device.type == "cuda" else None
        )
    use_amp = tc.amp and device.type == "cuda"
    if tc.amp and not use_amp:
        log("train.amp=true is ignored on CPU")

    n = x_all.shape[0]
    bar = tqdm(
        range(start, tc.steps),
        initial=start,
        total=tc.steps,
        desc=task,
        disable=rank != 0 or not tc.progress or not sys.stderr.isatty(),
    )
    t0 = time.perf_counter()
    for step in bar:
        idx = batch_indices(step, n, tc.batch_size, run_cfg.seed)[rank::world_size]
        x, y = x_all[idx].to(device), y_all[idx].to(device)
        lr = lr_at(step, tc)
        for group in opt.param_groups:
            group["lr"] = lr
        buffers = _float_buffers(model)  # forward may update them (codebook EMA): undone on a skip
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = runner(x, y)
        loss = out["loss"]
        # A non-finite loss or gradient skips the update (every rank agrees: DDP's gradients
        # are already averaged), so no NaN/inf ever reaches the weights or a checkpoint.
        finite = D.all_true(bool(torch.isfinite(loss).item()), device)
        opt.zero_grad(set_to_none=True)
        grad_norm = torch.tensor(float("nan"))
        if finite:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), tc.grad_clip if tc.grad_clip > 0 else 1e30
            )
            finite = D.all_true(bool(torch.isfinite(grad_norm).item()), device)
        if finite:
            opt.step()
            consecutive = 0
        else:
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, b in model.named_buffers():
                    if name in buffers:
                        b.copy_(buffers[name])
            skipped, consecutive = skipped + 1, consecutive + 1
            what = (
                f"loss is {loss.item()}"
                if not torch.isfinite(loss)
                else f"gradient norm is {float(grad_norm)}"
            )
            if consecutive >= tc.max_nonfinite_steps:
                latest = latest_checkpoint(out_dir)
                raise TrainingError(
                    f"{what} at step {step}, {consecutive} steps in a row (train.max_nonfinite_steps="
                    f"{tc.max_nonfinite_steps}): training stopped; no non-finite update was applied and "
                    f"the last good checkpoint ({latest or 'none yet'}) is untouched. Lower train.lr or set "
                    "train.grad_clip, then rerun with train.resume=true"
                )
            log(
                f"[{task}] step {step + 1}/{tc.steps}: {what}; update skipped ({skipped} so far, "
                f"{consecutive} in a row; training stops at train.max_nonfinite_steps="
                f"{tc.max_nonfinite_steps} in a row)"
            )

        done = step + 1
        evaluate = heldout is not None and tc.eval_every > 0 and done % tc.eval_every == 0
        if rank == 0 and (done % tc.log_every == 0 or done == tc.steps or evaluate):
            row = {"step": done, **_scalars(out), "lr": lr, "grad_norm": float(grad_norm)}
            row["skipped_nonfinite"] = skipped
            if evaluate:
                row.update(heldout_metrics(model, *heldout, device))
            row["elapsed_s"] = round(time.perf_counter() - t0, 3)
            with open(log_path(out_dir), "a") as f:
                f.write(json.dumps(row) + "\n")
            visuals.logged(row, evaluate, done == tc.steps)
            msg = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "elapsed_s"))
            if bar.disable:
                log(f"[{task}] step {done}/{tc.steps} {msg}")
            else:
                bar.set_postfix_str(msg)
        if rank == 0:
            visuals.step_done(model, done)
        if done % tc.ckpt_every == 0 or done == tc.steps:
            if rank == 0:
                _check_finite_weights(model, done)
                train_state = {"optimizer": opt.state_dict(), "skipped_nonfinite": skipped, **_rng_state()}
                save_checkpoint(out_dir, model, train_state, config, done, task, tc.keep_last)
            if world_size > 1:
                torch.distributed.barrier()
    bar.close()
    if rank == 0:
        visuals.close()
    if world_size > 1:
        div = D.max_param_divergence(model)
        if rank == 0:
            with open(os.path.join(out_dir, "ddp_check.json"), "w") as f:
                json.dump({"world_size": world_size, "max_param_divergence": div}, f)
            log(f"ddp: max parameter difference across {world_size} ranks = {div:.3g}")
    model.eval()
    return model
