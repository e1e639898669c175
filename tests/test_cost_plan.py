"""Speculate or not, and how wide, by measured cost (vargen.sampling.speculative.cost_plan,
issue 16): the fastest candidate wins and plain decoding where none pays by the margin; the
samplers then draw exactly what the chosen plan draws directly (plain decoding: the target's
own ids, so exact samplers stay exact), the plan is measured once per model and batch, and
bad options fail before any work."""

from __future__ import annotations

import pytest
import torch

from tests.toys import ScriptedClock, tiny_llamagen
from vargen.registry import SAMPLERS
from vargen.sampling.base import SamplerContext
from vargen.sampling.decoders.ar import sample_ar
from vargen.sampling.speculative import cost_plan
from vargen.sampling.speculative.draft import sample_speculative
from vargen.sampling.speculative.jacobi import sample_jacobi

WARP = {"cfg_scale": 1.5}
TORCH = {"backend": "torch"}  # the verification and window attention in torch (not the Triton interpreter)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # conftest: tiny tensors, one intra-op thread
    yield


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_fastest_width_wins_and_plain_where_none_pays():
    calls = []

    def run(w, cond, g, rows):
        calls.append((w, cond.tolist(), g.initial_seed(), rows))

    kw = dict(num_classes=3, rows=2, images=4, device="cpu")
    # candidates run as plain (0), 2, 4; seconds over 4 images
    width, info = cost_plan.choose_width(run, [2, 4], clock=ScriptedClock([4.0, 2.0, 3.0]), **kw)
    assert width == 2 and info["seconds"] == {0: 1.0, 2: 0.5, 4: 0.75}
    assert calls == [(w, [0, 1, 2, 0], 0, 2) for w in (0, 2, 4)]  # same labels, seed, rows
    # margin: a width must beat plain decoding by that factor
    width, _ = cost_plan.choose_width(run, [2, 4], clock=ScriptedClock([4.0, 2.0, 3.0]), margin=2.5, **kw)
    assert width == 0
    width, _ = cost_plan.choose_width(run, [2, 4], clock=ScriptedClock([4.0, 5.0, 4.5]), **kw)
    assert width == 0
    # reps interleave (plain, 2, 4, plain, 2, 4) and keep each candidate's best round
    two = [4.0, 3.5, 3.0, 4.0, 2.0, 3.5]
    _, info = cost_plan.choose_width(run, [2, 4, 2], clock=ScriptedClock(two), reps=2, **kw)
    assert info["seconds"] == {0: 1.0, 2: 0.5, 4: 0.75}
    with pytest.raises(ValueError, match="margin"):
        cost_plan.choose_width(run, [2], **{**kw, "rows": 0})


def scripted_plan(monkeypatch, durations):
    """The samplers' calibration timed by a scripted clock (plain first, then each width)."""
    real = cost_plan.choose_width
    monkeypatch.setattr(
        cost_plan, "choose_width", lambda *a, **kw: real(*a, clock=ScriptedClock(durations), **kw)
    )


@pytest.mark.parametrize("name", ["sjd", "gsd"])
@pytest.mark.parametrize("fast", [0, 3])  # 0: no window pays, plain decoding runs
def test_jacobi_samplers_draw_what_the_chosen_plan_draws(monkeypatch, name, fast):
    model = tiny_llamagen(0)
    windows = [2, 3]
    secs = {0: 1.0, 2: 1.5, 3: 0.5 if fast else 1.25}
    scripted_plan(monkeypatch, [secs[w] for w in (0, *windows)])
    extra = {"exact_groups": True, "group": 2} if name == "gsd" else {}
    cfg = {
        "name": name,
        "speculate_by": "cost",
        "cost_windows": windows,
        "cost_images": 3,
        **WARP,
        **TORCH,
        **extra,
    }
    sampler = SAMPLERS.build(cfg)
    labels = torch.tensor([2, 0, 1, 1, 0])
    g = seeded(7)
    ids, stats = sampler(model, labels, g, slots=2)
    want_g = seeded(7)
    if fast:
        direct = SAMPLERS.build({**cfg, "speculate_by": "fixed", "window": fast})
        want, _ = direct(model, labels, want_g, slots=2)
    else:  # plain decoding in chunks of the rows in flight
        want = torch.cat(
            [sample_ar(model, labels[i : i + 2], generator=want_g, **WARP)[0] for i in (0, 2, 4)]
        )
    assert torch.equal(ids, want)
    assert torch.equal(g.get_state(), want_g.get_state())  # the calibration drew from its own generator
    assert stats["plan_widths"] == [fast]
    assert stats["calibration"][0]["chosen"] == fast
    assert stats["target_calls_per_image"] > 0
    # measured once per model and batch: a new sampler with the same options reuses the plan
    again = SAMPLERS.build(cfg)(model, labels, seeded(7), slots=2)
    assert torch.equal(again[0], want) and "calibration" not in again[1]
    # another batch size is another plan (the script is spent: a real timing runs)
    other = SAMPLERS.build(cfg)
    monkeypatch.undo()
    _, st = other(model, labels, seeded(7), slots=5)
    assert st["plan_widths"][0] in (0, *windows) and "calibration" in st


def test_sd_draws_what_the_chosen_gamma_draws(monkeypatch):
    target, draft = tiny_llamagen(0), tiny_llamagen(1, dim=8, depth=1)
    scripted_plan(monkeypatch, [1.0, 0.5, 0.75])  # plain, gamma 1, gamma 2
    cfg = {
        "name": "speculative",
        "draft_ckpt": "draft",
        "speculate_by": "cost",
        "cost_gammas": [1, 2],
        **WARP,
        **TORCH,
    }
    sampler = SAMPLERS.build(cfg)
    sampler.setup(SamplerContext(target, loader=lambda ckpt, device: (draft, None)))
    labels = torch.tensor([1, 2, 0])
    ids, stats = sampler(target, labels, seeded(3), slots=2)
    want, _ = sample_speculative(
        target, draft, labels, generator=seeded(3), gamma=1, slots=2, **WARP, **TORCH
    )
    assert torch.equal(ids, want) and stats["plan_widths"] == [1]


def test_fixed_runs_the_configured_width_and_names_it():
    model = tiny_llamagen(0)
    labels = torch.tensor([0, 1])
    ids, stats = SAMPLERS.build({"name": "sjd", "window": 3, **WARP, **TORCH})(model, labels, seeded(1))
    want, _ = sample_jacobi(model, labels, generator=seeded(1), window=3, **WARP, **TORCH)
    assert torch.equal(ids, want) and stats["plan_widths"] == [3] and "calibration" not in stats


@pytest.mark.parametrize(
    "cfg, field",
    [
        ({"name": "sjd", "speculate_by": "fastest"}, "speculate_by"),
        ({"name": "sjd", "cost_windows": []}, "cost_windows"),
        ({"name": "gsd", "cost_windows": [1, 4]}, "cost_windows"),
        ({"name": "sjd", "cost_margin": 0.0}, "cost_margin"),
        ({"name": "speculative", "draft_ckpt": "d", "cost_gammas": [0]}, "cost_gammas"),
        ({"name": "speculative", "draft_ckpt": "d", "cost_images": 0}, "cost_images"),
    ],
)
def test_bad_plan_options_fail_when_built_naming_the_field(cfg, field):
    with pytest.raises(ValueError, match=field):
        SAMPLERS.build(cfg)


def test_the_plan_is_measured_at_the_rows_that_run(monkeypatch):
    """slots above the number of samples: the samplers keep every sample in flight, so the plan
    is timed (and kept) at that many rows, not at the unused slots."""
    rows, real = [], cost_plan.choose_width
    monkeypatch.setattr(cost_plan, "choose_width", lambda *a, **k: rows.append(k["rows"]) or real(*a, **k))
    cfg = {"name": "sjd", "speculate_by": "cost", "cost_windows": [2], "cost_images": 1, **WARP, **TORCH}
    model = tiny_llamagen(0)
    for labels, slots in (
        (torch.tensor([0, 1, 2]), 8),
        (torch.tensor([2, 1, 0, 1]), 3),
        (torch.tensor([1, 0]), 0),
    ):
        _, stats = SAMPLERS.build(cfg)(model, labels, seeded(0), slots=slots)
    assert rows == [3, 2]  # measured at 3 rows (not 8), reused by the 3-slot call, then 2 rows


@pytest.mark.parametrize("threads, counts_a_wait", [(1, False), (2, True)])
def test_the_cpu_clock_is_process_time_on_one_thread_and_wall_time_on_more(threads, counts_a_wait):
    """One thread: process CPU time, so time lost to a neighbour (here a sleep) does not count.
    More threads: wall time, since process time sums the threads and would charge a width that
    runs its products in parallel for every thread."""
    import time

    from vargen.sampling.timing import device_clock

    torch.set_num_threads(threads)  # the autouse fixture restores the thread count
    clock = device_clock("cpu")
    t0 = clock()
    time.sleep(0.2)
    assert (clock() - t0 > 0.15) is counts_a_wait
