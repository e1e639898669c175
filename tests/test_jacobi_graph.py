"""The static SJD / GSD iteration that ``cuda_graph=True`` captures, run eagerly on CPU: the ids,
the final generator state and every counter of ``sample_jacobi`` (SJD, GSD with its embedding
filter, GSD group-exact; CFG; ragged rows), also when one recorded iteration is replayed with a
CUDA graph's semantics (:class:`GraphEmulator`); no host reads inside an iteration (the meta
device); ``cuda_graph`` off CUDA is refused through the sampler configs. The real capture runs
in the CUDA-only test here and in ``benchmarks/gpu_check_graphs.py``."""

import pytest
import torch

from tests.graph_emulator import GraphEmulator
from vargen.models.ar import ARConfig, ARTransformer
from vargen.registry import SAMPLERS
from vargen.sampling.speculative.gsd import exact_group_fns, gsd_ratio, relative_embeddings
from vargen.sampling.speculative.jacobi import sample_jacobi
from vargen.sampling.speculative.jacobi_graph import _GRAPHS, StaticJacobi, sample_jacobi_static
from vargen.sampling.speculative.verify import token_ratio, token_residual

COUNTS = ("target_forwards", "positions_computed", "accepted", "proposed", "first_accepted", "first_proposed")


def model(seed=0, device="cpu"):
    torch.manual_seed(seed)  # weight init uses the global RNG (test data only)
    cfg = ARConfig(vocab_size=40, grid=[4, 4], num_classes=5, dim=32, depth=2, heads=4)
    m = ARTransformer(cfg).eval()
    for p in m.parameters():  # peaked, varied conditionals: drafts get accepted and rejected
        p.data.normal_(0, 0.3)
    return m.to(device)


def fns(kind, m):
    """(ratio_fn, residual_fn) of SJD, GSD (group 4, with the embedding filter) or GSD-exact."""
    if kind == "sjd":
        return token_ratio, token_residual
    if kind == "gsd_exact":
        return exact_group_fns(4)
    emb = relative_embeddings(m.token_embeddings())
    return (lambda p, q, x: gsd_ratio(p, q, x, 4, 0.15, 1.0, emb)), token_residual


@pytest.mark.parametrize(
    "kind,batch,window,warp",
    [
        ("sjd", 1, 4, dict()),
        ("sjd", 3, 16, dict(cfg_scale=2.0)),
        ("sjd", 2, 1, dict(cfg_scale=1.5, temperature=0.9, top_k=10, top_p=0.9)),
        ("gsd", 3, 4, dict(cfg_scale=2.0)),
        ("gsd_exact", 1, 16, dict()),
        ("gsd_exact", 3, 2, dict(cfg_scale=2.0)),
    ],
)
def test_static_iterations_draw_the_ids_of_sample_jacobi(kind, batch, window, warp):
    m = model(seed=1)
    cond_B = torch.arange(batch) % 5
    ratio_fn, residual_fn = fns(kind, m)
    kw = dict(window=window, ratio_fn=ratio_fn, residual_fn=residual_fn, **warp)
    g_eager, g_static = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    want, want_stats = sample_jacobi(m, cond_B, generator=g_eager, **kw)
    got, stats = sample_jacobi_static(m, cond_B, generator=g_static, capture=False, **kw)
    assert torch.equal(got, want)
    assert torch.equal(g_static.get_state(), g_eager.get_state())  # the same draws, in the same order
    for key in COUNTS:
        assert stats[key] == want_stats[key], key
    assert stats["syncs"] <= want_stats["syncs"]  # one read per chunk of certain iterations
    if window > 1:
        assert 0 < stats["accepted"] < stats["proposed"]  # drafts both accepted and rejected
    other, _ = sample_jacobi_static(
        m, cond_B, generator=torch.Generator().manual_seed(4), capture=False, **kw
    )
    assert not torch.equal(other, want)  # the ids follow the generator


def test_a_later_call_reuses_the_static_iteration_until_a_weight_changes():
    """The kept iteration (and on CUDA its graph) serves the next call of the same shapes from
    a clean state: other labels and seeds draw the eager ids; a weight edit builds a new one."""
    m = model(seed=4)
    ratio_fn, residual_fn = fns("gsd", m)
    kw = dict(window=4, ratio_fn=ratio_fn, residual_fn=residual_fn, cfg_scale=2.0)
    seen = []
    for labels, seed, edit in (([0, 1], 1, False), ([3, 2], 2, False), ([4, 4], 3, True)):
        if edit:
            with torch.no_grad():
                m.head.weight.mul_(1.5)  # a new version: new prepared weights
        cond_B = torch.tensor(labels)
        want, want_stats = sample_jacobi(m, cond_B, generator=torch.Generator().manual_seed(seed), **kw)
        got, stats = sample_jacobi_static(
            m, cond_B, generator=torch.Generator().manual_seed(seed), capture=False, **kw
        )
        assert torch.equal(got, want)
        assert [stats[k] for k in COUNTS] == [want_stats[k] for k in COUNTS]
        seen.append(next(reversed(_GRAPHS[m].values())))
    assert seen[0] is seen[1] and seen[2] is not seen[1] and len(_GRAPHS[m]) == 2


@pytest.mark.parametrize("kind,batch,warp", [("sjd", 1, dict()), ("gsd_exact", 3, dict(cfg_scale=2.0))])
def test_one_recorded_iteration_replayed_draws_the_ids_of_sample_jacobi(kind, batch, warp):
    """The host loop of :func:`jacobi_graph.run` with replays of one recorded iteration: state
    kept in Python, or a buffer replaced instead of written in place, would go stale here."""
    m = model(seed=2)
    cond_B = torch.arange(batch) % 5
    ratio_fn, residual_fn = fns(kind, m)
    want, want_stats = sample_jacobi(
        m,
        cond_B,
        generator=torch.Generator().manual_seed(5),
        window=4,
        ratio_fn=ratio_fn,
        residual_fn=residual_fn,
        **warp,
    )
    g = torch.Generator().manual_seed(5)
    warp = {"cfg_scale": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, **warp}
    cond_in = m.guidance_labels(cond_B, warp["cfg_scale"] != 1.0)
    fused = kind != "gsd"
    with torch.inference_mode():
        jac = StaticJacobi(m, cond_in, batch, 4, warp, ratio_fn, residual_fn, fused, "torch")
        graph, start, iterations = None, True, 0
        for _ in range(m.num_tokens):  # bounded: a stale length would loop forever
            if (left := m.num_tokens - int(jac.len_B.min())) <= 0:
                break
            k = -(-left // 4)
            jac.draw(g, k, start)
            start = False
            for _ in range(k):
                if graph is None:
                    graph = GraphEmulator()
                    with graph:
                        jac.step()  # recorded (and, unlike a CUDA capture, run)
                else:
                    graph.replay()
            iterations += k
    assert iterations == want_stats["target_forwards"]
    assert torch.equal(jac.ids_BX[:, : m.num_tokens], want)


def test_iteration_is_capturable():
    """On the meta device (no values: a host read or a value-dependent shape raises) an
    iteration runs; on CPU it keeps its buffers' addresses and no Python state between calls."""
    warp = dict(cfg_scale=2.0, temperature=1.0, top_k=5, top_p=0.9)
    for kind in ("sjd", "gsd", "gsd_exact"):
        meta = model().to("meta")
        ratio_fn, residual_fn = fns(kind, meta)
        cond = torch.tensor([1, 2, 5, 5], device="meta")
        with torch.inference_mode():
            jac = StaticJacobi(meta, cond, 2, 4, warp, ratio_fn, residual_fn, kind != "gsd", "torch")
            jac.step()
            assert jac.len_B.shape == (2,) and jac.q_BgV.shape == (2, 3, 40)
    m = model()
    ratio_fn, residual_fn = fns("gsd_exact", m)
    with torch.inference_mode():
        jac = StaticJacobi(m, torch.tensor([1, 2, 5, 5]), 2, 4, warp, ratio_fn, residual_fn, True, "torch")
        jac.draw(torch.Generator().manual_seed(0), 4, start=True)

        def buffers():
            names = (
                "ids_BX",
                "len_B",
                "draft_Bg",
                "q_BgV",
                "log_I3B",
                "done_1",
                "it_1",
                "u_KBWV",
                "fresh_KBg",
            )
            return [getattr(jac, n).data_ptr() for n in names] + [
                t.data_ptr() for t in jac.cache.k + jac.cache.v
            ]

        before = buffers(), {k: v for k, v in vars(jac).items() if not torch.is_tensor(v)}
        for _ in range(3):
            jac.step()
    assert buffers() == before[0]
    assert {k: v for k, v in vars(jac).items() if not torch.is_tensor(v)} == before[1]
    assert int(jac.it_1) == 3 and int(jac.len_B.min()) >= 3  # each iteration emits >= 1 token per row


@pytest.mark.parametrize(
    "name,extra", [("sjd", {}), ("gsd", {"group": 4}), ("gsd", {"group": 4, "exact_groups": True})]
)
def test_cuda_graph_needs_cuda(name, extra):
    m = model()
    sampler = SAMPLERS.build({"name": name, "cuda_graph": True, "window": 4, **extra})
    assert sampler.options()["cuda_graph"] is True
    with pytest.raises(ValueError, match="needs a model on CUDA"):
        sampler(m, torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="graph_noise must be 'eager' or 'chunk'"):
        SAMPLERS.build({"name": name, "cuda_graph": True, "graph_noise": "chnk", **extra})  # before any work
    with pytest.raises(ValueError, match="use_cache=True and compile=False"):
        sample_jacobi(m, torch.tensor([0]), generator=torch.Generator(), cuda_graph=True, compile=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind,batch,cfg_scale", [("sjd", 1, 1.0), ("gsd", 3, 2.0), ("gsd_exact", 3, 2.0)])
def test_cuda_graph_draws_the_ids_of_sample_jacobi_on_cuda(kind, batch, cfg_scale):
    m = model(seed=2, device="cuda")
    cond_B = torch.arange(batch, device="cuda") % 5
    ratio_fn, residual_fn = fns(kind, m)
    kw = dict(window=4, ratio_fn=ratio_fn, residual_fn=residual_fn, cfg_scale=cfg_scale)
    want, _ = sample_jacobi(m, cond_B, generator=torch.Generator("cuda").manual_seed(3), **kw)
    got, stats = sample_jacobi(
        m, cond_B, generator=torch.Generator("cuda").manual_seed(3), cuda_graph=True, slots=2, **kw
    )
    assert stats["graph_replays"] > 0
    g = torch.Generator("cuda").manual_seed(3)  # the static iterations run eagerly, chunk by chunk
    ref = torch.cat(
        [sample_jacobi_static(m, c, generator=g, capture=False, **kw)[0] for c in cond_B.split(2)]
    )
    assert torch.equal(got, ref)
    if batch <= 2:  # one chunk: the eager loop's draws exactly
        assert torch.equal(got, want)
    again, stats = sample_jacobi(
        m, cond_B, generator=torch.Generator("cuda").manual_seed(3), cuda_graph=True, slots=2, **kw
    )
    assert torch.equal(again, got)  # the kept graphs, replayed from a clean state
    assert stats["graph_replays"] == stats["target_forwards"]  # no warm-up, no capture: all replays


@pytest.mark.parametrize("window", [2, 4])
def test_chunk_noise_samples_the_target_exactly(window):
    """``noise="chunk"`` draws other numbers than ``sample_jacobi`` (one call per kind and chunk):
    the sampler stays exact, by a chi-square test of 20,000 sequences against the model's joint
    (V = 6, T = 3: every sequence enumerated), and the same seed gives the same ids."""
    from scipy.stats import chisquare

    torch.manual_seed(0)
    m = ARTransformer(ARConfig(vocab_size=6, grid=[1, 3], num_classes=2, dim=16, depth=2, heads=2)).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.5)
    seqs = torch.cartesian_prod(*[torch.arange(6)] * 3)  # (216, 3)
    with torch.no_grad():
        logp = torch.log_softmax(m.logits(seqs[:, :-1], torch.ones(216, dtype=torch.long)), -1)  # (216, 3, 6)
    joint = logp.gather(2, seqs[..., None])[..., 0].sum(1).exp()  # (216,)
    n = 20_000
    cond = torch.ones(n, dtype=torch.long)
    run = lambda seed: sample_jacobi_static(  # noqa: E731
        m, cond, generator=torch.Generator().manual_seed(seed), window=window, capture=False, noise="chunk"
    )
    ids, stats = run(window)
    assert stats["accepted"] > 0
    code = (ids[:, 0] * 6 + ids[:, 1]) * 6 + ids[:, 2]
    counts = torch.bincount(code, minlength=216).double()
    expected = joint.double() / joint.double().sum() * n
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3
    assert torch.equal(run(window)[0], ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_with_chunk_noise_draws_the_static_ids_on_cuda():
    m = model(seed=2, device="cuda")
    cond_B = torch.arange(3, device="cuda") % 5
    kw = dict(window=4, cfg_scale=2.0, noise="chunk")
    want, _ = sample_jacobi_static(
        m, cond_B, generator=torch.Generator("cuda").manual_seed(3), capture=False, **kw
    )
    for _ in range(2):  # captured, then the kept graph replayed
        got, stats = sample_jacobi_static(m, cond_B, generator=torch.Generator("cuda").manual_seed(3), **kw)
        assert stats["graph_replays"] > 0 and torch.equal(got, want)
