"""benchmarks/common.sweep with a fake generator and evaluator: draws interleave methods per seed,
FID mean/std are over seeds, nfe is forwards per batch at each method's batch size."""

import statistics

import pytest
import torch

from benchmarks.common import Method, flat_results, sweep


class FakeEvaluator:
    """FID = the mean pixel of the images: a sampler that paints ``level + seed offset`` has a
    known score per seed."""

    def score(self, images_NCHW):
        return float(images_NCHW.mean())


def painter(log, name, level, forwards):
    """A pixel sampler: images of ``level`` + a number drawn from the generator (so the seed moves
    the score), ``forwards`` target forwards per batch; every call is logged as (name, draw)."""

    def sample(model, labels_B, generator):
        draw = float(torch.rand((), generator=generator))
        log.append((name, draw))
        return torch.full((len(labels_B), 1, 2, 2), level + draw), {"target_forwards": forwards}

    return sample


def test_sweep_interleaves_methods_per_seed_and_reduces_over_seeds():
    log, seen = [], []
    methods = {
        "a": Method(None, None, painter(log, "a", 1.0, 3)),
        "b": Method(None, None, painter(log, "b", 5.0, 7), batch_size=2),
        "c": Method(None, None, painter(log, "c", 0.0, 1), score=False),
    }
    labels = torch.arange(5)
    seeds = [0, 1, 2]
    res = sweep(
        methods, labels, seeds, FakeEvaluator(), batch_size=4, on_draw=lambda n, s, *_: seen.append((n, s))
    )

    # seed-major: a, b, c with seed 0 (a: 2 batches of 4, b: 3 of 2, c: 2 of 4), then seed 1, ...
    names = [n for n, _ in log]
    assert names == ["a"] * 2 + ["b"] * 3 + ["c"] * 2 + (["a"] * 2 + ["b"] * 3 + ["c"] * 2) * 2
    assert seen == [(n, s) for s in seeds for n in "abc"]
    # each method's first batch of each seed starts from a fresh generator with that seed
    first = {s: float(torch.rand((), generator=torch.Generator().manual_seed(s))) for s in seeds}
    assert [d for n, d in log if n == "a"][::2] == [first[s] for s in seeds]

    # FID per seed = mean over that seed's images (a: batch of 4 with draw 1, batch of 1 with draw 2)
    for name, level, per_seed in (("a", 1.0, 2), ("b", 5.0, 3)):
        draws = [d for n, d in log if n == name]
        sizes = [4, 1] if name == "a" else [2, 2, 1]
        fids = [
            sum(k * (level + d) for k, d in zip(sizes, draws[i * per_seed : (i + 1) * per_seed])) / 5
            for i in range(len(seeds))
        ]
        assert res[name]["fids"] == pytest.approx(fids, rel=1e-5)
        assert res[name]["fid_mean"] == pytest.approx(statistics.mean(fids), rel=1e-5)
        assert res[name]["fid_std"] == pytest.approx(statistics.stdev(fids), rel=1e-4)
        assert res[name]["fid_std"] > 0
    assert "fid_mean" not in res["c"] and res["c"]["fids"] == []

    # nfe: forwards per batch (a: 2 x 3 per seed over 2 batches; b: 3 x 7 over 3)
    assert res["a"]["nfe"] == 3 and res["b"]["nfe"] == 7 and res["c"]["nfe"] == 1
    assert res["a"]["forwards"] == 3 * 2 * 3 and res["b"]["forwards"] == 3 * 3 * 7
    assert [st["target_forwards"] for st in res["b"]["seed_stats"]] == [21, 21, 21]
    assert all(r["seconds"] > 0 for r in res.values())

    flat = flat_results({k: res[k] for k in "ab"})
    assert flat["a.fid_mean"] == res["a"]["fid_mean"] and flat["b.nfe"] == 7
    assert set(flat) == {f"{m}.{k}" for m in "ab" for k in ("fid_mean", "fid_std", "nfe", "seconds")}


def test_commit_is_dirty_for_code_changes_not_for_results(tmp_path, monkeypatch):
    """A benchmark merging into its results file runs beside the previous run's uncommitted
    results: those must not mark the code dirty; an edited source file must."""
    import shutil
    import subprocess

    import benchmarks.common as common

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    monkeypatch.delenv("VARGEN_COMMIT", raising=False)
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "r.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(common, "ROOT", str(tmp_path))
    clean = common.commit()
    assert len(clean) == 40 and "+dirty" not in clean
    (tmp_path / "benchmarks" / "results" / "r.json").write_text('{"a": 1}\n')
    assert common.commit() == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert common.commit() == clean + "+dirty"
    monkeypatch.setenv("VARGEN_COMMIT", "abc123")  # a copied tree: the caller names the commit
    assert common.commit() == "abc123"
