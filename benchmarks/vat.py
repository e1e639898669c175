#!/usr/bin/env python
"""VAT + next-scale model vs the spine's VQ + next-token model, side by side on digits.

    python -m benchmarks.vat [--quick]

Trains (or resumes) four models with the shipped configs into runs/bench_vat_{quick,full}:
the VAT tokenizer (configs/digits_vat.yaml), the VQ tokenizer (configs/digits_vq.yaml),
the next-scale model on VAT ids (configs/digits_var.yaml) and the next-token model on VQ
ids (configs/digits_ar.yaml), the two generators for the same number of steps. Reports
held-out reconstruction MSE when decoding from the first k scales, the KL, FID (mean and
std over 3 sampling seeds, vs the train split, classifier features), forwards per image
and the sampling-time ratio next-token / next-scale measured in the same run, at batch 250
(throughput: compute-bound on a CPU) and at batch 1 (latency: bound by the number of
forwards). Writes
benchmarks/results/vat.json.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from benchmarks.common import ROOT, Method, flat_results, meta, print_table, sweep, train, write_results


@torch.no_grad()
def recon_by_scales(tok, images) -> list[float]:
    """Held-out MSE of images decoded from the first k scales' codes, k = 1..K."""
    ids = tok.encode(images)
    f_hat, out = None, []
    for k, ids_k in enumerate(ids):
        f_hat, _ = tok.quantizer.next_input(f_hat, ids_k, k)  # (B, D, S, S) after k + 1 scales
        out.append(torch.nn.functional.mse_loss(tok.decode_latent(f_hat).clamp(0, 1), images).item())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="300-step models and 200 samples per seed")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    args = p.parse_args(argv)
    from vargen.checkpoint import load_component, load_tokenizer_for
    from vargen.data import build_dataset
    from vargen.eval import FIDEvaluator
    from vargen.sampling.decoders.ar import sample_ar
    from vargen.sampling.decoders.var import sample_var
    from vargen.sampling.generate import class_labels
    from vargen.tokenizers.vat import gaussian_kl

    root = os.path.join(ROOT, "runs", f"bench_vat_{'quick' if args.quick else 'full'}")
    vat_dir = train("digits_vat", os.path.join(root, "vat"), args.quick)
    vq_dir = train("digits_vq", os.path.join(root, "vq"), args.quick)
    var_dir = train("digits_var", os.path.join(root, "var"), args.quick, [f"tokenizer_ckpt={vat_dir}"])
    ar_dir = train("digits_ar", os.path.join(root, "ar"), args.quick, [f"tokenizer_ckpt={vq_dir}"])

    var, var_cfg = load_component(var_dir)
    vat = load_tokenizer_for(var_cfg)
    var.attach_tokenizer(vat)
    ar, ar_cfg = load_component(ar_dir)
    vq = load_tokenizer_for(ar_cfg)
    data = build_dataset(var_cfg.data)
    held = data.heldout_images

    by_scales = recon_by_scales(vat, held)
    with torch.no_grad():
        mu, logvar = vat.posterior(held)
        kl = gaussian_kl(mu, logvar).item()
        vq_mse = torch.nn.functional.mse_loss(vq.decode(vq.encode(held)), held).item()

    evaluator = FIDEvaluator.for_dataset(dict(var_cfg.data), split="train")
    n, seeds, batch = (200 if args.quick else 1000), [0, 1, 2], 250
    labels = class_labels(n, var.num_classes, [])
    samplers = {
        "vat": Method(var, vat, lambda m, c, g: sample_var(m, c, generator=g, cfg_scale=args.cfg_scale)),
        "ar": Method(ar, vq, lambda m, c, g: sample_ar(m, c, generator=g, cfg_scale=args.cfg_scale)),
    }
    swept = sweep(samplers, labels, seeds, evaluator, batch)

    # latency at batch 1, where a forward costs about the same whatever its token count
    single = {k: 0.0 for k in samplers}
    one = class_labels(20, var.num_classes, [])
    for name, m in samplers.items():
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for i in range(len(one)):
            m.sampler(m.model, one[i : i + 1], g)
        single[name] = time.perf_counter() - t0

    bits = {"vat": var.num_tokens * math.log2(var.vocab_size), "vq": ar.num_tokens * math.log2(ar.vocab_size)}
    flat = {
        "vat.recon_mse_by_scales": by_scales,
        "vat.recon_mse": by_scales[-1],
        "vq.recon_mse": vq_mse,
        "vat.kl": kl,
        "vat.tokens_per_image": var.num_tokens,
        "vq.tokens_per_image": ar.num_tokens,
        "vat.bits_per_image": bits["vat"],
        "vq.bits_per_image": bits["vq"],
        **flat_results(swept, ("fid_mean", "fid_std", "nfe")),
        "vat.sample_speedup": swept["ar"]["seconds"] / swept["vat"]["seconds"],
        "vat.sample_speedup_batch1": single["ar"] / single["vat"],
        "samples_per_seed": n,
        "cfg_scale": args.cfg_scale,
    }
    rows = []
    for name, model, mse in (("vat", var, by_scales[-1]), ("ar", ar, vq_mse)):
        key = "vat" if name == "vat" else "vq"
        rows.append(
            {
                "model": "VAT + next-scale" if name == "vat" else "VQ + next-token",
                "tokens": model.num_tokens,
                "bits": bits[key],
                "recon_mse": mse,
                "fid": f"{flat[name + '.fid_mean']:.2f} ± {flat[name + '.fid_std']:.2f}",
                "nfe": flat[name + ".nfe"],
                "sample_s": swept[name]["seconds"],
            }
        )
    print_table(rows, ["model", "tokens", "bits", "recon_mse", "fid", "nfe", "sample_s"])
    print("recon MSE from the first k scales:", ", ".join(f"{v:.4g}" for v in by_scales))
    print(
        f"next-scale sampling speedup over next-token: {flat['vat.sample_speedup']:.2f}x at batch {batch}, "
        f"{flat['vat.sample_speedup_batch1']:.2f}x at batch 1"
    )
    path = write_results("vat", flat, meta(args.quick, seeds))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
