#!/usr/bin/env python
"""TTS-VAR vs best-of-N vs plain next-scale sampling, same model, compute in forwards.

    python benchmarks/tts_var.py [--quick]

Uses the VAT + next-scale pair of benchmarks/vat.py (trained or resumed into
runs/bench_vat_{quick,full}). The reward is the default one: log p(requested class) under
the digits feature net. For each method and each of 3 seeds it samples one image per
label and reports the mean reward of the returned images, FID (vs the train split,
classifier features), and compute: candidate forwards (rows pushed through the model,
summed over scales), token forwards (the same weighted by each scale's tokens, a FLOP
proxy) and decoded images. ``compute_ratio`` is token forwards / best-of-8's.
Writes benchmarks/results/tts_var.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import meta, print_table, train, write_results  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="300-step models, 60 labels per seed")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    args = p.parse_args(argv)
    from vargen.eval import FIDEvaluator, get_feature_net
    from vargen.sampling.generate import class_labels, generate
    from vargen.sampling.tts_var import TTSVAR, BestOfN, BestOfNConfig, ClassifierReward, TTSVARConfig
    from vargen.sampling.var_decode import sample_var
    from vargen.train.tasks import load_component, load_tokenizer_for

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs")
    root = os.path.join(root, f"bench_vat_{'quick' if args.quick else 'full'}")
    vat_dir = train("digits_vat", os.path.join(root, "vat"), args.quick)
    var_dir = train("digits_var", os.path.join(root, "var"), args.quick, [f"tokenizer_ckpt={vat_dir}"])
    model, cfg = load_component(var_dir)
    tok = load_tokenizer_for(cfg)
    model.attach_tokenizer(tok)
    data_cfg = dict(cfg.data)
    reward = ClassifierReward(get_feature_net(data_cfg))
    evaluator = FIDEvaluator.for_dataset(data_cfg, split="train")
    warp = dict(cfg_scale=args.cfg_scale)

    def tts(n, pot="value"):
        return TTSVAR(TTSVARConfig(n=n, potential=pot, **warp), reward_fn=reward)

    methods = {
        "plain": lambda m, c, g: sample_var(m, c, generator=g, **warp),
        "bon": BestOfN(BestOfNConfig(n=8, **warp), reward_fn=reward),
        "tts_var2": tts(2),
        "tts_var8": tts(8),
        **{f"tts_var8.potential.{pot}": tts(8, pot) for pot in ("diff", "max", "sum")},  # value: tts_var8
    }
    for sampler in methods.values():
        if isinstance(sampler, TTSVAR):
            sampler.bind_run(cfg)  # clustering features: the feature net's patch tokens
    n_labels, seeds, batch = (60 if args.quick else 300), [0, 1, 2], 20
    labels = class_labels(n_labels, model.num_classes, [])
    res = {name: {"reward": [], "fid": [], "cand": 0, "tok": 0, "dec": 0} for name in methods}
    for seed in seeds:
        for name, sampler in methods.items():
            images, _, stats = generate(
                model, tok, labels, sampler, torch.Generator().manual_seed(seed), batch
            )
            r = res[name]
            r["reward"].append(reward(images, labels).mean().item())
            r["fid"].append(evaluator.score(images))
            r["cand"] += stats["candidate_forwards"]
            r["tok"] += stats["token_forwards"]
            r["dec"] += stats.get("decoded_images", 0)
            print(f"seed {seed} {name}: reward {r['reward'][-1]:.4f} fid {r['fid'][-1]:.2f}", flush=True)
    res["tts_var8.potential.value"] = res["tts_var8"]

    flat, rows = {}, []
    per_image = len(seeds) * n_labels
    for name, r in res.items():
        flat[f"{name}.reward"] = statistics.mean(r["reward"])
        if "potential" in name:
            continue
        flat[f"{name}.fid_mean"] = statistics.mean(r["fid"])
        flat[f"{name}.fid_std"] = statistics.stdev(r["fid"])
        flat[f"{name}.candidate_forwards_per_image"] = r["cand"] / per_image
        flat[f"{name}.token_forwards_per_image"] = r["tok"] / per_image
        flat[f"{name}.decoded_images_per_image"] = r["dec"] / per_image
    for name in ("plain", "bon", "tts_var2", "tts_var8"):
        flat[f"{name}.compute_ratio"] = res[name]["tok"] / res["bon"]["tok"]
        flat[f"{name}.forward_ratio"] = res[name]["cand"] / res["bon"]["cand"]
        rows.append(
            {
                "method": name,
                "reward": flat[f"{name}.reward"],
                "fid": f"{flat[f'{name}.fid_mean']:.2f} ± {flat[f'{name}.fid_std']:.2f}",
                "token_fwd/img": flat[f"{name}.token_forwards_per_image"],
                "compute_ratio": flat[f"{name}.compute_ratio"],
                "decoded/img": flat[f"{name}.decoded_images_per_image"],
            }
        )
    for pot in ("value", "diff", "max", "sum"):
        rows.append({"method": f"tts_var8 {pot}", "reward": flat[f"tts_var8.potential.{pot}.reward"]})
    print_table(rows, ["method", "reward", "fid", "token_fwd/img", "compute_ratio", "decoded/img"])
    flat.update(
        {"labels_per_seed": n_labels, "cfg_scale": args.cfg_scale, "reward_kind": "classifier log p(class)"}
    )
    print(f"wrote {write_results('tts_var', flat, meta(args.quick, seeds))}")


if __name__ == "__main__":
    main()
