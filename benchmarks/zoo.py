#!/usr/bin/env python
"""The model zoo of the 256-token photos workload: trained once, reused by every benchmark.

    python -m benchmarks.zoo [--only photos_ar ...] [--quick] [--list]

Each entry is a shipped config (``configs/<name>.yaml``) plus the zoo entries it depends on (a
generator on its tokenizer). It trains into ``$VARGEN_CACHE/zoo/<name>-<hash>/`` (default cache
``~/.cache/vargen``), where the hash covers the entry's resolved config (output paths and progress
switches left out) and the hashes of its dependencies: a changed config, or a retrained tokenizer
under it, gives a new folder and retrains only what changed; an unchanged one is reused (a
``zoo.json`` beside the weights marks it finished, with its training time). A folder without
``zoo.json`` is an interrupted training and resumes from its last checkpoint.

``--quick`` trains every entry for 150 steps (a different hash, so it never mixes with the full
zoo): for trying the benchmarks, not for numbers. The summary (training seconds and parameters of
each entry) is written to ``benchmarks/results/zoo.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

from benchmarks.common import ROOT, meta, print_table, write_results
from vargen.checkpoint import LATER_MODEL_KEYS

QUICK_STEPS = 150
DONE = "zoo.json"


@dataclass(frozen=True)
class ZooEntry:
    """A shipped config and the zoo entries its path-valued keys point to (key -> entry name)."""

    config: str
    deps: dict = field(default_factory=dict)
    nominal_seconds: float = 300.0  # rough training time on 2 cores, only for the first ETA


ZOO: dict[str, ZooEntry] = {  # in training order: the token-AR set first, the benchmarks' main subject
    "photos_vq": ZooEntry("photos_vq", {}, 540),
    "photos_ar": ZooEntry("photos_ar", {"tokenizer_ckpt": "photos_vq"}, 900),
    "photos_ar_draft": ZooEntry("photos_ar_draft", {"tokenizer_ckpt": "photos_vq"}, 240),
    "photos_tarflow": ZooEntry("photos_tarflow", {}, 900),
    "photos_kl": ZooEntry("photos_kl", {}, 360),
    "photos_xar": ZooEntry("photos_xar", {"tokenizer_ckpt": "photos_kl"}, 900),
    "photos_xar_draft": ZooEntry("photos_xar_draft", {"tokenizer_ckpt": "photos_kl"}, 300),
    "photos_vat": ZooEntry("photos_vat", {}, 360),
    "photos_var": ZooEntry("photos_var", {"tokenizer_ckpt": "photos_vat"}, 900),
}
# Keys that say where or how visibly a run trains, not what it trains.
UNHASHED = ("out_dir",)
# How a run is driven or watched, never what a finite run learns: progress bars, resume, device,
# the NaN guard, training previews (train.sample_every only draws pictures of the model).
UNHASHED_TRAIN = ("progress", "resume", "device", "max_nonfinite_steps", "sample_every")
# Model options added after entries were trained (vargen.checkpoint.LATER_MODEL_KEYS) are left
# out while at the value that reproduces the old model (a new key alone would change every digest).


def zoo_root() -> str:
    base = os.environ.get("VARGEN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vargen"))
    return os.path.join(base, "zoo")


def config_path(config: str) -> str:
    return config if config.endswith(".yaml") else os.path.join(ROOT, "configs", f"{config}.yaml")


def order(names, zoo: dict) -> list[str]:
    """``names`` and everything they depend on, dependencies first."""
    out: list[str] = []

    def visit(n, stack=()):
        if n not in zoo:
            raise KeyError(f"unknown zoo entry '{n}'; known: {sorted(zoo)}")
        if n in stack:
            raise ValueError(f"zoo entries depend on each other in a cycle: {' -> '.join((*stack, n))}")
        for d in zoo[n].deps.values():
            visit(d, (*stack, n))
        if n not in out:
            out.append(n)

    for n in names:
        visit(n)
    return out


class Zoo:
    """Resolves zoo entries to trained run directories, training what is missing.

    ``overrides`` apply to every entry (e.g. ``train.steps=150`` for a quick zoo); ``zoo`` and
    ``root`` default to the shipped entries and ``$VARGEN_CACHE/zoo``.
    """

    def __init__(self, overrides=(), zoo: dict | None = None, root: str | None = None, log=print):
        self.overrides = list(overrides)
        self.zoo = dict(ZOO if zoo is None else zoo)
        self.root = root or zoo_root()
        self.log = log
        self._hash: dict[str, str] = {}
        self.trained: list[str] = []  # entries trained (or resumed) by this object

    # ---------------------------------------------------------------- identity
    def _overrides(self, name: str) -> list[str]:
        deps = [f"{k}={self.path(d)}" for k, d in self.zoo[name].deps.items()]
        return [*deps, *self.overrides]

    def resolved(self, name: str) -> dict:
        """The entry's resolved config as plain data (dependency paths filled in)."""
        from vargen.config import load_run_config, to_plain

        return to_plain(load_run_config(config_path(self.zoo[name].config), self._overrides(name)))

    def digest(self, name: str) -> str:
        """12 hex digits over the resolved config (paths and progress switches left out) and the
        digests of the dependencies."""
        if name not in self._hash:
            cfg = self.resolved(name)
            for k in UNHASHED:
                cfg.pop(k, None)
            for k in UNHASHED_TRAIN:
                cfg.get("train", {}).pop(k, None)
            model = cfg.get("model", {})
            for k, v in LATER_MODEL_KEYS.items():
                if k in model and model[k] == v:
                    model.pop(k)
            for k, d in self.zoo[name].deps.items():
                cfg[k] = self.digest(d)
            blob = json.dumps(cfg, sort_keys=True, default=str).encode()
            self._hash[name] = hashlib.sha256(blob).hexdigest()[:12]
        return self._hash[name]

    def path(self, name: str) -> str:
        return os.path.join(self.root, f"{name}-{self.digest(name)}")

    def is_trained(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.path(name), DONE))

    # ---------------------------------------------------------------- training
    def get(self, name: str) -> str:
        """The run directory of ``name``, trained first (with its dependencies) if missing."""
        self.ensure([name])
        return self.path(name)

    def ensure(self, names) -> dict[str, str]:
        """Train whatever of ``names`` (and their dependencies) is missing; {name: run dir}."""
        todo = [n for n in order(names, self.zoo) if not self.is_trained(n)]
        nominal = {n: self.zoo[n].nominal_seconds for n in todo}
        spent = spent_nominal = 0.0
        for i, n in enumerate(todo):
            left = sum(nominal[m] for m in todo[i:])
            speed = spent / spent_nominal if spent_nominal else 1.0  # measured / nominal so far
            self.log(
                f"zoo [{i + 1}/{len(todo)}] training {n} -> {self.path(n)} "
                f"(ETA for the rest: {_mins(left * speed)})"
            )
            t0 = time.perf_counter()
            self._train(n)
            spent += time.perf_counter() - t0
            spent_nominal += nominal[n]
        return {n: self.path(n) for n in order(names, self.zoo)}

    def _train(self, name: str) -> None:
        from vargen.config import load_run_config
        from vargen.train.tasks import run

        out = self.path(name)
        show = sys.stderr.isatty()
        over = [
            *self._overrides(name),
            f"out_dir={out}",
            "train.resume=true",
            f"train.progress={str(show).lower()}",
        ]
        cfg = load_run_config(config_path(self.zoo[name].config), over)
        fresh = Zoo(self.overrides, self.zoo, self.root, log=self.log).digest(name)
        if fresh != self.digest(name):  # the digest is memoized; the yaml is read now
            raise RuntimeError(
                f"configs/{self.zoo[name].config} changed while the zoo was running ({self.digest(name)} -> "
                f"{fresh}): rerun, so that {name} trains into the folder its config names"
            )
        model = run(cfg, log=self.log)
        seconds = logged_seconds(out)
        params = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else None
        record = {
            "name": name,
            "hash": self.digest(name),
            "train_seconds": round(seconds, 1),
            "params": params,
        }
        tmp = os.path.join(out, DONE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)
        os.replace(tmp, os.path.join(out, DONE))
        self.trained.append(name)
        self.log(f"zoo: {name} trained in {_mins(seconds)} ({params} parameters)")

    def record(self, name: str) -> dict:
        with open(os.path.join(self.path(name), DONE)) as f:
            return json.load(f)


def logged_seconds(run_dir: str) -> float:
    """Training wall time summed over every process that trained the run (log.jsonl's
    ``elapsed_s`` restarts at each resume)."""
    from vargen.io import read_log

    total = last = 0.0
    for row in read_log(run_dir):
        if "elapsed_s" not in row:
            continue
        if row["elapsed_s"] < last:  # a new process resumed the run
            total += last
        last = row["elapsed_s"]
    return total + last


def _mins(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def quick_overrides() -> list[str]:
    return [f"train.steps={QUICK_STEPS}", "train.eval_every=0"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="entries to train (with their dependencies)")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per entry (not for numbers)")
    ap.add_argument("--list", action="store_true", help="print the entries and whether they are trained")
    args = ap.parse_args(argv)
    zoo = Zoo(quick_overrides() if args.quick else [])
    names = args.only or list(zoo.zoo)
    if not args.list:
        zoo.ensure(names)
    rows, flat = [], {}
    for n in order(names, zoo.zoo):
        rec = {}
        if zoo.is_trained(n):
            rec = {**zoo.record(n), "train_seconds": round(logged_seconds(zoo.path(n)), 1)}
        rows.append(
            {
                "entry": n,
                "trained": zoo.is_trained(n),
                "minutes": rec.get("train_seconds", 0) / 60,
                "params": rec.get("params"),
                "path": zoo.path(n),
            }
        )
        if rec:
            flat[f"{n}.train_seconds"] = rec["train_seconds"]
            flat[f"{n}.params"] = rec["params"]
            flat[f"{n}.hash"] = rec["hash"]
    print_table(rows, ["entry", "trained", "minutes", "params", "path"])
    if not args.list and not args.quick:
        print("wrote", write_results("zoo", flat, meta(False, [])))


if __name__ == "__main__":
    main()
