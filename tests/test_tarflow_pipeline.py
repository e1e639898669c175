"""TarFlow end to end on digits: trained through the pixel_generator task, sampled by the
sequential and GS-Jacobi inverses, scored by FID."""

import pytest
import torch

from vargen.checkpoint import load_component
from vargen.eval import FIDEvaluator
from vargen.models.tarflow import TarFlow
from vargen.sampling.decoders.tarflow import sample_tarflow
from vargen.sampling.generate import class_labels
from vargen.train.tasks import run

from .conftest import DIGITS, task_config


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    out = tmp_path_factory.mktemp("tarflow")
    cfg = task_config(
        "pixel_generator",
        out,
        dict(steps=250, batch_size=64, lr=2e-3),
        model={"name": "tarflow", "dim": 48, "layers_per_block": 1, "num_blocks": 4, "heads": 4},
    )
    run(cfg, log=lambda m: None)
    model, _ = load_component(str(out))
    return model


def test_trained_flow_scores_far_below_untrained(flow):
    ev = FIDEvaluator.for_dataset(DIGITS, split="train")
    labels = class_labels(300, flow.num_classes, [])
    trained, stats = sample_tarflow(flow, labels, generator=torch.Generator().manual_seed(0), cfg_scale=1.5)
    untrained = TarFlow(flow.cfg).eval()  # zero-initialised output: the identity flow
    noise, _ = sample_tarflow(untrained, labels, generator=torch.Generator().manual_seed(0))
    fid_trained, fid_untrained = ev.score(trained), ev.score(noise)
    assert stats["target_forwards"] == stats["baseline_passes"]  # sequential: blocks x (T - 1)
    assert fid_trained * 2 < fid_untrained, (fid_trained, fid_untrained)


def test_gs_jacobi_matches_sequential_on_the_trained_flow(flow):
    labels = class_labels(16, flow.num_classes, [])
    kw = dict(cfg_scale=1.5, tol=0.0)  # tol 0: iterate to the exactness guarantee
    seq, s_seq = sample_tarflow(flow, labels, generator=torch.Generator().manual_seed(1), **kw)
    gsj, s_gsj = sample_tarflow(
        flow, labels, generator=torch.Generator().manual_seed(1), method="gs_jacobi", segments=4, **kw
    )
    assert (seq - gsj).abs().max() < 1e-4
    assert all(it <= 16 * 4 for it in s_gsj["iterations_per_block"])
