"""The fused logits warper inside the AR sampler: the interpreted Triton kernel and the
torch reference draw the same tokens from the same generator."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from vargen.models.ar import ARConfig, ARTransformer  # noqa: E402
from vargen.sampling.decoders.ar import sample_ar  # noqa: E402

pytest.importorskip("triton")


def test_sampler_tokens_equal_under_interpreter_and_reference(monkeypatch):
    torch.manual_seed(0)
    m = ARTransformer(ARConfig(vocab_size=20, grid=[2, 3], num_classes=3, dim=32, depth=1, heads=2)).eval()
    cond = torch.tensor([0, 1, 2])
    kw = dict(cfg_scale=2.0, temperature=0.8, top_k=6, top_p=0.9)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    a, _ = sample_ar(m, cond, generator=torch.Generator().manual_seed(3), **kw)
    monkeypatch.delenv("TRITON_INTERPRET")
    b, _ = sample_ar(m, cond, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)
