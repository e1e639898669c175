"""The ``lsd`` task: distil an LSD / LSD+ student from a trained ``mdm`` generator.

    python train.py --config configs/digits_lsd.yaml teacher_ckpt=runs/digits_mdm

Each step draws ``train.batch_size`` class labels and teacher trajectories (``teacher_steps``
uniform Euler steps from all-mask, states recorded, no gradient), runs the student on its own
trajectory with its current coefficients and times (objective ``own_trajectory``, the default, or
``score_l2``), and takes one Adam step on the student's coefficients (and, with ``model.learn_steps``,
its step logits) to lower the LSD loss (vargen/diffusion/lsd.py, which says what the reference code
defines and what it leaves open; ``objective=teacher_forced`` is the earlier vargen loss on the
teacher's states). The network itself is the teacher's and stays frozen. The batch of step
s depends only on (seed, s), so ``train.resume=true`` continues exactly.

Writes ``model.safetensors`` + ``checkpoints/`` (atomic, vargen/checkpoint.py; the teacher's
weights + ``coef`` + ``step_logits``; its config names the tokenizer so sample.py decodes) and
``eval.json``: the loss on a fixed evaluation batch before (c = 1, uniform steps) and after.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

from vargen.checkpoint import (
    WEIGHTS,
    CheckpointError,
    file_sha256,
    latest_checkpoint,
    load_checked,
    load_state_into,
    read_train_state,
    read_weights,
    resolve_weights_path,
    save_checkpoint,
)
from vargen.config import RunConfig, component, to_plain
from vargen.diffusion.absorbing import all_mask, sample_chain, uniform_times
from vargen.diffusion.lsd import OBJECTIVES, distill_loss, score_l2_loss, student_rollout, teacher_forced_loss
from vargen.registry import MODELS, TASKS
from vargen.train.loop import TrainingError
from vargen.train.tasks import _device, _write_eval


@dataclass
class LSDRun(RunConfig):
    task: str = "lsd"
    model: dict = component("MODELS", {"name": "lsd_student"})
    teacher_ckpt: str = "???"  # weights file or run directory of a trained mdm generator
    teacher_sha256: str = ""  # filled in at training time; a resumed run checks it
    teacher_steps: int = 64  # N: the teacher's uniform Euler steps
    cfg_scale: float = 1.0  # guidance of teacher and student during distillation
    temperature: float = 1.0
    objective: str = "own_trajectory"  # or "score_l2", "teacher_forced" (vargen/diffusion/lsd.py)
    eval_batch: int = 256  # fixed trajectories for the before / after loss in eval.json
    tokenizer_ckpt: str = ""  # copied from the teacher's run (sample.py decodes with it)
    tokenizer_sha256: str = ""


EVAL_STEP = 10**9  # the "step" whose batch is the fixed evaluation batch


def _batch(step: int, seed: int, batch: int, num_classes: int, device):
    """Labels and a sampling generator for ``step``: a pure function of (seed, step)."""
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
    labels = torch.randint(num_classes, (batch,), generator=g, device=device)
    return labels, g


def _loss(net, times, coefs, labels, g, cfg, teacher_times):
    """Teacher trajectories for ``labels`` (no gradient), then (``own_trajectory``) the student's
    own trajectories with ``times`` / ``coefs`` from the same x_T, and the LSD loss; returns
    (loss, per-step losses)."""

    def logp0(x_BN):
        return net.log_p0(x_BN, labels, cfg.cfg_scale, cfg.temperature)

    x_T = all_mask(labels.shape[0], net.num_tokens, net.vocab_size, labels.device)
    _, states = sample_chain(logp0, x_T, teacher_times, net.eps, g, record=True)
    if cfg.objective == "teacher_forced":
        return teacher_forced_loss(logp0, states, teacher_times, times, coefs, net.eps)
    own, own_logp0 = student_rollout(logp0, x_T, times, coefs, net.eps, g)
    loss_fn = score_l2_loss if cfg.objective == "score_l2" else distill_loss
    return loss_fn(own_logp0, own, logp0, states, teacher_times, times, coefs, net.eps)


@TASKS.register("lsd", LSDRun)
def run_lsd(cfg, log=print):
    device = _device(cfg)
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {cfg.objective!r}")
    torch.manual_seed(cfg.seed)
    tc = cfg.train
    wpath = resolve_weights_path(cfg.teacher_ckpt)
    teacher, tcfg = load_checked(wpath, cfg.teacher_sha256, "teacher", "student", device)
    cfg.teacher_sha256 = file_sha256(wpath)
    if tcfg.model.name != "mdm":
        raise ValueError(f"teacher_ckpt {wpath} holds a '{tcfg.model.name}' model; lsd distils an mdm model")
    cfg.tokenizer_ckpt, cfg.tokenizer_sha256 = tcfg.tokenizer_ckpt, tcfg.tokenizer_sha256
    cfg.model.base = to_plain(tcfg.model)
    if cfg.teacher_steps < cfg.model.student_steps:
        raise ValueError(f"teacher_steps {cfg.teacher_steps} < model.student_steps {cfg.model.student_steps}")
    student = MODELS.build(cfg.model).to(device)
    student.base.load_state_dict(teacher.state_dict())
    student.base.eval().requires_grad_(False)
    params = student.distilled_parameters()
    opt = torch.optim.Adam(params, lr=tc.lr, betas=tuple(tc.betas))
    config = to_plain(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)

    start, existing = 0, latest_checkpoint(cfg.out_dir)
    if existing and not tc.resume:
        raise TrainingError(
            f"{cfg.out_dir} already holds a checkpoint ({existing}); pass train.resume=true to continue it, "
            "or choose another out_dir (nothing was overwritten)"
        )
    if existing:
        state, meta = read_weights(os.path.join(existing, WEIGHTS))
        if meta["config"].get("model") != config.get("model"):
            raise CheckpointError(f"cannot resume from {existing}: its model config differs from this run's")
        load_state_into(student, state, os.path.join(existing, WEIGHTS))
        opt.load_state_dict(read_train_state(existing)["optimizer"])
        start = int(meta["step"])
        log(f"resumed from {existing} at step {start}")

    teacher_times = uniform_times(cfg.teacher_steps, student.eps).to(device)
    eval_labels, _ = _batch(EVAL_STEP, cfg.seed, cfg.eval_batch, student.num_classes, device)

    def eval_loss(times, coefs):
        with torch.no_grad():
            _, g = _batch(EVAL_STEP, cfg.seed, cfg.eval_batch, student.num_classes, device)
            return _loss(student.base, times, coefs, eval_labels, g, cfg, teacher_times)[0].item()

    log(
        f"[lsd] student {cfg.model.student_steps} steps ({'LSD+' if cfg.model.learn_steps else 'LSD'}) "
        f"from a {cfg.teacher_steps}-step teacher, {len(params)} parameter tensors"
    )
    n = cfg.model.student_steps
    loss_init = eval_loss(
        uniform_times(n, student.eps).to(device), torch.ones(n, device=device)
    )  # base sampler
    t0, log_path = time.perf_counter(), os.path.join(cfg.out_dir, "log.jsonl")
    if start == 0 and os.path.exists(log_path):
        os.remove(log_path)
    for step in range(start, tc.steps):
        labels, g = _batch(step, cfg.seed, tc.batch_size, student.num_classes, device)
        loss, per_step = _loss(student.base, student.times(), student.coef, labels, g, cfg, teacher_times)
        if not torch.isfinite(loss):
            raise TrainingError(f"lsd loss is {loss.item()} at step {step}: lower train.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            row = {"step": done, "loss": loss.item(), "elapsed_s": round(time.perf_counter() - t0, 3)}
            row["per_step"] = per_step.tolist()
            row["coef"] = student.coef.tolist()
            row["times"] = student.times().tolist()
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            log(f"[lsd] step {done}/{tc.steps} loss {loss.item():.4f}")
        if done % tc.ckpt_every == 0 or done == tc.steps:
            train_state = {"optimizer": opt.state_dict()}
            save_checkpoint(cfg.out_dir, student, train_state, config, done, cfg.task, tc.keep_last)
    if tc.steps == 0:  # no distillation: the base sampler (c = 1, uniform steps) as a student
        save_checkpoint(cfg.out_dir, student, {"optimizer": opt.state_dict()}, config, 0, cfg.task)
    with open(os.path.join(cfg.out_dir, "lsd_schedule.json"), "w") as f:
        json.dump({"coef": student.coef.tolist(), "times": student.times().tolist()}, f, indent=2)
    _write_eval(
        cfg, {"eval_loss_base": loss_init, "eval_loss": eval_loss(student.times(), student.coef)}, log
    )
    return student.eval()
