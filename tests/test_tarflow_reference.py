"""TarFlow against apple/ml-tarflow (issue 20): the same random weights in both, equal outputs.

Two references:

- a restatement of the reference's MetaBlock written from its code (einsum attention with
  ``sqrt_scale`` on q and k, scores divided by ``attn_temp``, no norm before ``proj_out``,
  shift right, the naive reverse that recomputes the prefix per token with an annealed guided
  stream at ``attn_temp``); always runs;
- the reference's own ``transformer_flow.py`` (pure torch, no network), when
  ``VARGEN_TARFLOW_REF`` names a copy of it, e.g.
  ``git -C <clone of apple/ml-tarflow> show 313120e:transformer_flow.py > /tmp/ref/transformer_flow.py``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import replace

import pytest
import torch

from vargen.models.tarflow import TarFlow, TarFlowConfig
from vargen.sampling.decoders import tarflow as ts

T, CP, D, HEADS = 16, 4, 16, 2  # 8x8 gray images in 2x2 patches


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # conftest: tiny tensors, one intra-op thread
    yield


def flow(dtype=torch.float64, blocks=2, seed=0, scale=0.3):
    """A random flow; every parameter (LayerNorm affines too) drawn with std ``scale``, proj_out
    with std 0.05 (non-zero: a coupled flow)."""
    torch.manual_seed(seed)
    cfg = TarFlowConfig(
        channels=1,
        resolution=8,
        num_classes=3,
        dim=D,
        layers_per_block=2,
        num_blocks=blocks,
        heads=HEADS,
    )  # the default architecture
    m = TarFlow(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            std = 0.05 if "proj_out" in name else scale
            base = 1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g, dtype=dtype))
    return m


def inputs(B=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, CP, generator=g, dtype=dtype), torch.tensor([0, 2, 1])[:B]


# ------------------------------------------------------------ restatement of the reference
def _ln(mod, x):
    return torch.nn.functional.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)


def ref_params(block, u_BTC, class_BD, attn_temp=1.0):
    """The reference MetaBlock's pre-shift output (a, b) for inputs u (permuted order, causal)."""
    B, L, _ = u_BTC.shape
    pos = block.pos_emb.flip(0) if block.flip else block.pos_emb
    x = u_BTC @ block.proj_in.weight.T + block.proj_in.bias + pos[:L] + class_BD[:, None]
    H, d = block.heads, block.head_dim
    s = d**-0.25
    mask = torch.tril(torch.ones(L, L, dtype=torch.bool))
    for layer in block.layers:
        h = _ln(layer.norm1, x)
        q, k, v = (h @ layer.qkv.weight.T + layer.qkv.bias).reshape(B, L, 3 * H, d).chunk(3, dim=2)
        att = torch.einsum("bmhd,bnhd->bmnh", q * s, k * s) / attn_temp
        att = att.masked_fill(~mask[None, :, :, None], float("-inf")).softmax(dim=-2)
        y = torch.einsum("bmnh,bnhd->bmhd", att, v).reshape(B, L, H * d)
        x = x + y @ layer.proj.weight.T + layer.proj.bias
        mlp = layer.mlp
        h = _ln(layer.norm2, x) @ mlp[0].weight.T + mlp[0].bias
        x = x + torch.nn.functional.gelu(h) @ mlp[2].weight.T + mlp[2].bias
    o = x @ block.proj_out.weight.T + block.proj_out.bias  # straight from the residual stream
    o = torch.cat([torch.zeros_like(o[:, :1]), o[:, :-1]], dim=1)  # shift right by one
    return o.chunk(2, dim=-1)


def ref_forward(block, x_BTC, labels_B):
    u = block.permute(x_BTC)
    a, b = ref_params(block, u, block.class_emb[labels_B])
    return block.permute((u - b) * torch.exp(-a)), -a.mean(dim=(1, 2))


def ref_reverse(block, z_BTC, labels_B, w=0.0, attn_temp=1.0):
    """Naive guided reverse: every token recomputes the prefix; the unguided stream uses the
    mean class embedding and ``attn_temp``; g_i = i / (T - 1) w (annealed)."""
    u = block.permute(z_BTC).clone()
    null = block.class_emb.mean(0, keepdim=True).expand(u.shape[0], -1)
    for i in range(1, T):
        a, b = ref_params(block, u, block.class_emb[labels_B])
        if w > 0:
            a_u, b_u = ref_params(block, u, null, attn_temp)
            g = i / (T - 1) * w
            a, b = a + g * (a - a_u), b + g * (b - b_u)
        u[:, i] = u[:, i] * torch.exp(a[:, i]) + b[:, i]
    return block.permute(u)


def test_forward_equals_the_reference_block_and_the_final_norm_is_the_difference():
    x, c = inputs()
    m = flow()
    assert not any("norm." in k for k in m.state_dict() if ".layers." not in k)  # no extra norm
    for block in m.blocks:
        z, ld = block(x, c)
        z_ref, ld_ref = ref_forward(block, x, c)
        assert (z - z_ref).abs().max() < 1e-12 and (ld - ld_ref).abs().max() < 1e-12
    normed = TarFlow(replace(m.cfg, final_norm=True)).to(torch.float64)  # + vargen's former LayerNorm
    missing, _ = normed.load_state_dict(m.state_dict(), strict=False)
    assert sorted(missing) == [
        "blocks.0.norm.bias",
        "blocks.0.norm.weight",
        "blocks.1.norm.bias",
        "blocks.1.norm.weight",
    ]
    assert (normed.blocks[0](x, c)[0] - ref_forward(m.blocks[0], x, c)[0]).abs().max() > 1e-2


@pytest.mark.parametrize("method", ["sequential", "jacobi", "gs_jacobi"])
@pytest.mark.parametrize("w,attn_temp", [(0.0, 1.0), (1.5, 1.0), (1.5, 0.5), (0.8, 2.0)])
def test_guided_reverse_with_attn_temp_equals_the_reference(method, w, attn_temp):
    m = flow()
    x, c = inputs()
    block = m.blocks[1]
    z, _ = block(x, c)
    ref = ref_reverse(block, z, c, w, attn_temp)
    guidance = w if w > 0 else None
    plans = [ts.BlockPlan(method, 4 if method == "gs_jacobi" else 1)]
    out, _ = ts.invert_tarflow(
        TarFlowStack([block]), z, c, plans, tol=0.0, guidance=guidance, attn_temp=attn_temp
    )
    assert (out - ref).abs().max() < 1e-12
    if w == 0:
        assert (out - x).abs().max() < 1e-12  # unguided: the exact inverse
    if attn_temp != 1.0:  # the temperature does reach the unguided stream
        plain = ref_reverse(block, z, c, w, 1.0)
        assert (ref - plain).abs().max() > 1e-4


def test_continuous_jacobi_passes_attn_temp():
    m = flow(blocks=2)
    c = torch.tensor([0, 1, 2, 3, 1])
    kw = dict(cfg_scale=2.0, attn_temp=0.5)
    ref, _ = ts.sample_tarflow(m, c, generator=torch.Generator().manual_seed(0), denoise=False, **kw)
    out, _ = ts.sample_tarflow_continuous(
        m, c, generator=torch.Generator().manual_seed(0), slots=2, tol=0.0, denoise=False, **kw
    )
    assert (out - ref).abs().max() < 1e-12
    plain, _ = ts.sample_tarflow(
        m, c, generator=torch.Generator().manual_seed(0), denoise=False, cfg_scale=2.0
    )
    assert (plain - ref).abs().max() > 1e-4


def test_fp32_inverse_of_forward_is_exact_to_1e6():
    m = flow(dtype=torch.float32, blocks=3, scale=0.1)
    x, c = inputs(dtype=torch.float32)
    z, _ = m(x, c)
    assert (z - x).abs().max() > 1e-2
    for method in ("sequential", "jacobi"):
        xr, _ = ts.invert_tarflow(m, z, c, [ts.BlockPlan(method)] * 3, tol=0.0)
        assert (xr - x).abs().max() < 1e-6, method


def test_crm_igm_as_the_gs_jacobi_reference():
    """encoreus/GS-Jacobi_for_TarFlow detect mode, ``--norm 2``: the flow runs with the null
    class (y=None), CRM and IGM take spectral norms of (T, C) and weight matrices."""
    m = flow(blocks=2)
    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    met = ts.crm_igm(m, images)
    x = m.to_tokens(images)
    spec = lambda A: torch.linalg.matrix_norm(A, 2)  # noqa: E731
    for j, block in enumerate(m.blocks):
        u = block.permute(x)
        null = block.class_emb.mean(0, keepdim=True).expand(u.shape[0], -1)
        a, b = ref_params(block, u, null)
        z = (u - b) * torch.exp(-a)
        W = block.proj_out.weight
        crm = spec((torch.exp(-a) * u).mean(0)) * spec(W[:CP]) + spec(W[CP:])
        zero = torch.cat([u[:, :1], torch.zeros_like(u[:, 1:])], dim=1)
        igm = []
        for init in (z, zero):
            a0, b0 = ref_params(block, init, null)
            igm.append(spec((z * torch.exp(a0) + b0 - u).mean(0)))
        got = [met["crm"][j], met["igm_z"][j], met["igm_zero"][j]]
        for g, want in zip(got, [crm, *igm]):
            assert abs(g.item() - want.item()) < 1e-5 * want.item(), j
        x = block.permute(z)


class TarFlowStack(torch.nn.Module):
    """One block as a flow (invert_tarflow walks ``blocks`` in reverse)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)


# ------------------------------------------------------------ the reference's own code
REF = os.environ.get("VARGEN_TARFLOW_REF", "")


def _reference_module():
    spec = importlib.util.spec_from_file_location("ref_transformer_flow", REF)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _copy_into_reference(block, rb):
    """vargen FlowBlock weights -> the reference MetaBlock (same layout, renamed)."""
    with torch.no_grad():
        rb.proj_in.load_state_dict(block.proj_in.state_dict())
        rb.pos_embed.copy_(block.pos_emb)
        rb.class_embed.copy_(block.class_emb[:, None])
        for layer, rl in zip(block.layers, rb.attn_blocks):
            rl.attention.norm.load_state_dict(layer.norm1.state_dict())
            rl.attention.qkv.load_state_dict(layer.qkv.state_dict())
            rl.attention.proj.load_state_dict(layer.proj.state_dict())
            rl.mlp.norm.load_state_dict(layer.norm2.state_dict())
            rl.mlp.main[0].load_state_dict(layer.mlp[0].state_dict())
            rl.mlp.main[2].load_state_dict(layer.mlp[2].state_dict())
        rb.proj_out.load_state_dict(block.proj_out.state_dict())


@pytest.mark.skipif(not os.path.isfile(REF), reason="VARGEN_TARFLOW_REF names no copy of transformer_flow.py")
def test_equals_apple_ml_tarflow_with_copied_weights():
    """fp32 only: the reference runs its LayerNorms in float32 whatever the weights' dtype."""
    dtype, tol = torch.float32, 4e-6  # forward: |z| up to ~5, a few float32 ulps
    ref = _reference_module()
    m = flow(dtype=dtype)
    x, c = inputs(dtype=dtype)
    for i, block in enumerate(m.blocks):
        perm = ref.PermutationFlip(T) if block.flip else ref.PermutationIdentity(T)
        rb = ref.MetaBlock(CP, D, T, perm, num_layers=2, head_dim=D // HEADS, num_classes=3).to(dtype)
        _copy_into_reference(block, rb)
        rb.eval()
        with torch.no_grad():
            z_ref, ld_ref = rb(x, c)
            z, ld = block(x, c)
            assert (z - z_ref).abs().max() < tol and (ld - ld_ref).abs().max() < tol, i
            for w, temp in [(0.0, 1.0), (1.5, 1.0), (1.5, 0.5), (0.8, 1.3)]:
                x_ref = rb.reverse(z.clone(), c, guidance=w, attn_temp=temp, annealed_guidance=True)
                out, _ = ts.invert_tarflow(
                    TarFlowStack([block]), z, c, [ts.BlockPlan()], guidance=w or None, attn_temp=temp
                )
                diff = (out - x_ref).abs().max().item()
                if temp == 1.0:
                    assert diff == 0.0, (i, w, diff)  # the KV-cached inverse, bit for bit
                else:
                    assert diff < tol, (i, w, diff)  # q / temp vs scale / temp: rounding apart
