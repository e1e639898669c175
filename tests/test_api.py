"""The Python API (``vargen.load`` / ``Pipeline.sample`` / ``Pipeline.fid`` / ``vargen.train``):
the README's block runs as written from another working directory, and its images and FID
equal what ``sample.py`` writes for the same settings."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import ROOT


def _readme_block(heading: str) -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def small_feature_net(monkeypatch):
    """FID features from a 20-step digits classifier (cached under its own key), so this module
    does not pay the 600-step net; the FID code path is otherwise the real one."""
    from vargen.eval import feature_net, fid

    real = feature_net.get_feature_net
    monkeypatch.setattr(fid, "get_feature_net", lambda cfg, device="cpu": real(cfg, device, steps=20))


def test_readme_block_runs_from_any_folder_and_matches_sample_py(
    one_thread, tiny_gen, small_feature_net, tmp_path, monkeypatch, capsys
):
    import sample
    from vargen.io import to_uint8

    code = _readme_block("Python API")
    assert '"runs/digits_ar"' in code and '"steps": 300' in code
    code = code.replace('"runs/digits_ar"', repr(str(tiny_gen))).replace('"steps": 300', '"steps": 2')
    monkeypatch.chdir(tmp_path)  # no configs/ here: the shipped config is found by vargen.train
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    images, pipe = ns["images"], ns["pipe"]
    assert images.shape == (100, 1, 16, 16) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert ns["stats"]["target_forwards"] > 0
    assert ns["run_dir"] == str(tmp_path / "runs" / "my_vq")
    assert (tmp_path / "runs" / "my_vq" / "model.safetensors").is_file()

    # sample.py with the same seed, labels and sampler settings writes the same images and FID
    args = ["num_samples=100", "seed=1", "sampler.cfg_scale=2.0", "fid=true", "progress=false"]
    assert sample.main(["--ckpt", str(tiny_gen), f"out={tmp_path / 's'}", *args]) == 0
    assert np.array_equal(np.load(tmp_path / "s" / "samples.npz")["images"], to_uint8(images))
    fid = json.load(open(tmp_path / "s" / "metrics.json"))["fid"]
    assert pipe.fid(images) == pytest.approx(fid, rel=1e-5)

    first, _ = pipe.sample(labels=[3, 3, 5], sampler="gsd", seed=0, window=8, batch_size=2)
    args = [
        "classes=[3,3,5]",
        "num_samples=3",
        "batch_size=2",
        "seed=0",
        "sampler.name=gsd",
        "sampler.window=8",
    ]
    assert sample.main(["--ckpt", str(tiny_gen), f"out={tmp_path / 'g'}", "progress=false", *args]) == 0
    assert np.array_equal(np.load(tmp_path / "g" / "samples.npz")["images"], to_uint8(first))
    assert not torch.equal(first, pipe.sample(labels=[3, 3, 5], sampler="gsd", seed=1, window=8)[0])


def test_bad_sampler_options_and_labels_are_refused(one_thread, tiny_gen):
    import vargen
    from vargen.config import ConfigError

    pipe = vargen.load(tiny_gen / "model.safetensors", device="cpu")  # a weights file works too
    with pytest.raises(ConfigError, match="sampler.top_kk"):
        pipe.sample(labels=[1], top_kk=3)
    with pytest.raises(ValueError, match="out of range"):
        pipe.sample(labels=[10])
    with pytest.raises(ValueError, match="'llamagen' model"):
        pipe.sample(labels=[1], sampler="var")


def test_train_overrides_keywords_and_strings(one_thread, tiny_vq, tmp_path, monkeypatch):
    """Nested, dotted and string overrides reach the run; a misspelt key fails before any work."""
    import vargen
    from vargen.checkpoint import read_weights
    from vargen.config import ConfigError

    monkeypatch.chdir(tmp_path)
    out = vargen.train(
        "digits_ar",  # a name in the repository's configs/
        ["model.depth=1"],
        log=lambda m: None,
        out_dir="gen",
        tokenizer_ckpt=str(tiny_vq),
        model={"dim": 16, "heads": 2},
        **{"train.steps": 2, "train.progress": False, "train.eval_every": 0},
    )
    assert out == str(tmp_path / "gen")
    cfg = read_weights(out)[1]["config"]
    assert (cfg["model"]["dim"], cfg["model"]["depth"], cfg["train"]["steps"]) == (16, 1, 2)
    with pytest.raises(ConfigError, match="train.stpes"):
        vargen.train("digits_ar", train={"stpes": 2})
    assert not (tmp_path / "runs").exists()


def test_import_vargen_stays_cheap():
    code = "import sys, vargen; print(callable(vargen.train), 'torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.stdout.split() == ["True", "False"], r.stderr
