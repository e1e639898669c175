"""Next-scale (VAR) transformer and its per-scale KV-cached sampler.

Invariant tests run on a tiny random model whose AdaLN weights are drawn away from their
zero initialisation (at init every block is the identity and nothing would mix); the
trained tests share one VAT + VAR pair trained on digits through the real tasks.
"""

import json

import pytest
import torch

from vargen.checkpoint import load_component, load_tokenizer_for
from vargen.eval import FIDEvaluator
from vargen.models.var import NextScaleTransformer, VARConfig
from vargen.sampling.decoders.var import decode_scale, guidance_at, sample_var, start_state
from vargen.sampling.generate import class_labels, generate
from vargen.tokenizers.vat import VATConfig, VATokenizer
from vargen.train.tasks import run

from .conftest import DIGITS, task_config

SCALES = [1, 2, 3, 4]


def tiny_pair(seed: int = 0, scales=SCALES, vocab: int = 24, code_dim: int = 4, attn_l2_norm: bool = False):
    """A random VAT tokenizer and a VAR model with every weight non-zero, attached."""
    torch.manual_seed(seed)
    tok = VATokenizer(
        VATConfig(
            channels=1, resolution=16, hidden=[8, 16], code_dim=code_dim, codebook_size=vocab, scales=scales
        )
    ).eval()
    cfg = VARConfig(
        vocab_size=vocab,
        scales=scales,
        code_dim=code_dim,
        num_classes=3,
        dim=32,
        depth=2,
        heads=2,
        attn_l2_norm=attn_l2_norm,
    )
    model = NextScaleTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.attach_tokenizer(tok)
    return tok, model


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("scales", [[1, 2, 3, 4], [2, 4], [4]])
def test_token_count_is_sum_of_squared_scales(scales):
    _, model = tiny_pair(scales=scales)
    ids, stats = sample_var(model, torch.tensor([0, 1, 2]), generator=gen(0))
    assert [t.shape for t in ids] == [(3, s * s) for s in scales]
    assert model.num_tokens == sum(s * s for s in scales) == sum(t.shape[1] for t in ids)
    assert stats["target_forwards"] == len(scales)  # one forward per scale


@pytest.mark.parametrize("attn_l2_norm", [False, True])
def test_teacher_forced_inputs_and_logits_equal_step_by_step_sampling(attn_l2_norm):
    tok, model = tiny_pair(attn_l2_norm=attn_l2_norm)
    seen = []  # (tokens fed to scale k, logits of scale k) while sampling
    forward_scale = model.forward_scale

    def recording(k, tokens, cond, cache):
        logits = forward_scale(k, tokens, cond, cache)
        seen.append((tokens, logits))
        return logits

    model.forward_scale = recording
    cond = torch.tensor([0, 2, 1])
    ids, _ = sample_var(model, cond, generator=gen(1), temperature=1.5)
    assert seen[0][0] is None  # scale 1 is fed the class start token
    fed = torch.cat([t for t, _ in seen[1:]], dim=1)  # (B, L - 1, D)
    assert torch.equal(fed, tok.quantizer.next_scale_inputs(ids))
    cached = torch.cat([logits for _, logits in seen], dim=1)  # (B, L, V)
    teacher = model(torch.cat(ids, dim=1), cond)
    torch.testing.assert_close(cached, teacher, atol=1e-5, rtol=1e-5)


def test_attn_l2_norm_is_vars_cosine_attention():
    """attn_l2_norm (VAR): logits = exp(min(s_h, log 100)) * cos(q, k) with softmax scale 1, so the
    block is unchanged when q's and k's projections are rescaled (not so without it)."""
    from vargen.nn import AdaLNBlock

    torch.manual_seed(0)
    x, c = torch.randn(2, 5, 16), torch.randn(2, 16)
    for l2 in (True, False):
        blk = AdaLNBlock(16, 2, 2.0, 0.0, attn_l2_norm=l2).eval()
        with torch.no_grad():
            for p in blk.parameters():
                p.add_(0.3 * torch.randn_like(p))
        mask = torch.ones(5, 5, dtype=torch.bool).tril()
        out = blk(x, c, None, 0, mask)
        if l2:  # the reference formula, written out
            sh1, sc1, g1, sh2, sc2, g2 = blk.ada(c).chunk(6, dim=-1)
            h = blk.norm1(x) * (1 + sc1[:, None]) + sh1[:, None]
            q, k, v = blk.qkv(h).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)  # 3x (B, H, T, d)
            s = blk.scale_mul_1H11.clamp_max(torch.log(torch.tensor(100.0))).exp()  # (1, H, 1, 1)
            logits = (
                s * torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).mT
            )
            a = logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v  # (B, H, T, d)
            y = x + g1[:, None] * blk.proj(a.transpose(1, 2).reshape(2, 5, 16))
            ref = y + g2[:, None] * blk.mlp(blk.norm2(y) * (1 + sc2[:, None]) + sh2[:, None])
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            blk.qkv.weight[:32] *= 3.0  # q and k projections (and biases) times 3
            blk.qkv.bias[:32] *= 3.0
        same = torch.allclose(blk(x, c, None, 0, mask), out, atol=1e-5, rtol=1e-5)
        assert same == l2


def test_ids_decode_to_the_quantized_latent():
    tok, model = tiny_pair()
    ids, _ = sample_var(model, torch.tensor([0, 1]), generator=gen(2))
    state, g = start_state(model, torch.tensor([0, 1])), gen(2)
    for _ in SCALES:
        decode_scale(model, state, g)
    assert all(torch.equal(a, b) for a, b in zip(state.ids, ids))  # same seed, same ids
    with torch.no_grad():
        assert torch.equal(state.f_hat, tok.quantizer.ids_to_fhat(ids))  # the running sum is exact


def test_block_causal_mask_later_scales_never_change_earlier_logits():
    _, model = tiny_pair()
    cond = torch.tensor([0, 1])
    ids = torch.randint(0, model.vocab_size, (2, model.num_tokens), generator=gen(3))
    base = model(ids, cond)  # (B, L, V)
    starts = model.scale_starts
    for j in range(1, len(SCALES)):  # perturb the inputs of scale j (ids of scale j - 1 feed them)
        other = ids.clone()
        other[:, starts[j - 1] : starts[j]] = (other[:, starts[j - 1] : starts[j]] + 1) % model.vocab_size
        out = model(other, cond)
        assert torch.equal(out[:, : starts[j]], base[:, : starts[j]]), j  # earlier scales untouched
        assert not torch.allclose(out[:, starts[j] :], base[:, starts[j] :]), j
    # bidirectional inside a scale: the first position of the last scale sees its last position
    x = model.teacher_forced_inputs(model.split_scales(ids), model.class_condition(cond))
    y = x.clone()
    y[:, -1] += torch.randn(y.shape[-1], generator=gen(9))  # not a constant: LayerNorm removes those
    cc = model.class_condition(cond)
    a, b = model._run(x, cc, None, model.mask_LL), model._run(y, cc, None, model.mask_LL)
    assert torch.equal(a[:, : starts[-2]], b[:, : starts[-2]])
    assert not torch.allclose(a[:, starts[-2]], b[:, starts[-2]])


def test_guidance_grows_from_one_to_cfg_scale():
    assert guidance_at(0, 4, 3.0) == 1.0 and guidance_at(3, 4, 3.0) == 3.0
    assert guidance_at(1, 4, 3.0) == pytest.approx(1 + 2.0 / 3)
    _, model = tiny_pair()
    cond = torch.tensor([0, 1, 2, 0])
    plain, s1 = sample_var(model, cond, generator=gen(4))
    guided, s3 = sample_var(model, cond, generator=gen(4), cfg_scale=3.0)
    assert torch.equal(plain[0], guided[0])  # guidance 1 at the first scale: same draw
    assert not all(torch.equal(a, b) for a, b in zip(plain[1:], guided[1:]))
    assert s3["positions_computed"] == 2 * s1["positions_computed"]  # cond + null rows


def test_same_seed_same_ids_and_per_row_generators_match_rows_alone():
    _, model = tiny_pair()
    cond = torch.tensor([0, 1, 2])
    a, _ = sample_var(model, cond, generator=gen(5), top_k=5, top_p=0.9)
    b, _ = sample_var(model, cond, generator=gen(5), top_k=5, top_p=0.9)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    batch, _ = sample_var(model, cond, generator=[gen(10 + j) for j in range(3)], cfg_scale=2.0)
    for j in range(3):
        alone, _ = sample_var(model, cond[j : j + 1], generator=[gen(10 + j)], cfg_scale=2.0)
        assert all(torch.equal(x[j : j + 1], y) for x, y in zip(batch, alone)), j


def test_gathered_candidates_continue_as_if_alone():
    """TTS-VAR keeps, drops and duplicates candidates mid-sampling by batch index."""
    _, model = tiny_pair()
    cond = torch.tensor([0, 1, 2])
    state = start_state(model, cond, cfg_scale=2.0)
    gens = [gen(20 + j) for j in range(3)]
    for _ in range(2):
        decode_scale(model, state, gens, cfg_scale=2.0)
    pick = torch.tensor([2, 0, 2])
    kept = state.gather(pick)
    for _ in range(2, len(SCALES)):
        decode_scale(model, kept, [gen(30 + m) for m in range(3)], cfg_scale=2.0)
    for m, j in enumerate(pick.tolist()):
        solo = start_state(model, cond[j : j + 1], cfg_scale=2.0)
        g = gen(20 + j)
        for _ in range(2):
            decode_scale(model, solo, [g], cfg_scale=2.0)
        for _ in range(2, len(SCALES)):
            decode_scale(model, solo, [gen(30 + m)], cfg_scale=2.0)
        assert all(torch.equal(x[m : m + 1], y) for x, y in zip(kept.ids, solo.ids)), (m, j)
        torch.testing.assert_close(kept.f_hat[m : m + 1], solo.f_hat)  # convs differ by batch size in the ulp


def test_needs_a_matching_tokenizer():
    tok, model = tiny_pair()
    fresh = NextScaleTransformer(model.cfg)
    with pytest.raises(RuntimeError, match="attach_tokenizer"):
        fresh.loss(torch.zeros(1, model.num_tokens, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    other, _ = tiny_pair(vocab=16)
    with pytest.raises(ValueError, match="does not match"):
        model.attach_tokenizer(other)
    with pytest.raises(ValueError, match="strictly increasing"):
        NextScaleTransformer(VARConfig(vocab_size=8, scales=[2, 1], code_dim=4, num_classes=2))


# ---------------------------------------------------------------------- trained on digits


@pytest.fixture(scope="module")
def trained_var(tmp_path_factory):
    root = tmp_path_factory.mktemp("var")
    torch.manual_seed(0)
    tok_model = {"name": "vat", "hidden": [16, 32], "code_dim": 8, "codebook_size": 64, "scales": SCALES}
    run(task_config("tokenizer", root / "vat", dict(steps=300, batch_size=64, lr=3e-3), model=tok_model),
        log=lambda m: None)  # fmt: skip
    var_model = {"name": "var", "dim": 64, "depth": 2, "heads": 4, "class_dropout": 0.1}
    gen_train = dict(steps=500, batch_size=64, lr=2e-3, weight_decay=0.01)
    cfg = task_config("generator", root / "var", gen_train, tokenizer_ckpt=str(root / "vat"), model=var_model)
    run(cfg, log=lambda m: None)
    model, gen_cfg = load_component(str(root / "var"))
    tok = load_tokenizer_for(gen_cfg)
    model.attach_tokenizer(tok)
    return {"root": root, "model": model, "tok": tok}


def test_trained_next_scale_model_scores_far_below_untrained(trained_var):
    model, tok = trained_var["model"], trained_var["tok"]
    ev = FIDEvaluator.for_dataset(DIGITS, split="train")
    labels = class_labels(500, model.num_classes, [])

    def sampler(m, c, g):
        return sample_var(m, c, generator=g, cfg_scale=1.5)

    trained, _, stats = generate(model, tok, labels, sampler, gen(0), 250)
    torch.manual_seed(1)
    untrained = NextScaleTransformer(model.cfg).eval()
    untrained.attach_tokenizer(tok)
    noise, _, _ = generate(untrained, tok, labels, sampler, gen(0), 250)
    fid_trained, fid_untrained = ev.score(trained), ev.score(noise)
    assert stats["target_forwards"] == 2 * len(SCALES)  # 2 batches, one forward per scale
    assert fid_trained * 3 < fid_untrained, (fid_trained, fid_untrained)


def test_sample_cli_on_a_next_scale_checkpoint(trained_var, tmp_path):
    import sample

    ckpt = str(trained_var["root"] / "var")
    args = ["num_samples=20", "batch_size=10", "sampler.cfg_scale=2.0", "progress=false"]
    assert sample.main(["--ckpt", ckpt, f"out={tmp_path / 'a'}", *args]) == 0
    assert sample.main(["--ckpt", ckpt, f"out={tmp_path / 'b'}", *args]) == 0
    metrics = json.load(open(tmp_path / "a" / "metrics.json"))
    assert metrics["stats.target_forwards"] == 2 * len(SCALES)  # picked the "var" sampler
    a, b = (torch.from_numpy(__import__("numpy").load(tmp_path / d / "samples.npz")["ids"]) for d in "ab")
    assert a.shape == (20, sum(s * s for s in SCALES)) and torch.equal(a, b)


@pytest.mark.parametrize(
    "sampler", [["sampler.name=tts_var", "sampler.n=2"], ["sampler.name=best_of_n", "sampler.n=4"]]
)
def test_sample_cli_runs_test_time_search(trained_var, tmp_path, sampler):
    import sample

    ckpt = str(trained_var["root"] / "var")
    args = ["num_samples=6", "batch_size=6", "progress=false", "sampler.cfg_scale=1.5", *sampler]
    assert sample.main(["--ckpt", ckpt, f"out={tmp_path}", *args]) == 0
    metrics = json.load(open(tmp_path / "metrics.json"))
    if "best_of_n" in sampler[0]:  # 4 candidates through 4 scales, decoded once for the pick
        decoded, rows = 4, 4 * 4
    else:  # N=2: 16, 12, 4, 2 survive each scale, so scales run with 16, 16, 12, 4; decoded after
        # scales 1, 2, 3 (each drop); the last scale's resampling rewards make the final pick
        decoded, rows = 16 + 12 + 4, 16 + 16 + 12 + 4
    assert metrics["stats.decoded_images"] == 6 * decoded
    assert metrics["stats.candidate_forwards"] == 6 * rows


def test_checkpoints_written_before_attn_l2_norm_still_resume():
    """A model config recorded before the option existed equals one with it off, not on."""
    from vargen.checkpoint import same_model_config

    old = {"name": "var", "dim": 64, "depth": 4}
    assert same_model_config(old, {**old, "attn_l2_norm": False})
    assert not same_model_config(old, {**old, "attn_l2_norm": True})
    assert not same_model_config(old, {**old, "dim": 32, "attn_l2_norm": False})
