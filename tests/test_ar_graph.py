"""The static decode step that ``sample_ar(..., cuda_graph=True)`` captures, run eagerly on CPU:
logits equal to ``forward_step``'s up to float rounding at every position, and the same ids and
generator state as ``sample_ar`` from the same generator, also when one recorded step is replayed
with a CUDA graph's semantics (:class:`GraphEmulator`); no host reads (the meta device); static
buffers; ``cuda_graph`` off CUDA is refused. The real capture runs in the CUDA-only test here and
in ``benchmarks/gpu_check_graphs.py``."""

import pytest
import torch

from tests.graph_emulator import GraphEmulator
from tests.toys import tiny_llamagen
from vargen.models.ar import ARConfig, ARTransformer
from vargen.registry import SAMPLERS
from vargen.sampling.decoders.ar import ARSamplerConfig, _StepNoise, sample_ar
from vargen.sampling.decoders.ar_graph import _DECODERS, StaticDecoder, decode, sample_ar_static


def model(seed=0):
    torch.manual_seed(seed)  # weight init uses the global RNG (test data only)
    cfg = ARConfig(vocab_size=40, grid=[4, 4], num_classes=5, dim=32, depth=2, heads=4)
    m = ARTransformer(cfg).eval()
    for p in m.parameters():  # peaked, varied conditionals (not the init's near-uniform ones)
        p.data.normal_(0, 0.3)
    return m


def static_run(m, cond_B, cfg_scale, seed):
    """The static decoder over a whole sequence: (ids (B, N), logits per step (N, rows, V))."""
    B, N, V = cond_B.shape[0], m.num_tokens, m.vocab_size
    cond_in = m.guidance_labels(cond_B, cfg_scale != 1.0)
    noise_NBV = torch.rand(N, B, V, generator=torch.Generator().manual_seed(seed))
    dec = StaticDecoder(m, cond_in, B, noise_NBV, dict(cfg_scale=cfg_scale))
    with torch.inference_mode():
        logits = [dec.step(first=True).clone()] + [dec.step().clone() for _ in range(N - 1)]
    return dec.ids_BN.clone(), torch.stack(logits), cond_in


@pytest.mark.parametrize("batch,cfg_scale", [(1, 1.0), (3, 2.0)])
def test_static_step_logits_equal_forward_step(batch, cfg_scale):
    m = model()
    cond_B = torch.arange(batch) % 5
    ids_BN, logits_NRV, cond_in = static_run(m, cond_B, cfg_scale, seed=1)
    reps = cond_in.shape[0] // batch
    cache = m.new_cache(cond_in.shape[0])
    want = []
    with torch.inference_mode():  # the eager step fed the ids the static decoder drew
        for i in range(m.num_tokens):
            prev = None if i == 0 else ids_BN[:, i - 1 : i].repeat(reps, 1)
            want.append(m.forward_step(prev, cond_in, cache)[:, -1])
    torch.testing.assert_close(logits_NRV, torch.stack(want), atol=1e-5, rtol=1e-5)
    assert len(set(ids_BN.flatten().tolist())) > 3  # a varied sequence: every position was used


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(
    "warp",
    [dict(), dict(cfg_scale=2.0), dict(cfg_scale=1.5, temperature=0.9, top_k=10, top_p=0.9)],
)
def test_static_decode_draws_the_ids_of_sample_ar(batch, warp):
    m = model(seed=2)
    cond_B = torch.arange(batch) % 5
    g_eager, g_static = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    want, want_stats = sample_ar(m, cond_B, generator=g_eager, **warp)
    got, stats = sample_ar_static(m, cond_B, generator=g_static, capture=False, **warp)
    assert torch.equal(got, want)
    assert torch.equal(g_static.get_state(), g_eager.get_state())  # the same draws, in the same order
    for key in ("target_forwards", "positions_computed", "tokens", "accepted", "proposed"):
        assert stats[key] == want_stats[key], key
    other, _ = sample_ar_static(m, cond_B, generator=torch.Generator().manual_seed(4), capture=False, **warp)
    assert not torch.equal(other, want)  # the ids follow the generator


def test_a_later_call_reuses_the_static_decoder_until_a_weight_changes():
    """The kept decoder (and on CUDA its graph) serves the next call of the same shapes from a
    clean state: other labels and seeds draw the eager ids; a weight edit builds a new one."""
    m = model(seed=5)
    seen = []
    for labels, seed, edit in (([0, 1], 1, False), ([3, 2], 2, False), ([4, 4], 3, True)):
        if edit:
            with torch.no_grad():
                m.head.weight.mul_(1.5)  # a new version: new prepared weights
        cond_B = torch.tensor(labels)
        want, _ = sample_ar(m, cond_B, generator=torch.Generator().manual_seed(seed), cfg_scale=2.0)
        got, _ = sample_ar_static(
            m, cond_B, generator=torch.Generator().manual_seed(seed), cfg_scale=2.0, capture=False
        )
        assert torch.equal(got, want)
        seen.append(next(reversed(_DECODERS[m].values())))
    assert seen[0] is seen[1] and seen[2] is not seen[1] and len(_DECODERS[m]) == 2


def test_decode_without_capture_counts_no_replays():
    m = model()
    cond_in = torch.tensor([1])
    dec = StaticDecoder(m, cond_in, 1, torch.rand(16, 1, 40, generator=torch.Generator().manual_seed(0)), {})
    with torch.inference_mode():
        assert decode(dec, capture=False) == 0
    assert int(dec.pos_1) == m.num_tokens


def test_step_is_capturable():
    """What a CUDA graph needs of the step, checked on CPU: on the meta device (no values: a host
    read such as ``.item()`` or a value-dependent shape raises) it runs, and on CPU it updates its
    buffers in place (a graph replays fixed addresses) and keeps no Python state between steps."""
    m = model().to("meta")
    dec = StaticDecoder(
        m,
        torch.tensor([1, 2, 5, 5], device="meta"),
        2,
        torch.empty(16, 2, 40, device="meta"),
        dict(cfg_scale=2.0, top_k=5, top_p=0.9),
    )
    with torch.inference_mode():
        assert dec.step(first=True).shape == dec.step().shape == (4, 40)
    dec = StaticDecoder(model(), torch.tensor([1, 2, 5, 5]), 2, torch.rand(16, 2, 40), dict(cfg_scale=2.0))

    def buffers():
        return [dec.pos_1, dec.tok_in, dec.ids_BN, dec.noise_NBV, dec.cond_in, *dec.cache.k, *dec.cache.v]

    with torch.inference_mode():
        dec.step(first=True)
        before = (
            [t.data_ptr() for t in buffers()],
            {k: v for k, v in vars(dec).items() if not torch.is_tensor(v)},
        )
        for _ in range(3):
            dec.step()
    assert [t.data_ptr() for t in buffers()] == before[0]
    assert {k: v for k, v in vars(dec).items() if not torch.is_tensor(v)} == before[1]
    assert int(dec.pos_1) == 4 and torch.equal(dec.tok_in[:2, 0], dec.ids_BN[:, 3])
    assert torch.equal(dec.tok_in[2:], dec.tok_in[:2])  # the null-class rows get the same ids


@pytest.mark.parametrize(
    "batch,warp", [(1, dict()), (3, dict(cfg_scale=1.5, temperature=0.9, top_k=10, top_p=0.9))]
)
def test_one_recorded_step_replayed_draws_the_ids_of_sample_ar(batch, warp):
    m = model(seed=2)
    cond_B = torch.arange(batch) % 5
    want, _ = sample_ar(m, cond_B, generator=torch.Generator().manual_seed(3), **warp)
    N, V = m.num_tokens, m.vocab_size
    with torch.inference_mode():
        noise = _StepNoise(torch.Generator().manual_seed(3), N, batch, V, "cpu", torch_warper=False)
        dec = StaticDecoder(
            m,
            m.guidance_labels(cond_B, "cfg_scale" in warp),
            batch,
            torch.stack([noise(i) for i in range(N)]),
            warp,
        )
        dec.step(first=True)
        graph = GraphEmulator()
        with graph:
            dec.step()  # recorded (and, unlike a CUDA capture, run: step 1)
        for _ in range(N - 2):
            graph.replay()
    assert int(dec.pos_1) == N
    assert torch.equal(dec.ids_BN, want)


def test_cuda_graph_needs_cuda():
    m = model()
    cond_B = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="needs a model on CUDA"):
        sample_ar(m, cond_B, generator=torch.Generator().manual_seed(0), cuda_graph=True)
    with pytest.raises(ValueError, match="needs a model on CUDA"):
        sample_ar_static(m, cond_B, generator=torch.Generator().manual_seed(0), capture=True)
    sampler = SAMPLERS.build({"name": "ar", "cuda_graph": True})  # the config key reaches sample_ar
    assert sampler.options()["cuda_graph"] is True and ARSamplerConfig().cuda_graph is False
    with pytest.raises(ValueError, match="needs a model on CUDA"):
        sampler(m, cond_B, torch.Generator().manual_seed(0))


def test_static_decoder_refuses_the_module_path():
    m = tiny_llamagen(0)  # float64: forward_step runs the modules, not the prepared weights
    with pytest.raises(ValueError, match="fp32"):
        StaticDecoder(m, torch.tensor([0]), 1, torch.rand(12, 1, 24, dtype=torch.float64), {})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch,cfg_scale", [(1, 1.0), (3, 2.0)])
def test_cuda_graph_draws_the_ids_of_sample_ar_on_cuda(batch, cfg_scale):
    m = model(seed=2).cuda()
    cond_B = torch.arange(batch, device="cuda") % 5
    want, _ = sample_ar(m, cond_B, generator=torch.Generator("cuda").manual_seed(3), cfg_scale=cfg_scale)
    got, stats = sample_ar(
        m, cond_B, generator=torch.Generator("cuda").manual_seed(3), cfg_scale=cfg_scale, cuda_graph=True
    )
    assert stats["graph_replays"] > 0
    assert (got != want).float().mean() < 0.05  # float rounding may flip a rare token
    again, stats = sample_ar(
        m, cond_B, generator=torch.Generator("cuda").manual_seed(3), cfg_scale=cfg_scale, cuda_graph=True
    )
    assert torch.equal(again, got)  # the kept graph, replayed from a clean state
    assert stats["graph_replays"] == m.num_tokens - 1  # no warm-up, no capture: every step after the first
