"""The fused logits warper: Triton kernel (CPU interpreter) vs the torch reference, and the
reference's own sampling properties.

The interpreter is slow (each top-k/top-p bisection costs 10-30 ms per row), so the kernel grids
are small and the statistical tests run on the vectorised reference only.
"""

import os

# Must precede the first `import triton` (vargen_kernels imports it): see vargen_kernels.dispatch.
os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from vargen_kernels import dispatch  # noqa: E402
from vargen_kernels.logits_warper import (  # noqa: E402
    U_EPS,
    gumbel_from_uniform,
    warp_and_sample,
    warp_and_sample_reference,
    warp_logits,
    warped_probs,
)

# Chi-square critical values at p = 1e-3 by degrees of freedom (scipy.stats.chi2.ppf(0.999, dof)).
CHI2_CRIT_1E3 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}


@pytest.fixture
def interpreter():
    """Skip unless the Triton kernel can run here: triton installed, TRITON_INTERPRET on."""
    pytest.importorskip("triton")
    if not dispatch.interpret_requested():
        pytest.skip("TRITON_INTERPRET is off, so the kernel cannot run on CPU")


def _logits(B, V, seed, guided=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cond_BV = (2.0 * torch.randn(B, V, generator=g)).to(dtype)
    uncond_BV = (2.0 * torch.randn(B, V, generator=g)).to(dtype) if guided else None
    return cond_BV, uncond_BV, g


def _boundary_noise(full_BV, kept_BV, g):
    """Uniform noise (B, V) that tests the kept-set boundary rather than a typical draw.

    ``full_BV``: reference logits after CFG and temperature; ``kept_BV``: the reference's kept set.
    Row r % 3 == 0: plain noise. == 1: noise making the largest *dropped* entry win (a kernel
    keeping one entry too many samples it). == 2: noise making the smallest *kept* entry win (a
    kernel dropping it samples something else).
    """
    B, V = full_BV.shape
    u_BV = torch.rand(B, V, generator=g)
    for r in range(B):
        if r % 3 == 0 or kept_BV[r].all():
            continue
        if r % 3 == 1:
            target = int(full_BV[r].masked_fill(kept_BV[r], -math.inf).argmax())
        else:
            target = int(full_BV[r].masked_fill(~kept_BV[r], math.inf).argmin())
        u_BV[r] *= 0.01  # everyone else gets small Gumbel noise (about -1.5 to -2.8)
        u_BV[r, target] = 1.0 - U_EPS  # Gumbel 16.6
    return u_BV


def _check_parity(cond_BV, uncond_BV, g, cfg_scale=1.0, temperature=1.0, **filters):
    warp = dict(cfg_scale=cfg_scale, temperature=temperature, **filters)
    full_BV = warp_logits(cond_BV, uncond_BV, cfg_scale=cfg_scale, temperature=temperature)
    kept_BV = torch.isfinite(warp_logits(cond_BV, uncond_BV, **warp))
    u_BV = _boundary_noise(full_BV, kept_BV, g)
    ref_B = warp_and_sample_reference(cond_BV, uncond_BV, uniform_BV=u_BV, **warp)
    ker_B = warp_and_sample(cond_BV, uncond_BV, uniform_BV=u_BV, backend="interpret", **warp)
    assert ker_B.dtype == torch.int64 and ker_B.shape == (cond_BV.shape[0],)
    assert torch.equal(ker_B, ref_B), (ker_B, ref_B)
    assert kept_BV.gather(1, ker_B[:, None]).all()


# ---------------------------------------------------------------- kernel == reference (interpreter)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
@pytest.mark.parametrize("top_k", [0, 1, 5])
@pytest.mark.parametrize("V", [7, 64, 100])
def test_kernel_matches_reference_filters(interpreter, V, top_k, top_p):
    cond_BV, uncond_BV, g = _logits(3, V, seed=V * 10 + top_k)
    _check_parity(cond_BV, uncond_BV, g, cfg_scale=3.0, temperature=0.7, top_k=top_k, top_p=top_p)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("guided,cfg_scale", [(False, 1.0), (False, 3.0), (True, 1.0), (True, 3.0)])
def test_kernel_matches_reference_guidance(interpreter, B, temperature, guided, cfg_scale):
    cond_BV, uncond_BV, g = _logits(B, 100, seed=B + int(10 * temperature), guided=guided)
    _check_parity(cond_BV, uncond_BV, g, cfg_scale=cfg_scale, temperature=temperature, top_k=5, top_p=0.8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_half_inputs(interpreter, dtype):
    cond_BV, uncond_BV, g = _logits(3, 64, seed=3, dtype=dtype)
    _check_parity(cond_BV, uncond_BV, g, cfg_scale=2.0, temperature=0.9, top_k=7, top_p=0.9)


def test_kernel_ties_and_tiny_vocab(interpreter):
    """Integer logits tie at the thresholds (ties must be kept alike); V=1 and V=2 pad the block."""
    g = torch.Generator().manual_seed(4)
    ties_BV = torch.randint(0, 3, (3, 40), generator=g).float()
    _check_parity(ties_BV, None, g, top_k=5)
    _check_parity(ties_BV, None, g, top_p=0.3)
    for V in (1, 2):
        _check_parity(torch.randn(3, V, generator=g), None, g, top_k=1, top_p=0.5)


def test_kernel_strided_rows_and_noise_extremes(interpreter):
    """Rows of a (B, N, V) view (as the decoder passes them); exact 0 and 1 noise stays finite."""
    g = torch.Generator().manual_seed(5)
    logits_BNV = torch.randn(3, 4, 24, generator=g)
    u_BV = torch.rand(3, 24, generator=g)
    u_BV[:, ::2] = 0.0
    u_BV[1:, 1::4] = 1.0
    for warp in ({}, {"top_k": 6, "top_p": 0.9}):
        args = (logits_BNV[:, -1], logits_BNV[:, 0])
        ker_B = warp_and_sample(*args, cfg_scale=2.5, uniform_BV=u_BV, backend="interpret", **warp)
        assert torch.equal(ker_B, warp_and_sample_reference(*args, cfg_scale=2.5, uniform_BV=u_BV, **warp))


def test_kernel_top_k_1_and_cfg_1(interpreter):
    cond_BV, uncond_BV, g = _logits(3, 50, seed=6)
    u_BV = torch.rand(3, 50, generator=g)
    greedy_B = warp_and_sample(
        cond_BV, uncond_BV, cfg_scale=3.0, top_k=1, uniform_BV=u_BV, backend="interpret"
    )
    assert torch.equal(greedy_B, (uncond_BV + 3.0 * (cond_BV - uncond_BV)).argmax(-1))
    with_uncond_B = warp_and_sample(cond_BV, uncond_BV, cfg_scale=1.0, uniform_BV=u_BV, backend="interpret")
    assert torch.equal(with_uncond_B, warp_and_sample(cond_BV, uniform_BV=u_BV, backend="interpret"))


def test_kernel_validates_like_reference(interpreter):
    cond_BV, _, _ = _logits(2, 8, seed=7, guided=False)
    with pytest.raises(ValueError, match="temperature"):
        warp_and_sample(cond_BV, temperature=0.0, uniform_BV=torch.rand(2, 8), backend="interpret")


def test_kernel_mode_mismatch_is_a_clear_error(interpreter):
    """Under the interpreter the kernel is an interpreter object: compiled mode must refuse it."""
    cond_BV, _, _ = _logits(2, 8, seed=8, guided=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        warp_and_sample(cond_BV, uniform_BV=torch.rand(2, 8), backend="triton")


# ---------------------------------------------------------------- reference properties


def _chi_square(ids, probs):
    """Pearson statistic of the sample ``ids`` against ``probs`` (float64, zero-prob bins dropped)."""
    counts = torch.bincount(ids, minlength=probs.numel()).double()
    support = probs > 0
    expected = probs[support] * ids.numel()
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


@pytest.mark.parametrize("guided", [False, True])
def test_samples_follow_softmax(guided):
    """20000 draws from one row match softmax(l / T) (dof 5), and the test has power: the same
    draws reject softmax(l), i.e. a sampler that ignored the temperature."""
    n, T = 20000, 0.8
    cond_1V = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 0.2]])
    uncond_1V = torch.tensor([[0.6, 0.6, 0.0, 0.0, -0.2, 0.4]]) if guided else None
    mixed_1V = cond_1V if uncond_1V is None else uncond_1V + 2.0 * (cond_1V - uncond_1V)
    g = torch.Generator().manual_seed(9)
    ids = warp_and_sample(
        cond_1V.expand(n, 6),
        None if uncond_1V is None else uncond_1V.expand(n, 6),
        cfg_scale=2.0,
        temperature=T,
        uniform_BV=torch.rand(n, 6, generator=g),
        backend="torch",
    )
    stat, dof = _chi_square(ids, torch.softmax(mixed_1V[0].double() / T, -1))
    assert dof == 5 and stat < CHI2_CRIT_1E3[dof], stat
    wrong, _ = _chi_square(ids, torch.softmax(mixed_1V[0].double(), -1))
    assert wrong > CHI2_CRIT_1E3[dof], wrong


def test_filtered_samples_follow_warped_probs():
    """With top-k and top-p, draws follow the renormalised kept distribution and never leave it."""
    n = 20000
    l_1V = torch.tensor([[2.0, 1.5, 1.2, 1.0, 0.3, -1.0, 0.9, 1.1]])
    for warp in ({"top_k": 4}, {"top_p": 0.7}, {"top_k": 5, "top_p": 0.8}):
        probs_V = warped_probs(l_1V, **warp)[0].double()
        g = torch.Generator().manual_seed(10)
        ids = warp_and_sample(
            l_1V.expand(n, 8), uniform_BV=torch.rand(n, 8, generator=g), backend="torch", **warp
        )
        assert (probs_V[ids] > 0).all()
        stat, dof = _chi_square(ids, probs_V)
        assert 1 <= dof <= 4 and stat < CHI2_CRIT_1E3[dof], (warp, stat)


def test_top_k_1_is_argmax_whatever_the_noise():
    cond_BV, uncond_BV, g = _logits(256, 50, seed=11)
    mixed_BV = uncond_BV + 3.0 * (cond_BV - uncond_BV)
    for top_p in (1.0, 0.5):
        ids = warp_and_sample_reference(
            cond_BV,
            uncond_BV,
            cfg_scale=3.0,
            temperature=1.7,
            top_k=1,
            top_p=top_p,
            uniform_BV=torch.rand(256, 50, generator=g),
        )
        assert torch.equal(ids, mixed_BV.argmax(-1))


def test_removed_entries_are_never_sampled():
    cond_BV, uncond_BV, g = _logits(1000, 30, seed=12)
    for warp in ({"top_k": 5}, {"top_p": 0.6}, {"top_k": 8, "top_p": 0.5}):
        l_BV = warp_logits(cond_BV, uncond_BV, cfg_scale=2.0, **warp)
        kept_BV = torch.isfinite(l_BV)
        assert (kept_BV.sum(-1) < 30).all()
        ids = warp_and_sample_reference(
            cond_BV, uncond_BV, cfg_scale=2.0, uniform_BV=torch.rand(1000, 30, generator=g), **warp
        )
        assert kept_BV.gather(1, ids[:, None]).all()
        if "top_p" not in warp:
            assert (kept_BV.sum(-1) == warp["top_k"]).all()  # continuous logits: no ties


def test_top_p_keeps_the_minimal_prefix():
    """Kept mass reaches top_p, and the kept set minus its least likely entry does not."""
    cond_BV, _, _ = _logits(500, 40, seed=13, guided=False)
    for top_p in (0.3, 0.8, 0.95):
        l_BV = warp_logits(cond_BV, temperature=0.9, top_p=top_p)
        kept_BV = torch.isfinite(l_BV)
        p_BV = torch.softmax(cond_BV.double() / 0.9, -1)
        mass_B = (p_BV * kept_BV).sum(-1)
        smallest_B = torch.where(kept_BV, p_BV, math.inf).amin(-1)
        assert (mass_B >= top_p - 1e-6).all()
        assert (mass_B - smallest_B < top_p + 1e-6).all()
    # A hand-worked row: probs 0.5, 0.3, 0.15, 0.05 (in shuffled order).
    l_14 = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    for top_p, kept in ((0.4, [1]), (0.7, [1, 3]), (0.9, [0, 1, 3]), (0.99, [0, 1, 2, 3])):
        assert torch.isfinite(warp_logits(l_14, top_p=top_p))[0].nonzero().flatten().tolist() == kept


def test_ties_at_thresholds_are_kept():
    l_15 = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0]])
    assert torch.isfinite(warp_logits(l_15, top_k=2))[0].tolist() == [True, True, True, True, False]
    flat_14 = torch.zeros(1, 4)
    assert torch.isfinite(warp_logits(flat_14, top_p=0.3)).all()  # one value: all or nothing


def test_cfg_1_with_uncond_equals_no_uncond():
    cond_BV, uncond_BV, g = _logits(64, 33, seed=14)
    warp = {"temperature": 0.8, "top_k": 10, "top_p": 0.9}
    assert torch.equal(warp_logits(cond_BV, uncond_BV, cfg_scale=1.0, **warp), warp_logits(cond_BV, **warp))
    u_BV = torch.rand(64, 33, generator=g)
    assert torch.equal(
        warp_and_sample_reference(cond_BV, uncond_BV, cfg_scale=1.0, uniform_BV=u_BV, **warp),
        warp_and_sample_reference(cond_BV, uniform_BV=u_BV, **warp),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_fp32(dtype):
    cond_BV, uncond_BV, g = _logits(16, 20, seed=15, dtype=dtype)
    u_BV = torch.rand(16, 20, generator=g)
    warp = {"cfg_scale": 2.0, "top_k": 6, "top_p": 0.9}
    l_BV = warp_logits(cond_BV, uncond_BV, **warp)
    assert l_BV.dtype == torch.float32
    assert torch.equal(l_BV, warp_logits(cond_BV.float(), uncond_BV.float(), **warp))
    assert torch.equal(
        warp_and_sample_reference(cond_BV, uncond_BV, uniform_BV=u_BV, **warp),
        warp_and_sample_reference(cond_BV.float(), uncond_BV.float(), uniform_BV=u_BV, **warp),
    )


def test_warped_probs_and_gumbel_are_well_formed():
    cond_BV, _, _ = _logits(8, 12, seed=16, guided=False)
    p_BV = warped_probs(cond_BV, top_k=4, top_p=0.9)
    assert torch.allclose(p_BV.sum(-1), torch.ones(8))
    assert torch.equal(p_BV > 0, torch.isfinite(warp_logits(cond_BV, top_k=4, top_p=0.9)))
    g_4 = gumbel_from_uniform(torch.tensor([0.0, 1e-30, 1.0 - U_EPS, 1.0]))
    assert torch.isfinite(g_4).all() and g_4[0] == g_4[1] and g_4[2] == g_4[3]


def test_inputs_are_not_modified():
    cond_BV, uncond_BV, g = _logits(4, 10, seed=17)
    before = (cond_BV.clone(), uncond_BV.clone())
    warp_and_sample(cond_BV, uncond_BV, cfg_scale=2.0, top_k=3, uniform_BV=torch.rand(4, 10), backend="torch")
    assert torch.equal(cond_BV, before[0]) and torch.equal(uncond_BV, before[1])


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": 0.0},
        {"temperature": -1.0},
        {"top_k": -1},
        {"top_k": 2.5},
        {"top_p": 0.0},
        {"top_p": 1.5},
    ],
)
def test_invalid_parameters_raise(bad):
    cond_BV, _, _ = _logits(2, 8, seed=18, guided=False)
    with pytest.raises(ValueError):
        warp_and_sample(cond_BV, uniform_BV=torch.rand(2, 8), backend="torch", **bad)


def test_invalid_shapes_raise():
    cond_BV, _, _ = _logits(2, 8, seed=19, guided=False)
    with pytest.raises(ValueError, match="uniform_BV"):
        warp_and_sample_reference(cond_BV, uniform_BV=torch.rand(2, 9))
    with pytest.raises(ValueError, match="logits_uncond_BV"):
        warp_logits(cond_BV, torch.zeros(3, 8), cfg_scale=2.0)
    with pytest.raises(ValueError, match="logits_cond_BV"):
        warp_logits(cond_BV[0])


# ---------------------------------------------------------------- dispatcher


def test_backend_for_reads_the_env_at_call_time(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert dispatch.backend_for(x, None) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dispatch.backend_for(x) == "torch"
    for on in ("1", "true", "ON"):
        monkeypatch.setenv("TRITON_INTERPRET", on)
        assert dispatch.backend_for(x, None, x) == ("interpret" if dispatch.TRITON_AVAILABLE else "torch")
    assert dispatch.backend_for(torch.zeros(2, device="meta")) == "torch"


def test_backend_for_override():
    x = torch.zeros(2, 3)
    assert dispatch.backend_for(x, backend="torch") == "torch"
    if dispatch.TRITON_AVAILABLE:
        assert dispatch.backend_for(x, backend="interpret") == "interpret"
        assert dispatch.backend_for(x, backend="triton") == "triton"
    with pytest.raises(ValueError, match="backend"):
        dispatch.backend_for(x, backend="cuda")


def test_auto_backend_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cond_BV, uncond_BV, g = _logits(4, 10, seed=20)
    u_BV = torch.rand(4, 10, generator=g)
    assert torch.equal(
        warp_and_sample(cond_BV, uncond_BV, cfg_scale=2.0, top_p=0.7, uniform_BV=u_BV),
        warp_and_sample_reference(cond_BV, uncond_BV, cfg_scale=2.0, top_p=0.7, uniform_BV=u_BV),
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_plain_sampling_shortcut_equals_the_general_formula(temperature, dtype):
    """No top-k/top-p/guidance: the reference's shortcut draws argmax(warp_logits + Gumbel) and
    leaves its inputs untouched."""
    g = torch.Generator().manual_seed(0)
    B, V = 256, 300
    cond = (3 * torch.randn(B, V, generator=g)).to(dtype)
    uncond = torch.randn(B, V, generator=g).to(dtype)
    u = torch.rand(B, V, generator=g)
    u[0, :7], u[1, :7] = 0.0, 1.0 - U_EPS  # clamped ends
    u_copy, cond_copy = u.clone(), cond.clone()
    general = (warp_logits(cond, temperature=temperature) + gumbel_from_uniform(u)).argmax(-1)  # (B,)
    for unc in (None, uncond):  # cfg_scale 1 ignores the unconditional logits
        ids = warp_and_sample_reference(cond, unc, cfg_scale=1.0, temperature=temperature, uniform_BV=u)
        assert torch.equal(ids, general)
    assert torch.equal(u, u_copy) and torch.equal(cond, cond_copy)
