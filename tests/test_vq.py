"""VQ tokenizer: the encode/decode contract, nearest-code lookup, straight-through
gradients, EMA codebook updates, dead-code restarts, DDP buffer sync, a short training
run on digits and the builder's config errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vargen.config import validate
from vargen.registry import TOKENIZERS
from vargen.tokenizers import VQConfig, VQTokenizer, build_vq

from .conftest import adam_steps

TINY = {"name": "vq", "channels": 1, "resolution": 16, "hidden": [16, 32], "codebook_size": 32, "code_dim": 8}


def tiny(seed: int = 0, **overrides) -> VQTokenizer:
    torch.manual_seed(seed)
    return build_vq({**TINY, **overrides})


def flat_latents(m: VQTokenizer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m.encode_latent(x).permute(0, 2, 3, 1).reshape(-1, m.cfg.code_dim)  # (M, D)


def test_registered_schema_and_tokens_spec():
    assert TOKENIZERS.get("vq").schema is VQConfig
    cfg = validate(VQConfig, {"name": "vq", "channels": 1, "resolution": 16})
    assert cfg["hidden"] == [32, 64] and cfg["codebook_size"] == 128 and cfg["downsample"] == 4
    m = TOKENIZERS.build(cfg)
    assert m.tokens_spec == {"kind": "ids", "grid": (4, 4), "vocab_size": 128, "num_tokens": 16}
    m = tiny(resolution=32, channels=3, downsample=8, hidden=[8, 16, 16])
    assert m.tokens_spec == {"kind": "ids", "grid": (4, 4), "vocab_size": 32, "num_tokens": 16}
    assert m.encode(torch.rand(2, 3, 32, 32)).shape == (2, 16)


def test_encode_decode_contract(digits):
    m = tiny().eval()
    x = digits.train_images[:8]
    ids = m.encode(x)
    assert ids.shape == (8, 16) and ids.dtype == torch.int64
    assert 0 <= int(ids.min()) and int(ids.max()) < 32
    assert torch.equal(ids, m.encode(x))  # deterministic
    m.decoder[-1].bias.data += 3.0  # push raw outputs above 1 so the clamp matters
    images = m.decode(ids)
    assert images.shape == (8, 1, 16, 16)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    with torch.no_grad():
        raw = m.decode_latent(m.embed_ids(ids))
    assert float(raw.max()) > 1.0
    assert torch.equal(images, raw.clamp(0, 1))
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        m.decode(ids[:, :15])


def test_encode_in_train_mode_leaves_codebook_alone(digits):
    m = tiny().train()
    state = copy.deepcopy(m.state_dict())
    ids = m.encode(digits.train_images[:8])
    assert not ids.requires_grad
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("l2", [False, True])
def test_quantize_returns_nearest_code(l2):
    m = tiny(l2_normalized=l2)
    z = torch.randn(4, 8, 4, 4)
    zq, ids = m.quantize(z)
    assert zq.shape == z.shape and ids.shape == (4, 16)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8).double()  # (64, D)
    codes = m.codebook.double()
    if l2:
        flat, codes = F.normalize(flat, dim=1), F.normalize(codes, dim=1)
    d = torch.cdist(flat, codes)  # (64, V)
    chosen = d.gather(1, ids.reshape(-1, 1)).squeeze(1)
    torch.testing.assert_close(chosen, d.min(1).values, rtol=0, atol=1e-5)
    expect = codes[ids.reshape(-1)].reshape(4, 4, 4, 8).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(zq, expect, rtol=0, atol=1e-5)
    torch.testing.assert_close(m.embed_ids(ids), expect, rtol=0, atol=1e-6)


def test_straight_through_gradient_reaches_encoder(digits):
    m = tiny()
    x = digits.train_images[:8]
    z = m.encode_latent(x)
    zq, _ = m.quantize(z)
    F.mse_loss(m.decode_latent(zq), x).backward()  # recon loss only: no commitment term
    for name, p in m.encoder.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_ema_moves_used_codes_to_their_latents(digits):
    m = tiny(ema_decay=0.5, dead_code_threshold=0.0).train()
    x = digits.train_images[:32]
    flat = flat_latents(m, x)  # (M, D)
    _, ids = m.quantize(flat.reshape(32, 4, 4, 8).permute(0, 3, 1, 2))
    ids = ids.reshape(-1)
    old = m.codebook.clone()
    m.loss(x)
    used = ids.unique()
    assert len(used) >= 1
    for k in used.tolist():
        sel = flat[ids == k]  # latents assigned to code k
        expect = (0.5 * old[k] + 0.5 * sel.sum(0)) / (0.5 + 0.5 * len(sel))  # EMA of sums / of counts
        torch.testing.assert_close(m.codebook[k], expect, rtol=1e-4, atol=1e-5)
        mean = sel.mean(0)
        assert (m.codebook[k] - mean).norm() < (old[k] - mean).norm()
    unused = torch.ones(32, dtype=torch.bool)
    unused[used] = False
    torch.testing.assert_close(m.codebook[unused], old[unused])  # decayed sum / decayed count
    assert "ema_sum" in m.state_dict() and not any(p is m.codebook for p in m.parameters())


def test_dead_codes_restart_onto_encoder_outputs(digits):
    m = tiny(ema_decay=0.5, dead_code_threshold=1.0).train()
    x = digits.train_images[:32]
    flat = flat_latents(m, x)  # (512, D)
    far = 100.0 + torch.randn(31, 8)
    m.codebook.copy_(torch.cat([flat.mean(0, keepdim=True), far]))  # every latent picks code 0
    m.ema_sum.copy_(m.codebook)  # consistent with ema_count == 1
    start = copy.deepcopy(m.state_dict())
    torch.manual_seed(123)
    m.loss(x)
    assert float(m.ema_count[0]) > 1.0  # code 0 was used by all 512 latents: kept
    assert float(m.codebook[0].abs().max()) < 50.0
    dead = m.codebook[1:]  # count 0.5 * 1 < threshold: all restarted
    assert (
        float(torch.cdist(dead.double(), flat.double()).min(1).values.max()) < 1e-6
    )  # each is some encoder output
    torch.testing.assert_close(m.ema_count[1:], torch.ones(31))
    torch.testing.assert_close(m.ema_sum[1:], dead)  # sum = code * count, count = threshold
    # restarts come from the global RNG: same seed, same codebook; another seed, another one
    again = tiny(ema_decay=0.5, dead_code_threshold=1.0).train()
    again.load_state_dict(start)
    torch.manual_seed(123)
    again.loss(x)
    assert torch.equal(again.codebook, m.codebook)
    again.load_state_dict(start)
    torch.manual_seed(7)
    again.loss(x)
    assert not torch.equal(again.codebook, m.codebook)


def test_codebook_loss_mode(digits):
    m = tiny(ema_decay=0.0).train()
    assert isinstance(m.codebook, torch.nn.Parameter) and "ema_sum" not in m.state_dict()
    out = m.loss(digits.train_images[:16])
    assert set(out) == {"loss", "recon_mse", "commit", "codebook_usage", "perplexity"}
    out["loss"].backward()
    assert float(m.codebook.grad.abs().sum()) > 0


def _ddp_worker(rank: int, world: int, init: str, x: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    m = tiny(seed=0)  # same initial weights on every rank ...
    torch.manual_seed(100 + rank)  # ... but different RNG streams and different data
    ddp = torch.nn.parallel.DistributedDataParallel(m, broadcast_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(2):
        batch = x[rank * 16 + step * 32 : rank * 16 + step * 32 + 16]
        opt.zero_grad()
        ddp(batch)["loss"].backward()
        opt.step()
    torch.save(m.state_dict(), f"{out}.{rank}")
    dist.destroy_process_group()


def test_ddp_ranks_keep_identical_codebooks(digits, tmp_path):
    init = f"file://{tmp_path / 'store'}"
    out = str(tmp_path / "state")
    args = (2, init, digits.train_images[:64], out)
    mp.start_processes(_ddp_worker, args=args, nprocs=2, join=True, start_method="fork")
    s0, s1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    for k in ("codebook", "ema_sum", "ema_count"):
        assert torch.equal(s0[k], s1[k]), k
    assert torch.equal(s0["encoder.0.weight"], s1["encoder.0.weight"])
    assert not torch.equal(s0["codebook"], tiny(seed=0).codebook)  # the updates did happen


@pytest.mark.slow
def test_training_lowers_recon_and_uses_codebook(digits, one_thread):
    m = tiny().train()
    x, held = digits.train_images, digits.heldout_images
    m.eval()
    before = float(m.loss(held)["recon_mse"])
    adam_steps(m, x, 150)
    m.eval()
    after = m.loss(held)
    assert float(after["recon_mse"]) < 0.25 * before, (before, float(after["recon_mse"]))
    usage = m.encode(x[:512]).unique().numel() / 32
    assert usage > 0.5, usage
    copy_ = tiny(seed=1)
    copy_.load_state_dict(m.state_dict())
    assert torch.equal(copy_.encode(held), m.encode(held))
    assert torch.equal(copy_.decode(m.encode(held)), m.decode(m.encode(held)))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"channels": 0}, "channels=0"),
        ({"resolution": 0}, "resolution=0"),
        ({"resolution": 18}, "not divisible by tokenizer.downsample=4"),
        ({"downsample": 3}, "power of 2"),
        ({"hidden": [32]}, "log2"),
        ({"ema_decay": 1.0}, "ema_decay"),
    ],
)
def test_builder_rejects_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_vq({**TINY, **overrides})
