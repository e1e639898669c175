import pytest
import torch

from vargen.sampling.decoders.ar import sample_ar
from vargen.tokenizers.ctf_labels import cluster_mask, kmeans


def _codebook():
    return torch.randn(64, 8, generator=torch.Generator().manual_seed(1))


def test_each_code_is_labelled_by_its_nearest_centroid():
    cb = _codebook()
    c, labels = kmeans(cb, 7, seed=3)
    assert torch.equal(labels, torch.cdist(cb, c).argmin(1))


def test_cluster_sizes_sum_to_vocabulary_and_none_empty():
    c, labels = kmeans(_codebook(), 10, seed=0)
    sizes = cluster_mask(labels, 10).sum(1)
    assert sizes.sum().item() == 64 and sizes.min().item() >= 1
    assert torch.equal(cluster_mask(labels, 10).sum(0), torch.ones(64, dtype=torch.long))


def test_deterministic_by_seed():
    a = kmeans(_codebook(), 8, seed=5)
    b = kmeans(_codebook(), 8, seed=5)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_k_equals_v_gives_identity_clusters():
    cb = _codebook()
    c, labels = kmeans(cb, 64, seed=0)
    assert len(set(labels.tolist())) == 64
    assert torch.allclose(c[labels], cb)  # one code per cluster: the fine id is fixed by the coarse one


def test_bad_k_names_the_key():
    with pytest.raises(ValueError, match="num_coarse"):
        kmeans(_codebook(), 65)


class _FakeVQ:
    def __init__(self, v=24, d=4):
        self.codebook = torch.randn(v, d, generator=torch.Generator().manual_seed(7))


def _ctf(k, mask=True):
    from vargen.models.ctf import CTF, CTFConfig

    torch.manual_seed(0)
    cfg = CTFConfig(vocab_size=24, grid=[4, 4], num_classes=3, num_coarse=k, dim=32, depth=2, heads=2)
    cfg.stage2_dim, cfg.stage2_depth, cfg.mask_to_cluster = 32, 1, mask
    model = CTF(cfg)
    model.attach_tokenizer(_FakeVQ())
    return model.eval()


def test_masked_sampling_keeps_every_fine_id_in_its_cluster():
    from vargen.sampling.decoders.ctf import sample_ctf

    model = _ctf(5)
    cond = torch.tensor([0, 1, 2, 0])
    ids, stats = sample_ctf(model, cond, generator=torch.Generator().manual_seed(0), cfg_scale=2.0)
    assert ids.shape == (4, 16) and stats["target_forwards"] == 17  # 16 stage-1 steps + 1 stage-2 pass
    # the same generator seed replays stage 1, so the coarse labels of the fine ids are the sampled ones
    coarse, _ = sample_ar(model.stage1, cond, generator=torch.Generator().manual_seed(0), cfg_scale=2.0)
    assert torch.equal(model.coarse_of[ids], coarse)
    again, _ = sample_ctf(model, cond, generator=torch.Generator().manual_seed(0), cfg_scale=2.0)
    assert torch.equal(ids, again)


def test_unmasked_stage2_can_leave_the_cluster():
    from vargen.sampling.decoders.ctf import sample_ctf

    model = _ctf(5, mask=False)
    ids, _ = sample_ctf(model, torch.arange(3).repeat(4), generator=torch.Generator().manual_seed(0))
    coarse, _ = sample_ar(model.stage1, torch.arange(3).repeat(4), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(model.coarse_of[ids], coarse)  # untrained stage 2 ignores the clusters


def test_k_equals_v_makes_stage2_trivial():
    model = _ctf(24)
    ids = torch.randint(24, (3, 16), generator=torch.Generator().manual_seed(1))
    out = model.loss(ids, torch.tensor([0, 1, 2]))
    assert out["stage2_loss"].item() == 0.0
    assert out["stage1_loss"].item() > 1.0


def test_attach_keeps_existing_labels_and_bad_k_names_the_key():
    from vargen.models.ctf import CTF, CTFConfig

    model = _ctf(5)
    before = model.coarse_of.clone()
    model.attach_tokenizer(_FakeVQ(d=4).__class__(d=4))
    assert torch.equal(model.coarse_of, before)
    with pytest.raises(ValueError, match="num_coarse"):
        CTF(CTFConfig(vocab_size=24, grid=[4, 4], num_classes=3, num_coarse=30))
