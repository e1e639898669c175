"""Shared test setup.

TRITON_INTERPRET must be set before ``triton`` itself is first imported (its own helpers
such as tl.sum are decorated at import), so it is set here, at the top of the first file
pytest imports. Outside the kernel test modules it is removed again for each test, so
the dispatchers pick the torch reference there, as they do for any CPU user: the
interpreter costs milliseconds per row and would dominate sampling-heavy tests.
Feature nets are cached under a per-session temporary directory, never in ~/.cache.
"""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VARGEN_CACHE", tempfile.mkdtemp(prefix="vargen-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

from vargen.config import from_dict  # noqa: E402


@pytest.fixture(autouse=True)
def _interpreter_only_in_kernel_tests(request, monkeypatch):
    if "kernels" not in request.module.__name__:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DIGITS = {"name": "digits", "resolution": 16, "heldout_fraction": 0.15, "split_seed": 0}


@pytest.fixture(scope="module")
def digits():
    from vargen.data import build_dataset

    return build_dataset(DIGITS)


@pytest.fixture
def one_thread():
    """Tiny nets gain nothing from intra-op threads, and spinning OpenMP workers make a run
    several times slower when another process shares the two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def adam_steps(model, images, steps: int, lr: float = 2e-3, batch: int = 32) -> dict:
    """A few Adam steps of ``model.loss(images)`` on random batches; returns the last output."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        out = model.loss(images[torch.randint(len(images), (batch,))])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return out


def task_config(task: str, out_dir, train: dict, **sections):
    """A validated run config on digits: ``train`` goes through :func:`quiet_train`,
    ``sections`` (model=..., tokenizer_ckpt=...) are added as they are."""
    raw = {"task": task, "out_dir": str(out_dir), "data": DIGITS, "train": quiet_train(**train), **sections}
    return from_dict(raw)


def quiet_train(**over):
    """Training-loop settings for tests: no bar, no logging noise."""
    base = {"device": "cpu", "progress": False, "log_every": 1000, "ckpt_every": 100000, "warmup_steps": 20}
    base.update(over)
    return base


TINY_VQ = {"name": "vq", "hidden": [8, 16], "codebook_size": 16, "code_dim": 4}


def vq_cfg(out_dir, steps: int, **train):
    """A tiny VQ tokenizer run on digits (milliseconds a step): the cheapest real training."""
    return task_config(
        "tokenizer", out_dir, dict(steps=steps, batch_size=32, log_every=1, **train), model=TINY_VQ
    )


@pytest.fixture(scope="session")
def tiny_vq(tmp_path_factory):
    """A tiny tokenizer trained for 20 steps (shared, read-only)."""
    from vargen.train.tasks import run

    out = tmp_path_factory.mktemp("vq")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = task_config("tokenizer", out, dict(steps=20, batch_size=32), model=TINY_VQ)
    run(cfg, log=lambda m: None)
    torch.set_num_threads(before)
    return out


@pytest.fixture(scope="session")
def tiny_gen(tiny_vq, tmp_path_factory):
    """A tiny next-token model on ``tiny_vq``'s ids, 4 steps (for sample.py plumbing, not quality)."""
    from vargen.train.tasks import run

    out = tmp_path_factory.mktemp("gen")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = task_config(
        "generator",
        out,
        dict(steps=4, batch_size=32),
        tokenizer_ckpt=str(tiny_vq),
        model={"name": "llamagen", "dim": 32, "depth": 1, "heads": 2},
    )
    run(cfg, log=lambda m: None)
    torch.set_num_threads(before)
    return out


@pytest.fixture(scope="session")
def trained_pipeline(tmp_path_factory):
    """A tiny VQ tokenizer and next-token model trained on digits through the real tasks.

    Shared by every test that needs trained weights (FID, class recognition, sample.py).
    About a minute on 2 cores.
    """
    from vargen.train.tasks import run

    root = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    tok_cfg = task_config(
        "tokenizer",
        root / "vq",
        dict(steps=400, batch_size=64, lr=3e-3),
        model={"name": "vq", "hidden": [16, 32], "codebook_size": 64, "code_dim": 8},
    )
    run(tok_cfg, log=lambda m: None)
    gen_cfg = task_config(
        "generator",
        root / "ar",
        dict(steps=600, batch_size=64, lr=3e-3, weight_decay=0.01),
        tokenizer_ckpt=str(root / "vq"),
        model={"name": "llamagen", "dim": 64, "depth": 2, "heads": 4, "class_dropout": 0.1},
    )
    run(gen_cfg, log=lambda m: None)
    return {"root": root, "vq": root / "vq", "ar": root / "ar"}
