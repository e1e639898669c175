"""TarFlow's per-block plan by measured cost (vargen.sampling.decoders.tarflow_cost, issue 16)."""

from __future__ import annotations

import pytest
import torch

from tests.toys import ScriptedClock, tiny_tarflow
from vargen.registry import SAMPLERS
from vargen.sampling.base import SamplerContext
from vargen.sampling.decoders import tarflow as ts
from vargen.sampling.decoders import tarflow_cost as tc


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # conftest: tiny tensors, one intra-op thread
    yield


def test_cheapest_candidate_wins_and_sequential_where_jacobi_does_not_pay():
    m = tiny_tarflow(std=0.05, blocks=2)
    labels = torch.tensor([0, 1, 2, 0])
    # per block (sampling order) the candidates run as sequential, jacobi w2, jacobi w4
    script = [1.0, 0.5, 0.75] + [1.0, 1.25, 1.125]  # binary fractions: exact sums
    kw = dict(windows=(2, 4), tol=1e-8, reps=1)
    plans, cal = tc.calibrate_cost(
        m, labels, torch.Generator().manual_seed(0), clock=ScriptedClock(script), **kw
    )
    assert [(p.method, p.window) for p in plans] == [("jacobi", 2), ("sequential", 0)]
    assert cal["chosen"] == ["jacobi w2", "sequential"]
    assert cal["seconds"][0] == {"sequential": 1.0, "jacobi w2": 0.5, "jacobi w4": 0.75}
    # margin: Jacobi must beat the sequential loop by that factor
    plans, _ = tc.calibrate_cost(
        m, labels, torch.Generator().manual_seed(0), clock=ScriptedClock(script), margin=2.5, **kw
    )
    assert [p.method for p in plans] == ["sequential", "sequential"]
    # reps interleave and keep each candidate's best round
    two = [1.0, 0.875, 0.75, 1.0, 0.5, 0.875] + [1.0, 1.25, 1.125] * 2  # block 0 round 1, 2; block 1
    _, cal = tc.calibrate_cost(
        m, labels, torch.Generator().manual_seed(0), clock=ScriptedClock(two), **{**kw, "reps": 2}
    )
    assert cal["seconds"][0] == {"sequential": 1.0, "jacobi w2": 0.5, "jacobi w4": 0.75}


def test_measured_plans_sample_close_to_sequential_and_inputs_are_checked():
    m = tiny_tarflow(std=0.05, blocks=2, dtype=torch.float32)
    labels = torch.tensor([0, 1, 2, 0])
    plans, cal = tc.calibrate_cost(
        m, labels, torch.Generator().manual_seed(0), batch=2, method="gs_jacobi", segments=3, windows=(2, 8)
    )
    assert len(plans) == 2 and all(p.method in ("sequential", "gs_jacobi") for p in plans)
    assert all(set(s) == {"sequential", "gs_jacobi 3x w2", "gs_jacobi 3x w8"} for s in cal["seconds"])
    assert all(v > 0 for s in cal["seconds"] for v in s.values())
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    seq, _ = ts.sample_tarflow(m, labels, generator=g(), method="sequential", cfg_scale=1.5)
    out, st = ts.sample_tarflow(m, labels, generator=g(), policy=plans, cfg_scale=1.5, tol=1e-6)
    assert (out - seq).abs().max() < 1e-4 and st["plans"][0]["method"] == plans[0].method
    with pytest.raises(ValueError, match="jacobi or gs_jacobi"):
        tc.candidates("sequential", (2,))
    with pytest.raises(ValueError, match="windows"):
        tc.candidates("jacobi", ())


def test_auto_sampler_by_cost_records_its_measurements():
    m = tiny_tarflow(std=0.05, dtype=torch.float32)
    c = torch.tensor([0, 1, 2, 3])
    cfg = {
        **vars(ts.TarFlowSamplerConfig()),
        "method": "auto",
        "auto_by": "cost",
        "cost_windows": [2, 4],
        "calib": 4,
        "calib_batch": 2,
        "cfg_scale": 1.5,
    }
    run = SAMPLERS.build(cfg)
    run.setup(SamplerContext(m))
    out, stats = run(m, c, torch.Generator().manual_seed(0))
    assert len(stats["calibration_seconds"]) == 2 and "calibration_passes" not in stats
    assert [p["method"] for p in stats["plans"]] == [
        "sequential" if name == "sequential" else "jacobi" for name in run.calibration["chosen"]
    ]
    seq, _ = SAMPLERS.build({**cfg, "method": "sequential"})(m, c, torch.Generator().manual_seed(0))
    assert (seq - out).abs().max() < 1e-4
    with pytest.raises(ValueError, match="auto_by"):
        SAMPLERS.build({**cfg, "auto_by": "speed"})
