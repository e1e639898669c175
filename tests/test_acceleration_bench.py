"""benchmarks/acceleration.py on random-weight models: every key is produced, draws are seeded."""

import pytest
import torch

from benchmarks.acceleration import (
    BASELINES,
    BATCHES,
    DEFAULTS,
    METHODS,
    Method,
    Workload,
    labels,
    merge_previous,
    options,
    parse_set,
    resolve,
    run,
)
from vargen.models.ar import ARConfig, ARTransformer
from vargen.models.tarflow import TarFlow, TarFlowConfig
from vargen.models.var import NextScaleTransformer, VARConfig
from vargen.models.xar import XAR, XARConfig
from vargen.tokenizers.vat import VATConfig, VATokenizer

V, CLASSES = 32, 3


@pytest.fixture(scope="module")
def workload():
    torch.manual_seed(0)  # weight init uses the global RNG (test models only)
    ar = ARTransformer(
        ARConfig(vocab_size=V, grid=[4, 4], num_classes=CLASSES, dim=16, depth=1, heads=2)
    ).eval()
    draft = ARTransformer(
        ARConfig(vocab_size=V, grid=[4, 4], num_classes=CLASSES, dim=8, depth=1, heads=2)
    ).eval()
    vat = VATokenizer(
        VATConfig(channels=1, resolution=16, hidden=[8, 8], code_dim=4, codebook_size=V, scales=[1, 2, 4])
    ).eval()
    var = NextScaleTransformer(
        VARConfig(vocab_size=V, scales=[1, 2, 4], code_dim=4, num_classes=CLASSES, dim=16, depth=1, heads=2)
    ).eval()
    var.attach_tokenizer(vat)

    def xar(dim):
        head = {"name": "mar_diffusion", "width": 16, "depth": 1, "num_sampling_steps": 4}
        cfg = XARConfig(
            grid=[2, 2],
            code_dim=2,
            num_classes=CLASSES,
            entity="token",
            denoiser="head",
            dim=dim,
            depth=1,
            heads=2,
            head=head,
        )
        return XAR(cfg).eval()

    tf = TarFlow(
        TarFlowConfig(
            channels=1, resolution=8, num_classes=CLASSES, dim=16, layers_per_block=1, num_blocks=2, heads=2
        )
    ).eval()
    tf.init_output_(0.05, torch.Generator().manual_seed(1))
    return Workload(
        ar=ar,
        draft=draft,
        vq=object(),
        var=var,
        vat=vat,
        xar=xar(16),
        xar_draft=xar(8),
        kl=object(),
        tarflow=tf,
        num_classes=CLASSES,
        params={"ar": 1},
    )


def test_every_method_and_batch_produces_every_key(workload):
    torch.set_num_threads(1)
    flat = run(
        workload,
        list(METHODS),
        BATCHES,
        reps=1,
        n_latency=2,
        n_throughput=16,
        fid_samples=0,
        log=lambda *a: None,
    )
    assert flat["workload.tokens"] == 16 and flat["workload.params.ar"] == 1
    for name in METHODS:
        for b in BATCHES:
            for key in (
                "nfe",
                "nfe_ratio",
                "token_rows",
                "baseline_token_rows",
                "wall_ratio",
                "cpu_ratio",
                "seconds",
                "baseline_seconds",
            ):
                v = flat[f"{name}.b{b}.{key}"]
                assert isinstance(v, float) and v >= 0, (name, b, key, v)
            assert flat[f"{name}.b{b}.nfe"] > 0 and flat[f"{name}.b{b}.wall_ratio"] > 0
    # NFE per image is a count: next-token decoding of 16 tokens costs 16 row-calls per image at any batch
    assert flat["sd.b1.baseline_nfe"] == flat["sd.b16.baseline_nfe"] == 16
    assert flat["var.b1.nfe"] == 3  # one forward per scale
    for name in ("sd", "sjd", "gsd", "cspd"):
        assert 0 <= flat[f"{name}.b1.acceptance"] <= 1


@pytest.mark.parametrize("name", ["ar", "sd", "sjd", "gsd", "var", "cspd", "tarflow_jacobi"])
def test_methods_draw_from_their_explicit_generator(workload, name):
    method = METHODS.get(name) or BASELINES[name]
    cond, opts = labels(4, CLASSES), {"cfg_scale": 1.5, "gamma": 2, "window": 4}

    def draw(seed):
        out, _ = method.draw(workload, cond, torch.Generator().manual_seed(seed), 2, opts)
        return torch.cat([o.flatten(1).float() for o in out], 1) if isinstance(out, list) else out

    torch.manual_seed(123)  # the global RNG must not matter
    a = draw(0)
    torch.manual_seed(456)
    assert torch.equal(a, draw(0))
    assert not torch.equal(a, draw(1))


def test_options_resolve_per_method_and_regime():
    opts = options({"sjd.window": {1: 6, 16: 3}, "sd.gamma": 2, "cfg_scale": 2.0})
    assert [resolve(opts, "sjd", b)["window"] for b in (1, 8, 15, 16, 100)] == [6, 6, 6, 3, 3]
    assert resolve(opts, "sd", 16) == {
        "cfg_scale": 2.0,
        "cuda_graph": False,
        "graph_noise": "eager",
        "gamma": 2,
        "speculate_by": "fixed",
    }
    # every method reads only its own family's keys: GSD keeps its default, SJD's does not leak
    assert resolve(opts, "gsd", 1)["window"] == DEFAULTS["gsd.window"][1]
    assert resolve(opts, "cspd_path", 16)["gamma"] == DEFAULTS["cspd.gamma"]
    untuned = options({"tarflow.tuned": False})
    assert resolve(untuned, "tarflow_gs_jacobi", 1)["window"] == DEFAULTS["tarflow.window"]
    # tuned TarFlow: what runs at each batch size, so that the results record it
    from vargen.sampling.decoders.tarflow import JACOBI_CPU

    for b in (1, 16, 100):
        tuned = JACOBI_CPU[1 if b == 1 else 16]
        assert resolve(opts, "tarflow_jacobi", b) == {
            "cfg_scale": 2.0,
            "cuda_graph": False,
            "graph_noise": "eager",
            **tuned,
        }
    # keys without a dot reach every method; window / gamma only their family's
    assert (
        resolve(opts, "var", 1)
        == resolve(opts, "ar", 16)
        == {"cfg_scale": 2.0, "cuda_graph": False, "graph_noise": "eager"}
    )
    assert resolve(options({"sjd.window": {4: 5, 16: 3}}), "sjd", 1)["window"] == 5  # below them all


def test_unknown_or_malformed_options_fail_clearly():
    with pytest.raises(ValueError, match="unknown acceleration option 'window'"):
        options({"window": 4})  # the pre-regime key: must not silently leave the defaults in force
    with pytest.raises(ValueError, match="unknown acceleration option 'sjd.windw'"):
        options(parse_set(["sjd.windw.b16=4"]))
    with pytest.raises(ValueError, match="per-batch keys"):
        options({"sjd.window": {"b1": 4}})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_set(["sjd.window"])


def test_set_flags_override_one_regime_or_all():
    over = parse_set(["sjd.window.b16=4", "sd.gamma=2", "cfg_scale=2.0"])
    assert over == {"sjd.window": {**DEFAULTS["sjd.window"], 16: 4}, "sd.gamma": 2, "cfg_scale": 2.0}
    assert resolve(options(over), "sjd", 1)["window"] == DEFAULTS["sjd.window"][1]
    assert parse_set(["cuda_graph=true", "graph_noise=chunk"]) == {"cuda_graph": True, "graph_noise": "chunk"}
    assert DEFAULTS["cuda_graph"] is False
    graph = options({"cuda_graph": True, "sjd.window": 8})  # the GPU's windows, unless given
    assert resolve(graph, "gsd", 1)["window"] == 24 and resolve(graph, "gsd_exact", 16)["window"] == 16
    assert (
        resolve(graph, "sjd", 1)["window"] == 8
        and resolve(graph, "sd", 1)["gamma"] == DEFAULTS["sd.gamma"][1]
    )


@pytest.mark.parametrize("name", ["ar", "sjd", "gsd_exact"])
def test_cuda_graph_option_reaches_the_samplers(workload, name):
    """``--set cuda_graph=true`` makes plain decoding and SJD / GSD capture their steps: off CUDA
    that is refused, which shows the option got through."""
    method = {**BASELINES, **METHODS}[name]
    o = resolve(options({"cuda_graph": True}), name, 1)
    with pytest.raises(ValueError, match="needs a model on CUDA"):
        method.draw(workload, labels(1, workload.num_classes), torch.Generator().manual_seed(0), 1, o)


def test_run_draws_each_regime_with_its_own_setting(workload, monkeypatch):
    seen = []

    def spy(w, cond, g, slots, o):
        seen.append((slots, o["window"]))
        return METHODS["sjd"].draw(w, cond, g, slots, o)

    monkeypatch.setitem(METHODS, "sjd_spy", Method("ar", "ar", spy, METHODS["sjd"].decode, ("vq",)))
    monkeypatch.setitem(DEFAULTS, "sjd_spy.window", {1: 2, 16: 5})
    flat = run(workload, ["sjd_spy"], (1, 16), reps=1, n_latency=2, n_throughput=16, log=lambda *a: None)
    assert sorted(set(seen)) == [(1, 2), (16, 5)]
    assert (flat["sjd_spy.b1.window"], flat["sjd_spy.b16.window"]) == (2, 5)
    assert (flat["options.sjd_spy.window.b1"], flat["options.sjd_spy.window.b16"]) == (2, 5)


def test_cli_rejects_an_unknown_option_before_any_work(capsys):
    from benchmarks.acceleration import main

    with pytest.raises(SystemExit):
        main(["--set", "window=3"])
    assert "unknown acceleration option 'window'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--methods", "sjd", "gdd"])  # a typo: refused before any model is loaded
    assert "invalid choice: 'gdd'" in capsys.readouterr().err


def test_spec_sweep_measures_every_cell_and_names_the_best(workload):
    from benchmarks.spec_sweep import sweep

    flat = sweep(workload, ["sjd", "sd"], (1, 16), (2, 4), (1, 2), 1, 2, 16, log=lambda *a: None)
    for key in ("sjd.w2", "sjd.w4", "sd.g1", "sd.g2"):
        for b in (1, 16):
            assert flat[f"{key}.b{b}.nfe_ratio"] > 0 and flat[f"{key}.b{b}.cpu_ratio"] > 0
    for m, tag, vals in (("sjd", "w", (2, 4)), ("sd", "g", (1, 2))):
        for b in (1, 16):
            ratios = {v: flat[f"{m}.{tag}{v}.b{b}.cpu_ratio"] for v in vals}
            assert flat[f"best.{m}.b{b}"] == max(ratios, key=ratios.get)
    # the swept value reaches the sampler: a window of W (gamma g) commits at most W (g + 1) tokens a call
    for b in (1, 16):
        assert (
            flat[f"sjd.w2.b{b}.mean_accepted_length"] <= 2 and flat[f"sd.g1.b{b}.mean_accepted_length"] <= 2
        )


def test_tarflow_tuned_options_follow_the_batch_size(workload):
    """``tarflow.tuned``: each batch size gets its JACOBI_CPU window/tol/batching (batch 1: continuous
    rows, calls per image from rows; batch 16: chunks, calls per image = passes), and the images stay
    within 1e-3 of the sequential baseline's from the same generator seed."""
    from vargen.sampling.decoders.tarflow import JACOBI_CPU

    cond = labels(4, CLASSES)
    for slots in (1, 16):
        o = resolve(options({"tarflow.window": 4}), "tarflow_jacobi", slots)
        g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        ref, _ = BASELINES["tarflow_seq"].draw(workload, cond, g(), slots, o)
        out, st = METHODS["tarflow_jacobi"].draw(workload, cond, g(), slots, o)
        assert (out - ref).abs().max() < 1e-3, slots
        assert ("row_target_forwards" in st) == JACOBI_CPU[slots]["continuous"]
        untuned = resolve(options({"tarflow.window": 4, "tarflow.tuned": False}), "tarflow_jacobi", slots)
        _, plain = METHODS["tarflow_jacobi"].draw(workload, cond, g(), slots, untuned)
        assert "row_target_forwards" in plain  # untuned: window 4, tol 1e-6, continuous
        assert plain["positions_computed"] != st["positions_computed"], slots


def test_merge_keeps_other_methods_and_credits_each_its_commit(tmp_path):
    import json

    path = tmp_path / "acceleration.json"
    old = {
        "sd.b1.wall_ratio": 0.5,
        "options.sd.gamma.b1": 4,
        "sjd.b1.wall_ratio": 0.9,
        "options.sjd.window.b1": 16,
        "options.cfg_scale": 1.0,
        "workload.tokens": 64,
        "meta": {"commit": "old"},
    }
    path.write_text(json.dumps(old))
    new = {
        "sjd.b1.wall_ratio": 1.4,
        "options.sjd.window.b1": 3,
        "options.cfg_scale": 1.5,
        "workload.tokens": 256,
    }
    run_meta = {"commit": "new", "methods": {"sjd": {"commit": "new", "reps": 3}}}
    flat, entry = merge_previous(new, run_meta, ["sjd"], str(path))
    assert flat["sd.b1.wall_ratio"] == 0.5 and flat["options.sd.gamma.b1"] == 4  # kept
    assert flat["sjd.b1.wall_ratio"] == 1.4 and flat["options.sjd.window.b1"] == 3  # replaced
    assert flat["options.cfg_scale"] == 1.5 and flat["workload.tokens"] == 256  # run-wide: this run's
    assert entry["methods"] == {"sd": {"commit": "old"}, "sjd": {"commit": "new", "reps": 3}}
    # a second merge keeps the per-method commits it found
    path.write_text(json.dumps({**flat, "meta": entry}))
    rerun = {"commit": "c3", "methods": {"sd": {"commit": "c3"}}}
    flat2, entry2 = merge_previous({"sd.b1.wall_ratio": 0.6}, rerun, ["sd"], str(path))
    assert entry2["methods"] == {"sd": {"commit": "c3"}, "sjd": {"commit": "new", "reps": 3}}
    assert flat2["sjd.b1.wall_ratio"] == 1.4
    # nothing to merge into: the run as it is
    assert merge_previous(new, {"methods": {}}, ["sjd"], str(tmp_path / "none.json"))[0] == new


def test_keep_going_records_a_failing_method_and_runs_the_rest(workload, monkeypatch):
    def broken(w, cond, g, slots, o):
        raise RuntimeError("boom")

    monkeypatch.setitem(METHODS, "broken", Method("ar", "ar", broken, METHODS["sjd"].decode, ("vq",)))
    kw = dict(reps=1, n_latency=1, n_throughput=1, fid_samples=0, log=lambda *a: None)
    saved = []  # what the CLI would write after each method
    flat = run(
        workload, ["broken", "var"], (1,), keep_going=True, on_method=lambda f, m: saved.append((m, f)), **kw
    )
    assert flat["broken.error"] == "RuntimeError: boom"
    assert flat["var.b1.nfe"] == 3  # the method after the failure still ran
    assert [m for m, _ in saved] == ["broken", "var"]
    assert "broken.error" in saved[0][1] and "var.b1.nfe" not in saved[0][1]  # saved as each ends
    with pytest.raises(RuntimeError, match="boom"):  # without the switch a failure stops the run
        run(workload, ["broken"], (1,), **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on a GPU machine)")
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_on_cuda_with_device_generators(workload, name):
    """``--device cuda``: the models, labels and generators on the GPU, timed after a warm-up."""
    import copy

    w = copy.copy(workload)
    w.device = torch.device("cuda")
    for f in ("ar", "draft", "var", "vat", "xar", "xar_draft", "tarflow"):
        setattr(w, f, copy.deepcopy(getattr(workload, f)).to(w.device))
    w.var.attach_tokenizer(w.vat)
    flat = run(w, [name], BATCHES, reps=1, n_latency=2, n_throughput=16, fid_samples=0, log=lambda *a: None)
    for b in BATCHES:
        assert flat[f"{name}.b{b}.nfe"] > 0 and flat[f"{name}.b{b}.wall_ratio"] > 0


def test_tarflow_cost_policy_is_measured_once_per_batch_size(workload, monkeypatch):
    """``policy: "cost"`` (JACOBI_CPU at batch 16): the per-block plans are timed on the first draw
    at a batch size and reused by the next draws, as the sampler's setup does."""
    import vargen.sampling.decoders.tarflow_cost as tc
    from benchmarks.acceleration import _tarflow

    calls, real = [], tc.calibrate_cost
    monkeypatch.setattr(tc, "calibrate_cost", lambda *a, **k: calls.append(k["batch"]) or real(*a, **k))
    o = resolve(options(), "tarflow_jacobi", 16)
    assert o["policy"] == "cost"
    draw, cond = _tarflow("jacobi"), labels(4, CLASSES)
    a, _ = draw(workload, cond, torch.Generator().manual_seed(0), 16, o)
    b, _ = draw(workload, cond, torch.Generator().manual_seed(0), 16, o)
    assert calls == [16] and torch.equal(a, b)


def test_speculate_by_cost_is_measured_before_the_clock_and_recorded(workload, monkeypatch):
    """``<family>.speculate_by=cost``: SD / SJD / GSD / CSpD time plain sampling and each width once
    per batch size (in the warm-up, not in the timed reps) and the cell names the width that ran."""
    from vargen.sampling.speculative import cost_plan

    calls, real = [], cost_plan.choose_width
    monkeypatch.setattr(cost_plan, "choose_width", lambda *a, **k: calls.append(k["rows"]) or real(*a, **k))
    methods = ["sd", "sjd", "gsd", "cspd"]
    sets = {f"{m}.speculate_by": "cost" for m in methods}
    flat = run(workload, methods, (1,), reps=2, n_latency=2, opts=sets, fid_samples=0, log=lambda *a: None)
    assert calls == [1, 1, 1, 1]  # one plan per method at batch 1, reused by both reps
    from vargen.sampling.speculative.cspd import CSpDConfig
    from vargen.sampling.speculative.draft import SpeculativeConfig
    from vargen.sampling.speculative.jacobi import COST_WINDOWS

    gammas = {"sd": SpeculativeConfig().cost_gammas, "cspd": CSpDConfig().cost_gammas}
    for m in methods:
        assert flat[f"{m}.b1.speculate_by"] == "cost"
        widths = gammas.get(m, COST_WINDOWS)
        assert flat[f"{m}.b1.plan_width"] in (0, *widths)


def test_cost_plan_benchmark_reports_every_width_and_the_choice(workload):
    from benchmarks.cost_plan import measure, table
    from vargen.sampling.speculative.jacobi import COST_WINDOWS

    torch.set_num_threads(1)
    flat = measure(workload, ["sjd", "sd", "cspd"], (1, 2), reps=1)
    for b in (1, 2):
        widths = [f"w{k}" for k in COST_WINDOWS]
        assert all(flat[f"sjd.b{b}.{k}_ms"] > 0 for k in ["plain", *widths])
        for m in ("sjd", "sd", "cspd"):
            key = f"{m}.b{b}."
            fastest = min(v for k, v in flat.items() if k.startswith(key + "w"))
            assert flat[key + "best_ratio"] == pytest.approx(flat[key + "plain_ms"] / fastest)
            # the choice follows the sampler's rule: a width only where it beats plain by the margin
            chosen = flat[key + "chosen"]
            assert chosen == 0 or flat[f"{key}w{chosen}_ms"] == fastest
            assert (chosen != 0) == (fastest * 1.05 < flat[key + "plain_ms"])
    assert len(table(flat, ["sjd", "sd", "cspd"], (1, 2))) == 6
