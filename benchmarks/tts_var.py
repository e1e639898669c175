#!/usr/bin/env python
"""TTS-VAR vs best-of-N vs plain next-scale sampling, same model, every network pass counted.

    python -m benchmarks.tts_var [--quick] [--seeds 0 1 2] [--no-potentials]

Uses the VAT + next-scale pair of benchmarks/vat.py (trained or resumed into
runs/bench_vat_{quick,full}). Three feature nets of the same recipe and different seeds
play three roles, so no number is judged by the net that chose it:

- seed 0 *selects*: its log p(requested class) is the search's reward and its patch
  tokens the clustering features (``reward_sel``, what the search optimised);
- seed 1 *scores*: the held-out reward ``reward`` (log p(class) under an independent net);
- seed 2 gives the FID features (vs the train split).

Within-class diversity is the mean pairwise pixel L2 distance between images of the same
label, averaged over labels (``diversity``; the same for as many real train images per
class: ``real.diversity``). For each method and each of 3 seeds it samples one image per
label. Compute, per returned image: AR rows (candidates through the model, x2 with
guidance), tokenizer decodes, feature-net and reward-net images, and ``passes`` = their
sum plus the one decode every method ends with; wall time (seconds per image) sits beside
them. ``compute_ratio`` (token forwards, the AR FLOP proxy), ``passes_ratio`` and
``wall_ratio`` are relative to best-of-8. "plain" is TTS-VAR with N = 1 and the constant
schedule 1 (identical ids to ``sample_var``, tested), so it reports the same counts.
The methods run through ``common.sweep``; its ``on_draw`` scores each draw's held-out reward and
diversity. Writes benchmarks/results/tts_var.json.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from benchmarks.common import ROOT, Method, meta, print_table, sweep, train, write_results

COUNTS = ("ar_rows", "decoded_images", "feature_images", "reward_images", "token_forwards")


def within_class_distance(images, labels) -> float:
    """Mean over labels of the mean pairwise pixel L2 distance between that label's images."""
    flat = images.flatten(1).double()  # (N, C*H*W)
    per_class = []
    for c in labels.unique():
        x = flat[labels == c]
        if x.shape[0] < 2:
            continue
        d = torch.cdist(x, x)  # (n, n)
        n = x.shape[0]
        per_class.append((d.sum() / (n * (n - 1))).item())
    return statistics.mean(per_class)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="300-step models, 60 labels per seed")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--no-potentials", action="store_true", help="skip the diff / max / sum rows")
    args = p.parse_args(argv)
    from vargen.checkpoint import load_component, load_tokenizer_for
    from vargen.data import build_dataset
    from vargen.eval import FIDEvaluator, get_feature_net
    from vargen.eval.feature_net import _full_data_config
    from vargen.sampling.base import SamplerContext
    from vargen.sampling.generate import class_labels
    from vargen.sampling.search.tts_var import TTSVAR, BestOfN, BestOfNConfig, ClassifierReward, TTSVARConfig

    root = os.path.join(ROOT, "runs", f"bench_vat_{'quick' if args.quick else 'full'}")
    vat_dir = train("digits_vat", os.path.join(root, "vat"), args.quick)
    var_dir = train("digits_var", os.path.join(root, "var"), args.quick, [f"tokenizer_ckpt={vat_dir}"])
    model, cfg = load_component(var_dir)
    tok = load_tokenizer_for(cfg)
    model.attach_tokenizer(tok)
    data_cfg = dict(cfg.data)
    select_reward = ClassifierReward(get_feature_net(data_cfg, seed=0))
    heldout_reward = ClassifierReward(get_feature_net(data_cfg, seed=1))
    real, real_labels = build_dataset(_full_data_config(data_cfg)).split("train")
    evaluator = FIDEvaluator(real, get_feature_net(data_cfg, seed=2))
    warp = dict(cfg_scale=args.cfg_scale)
    K = len(model.scales)

    def tts(n, pot="value", schedule=()):
        return TTSVAR(
            TTSVARConfig(n=n, potential=pot, schedule=list(schedule), **warp), reward_fn=select_reward
        )

    methods = {
        "plain": tts(1, schedule=[1] * K),
        "bon": BestOfN(BestOfNConfig(n=8, **warp), reward_fn=select_reward),
        "tts_var2": tts(2),
        "tts_var8": tts(8),
        **{f"tts_var8.potential.{pot}": tts(8, pot) for pot in ("diff", "max", "sum")},  # value: tts_var8
    }
    if args.no_potentials:
        methods = {k: v for k, v in methods.items() if "potential" not in k}
    for sampler in methods.values():
        # clustering features: the seed-0 feature net's patch tokens
        sampler.setup(SamplerContext(model, "cpu", cfg))
    n_labels, seeds, batch = (60 if args.quick else 300), list(args.seeds), 20
    labels = class_labels(n_labels, model.num_classes, [])
    res = {name: {"reward": [], "reward_sel": [], "div": []} for name in methods}
    for r in res.values():
        r.update({key: 0 for key in COUNTS})
    real_div = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        per_class = [torch.nonzero(real_labels == c).squeeze(1) for c in labels.unique()]
        pick = torch.cat(
            [
                i[torch.randperm(i.numel(), generator=g)[: int((labels == c).sum())]]
                for c, i in zip(labels.unique(), per_class)
            ]
        )  # as many real images per class
        real_div.append(within_class_distance(real[pick], real_labels[pick]))

    def on_draw(name, seed, images, ids, stats):
        r = res[name]
        r["reward"].append(heldout_reward(images, labels).mean().item())
        r["reward_sel"].append(select_reward(images, labels).mean().item())
        r["div"].append(within_class_distance(images, labels))
        for key in COUNTS:
            r[key] += stats[key]
        print(
            f"seed {seed} {name}: held-out reward {r['reward'][-1]:.4f} (selecting net "
            f"{r['reward_sel'][-1]:.4f}) diversity {r['div'][-1]:.3f}",
            flush=True,
        )

    swept = sweep(
        {k: Method(model, tok, v) for k, v in methods.items()},
        labels,
        seeds,
        evaluator,
        batch,
        on_draw=on_draw,
    )
    for name, r in res.items():
        r["fid"], r["sec"] = swept[name]["fids"], swept[name]["seconds"]
    res["tts_var8.potential.value"] = res["tts_var8"]

    flat, rows = {"real.diversity": statistics.mean(real_div)}, []
    per_image = len(seeds) * n_labels
    for name, r in res.items():
        flat[f"{name}.reward"] = statistics.mean(r["reward"])
        flat[f"{name}.reward_sel"] = statistics.mean(r["reward_sel"])
        if "potential" in name:
            continue
        flat[f"{name}.fid_mean"] = statistics.mean(r["fid"])
        flat[f"{name}.fid_std"] = statistics.stdev(r["fid"]) if len(r["fid"]) > 1 else 0.0
        flat[f"{name}.diversity"] = statistics.mean(r["div"])
        for key in COUNTS:
            flat[f"{name}.{key}_per_image"] = r[key] / per_image
        passes = sum(r[key] for key in COUNTS if key != "token_forwards") + per_image  # + the final decode
        flat[f"{name}.passes_per_image"] = passes / per_image
        flat[f"{name}.seconds_per_image"] = r["sec"] / per_image
    for name in ("plain", "bon", "tts_var2", "tts_var8"):
        flat[f"{name}.compute_ratio"] = res[name]["token_forwards"] / res["bon"]["token_forwards"]
        flat[f"{name}.passes_ratio"] = flat[f"{name}.passes_per_image"] / flat["bon.passes_per_image"]
        flat[f"{name}.wall_ratio"] = res[name]["sec"] / res["bon"]["sec"]
        rows.append(
            {
                "method": name,
                "reward": flat[f"{name}.reward"],
                "reward_sel": flat[f"{name}.reward_sel"],
                "fid": f"{flat[f'{name}.fid_mean']:.2f} ± {flat[f'{name}.fid_std']:.2f}",
                "diversity": flat[f"{name}.diversity"],
                "passes/img": flat[f"{name}.passes_per_image"],
                "compute_ratio": flat[f"{name}.compute_ratio"],
                "passes_ratio": flat[f"{name}.passes_ratio"],
                "wall_ratio": flat[f"{name}.wall_ratio"],
            }
        )
    for pot in ("value",) if args.no_potentials else ("value", "diff", "max", "sum"):
        rows.append(
            {
                "method": f"tts_var8 {pot}",
                "reward": flat[f"tts_var8.potential.{pot}.reward"],
                "reward_sel": flat[f"tts_var8.potential.{pot}.reward_sel"],
            }
        )
    rows.append({"method": "real", "diversity": flat["real.diversity"]})
    cols = [
        "method",
        "reward",
        "reward_sel",
        "fid",
        "diversity",
        "passes/img",
        "compute_ratio",
        "passes_ratio",
    ]
    print_table(rows, [*cols, "wall_ratio"])
    flat.update(
        {
            "labels_per_seed": n_labels,
            "cfg_scale": args.cfg_scale,
            "reward_kind": "log p(class): selection under feature net seed 0, reported under seed 1",
            "fid_features": "feature net seed 2",
        }
    )
    print(f"wrote {write_results('tts_var', flat, meta(args.quick, seeds))}")


if __name__ == "__main__":
    main()
