import pytest
import torch
from torch import nn

from vargen.models.token_shuffle_ops import TokenShuffle, shuffle_windows, unshuffle_windows, window_order


@pytest.mark.parametrize("s,h,w", [(1, 4, 4), (2, 4, 4), (2, 8, 4), (4, 8, 8)])
def test_unshuffle_inverts_shuffle(s, h, w):
    x = torch.randn(3, h * w, 5, generator=torch.Generator().manual_seed(0))
    y = shuffle_windows(x, h, w, s)
    assert y.shape == (3, (h // s) * (w // s), s * s * 5)
    assert torch.equal(unshuffle_windows(y, h, w, s), x)


def test_window_must_divide_grid():
    with pytest.raises(ValueError, match="window"):
        shuffle_windows(torch.zeros(1, 12, 4), 3, 4, 2)
    with pytest.raises(ValueError, match="window"):
        TokenShuffle(dim=16, grid=(4, 6), s=4)


@pytest.mark.parametrize("order", ["compress_first", "concat_first"])
def test_one_token_changes_only_its_window(order):
    torch.manual_seed(0)
    h = w = 4
    op = TokenShuffle(dim=8, grid=(h, w), s=2, order=order)
    x = torch.randn(1, h * w, 8)
    base = op(x)
    for t in range(h * w):
        x2 = x.clone()
        x2[0, t] += 1.0
        changed = (op(x2) - base).abs().amax(-1)[0] > 0  # (M,)
        r, c = divmod(t, w)
        expect = torch.zeros(4, dtype=torch.bool)
        expect[(r // 2) * 2 + c // 2] = True
        assert torch.equal(changed, expect)


def test_window_order_groups_each_window():
    order = window_order(4, 4, 2).reshape(4, 4)
    assert order[0].tolist() == [0, 1, 4, 5] and order[3].tolist() == [10, 11, 14, 15]


def test_s1_with_identity_mlp_is_the_identity():
    op = TokenShuffle(dim=8, grid=(4, 4), s=1)
    op.mlp = nn.Identity()
    x = torch.randn(2, 16, 8)
    assert torch.equal(op(x), x)


def _ts_model(s=2, **kw):
    from vargen.models.token_shuffle import TokenShuffleAR, TokenShuffleConfig

    torch.manual_seed(0)
    cfg = TokenShuffleConfig(
        vocab_size=12, grid=[4, 4], num_classes=3, dim=32, depth=2, heads=2, window=s, **kw
    )
    return TokenShuffleAR(cfg).eval()


def test_model_window_must_divide_grid():
    with pytest.raises(ValueError, match="window"):
        _ts_model(s=3)


@pytest.mark.parametrize("order", ["compress_first", "concat_first"])
def test_window_causality(order):
    model = _ts_model(shuffle_order=order)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(12, (2, 16), generator=g)
    cond = torch.tensor([0, 2])
    base = model.group(ids)  # (B, M, 4)
    ref = model.logits(base[:, :-1], cond)  # (B, M, 4, V): window t predicted from windows < t
    for m in range(4):
        pert = base.clone()
        pert[:, m] = (pert[:, m] + 5) % 12
        diff = (model.logits(pert[:, :-1], cond) - ref).abs().amax((0, 2, 3))  # (M,)
        assert torch.all(diff[: m + 1] == 0)
        assert torch.all(diff[m + 1 :] > 0)


def test_s1_with_identity_mlps_equals_plain_model():
    from vargen.models.ar import ARConfig, ARTransformer

    model = _ts_model(s=1)
    model.shuffle.mlp = nn.Identity()
    model.unshuffle.split, model.unshuffle.mlp = nn.Identity(), nn.Identity()
    torch.manual_seed(1)
    plain = ARTransformer(
        ARConfig(vocab_size=12, grid=[4, 4], num_classes=3, dim=32, depth=2, heads=2)
    ).eval()
    missing = model.load_state_dict(plain.state_dict(), strict=False)
    assert not missing.unexpected_keys
    ids = torch.randint(12, (3, 16), generator=torch.Generator().manual_seed(2))
    cond = torch.tensor([0, 1, 2])
    assert torch.allclose(model(ids, cond), plain(ids, cond), atol=1e-6)
    model.train()
    plain.train()
    model.cfg.class_dropout = plain.cfg.class_dropout = 0.0
    assert torch.allclose(model.loss(ids, cond)["loss"], plain.loss(ids, cond)["loss"], atol=1e-6)


def test_sampler_emits_a_window_per_forward_and_matches_the_model():
    from vargen.sampling.decoders.token_shuffle import half_linear_cfg, sample_token_shuffle

    model = _ts_model()
    cond = torch.tensor([0, 1, 2])
    ids, stats = sample_token_shuffle(model, cond, generator=torch.Generator().manual_seed(0), top_k=1)
    assert ids.shape == (3, 16) and stats["target_forwards"] == 4 and stats["tokens"] == 48
    assert torch.equal(model(ids, cond).argmax(-1), ids)  # greedy: cached decoding == full forward
    again, _ = sample_token_shuffle(model, cond, generator=torch.Generator().manual_seed(0), cfg_scale=2.0)
    same, _ = sample_token_shuffle(model, cond, generator=torch.Generator().manual_seed(0), cfg_scale=2.0)
    assert torch.equal(again, same)
    scales = [half_linear_cfg(i, 16, 3.0) for i in range(16)]
    assert scales[0] == 1.0 and all(b >= a for a, b in zip(scales, scales[1:])) and scales[8:] == [3.0] * 8
