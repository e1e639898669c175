"""The fused FKC-CFG weight update: Triton kernel (CPU interpreter) vs the torch reference, and
the reference vs the sampler's own increment / ESS / resampling functions, draw for draw."""

import os

# Must precede the first `import triton` (vargen_kernels imports it): see vargen_kernels.dispatch.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from vargen.diffusion.analytic import GaussianMixtureDenoiser  # noqa: E402
from vargen.diffusion.fkc import cfg_ancestral_increment, ess, fkc_cfg_ddpm, resample_groups  # noqa: E402
from vargen.diffusion.schedules import linear_alphas_cumprod  # noqa: E402
from vargen_kernels import dispatch  # noqa: E402
from vargen_kernels.fkc import fkc_update, fkc_update_reference  # noqa: E402

STEP = dict(w=3.0, a_t=0.4, a_n=0.55)
ABAR = linear_alphas_cumprod()


@pytest.fixture
def interpreter():
    pytest.importorskip("triton")
    if not dispatch.interpret_requested():
        pytest.skip("TRITON_INTERPRET is off, so the kernel cannot run on CPU")


def _case(G, K, seed, shape=(2, 3, 3), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    log_w = torch.randn(G, K, generator=g, dtype=torch.float64)
    eps_c = torch.randn(G * K, *shape, generator=g, dtype=torch.float64).to(dtype)
    eps_u = (eps_c.double() + 0.3 * torch.randn(G * K, *shape, generator=g, dtype=torch.float64)).to(dtype)
    return log_w, eps_c, eps_u, torch.rand(G, generator=g, dtype=torch.float64)


def _check(log_w, eps_c=None, eps_u=None, **kw):
    ref = fkc_update_reference(log_w, eps_c, eps_u, **kw)
    ker = fkc_update(log_w, eps_c, eps_u, backend="interpret", **kw)
    torch.testing.assert_close(ker[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ker[1], ref[1], rtol=1e-12, atol=0)
    assert torch.equal(ker[2], ref[2])
    assert (ker[3] is None) == (ref[3] is None)
    if ref[3] is not None:
        assert torch.equal(ker[3], ref[3]), (ker[3], ref[3])
    return ref


@pytest.mark.parametrize("G,K", [(1, 1), (1, 5), (3, 4), (4, 7)])
@pytest.mark.parametrize("ess_threshold", [1.0, 0.6])
def test_kernel_matches_reference(interpreter, G, K, ess_threshold):
    log_w, eps_c, eps_u, u_G = _case(G, K, seed=G * 10 + K)
    _check(log_w, eps_c, eps_u, ess_threshold=ess_threshold, u_G=u_G, **STEP)
    _check(log_w, eps_c, eps_u, ess_threshold=ess_threshold, **STEP)  # weights and ESS only
    _check(log_w, ess_threshold=ess_threshold, u_G=u_G)  # resampling only (the final one)


def test_kernel_fp32_eps_long_rows_and_strided_input(interpreter):
    """fp32 eps upcast per element; D = 1200 spans two BLOCK_D chunks; a non-contiguous eps."""
    log_w, eps_c, eps_u, u_G = _case(2, 3, seed=1, shape=(3, 20, 20), dtype=torch.float32)
    _check(log_w, eps_c, eps_u, u_G=u_G, **STEP)
    _check(log_w, eps_c.transpose(2, 3), eps_u.transpose(2, 3), u_G=u_G, **STEP)


def test_kernel_degenerate_and_uniform_weights(interpreter):
    """One live particle (the others at -inf: zero weight) is every ancestor and ESS is 1; equal
    weights give each index once and ESS K; mixed groups resample only below kappa K."""
    lw = torch.tensor(
        [[float("-inf"), 2.0, float("-inf"), float("-inf")], [0.5] * 4, [0.0, 0.0, -30.0, -30.0]]
    )
    u_G = torch.tensor([0.999, 0.25, 0.5], dtype=torch.float64)
    out, ess_G, mask, idx = _check(lw.double(), u_G=u_G, ess_threshold=0.9)
    assert mask.tolist() == [True, False, True]
    assert idx[0].tolist() == [1, 1, 1, 1] and idx[1].tolist() == [4, 5, 6, 7]
    assert idx[2].tolist() == [8, 8, 9, 9]
    assert torch.allclose(ess_G[:2], torch.tensor([1.0, 4.0], dtype=torch.float64))
    assert out[0].eq(0).all() and out[1].eq(0.5).all()
    # positions k / 4 fall exactly on the CDF steps 1/4, 2/4, 3/4: searchsorted(right=True) goes past
    idx = _check(torch.zeros(1, 4, dtype=torch.float64), u_G=torch.zeros(1, dtype=torch.float64))[3]
    assert idx[0].tolist() == [0, 1, 2, 3]


def test_kernel_empty_batch_and_mode_mismatch(interpreter):
    out = fkc_update(torch.zeros(0, 3, dtype=torch.float64), u_G=torch.zeros(0), backend="interpret")
    assert out[0].shape == (0, 3) and out[3].shape == (0, 3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fkc_update(torch.zeros(1, 2, dtype=torch.float64), backend="triton")


def test_shape_errors():
    with pytest.raises(ValueError, match="float64"):
        fkc_update(torch.zeros(2, 3), backend="torch")
    with pytest.raises(ValueError, match="u_G"):
        fkc_update(torch.zeros(2, 3, dtype=torch.float64), u_G=torch.zeros(3), backend="torch")


@pytest.mark.parametrize("ess_threshold", [1.0, 0.7])
def test_reference_equals_the_samplers_functions(ess_threshold):
    """The reference is bit for bit the sampler's increment, ESS, mask and systematic resampling
    (which draws one float64 uniform per group)."""
    G, K = 5, 4
    log_w, eps_c, eps_u, _ = _case(G, K, seed=2)
    log_w = 3 * log_w
    new = log_w + cfg_ancestral_increment(eps_c, eps_u, STEP["w"], STEP["a_t"], STEP["a_n"]).view(G, K)
    ess_G = ess(new)
    mask = ess_G < ess_threshold * K if ess_threshold < 1 else torch.ones(G, dtype=torch.bool)
    assert 0 < mask.sum() <= G
    idx = resample_groups(new, torch.Generator().manual_seed(3), "systematic", mask)
    u_G = torch.rand(G, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out, ess_r, mask_r, idx_r = fkc_update_reference(
        log_w, eps_c, eps_u, ess_threshold=ess_threshold, u_G=u_G, **STEP
    )
    assert torch.equal(ess_r, ess_G) and torch.equal(mask_r, mask) and torch.equal(idx_r, idx)
    assert torch.equal(out, torch.where(mask[:, None], torch.zeros_like(new), new))


@pytest.mark.parametrize(
    "resampler,ess_threshold", [("systematic", 1.0), ("systematic", 0.95), ("multinomial", 0.95)]
)
def test_sampler_particles_equal_under_interpreter_and_reference(interpreter, resampler, ess_threshold):
    """fkc_cfg_ddpm on an exact Gaussian denoiser pair: the interpreted kernel and the reference
    resample alike and draw the same particles from the same generator."""
    cond = GaussianMixtureDenoiser([1.0], [1.0], [0.5], ABAR)
    unc = GaussianMixtureDenoiser([1.0], [0.0], [1.0], ABAR)
    stats = {}
    x = {}
    for backend in ("interpret", "torch"):
        x[backend], stats[backend] = fkc_cfg_ddpm(
            lambda x, t_B: (cond(x, t_B), unc(x, t_B)),
            (12, 2),
            4,
            ABAR,
            6,
            3.0,
            torch.Generator().manual_seed(5),
            resampler,
            ess_threshold,
            keep_all=True,
            backend=backend,
        )
    torch.testing.assert_close(x["interpret"], x["torch"], rtol=1e-12, atol=1e-12)
    assert stats["interpret"]["resamples"] == stats["torch"]["resamples"] > 0
