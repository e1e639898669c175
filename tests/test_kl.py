"""The continuous KL tokenizer: shapes, deterministic encoding, exact normalisation inverse."""

import pytest
import torch

from vargen.tokenizers.kl import KLConfig, KLTokenizer


def _tok(**kw):
    torch.manual_seed(0)
    return KLTokenizer(KLConfig(channels=1, resolution=16, hidden=[8, 16], code_dim=4, **kw))


def test_tokens_shape_and_deterministic_eval():
    tok = _tok().eval()
    x = torch.rand(3, 1, 16, 16)
    t = tok.encode(x)
    assert t.shape == (3, 16, 4) and tok.tokens_spec["num_tokens"] == 16
    assert torch.equal(t, tok.encode(x))
    assert tok.decode(t).shape == x.shape


def test_normalisation_round_trip_and_stats_follow_data():
    tok = _tok(stats_momentum=0.5)
    x = torch.rand(8, 1, 16, 16)
    tok.train()
    for _ in range(30):
        tok.loss(x)
    mu = tok.posterior(x)[0]
    t = tok.normalize(mu)
    torch.testing.assert_close(tok.denormalize(t), mu, atol=1e-5, rtol=1e-5)
    # running stats converge to the batch stats, so the tokens are standardised per channel
    torch.testing.assert_close(t.mean((0, 1)), torch.zeros(4), atol=1e-3, rtol=0)
    torch.testing.assert_close(t.std((0, 1)), torch.ones(4), atol=1e-2, rtol=0)


def test_eval_loss_changes_nothing():
    tok = _tok().eval()
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    tok.loss(torch.rand(2, 1, 16, 16))
    assert all(torch.equal(before[k], v) for k, v in tok.state_dict().items())


def test_bad_config_names_field():
    with pytest.raises(ValueError, match="kl_weight"):
        _tok(kl_weight=-1.0)
