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

from vargen import distributed as D
from vargen.checkpoint import (
    CheckpointError,
    file_sha256,
    load_component,
    load_tokenizer_for,
    read_weights,
    resolve_weights_path,
)
from vargen.config import DEVICE, component, ranged
from vargen.eval.fid import FIDEvaluator
from vargen.io import save_grid, to_uint8
from vargen.registry import MODELS, SAMPLERS, import_components
from vargen.sampling.base import Sampler, SamplerContext, as_sampler
from vargen.sampling.stats import add_stats, finish_stats


@dataclass
class SampleConfig:
    out: str = ""  # output directory (refused if it holds samples); default: a new <run dir>/samples/NNN
    tokenizer_ckpt: str = ""  # the generator's tokenizer at another path (still checked by sha256)
    num_samples: int = ranged(64, ge=1)
    batch_size: int = ranged(64, ge=1)
    seed: int = 0
    classes: list[int] = field(default_factory=list)  # labels to cycle through; empty = every class
    nrow: int = ranged(0, ge=0)  # images per grid row; 0 = number of classes (one class per column)
    grid_max: int = ranged(100, ge=0)  # at most this many images in the PNG grid
    sampler: dict = component("SAMPLERS", {"name": "ar"})  # sample.py defaults it from the checkpoint
    fid: bool = False  # score the samples against a split of the training dataset
    fid_split: str = ranged("heldout", choices=("heldout", "train"))  # heldout | train
    inception_weights: str = ""  # local Inception weights file: real Inception FID instead of the proxy
    device: str = ranged("auto", pattern=DEVICE)
    progress: bool = True


def class_labels(num: int, num_classes: int, classes: list[int]) -> torch.Tensor:
    """Labels cycling through ``classes`` (default: all classes), length ``num``."""
    pool = torch.tensor(list(classes) or list(range(num_classes)), dtype=torch.long)
    if pool.numel() and (pool.min() < 0 or pool.max() >= num_classes):
        raise ValueError(f"classes {list(classes)} out of range for a model with {num_classes} classes")
    return pool.repeat((num + len(pool) - 1) // len(pool))[:num]


FID_MIN_REAL = 300  # fewer reference images than this: the FID printed comes with a warning
GENERATOR_TASKS = ("generator", "pixel_generator", "lsd")


def model_samplers(model: str) -> tuple:
    """The samplers that can draw from a model, its default first, as the model declared them
    at registration (``MODELS.register(name, schema, samplers=...)``); () for an unknown name."""
    import_components()
    return tuple(MODELS.get(model).meta.get("samplers", ())) if model in MODELS else ()


def default_sampler_for(model: str) -> str:
    """The sampler a model is drawn with when the sample config names none."""
    return (model_samplers(model) or ("ar",))[0]


def check_sampler_fits(sampler: str, model: str) -> None:
    """Raise ValueError naming the samplers that fit when ``sampler`` cannot draw from ``model``
    (run before any work, so a mismatch is a message instead of an AttributeError mid-sampling)."""
    import_components()
    fits = [m for m in MODELS.names() if sampler in model_samplers(m)]
    if fits and model not in fits:
        ok = sorted(model_samplers(model))
        raise ValueError(
            f"sampler '{sampler}' draws from {', '.join(fits)} models; this checkpoint holds a '{model}' "
            f"model: use sampler.name={default_sampler_for(model) if ok else '?'} "
            f"(samplers for {model}: {ok})"
        )


def batch_rows(out, i: int, n: int):
    """Rows i .. i+n-1 of a sampler's output: a tensor, or a list of per-scale tensors."""
    return [o[i : i + n] for o in out] if isinstance(out, list) else out[i : i + n]


def generate(model, tokenizer, labels_B: torch.Tensor, sampler, generator, batch_size: int, progress=False):
    """Sample (and decode, when there is a tokenizer) in batches with a :class:`Sampler` (or a
    plain function ``(model, cond_B, generator) -> (out, stats)``, see :func:`as_sampler`).

    A ``continuous`` sampler (continuous batching: it refills a finished row with the next
    pending sample itself) gets every label at once, with ``slots=batch_size`` rows at a time;
    its output is decoded in batches.

    Returns (images (N,C,H,W) in [0,1], tokens or None, summed stats). Stats are summed
    over batches except list-valued entries (per-block counts), which are concatenated.
    """
    images, tokens, total = [], [], {}
    sampler = as_sampler(sampler)
    chunks = range(0, labels_B.shape[0], batch_size)
    if sampler.continuous:
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
        add_stats(total, stats)
    return torch.cat(images), (torch.cat(tokens) if tokens else None), finish_stats(total, labels_B.shape[0])


class Counting(Sampler):
    """``sampler`` with the model forwards of each call recorded in ``per_batch`` as (forwards
    per row, rows). What sample.py and :meth:`vargen.api.Pipeline.sample` both draw through, so
    they draw the same images. A continuous sampler stays continuous (:func:`generate` gives it
    every label at once with ``slots``); its one call records (row forwards, 1)."""

    def __init__(self, sampler: Sampler, per_batch: list):
        super().__init__(sampler.cfg)
        self.sampler, self.per_batch = sampler, per_batch
        self.continuous = sampler.continuous

    def setup(self, ctx) -> None:
        self.sampler.setup(ctx)

    def __call__(self, model, labels_B, generator, progress=False, slots=0):
        if self.continuous:
            out_B, stats = self.sampler(model, labels_B, generator, progress, slots=slots)
            rows = stats.get("row_target_forwards", stats.get("target_forwards", 0) * labels_B.shape[0])
            self.per_batch.append((rows, 1))
            return out_B, stats
        out_B, stats = self.sampler(model, labels_B, generator)
        self.per_batch.append((stats.get("target_forwards", 0), labels_B.shape[0]))
        return out_B, stats


def counting(sampler: Sampler, per_batch: list) -> Counting:
    """``sampler`` counting its forwards into ``per_batch`` (:class:`Counting`)."""
    return Counting(sampler, per_batch)


def shard(num: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi): the contiguous share of ``num`` samples rank ``rank`` draws (sizes differ by <= 1)."""
    return rank * num // world_size, (rank + 1) * num // world_size


def shard_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s generator: ``seed`` itself on rank 0 (so one process draws what
    it always drew), a distinct stream per rank otherwise."""
    return seed + 1_000_003 * rank


def default_sampler(ckpt: str) -> str:
    """The sampler for a checkpoint's model, read from its stored config (no weights built)."""
    _, meta = read_weights(ckpt)
    return default_sampler_for(meta["config"].get("model", {}).get("name"))


def _find_tokenizer(ckpt: str, gen_cfg, override: str, log) -> str:
    """Where the generator's tokenizer is now: ``override`` when given, else the stored path,
    else the same path relative to the generator when the runs were moved together."""
    if override:
        return override
    stored = gen_cfg.tokenizer_ckpt
    if os.path.exists(stored):
        return stored
    here = os.path.dirname(os.path.abspath(resolve_weights_path(ckpt)))
    rel = os.path.relpath(stored, gen_cfg.out_dir) if os.path.isabs(stored) else None
    for base in (here, os.path.dirname(os.path.dirname(here))):  # run dir, or run/checkpoints/step_*
        if rel and os.path.exists(os.path.join(base, rel)):
            moved = os.path.normpath(os.path.join(base, rel))
            log(f"tokenizer not at its stored path {stored}; using {moved} (same place relative to the run)")
            return moved
    raise CheckpointError(
        f"the generator's tokenizer {stored} does not exist (moved or deleted?); pass "
        "tokenizer_ckpt=<weights file or run dir of that tokenizer> (its sha256 is still checked)"
    )


def run_sampling(ckpt: str, cfg, log=print) -> dict:
    """Sample as ``cfg`` says into a new folder; returns the metrics written there."""
    created = []
    root = os.path.join(os.path.dirname(resolve_weights_path(ckpt)), "samples")
    try:  # the output folder is claimed once model and sampler are known to work
        return _sample_into(lambda: _output_dir(cfg.out, root, created), ckpt, cfg, log)
    except BaseException:
        for d in reversed(created):  # nothing written: leave no empty folder behind
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        raise


def _output_dir(out: str, samples_root: str, created: list) -> str:
    """``out`` (refused when it already holds samples), else a new numbered folder under
    ``samples_root``: each call keeps its own images and record. Appends the folders it
    makes to ``created``."""
    if out:
        if any(os.path.exists(os.path.join(out, f)) for f in ("samples.npz", "metrics.json")):
            raise ValueError(f"{out} already holds samples; choose another out=... or delete that folder")
        if not os.path.isdir(out):
            os.makedirs(out)
            created.append(out)
        return out
    if not os.path.isdir(samples_root):
        os.makedirs(samples_root, exist_ok=True)
        created.append(samples_root)
    taken = [int(d) for d in os.listdir(samples_root) if d.isdigit()]
    k = max(taken, default=0) + 1
    while True:
        path = os.path.join(samples_root, f"{k:03d}")
        try:
            os.mkdir(path)  # atomic: two concurrent calls never share a folder
            created.append(path)
            return path
        except FileExistsError:
            k += 1


def load_generator(ckpt: str, device, tokenizer_ckpt: str = "", log=print):
    """A generator checkpoint (weights file or run dir) and its tokenizer, ready to sample.

    The tokenizer is found as :func:`_find_tokenizer` says (stored path, moved with the run, or
    ``tokenizer_ckpt``) and checked against its recorded sha256; None for a pixel generator.
    Returns (model, run config, tokenizer or None); the run config's ``tokenizer_ckpt`` names
    the tokenizer actually loaded.
    """
    model, gen_cfg = load_component(ckpt, device)
    if gen_cfg.task not in GENERATOR_TASKS:
        raise ValueError(f"{ckpt} holds a '{gen_cfg.task}' checkpoint; sample.py needs a generator")
    tokenizer = None
    if "tokenizer_ckpt" in gen_cfg:
        gen_cfg.tokenizer_ckpt = _find_tokenizer(ckpt, gen_cfg, tokenizer_ckpt, log)
        tokenizer = load_tokenizer_for(gen_cfg, device)
    if tokenizer is not None:
        model.attach_tokenizer(tokenizer)
    return model, gen_cfg, tokenizer


def build_sampler(sampler_cfg, model, gen_cfg, device) -> Sampler:
    """The sampler ``sampler_cfg`` names, checked against the model and set up for the run.

    Refuses a sampler that cannot draw from the model before any work; then
    :meth:`~vargen.sampling.base.Sampler.setup` gives it the run's context (drafts and
    classifiers load, TTS-VAR binds the dataset's feature net, TarFlow's auto policy measures).
    """
    check_sampler_fits(sampler_cfg["name"], gen_cfg.model.name)
    sampler = SAMPLERS.build(sampler_cfg)
    sampler.setup(SamplerContext(model, device, gen_cfg))
    return sampler


def _claim_on_rank0(claim_out, rank: int, device):
    """Rank 0 claims the output folder; every rank learns whether it could (no rank is left
    waiting in a gather when rank 0 refuses the folder). Returns the folder on rank 0."""
    out, error = None, None
    if rank == 0:
        try:
            out = claim_out()
        except Exception as e:  # re-raised below, once the other ranks know
            error = e
    if not D.all_true(error is None, device):
        raise error or ValueError("rank 0 could not claim the output folder (see its message)")
    return out


def _gather_shards(images, tokens, stats: dict, per_batch: list, rank: int, world_size: int):
    """Every rank's share on rank 0, in rank order (= sample order): (images (N, C, H, W) float
    in [0, 1], ids or None, summed stats, per-batch forward counts). Images travel as uint8, so
    rank 0 holds one byte per pixel per image; other ranks get None."""
    import torch.distributed as dist

    mine = {"images": to_uint8(images), "ids": tokens, "stats": stats, "per_batch": per_batch}
    parts = [None] * world_size if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if rank != 0:
        return None
    images_u8 = torch.from_numpy(np.concatenate([p["images"] for p in parts]))  # (N, H, W, C) uint8
    ids = [p["ids"] for p in parts]
    total = {}
    for p in parts:
        add_stats(total, p["stats"])
    return (
        images_u8.permute(0, 3, 1, 2).float() / 255,
        torch.cat(ids) if ids[0] is not None else None,
        total,
        [b for p in parts for b in p["per_batch"]],
    )


def _sample_into(claim_out, ckpt: str, cfg, log) -> dict:
    import sys

    from omegaconf import OmegaConf

    device = D.setup(cfg.device)
    model, gen_cfg, tokenizer = load_generator(ckpt, device, cfg.tokenizer_ckpt, log)
    sampler = build_sampler(cfg.sampler, model, gen_cfg, device)

    labels = class_labels(cfg.num_samples, model.num_classes, list(cfg.classes))
    rank, world_size = D.world()
    if cfg.num_samples < world_size:
        raise ValueError(f"num_samples={cfg.num_samples} is fewer than the {world_size} processes")
    out = _claim_on_rank0(claim_out, rank, device)
    lo, hi = shard(cfg.num_samples, rank, world_size)
    generator = torch.Generator(device=device).manual_seed(shard_seed(cfg.seed, rank))
    t0 = time.perf_counter()
    show = cfg.progress and sys.stderr.isatty() and rank == 0
    per_batch = []  # (model forwards, rows) of every batch: batches may be ragged
    images, tokens, stats = generate(
        model, tokenizer, labels[lo:hi], counting(sampler, per_batch), generator, cfg.batch_size, show
    )
    if world_size > 1:
        log(f"rank 0 drew {hi - lo} of {cfg.num_samples} images; gathering from {world_size} ranks")
        gathered = _gather_shards(images, tokens, stats, per_batch, rank, world_size)
        if rank != 0:
            return {}
        images, tokens, stats, per_batch = gathered
        finish_stats(stats, cfg.num_samples)
    elapsed = time.perf_counter() - t0

    nrow = cfg.nrow or (len(cfg.classes) or model.num_classes)
    grid_path = save_grid(images[: cfg.grid_max], os.path.join(out, "samples.png"), nrow=min(nrow, 20))
    arrays = {"images": to_uint8(images), "labels": labels.numpy()}
    if tokens is not None:
        arrays["ids"] = tokens.numpy()
    np.savez_compressed(os.path.join(out, "samples.npz"), **arrays)
    metrics = {
        "num_samples": cfg.num_samples,
        "seed": cfg.seed,
        "world_size": world_size,  # rank r drew its share with seed + 1000003 * r (see shard_seed)
        "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
        "seconds": round(elapsed, 3),
        # a batch's forwards serve each of its rows: weight by rows (the last batch may be short)
        "forwards_per_image": sum(f * rows for f, rows in per_batch) / max(1, cfg.num_samples),
        **{f"stats.{k}": v for k, v in stats.items()},
    }
    log(
        f"wrote {grid_path} and {os.path.join(out, 'samples.npz')} ({cfg.num_samples} images, {elapsed:.1f}s)"
    )
    if cfg.fid:
        evaluator = FIDEvaluator.for_dataset(
            dict(gen_cfg.data), split=cfg.fid_split, inception_weights=cfg.inception_weights or None
        )
        if evaluator.num_real < FID_MIN_REAL:
            metrics["fid_warning"] = (
                f"only {evaluator.num_real} reference images in the {cfg.fid_split} split: FID is biased and "
                f"noisy below a few hundred; compare FIDs only at equal sizes, or use fid_split=train"
            )
            log(f"warning: {metrics['fid_warning']}")
        metrics["fid"] = evaluator.score(images)
        metrics["fid_split"] = cfg.fid_split
        metrics["fid_features"] = "inception" if cfg.inception_weights else "classifier"
        log(
            f"FID vs {cfg.fid_split} split ({metrics['fid_features']} features, {cfg.num_samples} samples): "
            f"{metrics['fid']:.2f}"
        )
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    record = OmegaConf.to_container(cfg, resolve=True)
    record["out"] = os.path.abspath(out)
    weights = resolve_weights_path(ckpt)
    run = {"ckpt": os.path.abspath(weights), "ckpt_sha256": file_sha256(weights)}
    if tokenizer is not None:
        run["tokenizer_ckpt"] = os.path.abspath(gen_cfg.tokenizer_ckpt)
    OmegaConf.save(OmegaConf.create({**record, "run": run}), os.path.join(out, "sample_config.yaml"))
    log(f"wrote {os.path.join(out, 'sample_config.yaml')} (seed {cfg.seed}, sampler {cfg.sampler.name})")
    return metrics
