#!/usr/bin/env python
"""The samplers wired to the fused kernels draw the same output with the kernels as with the
torch references, from the same generator: SD, SJD, GSD group-exact (ids; their KV-cached windows
also run the ragged-window attention kernel), FKC-CFG (particles), continuous TarFlow Jacobi
(images, passes; fp32, so a convergence test at tol may flip for a token within an ulp of it:
``passes_equal`` is reported, not required) and CSpD (fp32 xAR pair: continuous tokens within
1e-4, the same acceptances; last-step test, residual proposals and window attention fused).

    python -m benchmarks.gpu_check_samplers            (CUDA: compiled kernels; run by gpu_check.sh)
    TRITON_INTERPRET=1 python -m benchmarks.gpu_check_samplers --small   (CPU smoke test)

Prints one line ``RESULT {json}`` with ``samplers.<name>.equal`` and mismatch counts; exits 1 when
any differs.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from vargen.diffusion.analytic import GaussianMixtureDenoiser
from vargen.diffusion.fkc import fkc_cfg_ddpm
from vargen.diffusion.schedules import linear_alphas_cumprod
from vargen.models.ar import ARConfig, ARTransformer
from vargen.sampling.speculative.draft import sample_speculative
from vargen.sampling.speculative.gsd import exact_group_fns
from vargen.sampling.speculative.jacobi import sample_jacobi


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="toy sizes (for the CPU interpreter)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    kernel = "triton" if cuda else "interpret"
    torch.manual_seed(0)
    V, grid, window, group, particles = (24, [2, 3], 4, 3, 4) if args.small else (512, [8, 8], 8, 14, 8)
    cfg = dict(vocab_size=V, grid=grid, num_classes=4, dim=32 if args.small else 64, depth=1, heads=2)
    target, draft = (ARTransformer(ARConfig(**cfg)).to(dev).eval() for _ in range(2))
    cond = torch.arange(2 if args.small else 8, device=dev) % 4
    warp = dict(cfg_scale=2.0, temperature=0.9, top_k=V // 2)
    rf, sf = exact_group_fns(group)
    runs = {
        "sd": lambda b, g: sample_speculative(
            target, draft, cond, generator=g, gamma=window // 2, backend=b, **warp
        ),
        "sjd": lambda b, g: sample_jacobi(target, cond, generator=g, window=window, backend=b, **warp),
        "gsd_exact": lambda b, g: sample_jacobi(
            target, cond, generator=g, window=window, ratio_fn=rf, residual_fn=sf, backend=b, **warp
        ),
    }
    out = {}
    for name, run in runs.items():
        a, b = (run(be, torch.Generator(device=dev).manual_seed(1))[0] for be in (kernel, "torch"))
        out[f"samplers.{name}.equal"] = bool(torch.equal(a, b))
        out[f"samplers.{name}.token_mismatch"] = int((a != b).sum())
    abar = linear_alphas_cumprod().to(dev)
    pair = []
    for mean, var in ((1.0, 0.5), (0.0, 1.0)):
        d = GaussianMixtureDenoiser([1.0], [mean], [var], abar)
        d.w, d.mu, d.var = d.w.to(dev), d.mu.to(dev), d.var.to(dev)
        pair.append(d)
    n = 16 if args.small else 64
    xs = [
        fkc_cfg_ddpm(
            lambda x, t: (pair[0](x, t), pair[1](x, t)),
            (n, 2),
            particles,
            abar,
            8 if args.small else 20,
            3.0,
            torch.Generator(device=dev).manual_seed(2),
            keep_all=True,
            backend=be,
        )[0]
        for be in (kernel, "torch")
    ]
    out["samplers.fkc_cfg.max_abs_diff"] = float((xs[0] - xs[1]).abs().max())
    out["samplers.fkc_cfg.equal"] = bool(torch.allclose(xs[0], xs[1], rtol=1e-9, atol=1e-9))
    from vargen.models.tarflow import TarFlow, TarFlowConfig
    from vargen.sampling.decoders.tarflow import sample_tarflow_continuous

    torch.manual_seed(0)  # a 2-block TarFlow on 8x8 images, random weights (check data only)
    tf_cfg = TarFlowConfig(
        channels=1,
        resolution=8,
        num_classes=3,
        dim=16,
        layers_per_block=1,
        num_blocks=1 if args.small else 2,
        heads=2,
    )
    m = TarFlow(tf_cfg).eval()
    m.init_output_(0.1, torch.Generator().manual_seed(1))  # every block transforms its input
    m = m.to(dev)
    imgs = [
        sample_tarflow_continuous(
            m,
            torch.arange(3 if args.small else 12, device=dev) % 4,
            generator=torch.Generator(device=dev).manual_seed(3),
            slots=2 if args.small else 5,
            window=4,
            tol=1e-4,
            cfg_scale=1.5,
            backend=be,
        )
        for be in (kernel, "torch")
    ]
    out["samplers.tarflow.max_abs_diff"] = float((imgs[0][0] - imgs[1][0]).abs().max())
    out["samplers.tarflow.equal"] = bool(torch.allclose(imgs[0][0], imgs[1][0], rtol=1e-4, atol=1e-4))
    out["samplers.tarflow.passes_equal"] = imgs[0][1]["passes_per_block"] == imgs[1][1]["passes_per_block"]
    from vargen.models.xar import XAR, XARConfig
    from vargen.sampling.speculative.cspd import sample_cspd

    xcfg = dict(
        grid=[1, 4] if args.small else [4, 4],
        code_dim=4,
        num_classes=4,
        entity="token",
        denoiser="head",
        dim=32,
    )
    head = {"name": "mar_diffusion", "width": 32, "depth": 2, "num_sampling_steps": 8}
    torch.manual_seed(4)
    xt = XAR(XARConfig(**xcfg, depth=2, heads=2, head=head)).to(dev).eval()
    xd = XAR(XARConfig(**xcfg, depth=1, heads=2, head=head)).to(dev).eval()
    ys = torch.arange(3 if args.small else 12, device=dev) % 4
    ckw = dict(gamma=3, cfg_scale=2.0)
    runs = [
        sample_cspd(xt, xd, ys, generator=torch.Generator(device=dev).manual_seed(5), backend=be, **ckw)
        for be in (kernel, "torch")
    ]
    out["samplers.cspd.max_abs_diff"] = float((runs[0][0] - runs[1][0]).abs().max())
    out["samplers.cspd.equal"] = bool(torch.allclose(runs[0][0], runs[1][0], rtol=1e-4, atol=1e-4)) and (
        runs[0][1]["accepted"] == runs[1][1]["accepted"]
    )
    out["samplers.cspd.accepted"] = [r[1]["accepted"] for r in runs]
    out["samplers.device"] = torch.cuda.get_device_name() if cuda else "cpu (interpreter)"
    print("RESULT " + json.dumps(out))
    sys.exit(0 if all(v for k, v in out.items() if k.endswith(".equal")) else 1)


if __name__ == "__main__":
    main()
