"""Training pictures: ``loss.png``, ``samples/step_N.png`` every ``train.sample_every`` steps (what
the model's sampler draws at that step, seeded by the run's seed), TensorBoard when installed;
none of it changes what is trained."""

import importlib.machinery
import sys
import types

import numpy as np
import pytest

from tests.conftest import task_config


class _FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is not a dependency)."""

    calls: list = []

    def __init__(self, log_dir):
        self.log_dir = log_dir

    def add_scalar(self, tag, value, step):
        self.calls.append(("scalar", tag, step))

    def add_image(self, tag, image, step, dataformats):
        self.calls.append(("image", tag, step, image.shape, dataformats))

    def close(self):
        self.calls.append(("close",))


@pytest.fixture
def fake_tensorboard(monkeypatch):
    tb = types.ModuleType("tensorboard")
    tb.__spec__ = importlib.machinery.ModuleSpec("tensorboard", None)
    writer = types.ModuleType("torch.utils.tensorboard")
    writer.SummaryWriter = _FakeWriter
    monkeypatch.setitem(sys.modules, "tensorboard", tb)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", writer)
    _FakeWriter.calls = []
    return _FakeWriter.calls


def _gen_cfg(out, tiny_vq, **train):
    model = {"name": "llamagen", "dim": 32, "depth": 1, "heads": 2, "dropout": 0.2}
    train = dict(steps=4, batch_size=16, log_every=1, eval_every=2, **train)
    return task_config("generator", out, train, tokenizer_ckpt=str(tiny_vq), model=model)


def test_sample_grids_and_loss_png_leave_training_unchanged(one_thread, tiny_vq, tmp_path, fake_tensorboard):
    from PIL import Image

    import vargen
    from vargen.io import make_grid, read_log
    from vargen.train.tasks import run

    run(_gen_cfg(tmp_path / "plain", tiny_vq), log=lambda m: None)
    assert ("close",) in fake_tensorboard and ("scalar", "loss", 4) in fake_tensorboard
    assert not [c for c in fake_tensorboard if c[0] == "image"]  # sample_every defaults to off
    fake_tensorboard.clear()
    run(_gen_cfg(tmp_path / "vis", tiny_vq, sample_every=2), log=lambda m: None)

    plain, vis = read_log(tmp_path / "plain"), read_log(tmp_path / "vis")
    drop = ("elapsed_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in plain] == [
        {k: v for k, v in r.items() if k not in drop} for r in vis
    ]  # the draws neither consumed the training RNG nor left the model in eval mode (dropout)
    assert "heldout_loss" in vis[1] and (tmp_path / "vis" / "loss.png").is_file()
    assert (tmp_path / "plain" / "loss.png").is_file() and not (tmp_path / "plain" / "samples").exists()
    assert sorted(p.name for p in (tmp_path / "vis" / "samples").iterdir()) == ["step_2.png", "step_4.png"]
    images = [c for c in fake_tensorboard if c[0] == "image"]
    assert [c[2] for c in images] == [2, 4] and images[0][4] == "HWC"

    # the last grid is what the final weights draw with the model's sampler, seed = the run's seed
    pipe = vargen.load(tmp_path / "vis", device="cpu")
    final, _ = pipe.sample(labels=list(range(10)), seed=0, batch_size=10)
    want = make_grid(final, nrow=10)[..., 0]  # (H, W) grey
    got = np.asarray(Image.open(tmp_path / "vis" / "samples" / "step_4.png"))[::4, ::4]  # saved 4x
    assert np.array_equal(got, want)
    first = np.asarray(Image.open(tmp_path / "vis" / "samples" / "step_2.png"))
    assert not np.array_equal(first[::4, ::4], want)  # step 2's weights draw something else
