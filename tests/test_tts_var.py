"""TTS-VAR: schedule, clustering, resampling, potentials, and the search on a tiny model."""

import pytest
import torch
from scipy.stats import chisquare

from vargen.sampling.decoders.var import decode_scale, sample_var, start_state
from vargen.sampling.search.tts_var import (
    REFERENCE_SCHEDULE,
    TTSVAR,
    BestOfN,
    BestOfNConfig,
    TTSVARConfig,
    check_schedule,
    cluster_select,
    default_schedule,
    layout_map,
    potential,
    resample_select,
    resampling_weights,
    selection_plan,
)

from .test_var import gen, tiny_pair


def brightness(images, labels=None):
    return images.mean((1, 2, 3))  # (M,)


@pytest.mark.parametrize("K", list(range(2, 14)))
def test_default_schedule_is_non_increasing_and_every_selection_shrinks(K):
    sched = default_schedule(K)
    check_schedule(sched, K)
    assert sched[0] == REFERENCE_SCHEDULE[0] and sched[-1] == REFERENCE_SCHEDULE[-1]
    for k, kind in selection_plan(sched, 0.5).items():
        assert sched[k] < sched[k - 1] and kind in ("cluster", "resample")
    assert default_schedule(13) == list(REFERENCE_SCHEDULE) and default_schedule(1) == [1]
    assert selection_plan(list(REFERENCE_SCHEDULE), 0.5) == {
        2: "cluster",
        5: "cluster",
        6: "resample",
        9: "resample",
    }


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="non-increasing"):
        check_schedule([2, 4, 1], 3)
    with pytest.raises(ValueError, match="3 scales"):
        check_schedule([2, 1], 3)


def test_clustering_picks_one_from_each_planted_blob():
    g = gen(0)
    k, per = 5, 7
    centres = torch.randn(k, 6, generator=g) * 20
    points = (centres[:, None] + torch.randn(k, per, 6, generator=g)).reshape(k * per, 6)
    perm = torch.randperm(k * per, generator=g)
    blob = (torch.arange(k * per) // per)[perm]
    picked = cluster_select(points[perm], k, seed=0)
    assert len(set(picked.tolist())) == k
    assert sorted(blob[picked].tolist()) == list(range(k))  # exactly one per blob
    for i in picked.tolist():  # each pick is the member of its blob nearest the blob's mean
        members = (blob == blob[i]).nonzero().squeeze(1)
        centre = points[perm][members].mean(0)
        d = (points[perm][members] - centre).pow(2).sum(1)
        assert members[d.argmin()] == i


def test_clustering_duplicates_still_gives_distinct_indices():
    picked = cluster_select(torch.zeros(6, 3), 4, seed=0)
    assert len(set(picked.tolist())) == 4


def test_resampling_frequencies_follow_softmax_of_lambda_potential():
    phi = torch.tensor([0.0, 0.3, -0.5, 1.0, 0.2])
    for lam in (0.0, 2.0):
        draws = resample_select(phi, 40000, lam, gen(1))
        counts = torch.bincount(draws, minlength=5).double()
        expected = torch.softmax(lam * phi.double(), 0) * 40000
        assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3, (lam, counts)
    assert torch.allclose(resampling_weights(phi, 0.0), torch.full((5,), 0.2, dtype=torch.float64))
    # a large lambda concentrates on the argmax; NaN potentials fall back to uniform
    assert (resample_select(phi, 100, 200.0, gen(2)) == 3).all()
    w = resampling_weights(torch.tensor([float("nan"), 1.0]), 10.0)
    assert torch.equal(w, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_potentials_from_a_recorded_history():
    h = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 4.0]])
    assert torch.equal(potential(h, "value"), torch.tensor([2.0, 4.0]))
    assert torch.equal(potential(h, "diff"), torch.tensor([-1.0, 5.0]))
    assert torch.equal(potential(h, "max"), torch.tensor([3.0, 4.0]))
    assert torch.equal(potential(h, "sum"), torch.tensor([6.0, 3.5]))
    assert torch.equal(potential(h[:, :1], "diff"), h[:, 0])  # nothing before the first record
    with pytest.raises(ValueError, match="potential"):
        potential(h, "mean")


def test_layout_map_ignores_offsets_and_principal_sign():
    tokens = torch.randn(3, 16, 8, generator=gen(3))
    a = layout_map(tokens)
    assert a.shape == (3, 16)
    torch.testing.assert_close(layout_map(tokens + 5.0), a, atol=1e-5, rtol=0)
    torch.testing.assert_close(layout_map(-tokens), layout_map(tokens) * 1, atol=1e-5, rtol=0)


def test_constant_schedule_without_selection_equals_plain_sampling():
    _, model = tiny_pair()
    cond = torch.tensor([0, 1, 2, 1])
    warp = dict(cfg_scale=2.0, temperature=1.2)
    plain, _ = sample_var(model, cond, generator=gen(4), **warp)
    tts = TTSVAR(
        TTSVARConfig(n=1, schedule=[1, 1, 1, 1], **warp), reward_fn=brightness, feature_fn=brightness
    )
    ids, stats = tts(model, cond, gen(4))
    assert all(torch.equal(a, b) for a, b in zip(plain, ids))
    assert stats["decoded_images"] == 0 and stats["candidate_forwards"] == 4 * len(cond)


def test_search_raises_the_reward_and_counts_compute():
    _, model = tiny_pair()
    tok = model.tokenizer
    cond = torch.arange(3).repeat(6)  # 18 labels
    plain, _ = sample_var(model, cond, generator=gen(5))
    r = brightness(tok.decode(plain))
    r_plain, margin = r.mean(), 0.5 * r.std()  # searching 8-16 candidates gains ~1.5 sd per label
    for pot in ("value", "diff", "max", "sum"):
        cfg = TTSVARConfig(n=2, potential=pot, lam=200.0)
        ids, stats = TTSVAR(cfg, reward_fn=brightness, feature_fn=lambda im: im.flatten(1))(
            model, cond, gen(5)
        )
        assert [t.shape[0] for t in ids] == [18] * 4
        assert brightness(tok.decode(ids)).mean() > r_plain + margin, pot
        sizes = [b * 2 for b in default_schedule(4)]  # 16, 12, 4, 2 survive each scale
        run = sizes[:1] + sizes[:-1]  # scale k runs with the sizes[k - 1] survivors: 16, 16, 12, 4
        assert stats["candidate_forwards"] == stats["ar_rows"] == 18 * sum(run)
        assert stats["token_forwards"] == 18 * sum(s * n for s, n in zip(run, model.scale_lengths))
        # decoded after scale 1 (cluster 16 -> 12), 2 and 3 (resample 12 -> 4 -> 2; the last
        # resampling's rewards make the final pick); features once, rewards twice
        assert stats["decoded_images"] == 18 * (16 + 12 + 4)
        assert stats["feature_images"] == 18 * 16 and stats["reward_images"] == 18 * (12 + 4)
        assert stats["network_passes"] == 18 * (sum(run) + 32 + 16 + 16)
    bon, bstats = BestOfN(BestOfNConfig(n=8), reward_fn=brightness)(model, cond, gen(5))
    assert brightness(tok.decode(bon)).mean() > r_plain + margin
    assert bstats["candidate_forwards"] == 18 * 8 * 4 and bstats["decoded_images"] == 18 * 8


def test_resampling_at_the_last_scale_scores_full_images_so_it_is_best_of_n():
    """Schedule (M, .., M, 1), resampling at the last scale with a huge lam: the M candidates
    decode every scale first, then the argmax of their full images' reward survives, which
    is best-of-M with the same generator. Selecting before the last scale (from images of
    scales 0..K-2) would continue one candidate and break the equality."""
    _, model = tiny_pair()
    cond = torch.tensor([0, 1, 2, 0, 1])
    M, warp = 4, dict(cfg_scale=1.5, temperature=1.3)
    cfg = TTSVARConfig(n=1, schedule=[M, M, M, 1], switch=0.0, lam=1e6, **warp)
    ids, stats = TTSVAR(cfg, reward_fn=brightness, feature_fn=brightness)(model, cond, gen(7))
    bon, _ = BestOfN(BestOfNConfig(n=M, **warp), reward_fn=brightness)(model, cond, gen(7))
    assert all(torch.equal(a, b) for a, b in zip(ids, bon))
    assert stats["candidate_forwards"] == len(cond) * M * 4 and stats["ar_rows"] == 2 * len(cond) * M * 4
    assert stats["reward_images"] == stats["decoded_images"] == len(cond) * M  # scored once


def test_clustering_sees_the_images_after_decoding_the_dropping_scale():
    """Schedule (M, M, 1, 1) clusters at scale 2: the feature net must see the M candidates'
    images after scales 0, 1 and 2 (a reference loop of decode_scale with the same
    generator), and the survivor's scales 0..2 are one of those candidates'."""
    tok, model = tiny_pair()
    cond, M = torch.tensor([2, 0]), 5
    seen = []

    def spy(images):
        seen.append(images)
        return images.flatten(1)

    cfg = TTSVARConfig(n=1, schedule=[M, M, 1, 1], switch=1.0)
    ids, stats = TTSVAR(cfg, reward_fn=brightness, feature_fn=spy)(model, cond, gen(8))
    ref = start_state(model, cond.repeat_interleave(M))
    g = gen(8)
    for _ in range(3):
        decode_scale(model, ref, g)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], tok.decode_latent(ref.f_hat).clamp(0, 1), rtol=0, atol=1e-6)
    for b in range(len(cond)):
        rows = range(b * M, (b + 1) * M)
        assert any(all(torch.equal(ids[j][b], ref.ids[j][r]) for j in range(3)) for r in rows)
    assert stats["candidate_forwards"] == len(cond) * (M + M + M + 1)
    assert stats["feature_images"] == stats["decoded_images"] == len(cond) * M


def test_same_seed_same_search():
    _, model = tiny_pair()
    tts = TTSVAR(TTSVARConfig(n=2), reward_fn=brightness, feature_fn=lambda im: im.flatten(1))
    a, _ = tts(model, torch.tensor([0, 1]), gen(6))
    b, _ = tts(model, torch.tensor([0, 1]), gen(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
