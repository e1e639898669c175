"""Checkpoint -> images: what ``sample.py`` runs, also usable from Python.

Loads a generator and the tokenizer it was trained on (none for a pixel generator such
as TarFlow, whose sampler returns images), draws ``num_samples`` images in
batches with one explicit generator (same seed, same images on the same machine),
writes a PNG grid, an ``.npz`` archive and ``metrics.json`` (sampler stats, optional FID).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from vargen.config import component
from vargen.registry import SAMPLERS


@dataclass
class SampleConfig:
    out: str = ""  # output directory; default: <run dir>/samples
    num_samples: int = 64
    batch_size: int = 64
    seed: int = 0
    classes: list[int] = field(default_factory=list)  # labels to cycle through; empty = every class
    nrow: int = 0  # images per grid row; 0 = number of classes (one class per column)
    grid_max: int = 100  # at most this many images in the PNG grid
    sampler: dict = component("SAMPLERS", {"name": "ar"})  # sample.py defaults it from the checkpoint
    fid: bool = False  # score the samples against a split of the training dataset
    fid_split: str = "heldout"  # heldout | train
    inception_weights: str = ""  # local Inception weights file: real Inception FID instead of the proxy
    device: str = "auto"
    progress: bool = True


def class_labels(num: int, num_classes: int, classes: list[int]) -> torch.Tensor:
    """Labels cycling through ``classes`` (default: all classes), length ``num``."""
    pool = torch.tensor(list(classes) or list(range(num_classes)), dtype=torch.long)
    if pool.numel() and (pool.min() < 0 or pool.max() >= num_classes):
        raise ValueError(f"classes {list(classes)} out of range for a model with {num_classes} classes")
    return pool.repeat((num + len(pool) - 1) // len(pool))[:num]


# The sampler a generator model uses when the sample config names none.
DEFAULT_SAMPLER = {
    "llamagen": "ar",
    "tarflow": "tarflow",
    "var": "var",
    "tokenbridge_ar": "tokenbridge",
    "token_shuffle": "token_shuffle",
    "ctf": "ctf",
    "xar": "xar",
    "mdm": "mdm",
    "lsd_student": "lsd",
    "ddpm_unet": "ddim",
}
GENERATOR_TASKS = ("generator", "pixel_generator", "lsd")


def batch_rows(out, i: int, n: int):
    """Rows i .. i+n-1 of a sampler's output: a tensor, or a list of per-scale tensors."""
    return [o[i : i + n] for o in out] if isinstance(out, list) else out[i : i + n]


def generate(model, tokenizer, labels_B: torch.Tensor, sampler, generator, batch_size: int, progress=False):
    """Sample (and decode, when there is a tokenizer) in batches.

    A sampler with the attribute ``continuous = True`` (continuous batching: it refills a
    finished row with the next pending sample itself) gets every label at once, with
    ``slots=batch_size`` rows at a time; its output is decoded in batches.

    Returns (images (N,C,H,W) in [0,1], tokens or None, summed stats). Stats are summed
    over batches except list-valued entries (per-block counts), which are concatenated.
    """
    images, tokens, total = [], [], {}
    chunks = range(0, labels_B.shape[0], batch_size)
    if getattr(sampler, "continuous", False):
        out_all, stats = sampler(model, labels_B, generator, progress, slots=batch_size)
        results = [(batch_rows(out_all, i, batch_size), stats if i == 0 else {}) for i in chunks]
    else:
        results = (sampler(model, labels_B[i : i + batch_size], generator) for i in chunks)
    for out, stats in tqdm(results, total=len(chunks), desc="sample", disable=not progress, leave=False):
        if tokenizer is None:
            images.append(out.cpu())
        else:
            with torch.no_grad():
                images.append(tokenizer.decode(out).cpu())
            tokens.append((torch.cat(out, dim=1) if isinstance(out, list) else out).cpu())
        for k, v in stats.items():
            total[k] = total.get(k, [] if isinstance(v, list) else 0) + v
    if "acceptance" in total:  # ratios do not sum over batches: recompute (speculative samplers)
        from vargen.sampling.speculative import derived_stats

        derived_stats(total, labels_B.shape[0])
    return torch.cat(images), (torch.cat(tokens) if tokens else None), total


def default_sampler(ckpt: str) -> str:
    """The sampler for a checkpoint's model, read from its stored config (no weights built)."""
    from vargen.train.checkpoint import read_weights

    _, meta = read_weights(ckpt)
    return DEFAULT_SAMPLER.get(meta["config"].get("model", {}).get("name"), "ar")


def run_sampling(ckpt: str, cfg, log=print) -> dict:
    import sys

    from vargen.io import save_grid, to_uint8
    from vargen.train.checkpoint import resolve_weights_path
    from vargen.train.distributed import setup
    from vargen.train.tasks import load_component, load_tokenizer_for

    device = setup(cfg.device)
    model, gen_cfg = load_component(ckpt, device)
    if gen_cfg.task not in GENERATOR_TASKS:
        raise ValueError(f"{ckpt} holds a '{gen_cfg.task}' checkpoint; sample.py needs a generator")
    tokenizer = load_tokenizer_for(gen_cfg, device) if "tokenizer_ckpt" in gen_cfg else None
    if tokenizer is not None and hasattr(model, "attach_tokenizer"):
        model.attach_tokenizer(tokenizer)
    sampler = SAMPLERS.build(cfg.sampler)
    if hasattr(sampler, "bind_run"):  # samplers that use the run's dataset (TTS-VAR's reward)
        sampler.bind_run(gen_cfg, device)
    if hasattr(sampler, "prepare"):  # samplers that tune themselves on real data (TarFlow auto policy)
        from vargen.data import build_dataset

        data = build_dataset(gen_cfg.data)
        pick = torch.randperm(len(data.train_images), generator=torch.Generator().manual_seed(0))[:256]
        sampler.prepare(model, data.train_images[pick].to(device), data.train_labels[pick].to(device))
    out = cfg.out or os.path.join(os.path.dirname(resolve_weights_path(ckpt)), "samples")
    os.makedirs(out, exist_ok=True)

    labels = class_labels(cfg.num_samples, model.num_classes, list(cfg.classes))
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    t0 = time.perf_counter()
    show = cfg.progress and sys.stderr.isatty()
    images, tokens, stats = generate(model, tokenizer, labels, sampler, generator, cfg.batch_size, show)
    elapsed = time.perf_counter() - t0

    nrow = cfg.nrow or (len(cfg.classes) or model.num_classes)
    grid_path = save_grid(images[: cfg.grid_max], os.path.join(out, "samples.png"), nrow=min(nrow, 20))
    arrays = {"images": to_uint8(images), "labels": labels.numpy()}
    if tokens is not None:
        arrays["ids"] = tokens.numpy()
    np.savez_compressed(os.path.join(out, "samples.npz"), **arrays)
    metrics = {
        "num_samples": cfg.num_samples,
        "seconds": round(elapsed, 3),
        "forwards_per_image": stats["target_forwards"] * cfg.batch_size / max(1, cfg.num_samples),
        **{f"stats.{k}": v for k, v in stats.items()},
    }
    log(
        f"wrote {grid_path} and {os.path.join(out, 'samples.npz')} ({cfg.num_samples} images, {elapsed:.1f}s)"
    )
    if cfg.fid:
        from vargen.eval.fid import FIDEvaluator

        evaluator = FIDEvaluator.for_dataset(
            dict(gen_cfg.data), split=cfg.fid_split, inception_weights=cfg.inception_weights or None
        )
        metrics["fid"] = evaluator.score(images)
        metrics["fid_split"] = cfg.fid_split
        metrics["fid_features"] = "inception" if cfg.inception_weights else "classifier"
        log(
            f"FID vs {cfg.fid_split} split ({metrics['fid_features']} features, {cfg.num_samples} samples): "
            f"{metrics['fid']:.2f}"
        )
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics
