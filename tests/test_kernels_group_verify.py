"""The fused GSD group-exact verification: Triton kernel (CPU interpreter) vs the torch
reference, which is the sampler's rank partition, group ratio and group residual."""

import os

# Must precede the first `import triton` (vargen_kernels imports it): see vargen_kernels.dispatch.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.toys import verify_case  # noqa: E402
from vargen_kernels import dispatch  # noqa: E402
from vargen_kernels.group_verify import (  # noqa: E402
    group_residual,
    group_verify,
    group_verify_reference,
    partition_ratio,
    rank_block_ratio,
    rank_partition,
)


@pytest.fixture
def interpreter():
    pytest.importorskip("triton")
    if not dispatch.interpret_requested():
        pytest.skip("TRITON_INTERPRET is off, so the kernel cannot run on CPU")


def _check(args, group):
    ref = group_verify_reference(*args, group=group)
    ker = group_verify(*args, group=group, backend="interpret")
    for name, r, k in zip(("n", "z", "y", "cap"), ref, ker):
        assert k.dtype == torch.int64 and k.shape == r.shape, name
        assert torch.equal(k, r), (name, k, r)
    return ref


@pytest.mark.parametrize("group,B,W,V", [(1, 1, 4, 16), (2, 4, 3, 13), (3, 3, 3, 13), (5, 1, 4, 16)])
def test_kernel_matches_reference(interpreter, group, B, W, V):
    _check(verify_case(B, W, V, seed=group * 100 + V, room=W + 1), group)


def test_kernel_ties_ragged_rooms_and_whole_vocab_group(interpreter):
    """Probabilities on 3 levels (rank ties broken by id), rooms 0 .. W+1, a group >= V."""
    _check(verify_case(4, 3, 11, seed=1, levels=3), 2)
    _check(verify_case(3, 3, 9, seed=2, levels=2, zero_frac=0.5), 4)
    _check(verify_case(1, 3, 6, seed=3), 10)


def test_kernel_all_accepted_all_rejected_and_empty_window(interpreter):
    """q = p accepts every draft; drafts with p(x) = 0 (ratio 0) are rejected and the group
    residual never emits a zero-probability token; W = 1 emits y_0; B = 0."""
    n, z, y, cap = _check(verify_case(3, 4, 12, seed=4, q_equals_p=True, room=9), 3)
    assert torch.equal(n, cap) and torch.equal(z, y[:, 3])
    p_BWV, q_BgV, x_Bg, *rest = verify_case(3, 3, 12, seed=5, room=9)
    x_Bg[:, 0] = (p_BWV[:, 0] == 0).float().argmax(-1)
    n, z, *_ = _check((p_BWV, q_BgV, x_Bg, *rest), 2)
    assert (n == 0).all() and (p_BWV[:, 0].gather(1, z[:, None]) > 0).all()
    res = group_residual(p_BWV[:, 0], q_BgV[:, 0], rank_partition(p_BWV[:, 0], 2))
    assert (res.gather(1, z[:, None]) > 0).all()
    n, z, y, cap = _check(verify_case(2, 1, 8, seed=6, room=5), 2)
    assert (n == 0).all() and torch.equal(z, y[:, 0])
    assert all(
        t.shape[0] == 0 for t in group_verify(*verify_case(0, 3, 5, seed=7), group=2, backend="interpret")
    )


def test_kernel_residual_draws(interpreter, group=3):
    """Uniforms at 1 - 2**-24 reject every draft whose group ratio is below one, so most rows
    emit a group-residual draw: those must match the reference token for token."""
    p_BWV, q_BgV, x_Bg, room_B, u_BWV, a_Bg, u_res_BV = verify_case(24, 2, 16, seed=13, room=5)
    n, z, *_ = _check((p_BWV, q_BgV, x_Bg, room_B, u_BWV, torch.full_like(a_Bg, 1 - 2**-24), u_res_BV), group)
    assert (n == 0).sum() >= 12
    res = group_residual(p_BWV[:, 0], q_BgV[:, 0], rank_partition(p_BWV[:, 0], group))
    assert (res.gather(1, z[:, None])[n == 0] > 0).all()


def _double_argsort_partition(p_XV, group):
    """The partition as it was first written: ranks from two stable argsorts (frozen here)."""
    V = p_XV.shape[-1]
    rank = p_XV.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1, stable=True)
    return torch.where(p_XV > 0, rank // min(group, V), torch.full_like(rank, V))


@pytest.mark.parametrize("levels,zero_frac", [(0, 0.3), (3, 0.3), (2, 0.6), (0, 0.0)])
def test_block_ratio_is_the_partition_ratio_bit_for_bit(levels, zero_frac):
    """The sort-free block ratio adds the same members in the same (id) order as scatter_add
    over the whole partition: equal floats for drafts at every rank (every token as a draft),
    rank ties, zero-probability tokens, a last block cut short by V and groups >= V."""
    V = 23
    p_BWV, q_BgV, *_ = verify_case(
        2, 4, V, seed=levels * 10 + int(zero_frac * 10), zero_frac=zero_frac, levels=levels
    )
    p_XV = p_BWV.reshape(-1, 1, V).expand(-1, V, V)  # (rows, V, V): row r's p for every draft
    q_XV = torch.cat([q_BgV, p_BWV[:, :1]], 1).reshape(-1, 1, V).expand(-1, V, V)
    x_XV = torch.arange(V).expand(p_XV.shape[0], V)  # draft = every token
    for group in (1, 2, 4, 5, 22, 23, 30):
        part = _double_argsort_partition(p_XV, group)
        assert torch.equal(rank_partition(p_XV, group), part)
        want = partition_ratio(p_XV, q_XV, x_XV, part)
        assert torch.equal(rank_block_ratio(p_XV, q_XV, x_XV, group), want), group
