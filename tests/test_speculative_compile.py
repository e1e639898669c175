"""``compile=True`` of SJD / GSD on the CPU: the verification and Jacobi update of every
iteration run through ``torch.compile`` (:func:`~vargen.sampling.speculative.jacobi.compiled_jacobi_step`, one
graph: a graph break fails here), with the random numbers drawn outside, in the eager
order, from the caller's generator. So the compiled samplers draw the eager samplers' ids. The
float64 toy keeps the window forward eager (the module path), so only the step compiles: one
graph per case, ~10 s each on one CPU thread."""

import pytest
import torch
from torch._dynamo.utils import counters

from tests.toys import LLAMAGEN_CLASSES as CLASSES
from tests.toys import tiny_llamagen
from vargen.registry import SAMPLERS
from vargen.sampling.speculative import jacobi

CASES = {  # (sampler config, slots): token-level SJD with refills, GSD's group ratio, group-exact GSD
    "sjd_refill": ({"name": "sjd", "window": 4}, 2),
    "gsd": ({"name": "gsd", "window": 4, "group": 6, "delta": 0.3, "dist": 1.5}, 0),
    "gsd_exact": ({"name": "gsd", "window": 4, "group": 3, "exact_groups": True}, 0),
}


@pytest.fixture(scope="module")
def model():
    return tiny_llamagen(0)


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_step_draws_the_eager_ids(model, case, monkeypatch):
    cfg, slots = CASES[case]
    cfg = {**cfg, "cfg_scale": 2.0, "temperature": 0.7}
    calls = []
    real = jacobi.compiled_jacobi_step()

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(jacobi, "compiled_jacobi_step", lambda: counted)
    eager, compiled = (SAMPLERS.build({**cfg, "compile": c}) for c in (False, True))
    cond = torch.arange(5) % CLASSES
    breaks = sum(counters["graph_break"].values())
    accepted = rejected = 0
    for seed in range(3):
        ids_e, st_e = eager(model, cond, torch.Generator().manual_seed(seed), slots=slots)
        n_calls = len(calls)
        ids_c, st_c = compiled(model, cond, torch.Generator().manual_seed(seed), slots=slots)
        assert len(calls) - n_calls == st_c["target_forwards"]  # every iteration ran the compiled step
        assert torch.equal(ids_c, ids_e)
        assert (st_c["accepted"], st_c["target_forwards"]) == (st_e["accepted"], st_e["target_forwards"])
        accepted += st_c["accepted"]
        rejected += st_c["proposed"] - st_c["accepted"]
    assert sum(counters["graph_break"].values()) == breaks  # the step compiled whole
    assert accepted > 0 and rejected > 0  # both outcomes of the test were exercised
