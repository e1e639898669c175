#!/usr/bin/env python
"""KV-cached vs uncached next-token decoding of the same model, side by side.

    python -m benchmarks.ar_decode [--quick] [--ckpt runs/digits_ar]

Without --ckpt, randomly initialised models of the demo's width are timed (decoding cost
does not depend on the weights) on the digits grid (4x4 = 16 tokens) and the shapes grid
(8x8 = 64 tokens). Both modes draw identical tokens from the same generator (checked),
so the ratio is pure caching. Model forwards (NFE) are equal by construction; the work
differs in positions pushed through the model: N for cached, N(N+1)/2 for uncached.
Writes benchmarks/results/ar_decode.json; the headline keys (kv_speedup, nfe_cached,
nfe_uncached, tokens) are those of the longest grid.

Peer race (keys ``peer.*``): vargen's plain KV-cached decode (:func:`sample_ar`, no guidance,
top_k=0) against Hugging Face transformers' ``LlamaForCausalLM.generate`` (do_sample, top_k=0,
top_p=1, temperature 1: sampling and nothing else) on a Llama of the same width, depth, heads,
SwiGLU width and vocabulary, random weights, prompt = one token (vargen's class token), batch 1
and 16, 64 and 256 new tokens. The two run interleaved (vargen, HF, vargen, ...), best of 3,
with the same thread count. ``peer.<config>.ratio`` = HF time / vargen time; the times are
``peer.<config>.vargen_s`` / ``hf_s`` and per token ``vargen_ms_per_token`` / ``hf_ms_per_token``
(per step of the batch). Needs the ``bench`` extra (``pip install vargen[bench]``); without
transformers the race is skipped with a message.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import meta, print_table, write_results
from vargen.models.ar import ARConfig, ARTransformer
from vargen.sampling.decoders.ar import sample_ar
from vargen_kernels.dispatch import interpret_requested


def time_decode(model, batch, use_cache, reps, seed, cfg_scale):
    cond = torch.arange(batch) % model.num_classes
    best, ids, stats = float("inf"), None, None
    for _ in range(reps):
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        ids, stats = sample_ar(model, cond, generator=g, use_cache=use_cache, cfg_scale=cfg_scale, top_k=0)
        best = min(best, time.perf_counter() - t0)
    return best, ids, stats


PEER_CONFIGS = {"w128x4": (128, 4, 4), "w256x6": (256, 6, 8)}  # name: (width, depth, heads)
PEER_VOCAB = 1024
PEER_GRIDS = {64: [8, 8], 256: [16, 16]}  # new tokens: vargen's token grid


def hf_llama_like(model: ARTransformer):
    """A random-weight transformers ``LlamaForCausalLM`` of ``model``'s shape: width, depth,
    heads (as many key/value heads), SwiGLU hidden width, vocabulary, and enough positions for
    the class token + every image token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    hidden = model.blocks[0].mlp.w1.out_features  # 16 * ceil(dim * mlp_ratio / 16)
    cfg = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.dim,
        intermediate_size=hidden,
        num_hidden_layers=c.depth,
        num_attention_heads=c.heads,
        num_key_value_heads=c.heads,
        max_position_embeddings=model.num_tokens + 1,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def hf_generate(hf, batch: int, new_tokens: int, seed: int):
    """``generate`` with sampling only (no top-k/top-p/temperature warpers), exactly
    ``new_tokens`` tokens (no end-of-sequence), prompt = token 0 per row; returns (B, new) ids."""
    torch.manual_seed(seed)  # HF samples from the global generator
    prompt = torch.zeros(batch, 1, dtype=torch.long)
    out = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=0,
        use_cache=True,
    )
    return out[:, 1:]


def peer_race(reps: int, configs, batches, lengths) -> dict:
    """Race vargen's sample_ar against HF generate (module docstring); returns the peer.* keys,
    or {} with a printed message when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        print("\npeer race skipped: transformers is not installed (pip install vargen[bench])")
        return {}
    transformers.logging.set_verbosity_error()
    rows, flat = [], {}
    for cname in configs:
        dim, depth, heads = PEER_CONFIGS[cname]
        for n in lengths:
            cfg = ARConfig(
                vocab_size=PEER_VOCAB, grid=PEER_GRIDS[n], num_classes=10, dim=dim, depth=depth, heads=heads
            )
            torch.manual_seed(0)
            model = ARTransformer(cfg).eval()
            hf = hf_llama_like(model)
            for b in batches:
                cond = torch.arange(b) % model.num_classes
                t_v, t_h = float("inf"), float("inf")
                for _ in range(reps):  # interleaved: any drift in machine load hits both alike
                    g = torch.Generator().manual_seed(0)
                    t0 = time.perf_counter()
                    ids_v, _ = sample_ar(model, cond, generator=g, top_k=0)
                    t_v = min(t_v, time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        ids_h = hf_generate(hf, b, n, 0)
                    t_h = min(t_h, time.perf_counter() - t0)
                if ids_v.shape != (b, n) or ids_h.shape != (b, n):
                    raise SystemExit(
                        f"peer race: wrong output shapes {tuple(ids_v.shape)}, {tuple(ids_h.shape)}"
                    )
                key = f"{cname}.b{b}.n{n}"
                row = {
                    "peer": key,
                    "vargen_s": t_v,
                    "hf_s": t_h,
                    "vargen_ms_per_token": 1e3 * t_v / n,
                    "hf_ms_per_token": 1e3 * t_h / n,
                    "ratio": t_h / t_v,
                }
                rows.append(row)
                flat.update({f"peer.{key}.{k}": v for k, v in row.items() if k != "peer"})
                print(
                    f"  {key}: vargen {row['vargen_ms_per_token']:.3f} ms/token, "
                    f"HF {row['hf_ms_per_token']:.3f} ms/token, ratio {row['ratio']:.2f}",
                    flush=True,
                )
    print(f"\nvargen sample_ar vs transformers {transformers.__version__} generate (ratio = HF / vargen):")
    print_table(rows, list(rows[0]))
    return flat


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a minute on 2 cores)")
    p.add_argument("--ckpt", default=None, help="time this trained generator instead of random models")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (both sides of the peer race)")
    p.add_argument("--no-peer", action="store_true", help="skip the race against transformers")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if interpret_requested():  # the warper would run under the Triton interpreter: ~8x slower steps
        print("warning: TRITON_INTERPRET is set; vargen's timings include the interpreted warper")
    reps = 2 if args.quick else 5
    torch.manual_seed(0)

    models = []
    if args.ckpt:
        from vargen.checkpoint import load_component

        m, _ = load_component(args.ckpt)
        models.append((f"ckpt {m.cfg.grid[0]}x{m.cfg.grid[1]}", m))
    else:
        for grid in ([4, 4], [8, 8]):
            cfg = ARConfig(vocab_size=256, grid=grid, num_classes=10, dim=128, depth=4, heads=4)
            models.append((f"{grid[0]}x{grid[1]}", ARTransformer(cfg).eval()))

    rows, flat = [], {}
    for name, model in models:
        t_c, ids_c, s_c = time_decode(model, args.batch, True, reps, 0, args.cfg_scale)
        t_u, ids_u, s_u = time_decode(model, args.batch, False, reps, 0, args.cfg_scale)
        if not torch.equal(ids_c, ids_u):
            raise SystemExit("cached and uncached decoding drew different tokens: the cache is wrong")
        row = {
            "grid": name,
            "tokens": s_c["tokens"],
            "nfe_cached": s_c["target_forwards"],
            "nfe_uncached": s_u["target_forwards"],
            "positions_cached": s_c["positions_computed"],
            "positions_uncached": s_u["positions_computed"],
            "cached_s": t_c,
            "uncached_s": t_u,
            "kv_speedup": t_u / t_c,
        }
        rows.append(row)
        key = name.replace(" ", "_")
        flat.update({f"{key}.{k}": v for k, v in row.items() if k != "grid"})
    head = rows[-1]
    flat.update({k: head[k] for k in ("kv_speedup", "nfe_cached", "nfe_uncached", "tokens")})
    print_table(rows, list(rows[0]))
    if not args.no_peer:
        flat.update(peer_race(3, list(PEER_CONFIGS), (1, 16), (64, 256)))
    info = {**meta(args.quick, [0]), "batch": args.batch, "cfg_scale": args.cfg_scale}
    path = write_results("ar_decode", flat, {**info, "triton_interpret": interpret_requested()})
    print(f"\nkv_speedup (longest grid) = {head['kv_speedup']:.2f}x; wrote {path}")


if __name__ == "__main__":
    main()
