"""Toy models and input builders several test files share (one definition each).

The enumerable table AR model lives in the library (:class:`vargen.models.toy_ar.ToyAR`): a
benchmark measures on it too, and benchmarks do not import from tests.
"""

from __future__ import annotations

import torch

from vargen.models.ar import ARConfig, ARTransformer
from vargen.models.tarflow import TarFlow, TarFlowConfig

LLAMAGEN_VOCAB, LLAMAGEN_GRID, LLAMAGEN_CLASSES = 24, [3, 4], 3


class ScriptedClock:
    """A clock for measured-cost calibrations, read in pairs (before, after a candidate): each
    pair spans the next scripted duration."""

    def __init__(self, durations):
        self.durations, self.t, self.reads = list(durations), 0.0, 0

    def __call__(self):
        self.reads += 1
        if self.reads % 2 == 0:
            self.t += self.durations.pop(0)
        return self.t


def tiny_llamagen(seed, dim=16, depth=2):
    """A float64 llamagen (V=24, 3x4 grid, 3 classes) with N(0, 0.4) weights: larger than the
    init, so its conditionals are peaked and varied (drafts are accepted at varied rates)."""
    torch.manual_seed(seed)  # weight init uses the global RNG (test data only)
    cfg = ARConfig(
        vocab_size=LLAMAGEN_VOCAB,
        grid=LLAMAGEN_GRID,
        num_classes=LLAMAGEN_CLASSES,
        dim=dim,
        depth=depth,
        heads=2,
    )
    m = ARTransformer(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.4)
    return m.double().eval()


def tiny_tarflow(std=0.1, blocks=2, seed=0, dtype=torch.float64):
    """A TarFlow on 1x8x8 images (3 classes, width 16, one layer per block); ``std`` > 0 draws the
    output projections from N(0, std) so every block transforms its input."""
    torch.manual_seed(seed)
    cfg = TarFlowConfig(
        channels=1, resolution=8, num_classes=3, dim=16, layers_per_block=1, num_blocks=blocks, heads=2
    )
    m = TarFlow(cfg).to(dtype).eval()
    if std > 0:
        m.init_output_(std, torch.Generator().manual_seed(seed + 1))
    return m


def verify_case(B, W, V, seed, zero_frac=0.3, q_equals_p=False, room=None, levels=0):
    """Inputs of the speculative verify kernels: target rows p (B, W, V) with ~``zero_frac``
    zero-probability tokens (``levels`` > 0: probabilities on a few levels, so ranks tie and the
    id order decides), draft rows q (B, W-1, V), drafts x ~ q, room per row and the uniforms."""
    g = torch.Generator().manual_seed(seed)
    logits_BWV = (
        torch.randint(0, levels, (B, W, V), generator=g).float()
        if levels
        else 2 * torch.randn(B, W, V, generator=g)
    )
    p_BWV = torch.softmax(logits_BWV, -1) * (torch.rand(B, W, V, generator=g) >= zero_frac)
    p_BWV[..., 0] += 1e-3  # never a whole row of zeros
    p_BWV = p_BWV / p_BWV.sum(-1, keepdim=True)
    q_BgV = (
        p_BWV[:, : W - 1].clone() if q_equals_p else torch.softmax(torch.randn(B, W - 1, V, generator=g), -1)
    )
    x_Bg = (
        torch.multinomial(q_BgV.reshape(-1, V), 1, generator=g).view(B, W - 1) if W > 1 else torch.zeros(B, 0)
    )
    room_B = torch.randint(0, W + 2, (B,), generator=g) if room is None else torch.full((B,), room)
    draws = (
        torch.rand(B, W, V, generator=g),
        torch.rand(B, W - 1, generator=g),
        torch.rand(B, V, generator=g),
    )
    return p_BWV, q_BgV, x_Bg.long(), room_B, *draws
