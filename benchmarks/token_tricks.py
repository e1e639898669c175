"""Issue 4 benchmark (partial: TokenBridge reconstruction only).

    python benchmarks/token_tricks.py [--quick]

Trains the digits KL tokenizer (configs/digits_kl.yaml settings; --quick: 200 steps) into a
temp dir, then reports held-out reconstruction MSE of the continuous latent (`kl.recon_mse`) and
of TokenBridge's quantized latent at B = 16, 32, 64 levels (`tokenbridge.recon_mse.{B}`), plus
the latent quantization error. CTF, Token-Shuffle and the generation FIDs are not built yet.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import meta, print_table, write_results  # noqa: E402

from vargen.config import load_run_config  # noqa: E402
from vargen.data import build_dataset  # noqa: E402
from vargen.tokenizers.tokenbridge import DimQuantConfig, DimQuantizer  # noqa: E402
from vargen.train.tasks import run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    steps = 200 if args.quick else 800
    out = tempfile.mkdtemp(prefix="bench_token_tricks_")
    cfg = load_run_config(
        os.path.join(ROOT, "configs", "digits_kl.yaml"),
        [f"out_dir={out}/kl", f"train.steps={steps}", "train.progress=false", "train.log_every=100000"],
    )
    kl = run(cfg, log=lambda m: None).eval()
    data = build_dataset(cfg.data)
    x = data.heldout_images
    with torch.no_grad():
        z = kl.encode(x)  # (B, N, D) normalised tokens
        flat = {"kl.recon_mse": torch.nn.functional.mse_loss(kl.decode(z), x).item()}
        rows = [{"latent": "continuous", "recon_mse": flat["kl.recon_mse"], "latent_abs_err": 0.0}]
        for levels in (16, 32, 64):
            q = DimQuantizer(DimQuantConfig(levels=levels))
            zq = q.dequantize(q.quantize(z))
            mse = torch.nn.functional.mse_loss(kl.decode(zq), x).item()
            flat[f"tokenbridge.recon_mse.{levels}"] = mse
            flat[f"tokenbridge.latent_abs_err.{levels}"] = (z - zq).abs().mean().item()
            rows.append(
                {"latent": f"B={levels}", "recon_mse": mse, "latent_abs_err": (z - zq).abs().mean().item()}
            )
    print_table(rows, ["latent", "recon_mse", "latent_abs_err"])
    print("wrote", write_results("token_tricks", flat, meta(args.quick, [0])))


if __name__ == "__main__":
    main()
