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
