"""CTF and Token-Shuffle trained by the generator task on the shared tiny VQ and sampled through sample.py."""

import json

import numpy as np
import pytest
import torch

from .conftest import task_config


@pytest.mark.parametrize("model", [{"name": "ctf", "num_coarse": 8}, {"name": "token_shuffle", "window": 2}])
def test_train_and_sample(trained_pipeline, tmp_path, model):
    import sample
    from vargen.checkpoint import load_component
    from vargen.train.tasks import run

    torch.manual_seed(0)
    cfg = task_config(
        "generator",
        tmp_path / model["name"],
        dict(steps=40, batch_size=32, lr=3e-3, log_every=10),
        tokenizer_ckpt=str(trained_pipeline["vq"]),
        model={**model, "dim": 32, "depth": 1, "heads": 2},
    )
    run(cfg, log=lambda m: None)
    losses = [
        json.loads(line)["loss"] for line in open(tmp_path / model["name"] / "log.jsonl") if "loss" in line
    ]
    assert losses[-1] < losses[0]
    out = tmp_path / "samples"
    assert (
        sample.main(
            ["--ckpt", str(tmp_path / model["name"]), f"out={out}", "num_samples=8", "progress=false"]
        )
        == 0
    )
    ids = np.load(out / "samples.npz")["ids"]
    assert ids.shape == (8, 16)
    if model["name"] == "ctf":
        loaded, _ = load_component(str(tmp_path / "ctf"), torch.device("cpu"))
        assert (loaded.coarse_of > 0).any()  # the k-means labels travel with the checkpoint
        metrics = json.load(open(out / "metrics.json"))
        assert metrics["stats.target_forwards"] == 17
