"""The KV-cached decode fast path (Block.forward_cached via ARTransformer.forward_step) against
the module path it replaces: the same math up to float rounding, bit-identical RoPE and RMSNorm."""

import pytest
import torch

from vargen.models.ar import ARConfig, ARTransformer
from vargen.nn import RMSNorm, apply_rope, rope_2d_table, rope_pair_tables, rotate_pairs
from vargen.sampling.decoders.ar import sample_ar


def model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=40, grid=[4, 4], num_classes=5, dim=64, depth=2, heads=4)
    cfg.update(kw)
    m = ARTransformer(ARConfig(**cfg)).eval()
    for p in m.parameters():  # not the init's near-identity scales: every weight matters
        p.data.normal_(0, 0.3)
    return m


def module_path_step(m, ids, cond, cache):
    """forward_step as it was: the nn.Module blocks (Block.forward) on the same cache."""
    start = cache.length
    return m._run(m.embed(ids, cond if start == 0 else None, start), start, cache)


def test_rotate_pairs_is_bit_identical_to_apply_rope():
    cos, sin = rope_2d_table(4, 4, 16)  # (17, 8)
    cos_T, sin_T, swap = rope_pair_tables(cos, sin)
    x = torch.randn(3, 2, 17, 16) * 5  # (B, H, T, d)
    torch.testing.assert_close(rotate_pairs(x, cos_T, sin_T, swap), apply_rope(x, cos, sin), atol=0, rtol=0)


def test_rms_norm_fp32_is_bit_identical_to_the_float_formula():
    n = RMSNorm(48)
    n.weight.data.normal_()
    x = torch.randn(5, 3, 48) * 4
    xf = x.clone()
    ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + n.eps)).type_as(x) * n.weight
    torch.testing.assert_close(n(x), ref, atol=0, rtol=0)


@pytest.mark.parametrize("batch", [1, 16])
def test_fast_step_equals_module_path(batch):
    m = model()
    ids = torch.randint(0, 40, (batch, 15))
    cond = torch.arange(batch) % 6  # includes the null class 5
    fast, ref = m.new_cache(batch), m.new_cache(batch)
    with torch.no_grad():
        out = [m.forward_step(ids[:, :3], cond, fast)]  # prefill (4 positions), then single steps
        want = [module_path_step(m, ids[:, :3], cond, ref)]
        for i in range(3, 15):
            out.append(m.forward_step(ids[:, i : i + 1], None, fast))
            want.append(module_path_step(m, ids[:, i : i + 1], None, ref))
    torch.testing.assert_close(torch.cat(out, 1), torch.cat(want, 1), atol=1e-5, rtol=1e-5)
    for layer in range(2):  # the caches hold the same keys and values
        torch.testing.assert_close(fast.k[layer], ref.k[layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.v[layer], ref.v[layer], atol=1e-5, rtol=1e-5)


def test_a_new_cache_sees_changed_weights():
    """Prepared decode weights live on the cache: a run after a weight update uses the update."""
    m = model()
    ids, cond = torch.randint(0, 40, (2, 15)), torch.tensor([0, 3])
    with torch.no_grad():
        before = m.forward_step(ids, cond, m.new_cache(2))
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
        after = m.forward_step(ids, cond, m.new_cache(2))
        want = m.logits(ids, cond)
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, want, atol=1e-5, rtol=1e-5)


def test_dropout_in_training_takes_the_module_path():
    m = model(dropout=0.5).train()
    ids, cond = torch.randint(0, 40, (2, 15)), torch.tensor([0, 3])
    torch.manual_seed(1)
    a = m.forward_step(ids, cond, m.new_cache(2))
    torch.manual_seed(1)
    b = m.logits(ids, cond)  # the same dropout draws in the same order
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fast_decode_draws_the_module_path_tokens(monkeypatch):
    m = model(seed=1)
    cond = torch.arange(16) % 5
    fast, _ = sample_ar(m, cond, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(ARTransformer, "forward_step", module_path_step)
    ref, _ = sample_ar(m, cond, generator=torch.Generator().manual_seed(3))
    assert torch.equal(fast, ref)


def test_decode_weights_are_kept_until_a_weight_changes():
    """prepared_decode_weights keeps one copy across runs and rebuilds it after an in-place
    update (version counter), a load_state_dict, or clear_decode_weights (after p.data edits)."""
    m = model()
    w = m.prepared_decode_weights()
    assert m.prepared_decode_weights() is w  # kept: no copy per run
    with torch.no_grad():
        m.blocks[0].mlp.w3.weight.add_(1.0)
    w2 = m.prepared_decode_weights()
    assert w2 is not w and torch.equal(w2[0][2], m.blocks[0].decode_weights()[2])
    m.load_state_dict(model(seed=5).state_dict())
    w3 = m.prepared_decode_weights()
    assert w3 is not w2 and torch.equal(w3[-1], m.head.weight.t())
    m.head.weight.data.mul_(2)  # bypasses the version counter: cleared by hand
    m.clear_decode_weights()
    assert torch.equal(m.prepared_decode_weights()[-1], m.head.weight.t())


@pytest.mark.parametrize(
    "kw", [dict(top_k=0), dict(temperature=0.7), dict(cfg_scale=2.0, top_k=7, top_p=0.8, temperature=1.3)]
)
def test_chunked_noise_draws_the_per_step_tokens(monkeypatch, kw):
    """sample_ar on the torch warper (noise drawn per chunk of steps and turned into Gumbel noise
    at once) against the per-step loop it replaces: rand (B, V) and warp_and_sample_reference
    each step. Same ids and the same generator state after, with chunks that do not divide N."""
    from vargen.sampling.decoders import ar as ar_decoder
    from vargen_kernels.logits_warper import warp_and_sample_reference

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    m, B = model(seed=2), 3
    V, N = m.vocab_size, m.num_tokens
    monkeypatch.setattr(ar_decoder._StepNoise, "CHUNK", 3 * B * V)  # 3 steps per draw, N = 16
    cond = torch.tensor([0, 4, 2])
    g = torch.Generator().manual_seed(9)
    got, _ = sample_ar(m, cond, generator=g, **kw)
    g_ref = torch.Generator().manual_seed(9)
    guided = kw.get("cfg_scale", 1.0) != 1.0
    want = torch.empty(B, N, dtype=torch.long)
    with torch.no_grad():
        cache = m.new_cache(2 * B if guided else B)
        labels = m.guidance_labels(cond, guided)
        for i in range(N):
            prev = None if i == 0 else want[:, i - 1 : i].repeat(2 if guided else 1, 1)
            logits = m.forward_step(prev, labels, cache)[:, -1]
            u = torch.rand(B, V, generator=g_ref)
            want[:, i] = warp_and_sample_reference(
                logits[:B], logits[B:] if guided else None, uniform_BV=u, **kw
            )
    assert torch.equal(got, want)
    assert torch.equal(g.get_state(), g_ref.get_state())
