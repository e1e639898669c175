"""benchmarks/acceleration.py on random-weight models: every key is produced, draws are seeded."""

import pytest
import torch

from benchmarks.acceleration import BASELINES, BATCHES, METHODS, Workload, labels, run
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


def test_tarflow_tuned_options_follow_the_batch_size(workload):
    """``tarflow_tuned``: each batch size gets its JACOBI_CPU window/tol/batching (batch 1: continuous
    rows, calls per image from rows; batch 16: chunks, calls per image = passes), and the images stay
    within 1e-3 of the sequential baseline's from the same generator seed."""
    from vargen.sampling.decoders.tarflow import JACOBI_CPU

    cond, o = labels(4, CLASSES), {"cfg_scale": 1.5, "window": 4, "tarflow_tuned": True}
    for slots in (1, 16):
        g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        ref, _ = BASELINES["tarflow_seq"].draw(workload, cond, g(), slots, o)
        out, st = METHODS["tarflow_jacobi"].draw(workload, cond, g(), slots, o)
        assert (out - ref).abs().max() < 1e-3, slots
        assert ("row_target_forwards" in st) == JACOBI_CPU[slots]["continuous"]
        _, plain = METHODS["tarflow_jacobi"].draw(workload, cond, g(), slots, {**o, "tarflow_tuned": False})
        assert "row_target_forwards" in plain  # untuned: window 4, tol 1e-6, continuous
        assert plain["positions_computed"] != st["positions_computed"], slots
