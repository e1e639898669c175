#!/usr/bin/env python
"""xAR on digits or photos: entity kinds, noisy context vs teacher forcing, backbone flow vs per-token head.

    python -m benchmarks.xar [--quick] [--workload digits|photos]

Trains (or resumes) the KL tokenizer (configs/digits_kl.yaml) and, with configs/digits_xar.yaml
and one training budget, into runs/bench_xar_{quick,full}:

- ``xar.<entity>``: xAR as the paper builds it (``denoiser: backbone``, the transformer denoises
  each entity, noisy context learning) for every entity kind (token, cell, subsample, scale, image);
- ``xar.teacher_forcing``: cells with clean context in training (``noisy_context=false``);
- ``head.flow.<entity>``: MAR's split (``denoiser: head``, per-token flow head) for cells and the
  whole image, where its tokens are drawn independently given the backbone's conditions;
- ``mar_head``: MAR's per-token diffusion head, one token per step (``entity=token``).

Every model samples with the same sampler settings (``xar`` sampler, CFG ramp to ``--cfg-scale``,
50 Euler-Maruyama steps per entity for the flow models, 50 DDPM steps for the MAR head) through
:func:`benchmarks.common.sweep`: FID (mean and std over 3 sampling seeds, classifier features,
vs the held-out split), backbone forwards per image batch (``nfe``: sequential network passes),
AR steps (entities) and solver steps per image. Writes benchmarks/results/xar.json.

``--workload photos`` (the 256-token workload of issue 15: 64x64 crops of the scikit-image
photos, 16x16 latents of 8 channels) takes the zoo's KL tokenizer (``photos_kl``, trained once by
:mod:`benchmarks.zoo`, never retrained here) and trains, from configs/photos_xar.yaml with the
backbone denoiser, into runs/bench_xar_photos_{quick,full}: ``xar.<entity>`` for every entity
kind (token: 256 entities; cell 4x4 and subsample stride 4: 16 entities of 16 tokens; scale
1,2,4,8,16: 5 entities, 341 positions; image: 1), ``xar.teacher_forcing`` (cells) and the
per-token flow head on cells and on the whole image (``head.flow.*``). The photos quick setting
fits about an hour of one shared core (measured here: a training step of the cell model at batch
16 costs ~0.75 s, teacher forcing ~1.2 s, the head ~1.4 s; drawing one image ~0.7-1.5 s, the token
entity's 5120 sequential forwards per batch the most): width 64, depth 3, 200 training steps at
batch 16, 40 images per seed (one batch) x 3 seeds, 20 Euler-Maruyama steps per entity (and 20
head steps), CFG 1.5. ``--quick`` off: 1000 steps, 500 images per seed, 50 solver steps (not run
here). Photos variants train and sample one after another (not interleaved) and the results file,
benchmarks/results/xar_photos.json, is rewritten after each, so a cut run keeps what finished.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import time

import torch

from benchmarks.common import ROOT, Method, flat_results, meta, print_table, sweep, train, write_results

HEAD = ["model.denoiser=head"]
VARIANTS = {  # result key -> overrides of configs/digits_xar.yaml
    "xar.token": ["model.entity=token"],
    "xar.cell": ["model.entity=cell"],
    "xar.subsample": ["model.entity=subsample"],
    "xar.scale": ["model.entity=scale"],
    "xar.image": ["model.entity=image"],
    "xar.teacher_forcing": ["model.entity=cell", "model.noisy_context=false"],
    "head.flow.cell": [*HEAD, "model.entity=cell"],
    "head.flow.image": [*HEAD, "model.entity=image"],
    "mar_head": [
        *HEAD,
        "model.entity=token",
        "model.head.name=mar_diffusion",
        "model.head.num_sampling_steps=50",
    ],
}


PHOTOS_MODEL = [  # overrides of configs/photos_xar.yaml shared by every photos variant
    "model.denoiser=backbone",
    "model.dim=64",
    "model.depth=3",
    "model.cell=4",
    "model.stride=4",
    "model.entity_scales=[1,2,4,8,16]",
    "model.head.name=flow",
    "train.warmup_steps=50",
]
PHOTOS_VARIANTS = {  # result key -> overrides, in run order (the claims' variants first)
    "xar.cell": ["model.entity=cell"],
    "xar.token": ["model.entity=token"],
    "xar.teacher_forcing": ["model.entity=cell", "model.noisy_context=false"],
    "head.flow.cell": [*HEAD, "model.entity=cell"],
    "xar.image": ["model.entity=image"],
    "xar.subsample": ["model.entity=subsample"],
    "xar.scale": ["model.entity=scale"],
    "head.flow.image": [*HEAD, "model.entity=image"],
}
COLUMNS = ["variant", "fid", "forwards", "ar_steps", "solver_steps", "head_evals", "seconds"]
# (training steps, images per seed, solver steps per entity) of the photos workload
PHOTOS_SETTING = {True: (200, 40, 20), False: (1000, 500, 50)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="300-step models and 200 samples per seed (digits)")
    p.add_argument("--workload", choices=("digits", "photos"), default="digits")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--only", nargs="*", default=None, help="a subset of the variants")
    p.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="photos: other training steps than the setting's (own runs folder, xar_photos_s<N>.json)",
    )
    args = p.parse_args(argv)
    known = PHOTOS_VARIANTS if args.workload == "photos" else VARIANTS
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        p.error(f"unknown {args.workload} variants {unknown}; known: {list(known)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.workload == "photos":
        return photos(args)
    from vargen.checkpoint import load_component, load_tokenizer_for
    from vargen.eval import FIDEvaluator
    from vargen.sampling.decoders.xar import sample_xar
    from vargen.sampling.generate import class_labels

    root = os.path.join(ROOT, "runs", f"bench_xar_{'quick' if args.quick else 'full'}")
    kl_dir = train("digits_kl", os.path.join(root, "kl"), args.quick)
    n, seeds, batch = (200 if args.quick else 1000), [0, 1, 2], 250
    methods, evaluator, labels = {}, None, None
    for key in args.only or VARIANTS:
        out = train(
            "digits_xar", os.path.join(root, key), args.quick, [f"tokenizer_ckpt={kl_dir}", *VARIANTS[key]]
        )
        model, cfg = load_component(out)
        evaluator = evaluator or FIDEvaluator.for_dataset(dict(cfg.data), split="heldout")
        labels = class_labels(n, model.num_classes, []) if labels is None else labels
        draw = lambda m, c, g: sample_xar(m, c, generator=g, cfg_scale=args.cfg_scale)  # noqa: E731
        methods[key] = Method(model, load_tokenizer_for(cfg), draw)
    swept = sweep(methods, labels, seeds, evaluator, batch)
    flat = flat_results(swept)
    batches = -(-n // batch)  # per seed: the last seed's stats are summed over its batches
    rows = [_row(key, r, flat, batches) for key, r in swept.items()]
    flat["samples_per_seed"], flat["cfg_scale"] = n, args.cfg_scale
    print_table(rows, COLUMNS)
    print("wrote", write_results("xar", flat, meta(args.quick, seeds), chart=("nfe", "fid_mean")))


def _row(key: str, r: dict, flat: dict, batches: int) -> dict:
    """The table row of one swept variant; adds its per-image step counts to ``flat``."""
    st = r["stats"]
    flat[f"{key}.ar_steps"] = st["ar_steps"] / batches
    flat[f"{key}.solver_steps"] = st["solver_steps"] / batches
    flat[f"{key}.head_evals"] = st.get("head_evals", 0) / batches
    return {
        "variant": key,
        "fid": f"{r['fid_mean']:.2f} ± {r['fid_std']:.2f}",
        "forwards": r["nfe"],
        "ar_steps": flat[f"{key}.ar_steps"],
        "solver_steps": flat[f"{key}.solver_steps"],
        "head_evals": flat[f"{key}.head_evals"],
        "seconds": r["seconds"],
        "train_seconds": flat.get(f"{key}.train_seconds"),
    }


@contextlib.contextmanager
def _encode_once():
    """Every photos variant trains on the same crops through the same zoo tokenizer: encode them
    once (65 s of one core for the 6000 training crops) instead of once per variant. Keyed on the
    tokenizer's weights and the images' bytes, so a different tokenizer or data set re-encodes."""
    from vargen.train import tasks

    real, memo = tasks.encode_all, {}

    def digest(*tensors) -> str:
        h = hashlib.blake2b(digest_size=16)
        for t in tensors:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def encode_all(tok, images, device, batch=256):
        key = (digest(*tok.state_dict().values()), digest(images))
        if key not in memo:
            memo[key] = real(tok, images, device, batch)
        return memo[key].clone()

    tasks.encode_all = encode_all
    try:
        yield
    finally:
        tasks.encode_all = real


def tokenizer_floor(data_cfg, tokenizer, evaluator, n: int, seeds) -> dict:
    """FID of ``n`` training crops (drawn per seed) passed through the tokenizer: what a perfect
    generator would score at this sample count (FID on a few dozen images is dominated by its bias,
    so the floor gives the photos table its scale). {"fid_mean", "fid_std", "fids"}."""
    import statistics

    from vargen.data import build_dataset

    images = build_dataset(data_cfg).train_images
    fids = []
    for seed in seeds:
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
        with torch.no_grad():
            recon = tokenizer.decode(tokenizer.encode(images[idx])).clamp(0, 1)  # (n, C, H, W)
        fids.append(evaluator.score(recon))
    return {"fid_mean": statistics.mean(fids), "fid_std": statistics.stdev(fids), "fids": fids}


def photos(args):
    """The photos workload (see the module docstring): each variant trained, swept over 3 seeds and
    written to benchmarks/results/xar_photos.json before the next one starts."""
    from benchmarks.zoo import Zoo
    from vargen.checkpoint import load_component, load_tokenizer_for
    from vargen.config import load_run_config
    from vargen.eval import FIDEvaluator
    from vargen.sampling.decoders.xar import sample_xar
    from vargen.sampling.generate import class_labels

    steps, n, solver_steps = PHOTOS_SETTING[args.quick]
    topic, suffix = "xar_photos", ""
    if args.train_steps:
        steps, suffix = args.train_steps, f"_s{args.train_steps}"
    kl_dir = Zoo().get("photos_kl")
    root = os.path.join(ROOT, "runs", f"bench_xar_photos_{'quick' if args.quick else 'full'}{suffix}")
    seeds, batch = [0, 1, 2], n
    common = [f"tokenizer_ckpt={kl_dir}", *PHOTOS_MODEL, f"model.head.num_sampling_steps={solver_steps}"]
    flat = {
        "samples_per_seed": n,
        "cfg_scale": args.cfg_scale,
        "train_steps": steps,
        "solver_steps_per_entity": solver_steps,
        "tokens": 256,
    }
    rows, labels = [], None
    draw = lambda m, c, g: sample_xar(m, c, generator=g, cfg_scale=args.cfg_scale, num_steps=solver_steps)  # noqa: E731
    cfg = load_run_config(os.path.join(ROOT, "configs", "photos_xar.yaml"), common)
    evaluator = FIDEvaluator.for_dataset(dict(cfg.data), split="heldout")
    floor = tokenizer_floor(cfg.data, load_tokenizer_for(cfg), evaluator, n, seeds)
    flat["tokenizer_floor.fid_mean"], flat["tokenizer_floor.fid_std"] = floor["fid_mean"], floor["fid_std"]
    print(f"[xar photos] tokenizer floor: FID {floor['fid_mean']:.2f} ± {floor['fid_std']:.2f}", flush=True)
    with _encode_once():  # one encoding of the crops for every variant
        for key in args.only or PHOTOS_VARIANTS:
            t0 = time.perf_counter()
            out = train("photos_xar", os.path.join(root, key), True, [*common, *PHOTOS_VARIANTS[key]], steps)
            flat[f"{key}.train_seconds"] = time.perf_counter() - t0
            model, cfg = load_component(out)
            flat[f"{key}.params"] = sum(p.numel() for p in model.parameters())
            labels = class_labels(n, model.num_classes, []) if labels is None else labels
            swept = sweep(
                {key: Method(model, load_tokenizer_for(cfg), draw)}, labels, seeds, evaluator, batch
            )
            flat.update(flat_results(swept))
            rows.append(_row(key, swept[key], flat, -(-n // batch)))
            print(
                f"[xar photos] {key}: FID {rows[-1]['fid']}, sampling {swept[key]['seconds']:.0f} s",
                flush=True,
            )
            write_results(topic + suffix, flat, meta(args.quick, seeds), chart=("nfe", "fid_mean"))
    print_table(rows, [*COLUMNS, "train_seconds"])
    print("wrote", os.path.join("benchmarks", "results", f"{topic}{suffix}.json"))


if __name__ == "__main__":
    main()
