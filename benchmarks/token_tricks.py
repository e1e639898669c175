#!/usr/bin/env python
"""Issue 4 side by side on digits: TokenBridge, coarse-to-fine labels (CTF) and Token-Shuffle
against the spine's VQ + next-token model.

    python -m benchmarks.token_tricks [--quick]

Trains (or resumes) with the shipped configs into runs/bench_token_tricks_{quick,full}: the KL
tokenizer, TokenBridge's wrapper of it (no training), the VQ tokenizer, and four generators for
the same number of steps and batch size (next-token `llamagen` on VQ ids, `ctf` and
`token_shuffle` on the same VQ ids, `tokenbridge_ar` on TokenBridge's per-dimension ids).
Reports:

- held-out reconstruction MSE of the continuous latent and of TokenBridge's quantized latent
  at 16 / 32 / 64 levels per dimension;
- FID (mean and std over 3 sampling seeds, classifier features, vs the held-out split) of
  every generator at the same guidance scale, and its forwards per image (NFE);
- CTF: the sampling-time ratio CTF / next-token (same batch, same run) and the held-out
  stage-1 cross-entropy (over K coarse labels) next to the next-token model's (over V ids);
- Token-Shuffle: transformer positions s=1 / s=2 and the train-step time s=1 / s=2 of the same
  architecture (window 1 vs window 2, forward + backward on one batch).

Writes benchmarks/results/token_tricks.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.common import ROOT, Method, meta, print_table, sweep, train, write_results

GENERATORS = {  # result key -> (config, tokenizer run)
    "ar": ("digits_ar", "vq"),
    "ctf": ("digits_ctf", "vq"),
    "token_shuffle": ("digits_token_shuffle", "vq"),
    "tokenbridge": ("digits_tokenbridge_ar", "tokenbridge"),
}


@torch.no_grad()
def recon(kl, images) -> dict:
    from vargen.tokenizers.tokenbridge import DimQuantConfig, DimQuantizer

    z = kl.encode(images)  # (B, N, D) normalised tokens
    out = {"kl.recon_mse": torch.nn.functional.mse_loss(kl.decode(z), images).item()}
    for levels in (16, 32, 64):
        q = DimQuantizer(DimQuantConfig(levels=levels))
        zq = q.dequantize(q.quantize(z))
        out[f"tokenbridge.recon_mse.{levels}"] = torch.nn.functional.mse_loss(kl.decode(zq), images).item()
        out[f"tokenbridge.latent_abs_err.{levels}"] = (z - zq).abs().mean().item()
    return out


def train_step_seconds(model, ids_BN, labels_B, steps: int) -> float:
    """Seconds per forward + backward of ``model.loss`` on one batch (after one warm-up step)."""
    model.train()
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model.loss(ids_BN, labels_B)["loss"].backward()
    return (time.perf_counter() - t0) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="300-step models and 200 samples per seed")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from vargen.checkpoint import load_component, load_tokenizer_for
    from vargen.data import build_dataset
    from vargen.eval import FIDEvaluator
    from vargen.registry import MODELS, SAMPLERS
    from vargen.sampling.generate import class_labels, default_sampler_for
    from vargen.train.tasks import encode_all

    root = os.path.join(ROOT, "runs", f"bench_token_tricks_{'quick' if args.quick else 'full'}")
    kl = load_component(train("digits_kl", os.path.join(root, "kl"), args.quick))[0]
    tb = os.path.join(root, "tokenbridge")
    if not os.path.exists(os.path.join(tb, "model.safetensors")):  # no training: wrap once, since
        # rewriting it would change the file its generator was trained on (its hash is checked)
        train("digits_tokenbridge", tb, args.quick, [f"model.kl_ckpt={root}/kl"])
    train("digits_vq", os.path.join(root, "vq"), args.quick)
    runs = {}
    for key, (config, tok_run) in GENERATORS.items():
        out = os.path.join(root, config)
        train(config, out, args.quick, [f"tokenizer_ckpt={root}/{tok_run}"])
        model, cfg = load_component(out)
        evals = json.load(open(os.path.join(out, "eval.json")))
        runs[key] = (model.eval(), load_tokenizer_for(cfg), evals, dict(cfg.model))

    data = build_dataset(dict(cfg.data))
    flat = recon(kl, data.heldout_images)

    evaluator = FIDEvaluator.for_dataset(dict(cfg.data), split="heldout")
    n, seeds, batch = (200 if args.quick else 1000), [0, 1, 2], 250
    labels = class_labels(n, data.num_classes, [])
    methods = {
        key: Method(
            model, tok, SAMPLERS.build({"name": default_sampler_for(mc["name"]), "cfg_scale": args.cfg_scale})
        )
        for key, (model, tok, _, mc) in runs.items()
    }
    swept = sweep(methods, labels, seeds, evaluator, batch)
    seconds = {key: r["seconds"] for key, r in swept.items()}
    for key, r in swept.items():
        flat.update(
            {f"{key}.fid_mean": r["fid_mean"], f"{key}.fid_std": r["fid_std"], f"{key}.nfe": r["nfe"]}
        )
        flat[f"{key}.sample_seconds"] = r["seconds"]

    flat["ctf.sample_time_ratio"] = seconds["ctf"] / seconds["ar"]
    flat["ctf.stage1_loss"] = runs["ctf"][2]["heldout_stage1_loss"]  # CE over K coarse labels
    flat["ctf.stage2_loss"] = runs["ctf"][2]["heldout_stage2_loss"]
    flat["ar.loss"] = runs["ar"][2]["heldout_loss"]  # CE over V ids

    # Token-Shuffle's compute saving: the same architecture at window 1 (every id a position) and 2
    ts, vq, _, ts_cfg = runs["token_shuffle"]
    ids = encode_all(vq, data.train_images[:64], torch.device("cpu"))  # (64, N)
    y = data.train_labels[:64]
    torch.manual_seed(0)
    s1 = MODELS.build({**ts_cfg, "window": 1})
    step = {w: train_step_seconds(m, ids, y, 5 if args.quick else 20) for w, m in ((1, s1), (2, ts))}
    flat["token_shuffle.tokens_ratio"] = s1.num_tokens / ts.num_tokens
    flat["token_shuffle.train_step_ratio"] = step[1] / step[2]
    flat["samples_per_seed"], flat["cfg_scale"] = n, args.cfg_scale

    rows = [
        {"latent": name, "recon_mse": flat[k]}
        for name, k in [("continuous KL", "kl.recon_mse")]
        + [(f"TokenBridge B={b}", f"tokenbridge.recon_mse.{b}") for b in (16, 32, 64)]
    ]
    print_table(rows, ["latent", "recon_mse"])
    rows = [
        {
            "generator": key,
            "fid": f"{flat[key + '.fid_mean']:.2f} ± {flat[key + '.fid_std']:.2f}",
            "nfe": flat[key + ".nfe"],
            "sample_s": seconds[key],
        }
        for key in runs
    ]
    print_table(rows, ["generator", "fid", "nfe", "sample_s"])
    print(
        f"CTF sample time / AR: {flat['ctf.sample_time_ratio']:.2f}; held-out CE stage 1 "
        f"{flat['ctf.stage1_loss']:.3f} (K labels) vs next-token {flat['ar.loss']:.3f} (V ids)\n"
        f"Token-Shuffle s=2: positions / {flat['token_shuffle.tokens_ratio']:.0f}, "
        f"train step {flat['token_shuffle.train_step_ratio']:.2f}x faster"
    )
    print("wrote", write_results("token_tricks", flat, meta(args.quick, seeds)))


if __name__ == "__main__":
    main()
