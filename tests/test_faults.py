"""Fault injection: ``kill -9`` during checkpoint writes, truncated and bit-flipped files, a
full disk. After each fault, training resumes from the newest intact checkpoint and ends
bit for bit where an uninterrupted run ends (nothing good is lost), and every message
says what to do.

The kills run the training in a forked child that SIGKILLs itself at an exact point of
the checkpoint write (deterministic), plus ``kill -9`` from outside at random moments
while checkpoints are written every step.
"""

import functools
import multiprocessing
import os
import random
import resource
import shutil
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from vargen.checkpoint import CheckpointError
from vargen.io import read_log
from vargen.train.tasks import run

from .conftest import vq_cfg

STEPS, EVERY, KEEP = 8, 2, 4


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def cfg(out, steps=STEPS, **over):
    return vq_cfg(out, steps, **{"ckpt_every": EVERY, "keep_last": KEEP, **over})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every recovered run must reproduce."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference")
    run(cfg(out), log=lambda m: None)
    torch.set_num_threads(before)
    return out


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A run stopped after 6 steps (checkpoints 2, 4, 6), copied by each test that damages it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("six")
    run(cfg(out, 6), log=lambda m: None)
    torch.set_num_threads(before)
    return out


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def resume_and_check(out, reference, expect_from: str, steps=STEPS, **over) -> list[str]:
    """Resume to the end; the result must equal the uninterrupted run exactly."""
    msgs = []
    run(cfg(out, steps, resume=True, **over), log=msgs.append)
    assert any("resumed from" in m and m.split(" at step")[0].endswith(expect_from) for m in msgs), msgs
    assert [r["step"] for r in read_log(out)] == list(range(1, steps + 1))
    a, b = weights(out), weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in os.listdir(os.path.join(out, "checkpoints")) if p.startswith(".")]
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]
    return msgs


# ---------------------------------------------------------------------------------------
# kill -9
# ---------------------------------------------------------------------------------------


def _in_child(target, *args) -> int:
    """Run ``target(*args)`` in a forked child (torch and the dataset already loaded, so it
    starts at once, as a DataLoader worker does); returns its exit code (-9: SIGKILL)."""
    p = multiprocessing.get_context("fork").Process(target=target, args=args)
    p.start()
    p.join()
    return p.exitcode


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _train_and_die_at(out, point: str, step: int) -> None:
    """Train ``cfg(out)`` in this (child) process and SIGKILL it at ``point`` of the write of
    checkpoint ``step``, leaving the files exactly as a kill there leaves them."""
    import vargen.checkpoint as C

    torch.set_num_threads(1)
    name = f"step_{step:07d}"
    real_save_file, real_torch_save = C.save_file, C.torch.save
    real_point_to, real_atomic = C.point_to, C._atomic_write

    def save_file(tensors, path, metadata=None):  # half a weights file, then killed
        real_save_file(tensors, path, metadata=metadata)
        if point == "weights" and ("." + name) in path:
            os.truncate(path, os.path.getsize(path) // 2)
            _die()

    def torch_save(obj, path, *a, **kw):  # half a training state, then killed
        real_torch_save(obj, path, *a, **kw)
        if point == "state" and ("." + name) in str(path):
            os.truncate(path, os.path.getsize(path) // 2)
            _die()

    def point_to(out_dir, ckpt_dir):  # the step folder is in place, 'latest' not yet
        if point == "pointer" and ckpt_dir.endswith(name):
            _die()
        real_point_to(out_dir, ckpt_dir)

    def atomic(path, fn):  # 'latest' written, model.safetensors half copied
        latest = os.path.join(os.path.dirname(path), "latest")
        if point == "copy" and path.endswith("model.safetensors") and open(latest).read().strip() == name:
            tmp = os.path.join(os.path.dirname(path), ".tmp-killed")
            fn(tmp)
            os.truncate(tmp, os.path.getsize(tmp) // 2)
            _die()
        real_atomic(path, fn)

    C.save_file, C.torch.save, C.point_to, C._atomic_write = save_file, torch_save, point_to, atomic
    run(cfg(out), log=lambda m: None)


@pytest.mark.parametrize(
    "point, resumes_from",
    [
        ("weights", "step_0000004"),  # killed while writing the weights of step 6
        ("state", "step_0000004"),  # ... the optimizer state of step 6
        ("pointer", "step_0000006"),  # step 6 complete, 'latest' still names step 4
        ("copy", "step_0000006"),  # 'latest' names step 6, out_dir/model.safetensors still step 4
    ],
)
def test_kill_during_a_checkpoint_write_loses_nothing(tmp_path, reference, point, resumes_from):
    assert _in_child(_train_and_die_at, tmp_path, point, 6) == -signal.SIGKILL
    msgs = resume_and_check(tmp_path, reference, resumes_from)
    if point in ("weights", "state", "copy"):
        assert any("left by an interrupted checkpoint write" in m for m in msgs)


def test_kill_at_a_random_moment_while_checkpointing_every_step(tmp_path, tmp_path_factory):
    """A real ``kill -9`` from outside, twice, at random moments of a run that writes a
    checkpoint every step (so most of its time is spent writing them)."""
    steps = 16
    ref = tmp_path_factory.mktemp("ref_every_step")
    run(cfg(ref, steps, ckpt_every=1, keep_last=2), log=lambda m: None)
    rng = random.Random(0)
    train = functools.partial(_train, tmp_path, steps, ckpt_every=1, keep_last=2, resume=True)
    for _ in range(2):
        p = multiprocessing.get_context("fork").Process(target=train)
        first = len(read_log(tmp_path))
        p.start()
        deadline = time.time() + 120
        while len(read_log(tmp_path)) < first + 3 and p.is_alive() and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert p.exitcode == -signal.SIGKILL
        assert len(read_log(tmp_path)) < steps, "the run finished before the kill"
    msgs = []
    run(cfg(tmp_path, steps, ckpt_every=1, keep_last=2, resume=True), log=msgs.append)
    assert any("resumed from" in m for m in msgs)
    assert [r["step"] for r in read_log(tmp_path)] == list(range(1, steps + 1))
    a, b = weights(tmp_path), weights(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------
# damaged files
# ---------------------------------------------------------------------------------------


def _train(out, steps, **over):
    torch.set_num_threads(1)
    run(cfg(out, steps, **over), log=lambda m: None)


def _flip_bit(path, offset_from_end=64):
    data = bytearray(open(path, "rb").read())
    data[len(data) - offset_from_end] ^= 0x10
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize(
    "damage",
    ["truncate_weights", "flip_weights", "flip_state", "truncate_state", "delete_checksums_and_truncate"],
)
def test_damaged_newest_checkpoint_is_set_aside(tmp_path, six_steps, reference, damage):
    out = tmp_path / "run"
    shutil.copytree(six_steps, out)
    newest = out / "checkpoints" / "step_0000006"
    w, s = newest / "model.safetensors", newest / "train_state.pt"
    if damage == "truncate_weights":
        w.write_bytes(w.read_bytes()[:-1000])
    elif damage == "flip_weights":  # inside a tensor: safetensors still loads it, the checksum does not match
        _flip_bit(w)
    elif damage == "flip_state":
        _flip_bit(s, 200)
    elif damage == "truncate_state":
        s.write_bytes(s.read_bytes()[:100])
    else:  # a checkpoint without checksums (older format) is loaded to be checked
        (newest / "checksums.json").unlink()
        w.write_bytes(w.read_bytes()[:-1000])
    msgs = resume_and_check(out, reference, "step_0000004")
    assert any("step_0000006 is damaged" in m and "moved to" in m for m in msgs), msgs
    assert (out / "checkpoints" / "damaged_step_0000006").is_dir()


def test_garbage_latest_and_damaged_top_level_weights(tmp_path, six_steps, reference):
    out = tmp_path / "run"
    shutil.copytree(six_steps, out)
    (out / "latest").write_text("step_9999999\n")
    top = out / "model.safetensors"
    top.write_bytes(top.read_bytes()[:50])
    resume_and_check(out, reference, "step_0000006")


def test_top_level_weights_repaired_when_nothing_is_left_to_train(tmp_path, six_steps):
    out = tmp_path / "run"
    shutil.copytree(six_steps, out)
    _flip_bit(out / "model.safetensors")
    run(cfg(out, 6, resume=True), log=lambda m: None)  # nothing to train: still repairs what sample.py reads
    a, b = weights(out), weights(out / "checkpoints" / "step_0000006")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_checkpoint_damaged_refuses_and_says_what_to_do(tmp_path, six_steps):
    out = tmp_path / "run"
    shutil.copytree(six_steps, out)
    for d in (out / "checkpoints").iterdir():
        (d / "train_state.pt").write_bytes(b"")
    with pytest.raises(
        CheckpointError, match="no checkpoint .* is usable.*delete .*checkpoints to start over"
    ):
        run(cfg(out, resume=True), log=lambda m: None)
    assert len(list((out / "checkpoints").iterdir())) == 3  # nothing deleted or renamed


# ---------------------------------------------------------------------------------------
# a full disk
# ---------------------------------------------------------------------------------------


def _train_on_a_small_disk(out, limit: int) -> None:
    """Resume ``cfg(out)`` with every file capped at ``limit`` bytes; the error goes to ``out/error.txt``."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    torch.set_num_threads(1)
    try:
        run(cfg(out, resume=True), log=lambda m: None)
    except CheckpointError as e:
        (out.parent / "error.txt").write_text(str(e)[: limit // 2])
        os._exit(1)


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_full_disk_keeps_the_last_checkpoint_and_says_what_to_do(tmp_path, six_steps, reference):
    """RLIMIT_FSIZE makes every write past ``limit`` bytes fail (EFBIG), as a full disk would:
    the weights of step 8 fit, its optimizer state does not."""
    out = tmp_path / "run"
    shutil.copytree(six_steps, out)
    newest = out / "checkpoints" / "step_0000006"
    w, s = (newest / "model.safetensors").stat().st_size, (newest / "train_state.pt").stat().st_size
    assert s > w
    limit = (w + s) // 2

    assert _in_child(_train_on_a_small_disk, out, limit) == 1
    err = (tmp_path / "error.txt").read_text()
    assert "cannot write checkpoint" in err and "free disk space" in err, err
    assert "resume=true" in err and "step_0000006) is intact" in err
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000002", "step_0000004", "step_0000006"]
    resume_and_check(out, reference, "step_0000006")
