#!/usr/bin/env python
"""Every fused Triton kernel of ``vargen_kernels`` against its torch reference.

    python -m benchmarks.kernels [--quick]

On CUDA: each kernel runs compiled on a sampler-sized problem, its outputs are compared with the
reference's (``kernels.<name>.equal``: integer outputs identical, float outputs within 1e-9
relative, 1e-5 for fp32 ones; ``mismatch`` counts differing integer entries, which float
rounding may cause in rare near-ties, see each module's docstring) and both are timed (median
of repeated calls after a warm-up, CUDA-synchronised): ``kernels.<name>.kernel_ms``, ``reference_ms`` and
``speedup`` = reference / kernel.

On a CPU-only machine: the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set
here before triton is imported) on a tiny problem, compared with the reference the same way
(``equal``, ``mismatch``), and the reference alone is timed on the sampler-sized problem
(``reference_ms``); there is no ``speedup`` (the interpreter's time means nothing). **The
compiled path is unverified until this runs on a GPU** (``benchmarks/gpu_check.sh`` does).

Problems (full / ``--quick`` halves the batch): ``logits_warper`` B=32 rows of V=16384 with CFG,
top-k 1000, top-p 0.9; ``speculative_verify`` and ``group_verify`` (G=14) B=16 rows, W=8 window
positions, V=16384; ``fkc_update`` G=16 groups of K=8 particles of 3x32x32 with systematic
resampling; ``tarflow_step`` 64 rows x 64 window tokens x C=48 (fp32, clamp 4);
``cspd_accept`` B=64 rows of g=4 drafts of C=16 (the MAR head's token width; std per token) and
``cspd_propose`` K=16 residual proposals for those 64 rows; ``ragged_attention`` B=32 rows x H=8
heads, a W=5 verification window of d=64 over a cache of S=1024 slots with rows' lengths spread
over 0..1019. Writes benchmarks/results/kernels.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # before the first `import triton` (vargen_kernels imports it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.common import meta, print_table, write_results  # noqa: E402
from vargen_kernels.cspd_ratio import cspd_accept, cspd_propose  # noqa: E402
from vargen_kernels.dispatch import TRITON_AVAILABLE  # noqa: E402
from vargen_kernels.fkc import fkc_update  # noqa: E402
from vargen_kernels.group_verify import group_verify  # noqa: E402
from vargen_kernels.logits_warper import warp_and_sample  # noqa: E402
from vargen_kernels.ragged_attention import ragged_attention  # noqa: E402
from vargen_kernels.speculative_verify import verify  # noqa: E402
from vargen_kernels.tarflow_step import tarflow_step  # noqa: E402


def _window(B, W, V, g, dev):
    """Target / draft probabilities of a speculative window (a quarter of p's tokens at 0),
    drafts ~ q, rooms, and the three uniform draws."""
    p = torch.softmax(2 * torch.randn(B, W, V, generator=g), -1) * (torch.rand(B, W, V, generator=g) > 0.25)
    p[..., 0] += 1e-4
    p = p / p.sum(-1, keepdim=True)
    q = torch.softmax(2 * torch.randn(B, W - 1, V, generator=g), -1)
    x = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, W - 1)
    room = torch.randint(1, 3 * W, (B,), generator=g)
    u = (torch.rand(B, W, V, generator=g), torch.rand(B, W - 1, generator=g), torch.rand(B, V, generator=g))
    return tuple(t.to(dev) for t in (p, q, x, room, *u))


def problems(scale: float, dev):
    """name -> (call(backend) -> outputs, description); ``scale`` shrinks every problem."""
    g = torch.Generator().manual_seed(0)
    out = {}
    B, V = max(2, int(32 * scale)), max(8, int(16384 * scale))
    cond = (2 * torch.randn(B, V, generator=g)).to(dev)
    unc = (2 * torch.randn(B, V, generator=g)).to(dev)
    u = torch.rand(B, V, generator=g).to(dev)
    warp = dict(cfg_scale=3.0, temperature=0.9, top_k=max(1, V // 16), top_p=0.9)
    out["logits_warper"] = (
        lambda b: (warp_and_sample(cond, unc, uniform_BV=u, backend=b, **warp),),
        f"B={B} V={V}",
    )
    Bw, W = max(2, int(16 * scale)), 8 if scale >= 0.1 else 3
    win = _window(Bw, W, V, g, dev)
    out["speculative_verify"] = (lambda b: verify(*win, backend=b), f"B={Bw} W={W} V={V}")
    out["group_verify"] = (lambda b: group_verify(*win, group=14, backend=b), f"B={Bw} W={W} V={V} G=14")
    G, K = max(2, int(16 * scale)), 8
    side = 32 if scale >= 0.1 else 4
    lw = torch.randn(G, K, generator=g, dtype=torch.float64).to(dev)
    ec = torch.randn(G * K, 3, side, side, generator=g).to(dev)
    eu = (ec.cpu() + 0.1 * torch.randn(G * K, 3, side, side, generator=g)).to(dev)
    uG = torch.rand(G, generator=g, dtype=torch.float64).to(dev)
    step = dict(w=3.0, a_t=0.4, a_n=0.45, ess_threshold=1.0, u_G=uG)
    out["fkc_update"] = (
        lambda b: fkc_update(lw, ec, eu, backend=b, **step),
        f"G={G} K={K} D={3 * side * side}",
    )
    R, Wt = max(2, int(64 * scale)), 64 if scale >= 0.1 else 3
    zab = [torch.randn(R, Wt, 48, generator=g).to(dev) for _ in range(4)]
    out["tarflow_step"] = (lambda b: tarflow_step(*zab, 4.0, backend=b), f"rows={R} width={Wt} C=48")
    Bc, gc, Cc, Kc = max(2, int(64 * scale)), 4 if scale >= 0.1 else 2, 16, 16 if scale >= 0.1 else 3
    x0 = torch.randn(Bc, gc, Cc, generator=g)
    mp, mq = x0 + 0.3 * torch.randn(Bc, gc, Cc, generator=g), x0 + 0.3 * torch.randn(Bc, gc, Cc, generator=g)
    sd = 0.5 + torch.rand(Bc, gc, 1, generator=g)
    acc = [t.to(dev) for t in (x0, mp, sd, mq, sd, torch.zeros(Bc, gc), torch.rand(Bc, gc, generator=g))]
    acc.append(torch.full((Bc,), gc, device=dev))
    out["cspd_accept"] = (lambda b: cspd_accept(*acc, backend=b), f"B={Bc} g={gc} C={Cc}")
    e = torch.randn(Kc, Bc, Cc, generator=g).to(dev)
    prop = [t[:, 0].to(dev) for t in (mp, sd, mq, sd)] + [torch.zeros(Bc, device=dev), e]
    out["cspd_propose"] = (lambda b: cspd_propose(*prop, backend=b), f"K={Kc} B={Bc} C={Cc}")
    Ba, Ha, Sa = max(2, int(32 * scale)), 8 if scale >= 0.1 else 2, 1024 if scale >= 0.1 else 24
    Wa, da = 5, 64
    qkv = [torch.randn(Ba, Ha, n, da, generator=g).to(dev) for n in (Wa, Sa, Sa)]
    lens = torch.randint(0, Sa - Wa + 1, (Ba,), generator=g).to(dev)
    out["ragged_attention"] = (
        lambda b: (ragged_attention(*qkv, lens, backend=b),),
        f"B={Ba} H={Ha} W={Wa} S={Sa} d={da}",
    )
    return out


def compare(ker, ref) -> tuple[bool, int]:
    """(all equal, integer entries that differ): ints exactly, floats within 1e-9 relative
    (fp32 outputs within 1e-5: the kernels' exp/log are not bit-identical to torch's)."""
    equal, mismatch = True, 0
    for k, r in zip(ker, ref):
        if r is None:
            equal &= k is None
        elif r.is_floating_point() or r.dtype == torch.bool:
            tol = 1e-9 if r.dtype in (torch.float64, torch.bool) else 1e-5
            equal &= bool(torch.allclose(k.double(), r.double(), rtol=tol, atol=tol))
        else:
            mismatch += int((k != r).sum())
    return equal and mismatch == 0, mismatch


def timed_ms(fn, reps: int) -> float:
    """Median wall time of ``fn()`` in ms after one warm-up call (CUDA-synchronised)."""
    fn()
    times = []
    for _ in range(reps):
        if CUDA:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if CUDA:
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="half-size problems, fewer repetitions")
    args = p.parse_args()
    torch.manual_seed(0)
    if not CUDA:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    dev = torch.device("cuda" if CUDA else "cpu")
    scale = 0.5 if args.quick else 1.0
    reps = 5 if args.quick else 20
    flat, rows = (
        {"kernels.mode": "compiled" if CUDA else "interpreter", "kernels.compiled_verified": CUDA},
        [],
    )
    full = problems(scale, dev)
    # on CPU the equality check runs interpreted on a tiny problem; the reference is timed on `full`
    check = full if CUDA else problems(0.004, dev)
    for name, (call, desc) in full.items():
        row = {"kernel": name, "problem": desc}
        if TRITON_AVAILABLE:
            c_call, c_desc = check[name]
            equal, mismatch = compare(c_call("triton" if CUDA else "interpret"), c_call("torch"))
            row.update(equal=equal, mismatch=mismatch, checked_on=c_desc)
        row["reference_ms"] = timed_ms(lambda call=call: call("torch"), reps)
        if CUDA and TRITON_AVAILABLE:
            row["kernel_ms"] = timed_ms(lambda call=call: call("triton"), reps)
            row["speedup"] = row["reference_ms"] / row["kernel_ms"]
        rows.append(row)
        flat.update({f"kernels.{name}.{k}": v for k, v in row.items() if k != "kernel"})
    print_table(
        rows, ["kernel", "problem", "checked_on", "equal", "mismatch", "reference_ms", "kernel_ms", "speedup"]
    )
    device = torch.cuda.get_device_name() if CUDA else "cpu"
    note = (
        "compiled kernels vs references on CUDA"
        if CUDA
        else "CPU: kernels checked under the Triton interpreter only; the compiled path is unverified"
    )
    path = write_results("kernels", flat, {**meta(args.quick, [0], device), "note": note})
    print(f"wrote {path}")
    if not all(r.get("equal", True) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
