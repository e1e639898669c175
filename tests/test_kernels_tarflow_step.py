"""The fused TarFlow Jacobi step: Triton kernel (CPU interpreter) vs the torch reference."""

import os

# Must precede the first `import triton` (vargen_kernels imports it): see vargen_kernels.dispatch.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from vargen_kernels import dispatch  # noqa: E402
from vargen_kernels.tarflow_step import tarflow_step, tarflow_step_reference  # noqa: E402


@pytest.fixture
def interpreter():
    pytest.importorskip("triton")
    if not dispatch.interpret_requested():
        pytest.skip("TRITON_INTERPRET is off, so the kernel cannot run on CPU")


def _case(shape, seed):
    g = torch.Generator().manual_seed(seed)
    z, a, b = (torch.randn(shape, generator=g) for _ in range(3))
    old = (
        z * torch.exp(a) + b + 0.1 * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) > 0.5)
    )
    return z, a, b, old


@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 5, 48), (70, 7)])
@pytest.mark.parametrize("clamp", [None, 1.5])
def test_kernel_matches_reference(interpreter, shape, clamp):
    """Rows of one token to many programs' worth; unchanged tokens (moved = 0) and clamped ones."""
    args = _case(shape, seed=shape[-1])
    new_r, moved_r = tarflow_step_reference(*args, clamp)
    new_k, moved_k = tarflow_step(*args, clamp, backend="interpret")
    assert new_k.shape == new_r.shape and moved_k.shape == moved_r.shape == shape[:-1]
    torch.testing.assert_close(new_k, new_r, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(moved_k, moved_r, rtol=2e-6, atol=4e-6)
    if clamp is not None:
        assert new_k.abs().max() <= clamp
        assert new_r.numel() < 10 or (new_r.abs() == clamp).any()  # the clamp was exercised


def test_kernel_strided_inputs_and_empty(interpreter):
    z, a, b, old = _case((3, 6, 5), seed=1)
    view = [t[:, ::2] for t in (z, a, b, old)]  # (3, 3, 5) non-contiguous
    torch.testing.assert_close(
        tarflow_step(*view, backend="interpret")[1], tarflow_step_reference(*view)[1], rtol=2e-6, atol=4e-6
    )
    new, moved = tarflow_step(*(t[:0] for t in (z, a, b, old)), backend="interpret")
    assert new.shape == (0, 6, 5) and moved.shape == (0, 6)
    with pytest.raises(ValueError, match="old"):
        tarflow_step(z, a, b, old[:, :1], backend="torch")


def test_kernel_float64_is_exact_to_fp64_rounding(interpreter):
    """TarFlow's exactness tests run in fp64: the kernel must not round through fp32."""
    args = tuple(t.double() for t in _case((4, 6, 5), seed=2))
    new_k, moved_k = tarflow_step(*args, 2.0, backend="interpret")
    new_r, moved_r = tarflow_step_reference(*args, 2.0)
    assert new_k.dtype == moved_k.dtype == torch.float64
    torch.testing.assert_close(new_k, new_r, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(moved_k, moved_r, rtol=1e-14, atol=1e-14)


def test_continuous_sampler_equal_under_interpreter_and_reference(interpreter):
    """sample_tarflow_continuous (refilling slots, guidance, a tolerance) gives the same images and
    passes with the interpreted step as with the reference."""
    from tests.toys import tiny_tarflow
    from vargen.sampling.decoders import tarflow as ts

    m = tiny_tarflow(std=0.1, blocks=1)
    c = torch.tensor([0, 1, 3])
    out = {}
    for backend in ("interpret", "torch"):
        kw = dict(slots=2, window=4, tol=1e-6, cfg_scale=1.5, backend=backend)
        out[backend] = ts.sample_tarflow_continuous(m, c, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(out["interpret"][0], out["torch"][0], rtol=1e-12, atol=1e-12)
    assert out["interpret"][1]["passes_per_block"] == out["torch"][1]["passes_per_block"]
