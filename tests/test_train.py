"""Training loop and checkpoints: exact resume, NaN stop, atomic and checked checkpoints, DDP."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vargen.checkpoint import CheckpointError, latest_checkpoint, load_component, read_train_state
from vargen.io import read_log
from vargen.train.loop import TrainingError, fit
from vargen.train.tasks import run

from .conftest import ROOT, task_config, vq_cfg


def ar_run_cfg(out_dir, tok_dir, steps, **train):
    return task_config(
        "generator",
        out_dir,
        dict(steps=steps, batch_size=32, lr=2e-3, log_every=1, **train),
        tokenizer_ckpt=str(tok_dir),
        model={"name": "llamagen", "dim": 32, "depth": 1, "heads": 2, "dropout": 0.1},
    )


def test_resume_continues_exactly(tmp_path, tiny_vq):
    """Losses after a resume equal those of an uninterrupted run (dropout and label dropout on)."""
    straight = tmp_path / "straight"
    run(ar_run_cfg(straight, tiny_vq, 12, ckpt_every=6), log=lambda m: None)
    split = tmp_path / "split"
    run(ar_run_cfg(split, tiny_vq, 6, ckpt_every=6), log=lambda m: None)
    run(ar_run_cfg(split, tiny_vq, 12, ckpt_every=6, resume=True), log=lambda m: None)
    a = [r["loss"] for r in read_log(straight)]
    b = [r["loss"] for r in read_log(split)]
    assert len(a) == len(b) == 12
    assert a == b
    wa, wb = load_file(straight / "model.safetensors"), load_file(split / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_existing_run_is_never_overwritten(tmp_path, tiny_vq):
    out = tmp_path / "run"
    run(ar_run_cfg(out, tiny_vq, 3), log=lambda m: None)
    before = open(out / "model.safetensors", "rb").read()
    with pytest.raises(TrainingError, match="resume=true"):
        run(ar_run_cfg(out, tiny_vq, 3), log=lambda m: None)
    assert open(out / "model.safetensors", "rb").read() == before


class _Blowup(torch.nn.Module):
    """Loss turns NaN on its 5th call: the loop must stop before updating or saving."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.calls = 0

    def loss(self, x, y):
        self.calls += 1
        val = (self.w * x.mean()).sum()
        return {"loss": val * float("nan") if self.calls == 5 else val}


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = task_config(
        "feature_net", tmp_path, dict(steps=10, batch_size=4, ckpt_every=2, max_nonfinite_steps=1)
    )
    model = _Blowup()
    x, y = torch.rand(40, 3), torch.zeros(40, dtype=torch.long)
    with pytest.raises(TrainingError, match="nan at step 4.*step_0000004"):
        fit(model, x, y, cfg, torch.device("cpu"), "feature_net", log=lambda m: None)
    assert os.path.basename(latest_checkpoint(str(tmp_path))) == "step_0000004"
    assert read_train_state(latest_checkpoint(str(tmp_path)))["step"] == 4
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_train_state_loads_with_weights_only(tiny_vq):
    state = torch.load(os.path.join(latest_checkpoint(str(tiny_vq)), "train_state.pt"), weights_only=True)
    assert state["step"] == 20 and "optimizer" in state and state["rng_cpu"].dtype == torch.uint8


def test_corrupt_checkpoint_names_file(tmp_path, tiny_vq):
    bad = tmp_path / "model.safetensors"
    good = open(tiny_vq / "model.safetensors", "rb").read()
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt"):
        load_component(str(bad))
    with pytest.raises(CheckpointError, match="not found"):
        load_component(str(tmp_path / "nothing.safetensors"))


def test_mismatched_checkpoint_names_file_and_keys(tmp_path, tiny_vq):
    from safetensors.torch import save_file

    from vargen.checkpoint import read_weights

    state, meta = read_weights(str(tiny_vq))
    state.pop(sorted(state)[0])
    path = tmp_path / "m.safetensors"
    save_file(state, str(path), metadata={"config": json.dumps(meta["config"])})
    with pytest.raises(CheckpointError, match=r"m\.safetensors does not match the model: missing keys"):
        load_component(str(path))


def test_generator_checks_tokenizer_hash(tmp_path, tiny_vq):
    import shutil

    tok = tmp_path / "tok"
    shutil.copytree(tiny_vq, tok)
    run(ar_run_cfg(tmp_path / "gen", tok, 2), log=lambda m: None)
    from vargen.checkpoint import load_tokenizer_for

    _, gen_cfg = load_component(str(tmp_path / "gen"))
    load_tokenizer_for(gen_cfg)  # unchanged: fine
    w = load_file(tok / "model.safetensors")
    k = sorted(w)[0]
    w[k] = w[k] + 1
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tok / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    save_file(w, str(tok / "model.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="changed since the generator was trained"):
        load_tokenizer_for(gen_cfg)


def test_torchrun_two_processes_keep_identical_weights(tmp_path, tiny_vq):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        os.path.join(ROOT, "train.py"),
        "--config",
        os.path.join(ROOT, "configs", "digits_ar.yaml"),
        f"out_dir={out}",
        f"tokenizer_ckpt={tiny_vq}",
        "model.dim=32",
        "model.depth=1",
        "model.heads=2",
        "train.steps=6",
        "train.batch_size=16",
        "train.device=cpu",
        "train.progress=false",
        "train.log_every=1",
        "train.threads=1",
    ]
    r = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert r.returncode == 0, r.stderr[-3000:]
    check = json.load(open(out / "ddp_check.json"))
    assert check["world_size"] == 2
    assert check["max_param_divergence"] == 0.0
    assert len(read_log(out)) == 6


def test_generator_on_wrong_image_size_stops_with_a_message(tmp_path, tiny_vq):
    from vargen.data import DataError

    cfg = ar_run_cfg(tmp_path / "gen", tiny_vq, 2)
    cfg.data.resolution = 8  # the tokenizer was trained on 16x16 digits
    with pytest.raises(DataError, match=r"expected \(N, 1, 16, 16\)"):
        run(cfg, log=lambda m: None)


def test_train_cli_reports_missing_data_folder(tmp_path, capsys):
    import train

    code = train.main(
        [
            "--config",
            os.path.join(ROOT, "configs", "shapes_vq.yaml"),
            f"out_dir={tmp_path / 'run'}",
            "data.name=imagefolder",
            f"data.root={tmp_path / 'no_such_folder'}",
        ]
    )
    assert code == 1
    assert f"image folder not found: {tmp_path / 'no_such_folder'}" in capsys.readouterr().err


def test_tokenizer_task_trains_a_multiscale_vat(tmp_path):
    cfg = task_config(
        "tokenizer",
        tmp_path,
        dict(steps=10, batch_size=32),
        model={"name": "vat", "hidden": [8, 16], "code_dim": 4, "codebook_size": 32, "scales": [1, 2, 4]},
    )
    run(cfg, log=lambda m: None)
    ev = json.load(open(tmp_path / "eval.json"))
    assert 0 < ev["codebook_usage"] <= 1 and ev["heldout_recon_mse"] < 0.5
    tok, _ = load_component(str(tmp_path))
    ids = tok.encode(torch.rand(2, 1, 16, 16))
    assert [t.shape for t in ids] == [(2, 1), (2, 4), (2, 16)]


def _weights_equal(a, b) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def straight_vq(tmp_path_factory):
    """10 uninterrupted steps of a tiny tokenizer: what every recovered run must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    run(vq_cfg(out, 10), log=lambda m: None)
    torch.set_num_threads(before)
    return out


def test_resume_without_latest_scans_for_checkpoints(one_thread, tmp_path, straight_vq):
    """Deleting ``latest`` loses nothing: recovery scans the step_* directories."""
    run(vq_cfg(tmp_path, 6, ckpt_every=2, keep_last=3), log=lambda m: None)
    os.remove(tmp_path / "latest")
    msgs = []
    run(vq_cfg(tmp_path, 10, ckpt_every=2, keep_last=3, resume=True), log=msgs.append)
    assert any("resumed from" in m and "step_0000006" in m for m in msgs), msgs
    assert [r["step"] for r in read_log(tmp_path)] == list(range(1, 11))
    assert _weights_equal(tmp_path, straight_vq)


def test_resume_skips_a_damaged_newest_checkpoint(one_thread, tmp_path, straight_vq):
    run(vq_cfg(tmp_path, 6, ckpt_every=2, keep_last=3), log=lambda m: None)
    weights = tmp_path / "checkpoints" / "step_0000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert os.path.basename(latest_checkpoint(str(tmp_path))) == "step_0000004"
    msgs = []
    run(vq_cfg(tmp_path, 10, ckpt_every=2, keep_last=3, resume=True), log=msgs.append)
    assert any("step_0000006" in m and "damaged" in m for m in msgs), msgs
    assert (tmp_path / "checkpoints" / "damaged_step_0000006").is_dir()  # kept for inspection
    assert [r["step"] for r in read_log(tmp_path)] == list(range(1, 11))
    assert _weights_equal(tmp_path, straight_vq)


def test_fresh_start_over_checkpoints_is_refused_without_latest(tmp_path, one_thread):
    run(vq_cfg(tmp_path, 4, ckpt_every=2), log=lambda m: None)
    os.remove(tmp_path / "latest")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(TrainingError, match="resume=true.*delete .*checkpoints to start over"):
        run(vq_cfg(tmp_path, 4, ckpt_every=2), log=lambda m: None)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_resume_refuses_when_every_checkpoint_is_damaged(tmp_path, one_thread):
    run(vq_cfg(tmp_path, 2, ckpt_every=2), log=lambda m: None)
    state = tmp_path / "checkpoints" / "step_0000002" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="no checkpoint .* is usable.*train_state.pt.*delete"):
        run(vq_cfg(tmp_path, 4, ckpt_every=2, resume=True), log=lambda m: None)
    assert (tmp_path / "checkpoints" / "step_0000002").is_dir()


class _Faulty(torch.nn.Module):
    """Loss NaN on the calls in ``nan_loss``, finite loss with NaN gradients on ``nan_grad``."""

    def __init__(self, nan_loss=(), nan_grad=()):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.calls, self.nan_loss, self.nan_grad = 0, set(nan_loss), set(nan_grad)

    def loss(self, x, y):
        self.calls += 1
        val = (self.w * x.mean()).sum()
        if self.calls in self.nan_loss:
            val = val * float("nan")
        if self.calls in self.nan_grad:  # d sqrt(u)/du at u = 0 is inf; times 0 gives NaN
            val = val + 0 * (self.w - self.w.detach()).sqrt().sum()
        return {"loss": val}


def test_nonfinite_steps_are_skipped_counted_and_never_saved(tmp_path):
    cfg = task_config("feature_net", tmp_path, dict(steps=10, batch_size=4, ckpt_every=2, log_every=1))
    model, msgs = _Faulty(nan_loss={3}, nan_grad={6}), []
    x, y = torch.rand(40, 3), torch.zeros(40, dtype=torch.long)
    fit(model, x, y, cfg, torch.device("cpu"), "feature_net", log=msgs.append)
    rows = read_log(tmp_path)
    assert [r["skipped_nonfinite"] for r in rows] == [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    assert sum("loss is nan; update skipped" in m for m in msgs) == 1
    assert sum("gradient norm is nan; update skipped" in m for m in msgs) == 1
    assert torch.isfinite(model.w).all()
    state = read_train_state(latest_checkpoint(str(tmp_path)))
    assert state["skipped_nonfinite"] == 2
    assert all(int(s["step"]) == 8 for s in state["optimizer"]["state"].values())  # 10 steps, 2 skipped


def test_nonfinite_limit_stops_training_with_a_message(tmp_path):
    cfg = task_config(
        "feature_net", tmp_path, dict(steps=20, batch_size=4, ckpt_every=2, max_nonfinite_steps=3)
    )
    model = _Faulty(nan_loss=set(range(5, 100)))
    x, y = torch.rand(40, 3), torch.zeros(40, dtype=torch.long)
    with pytest.raises(
        TrainingError, match=r"nan at step 6, 3 steps in a row \(train.max_nonfinite_steps=3\).*resume"
    ):
        fit(model, x, y, cfg, torch.device("cpu"), "feature_net", log=lambda m: None)
    for d in (tmp_path / "checkpoints").iterdir():
        assert all(torch.isfinite(v).all() for v in load_file(d / "model.safetensors").values())


def test_diverging_run_never_saves_nonfinite_weights(tmp_path, one_thread):
    """The issue's lr=1e6: whatever happens, no checkpoint holds a NaN/inf."""
    msgs = []
    with pytest.raises(TrainingError, match="3 steps in a row.*resume=true"):
        run(vq_cfg(tmp_path, 12, ckpt_every=3, lr=1e6, max_nonfinite_steps=3), log=msgs.append)
    assert any("update skipped" in m for m in msgs)
    assert (tmp_path / "checkpoints" / "step_0000003").is_dir()
    for d in (tmp_path / "checkpoints").iterdir():
        assert all(torch.isfinite(v).all() for v in load_file(d / "model.safetensors").values()), d
    if (tmp_path / "model.safetensors").exists():
        load_component(str(tmp_path))


def test_nonfinite_weights_refused_at_load(tmp_path, tiny_vq):
    from safetensors import safe_open
    from safetensors.torch import save_file

    w = load_file(tiny_vq / "model.safetensors")
    with safe_open(str(tiny_vq / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    k = sorted(w)[0]
    w[k] = w[k] * float("nan")
    save_file(w, str(tmp_path / "model.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="non-finite weights.*earlier checkpoint"):
        load_component(str(tmp_path))


def test_generator_run_samples_from_anywhere_and_after_moving(one_thread, tmp_path, tiny_vq, monkeypatch):
    """Paths are stored absolute; a moved tree is found relative to the generator, and
    ``tokenizer_ckpt=`` points sample.py at a tokenizer moved elsewhere (hash still checked)."""
    import shutil

    import sample

    shutil.copytree(tiny_vq, tmp_path / "runs" / "vq")
    monkeypatch.chdir(tmp_path)
    run(ar_run_cfg("runs/gen", "runs/vq", 2), log=lambda m: None)
    _, gen_cfg = load_component(str(tmp_path / "runs" / "gen"))
    assert gen_cfg.tokenizer_ckpt == str(tmp_path / "runs" / "vq") and gen_cfg.out_dir == str(
        tmp_path / "runs" / "gen"
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    args = ["num_samples=2", "batch_size=2", "progress=false"]
    assert sample.main(["--ckpt", str(tmp_path / "runs" / "gen"), f"out={tmp_path / 's1'}", *args]) == 0
    shutil.move(tmp_path / "runs", tmp_path / "moved")
    assert sample.main(["--ckpt", str(tmp_path / "moved" / "gen"), f"out={tmp_path / 's2'}", *args]) == 0
    shutil.move(tmp_path / "moved" / "vq", tmp_path / "tok")
    assert sample.main(["--ckpt", str(tmp_path / "moved" / "gen"), f"out={tmp_path / 's3'}", *args]) == 1
    over = f"tokenizer_ckpt={tmp_path / 'tok'}"
    assert (
        sample.main(["--ckpt", str(tmp_path / "moved" / "gen"), f"out={tmp_path / 's3'}", over, *args]) == 0
    )
    assert (tmp_path / "s3" / "samples.npz").is_file()


def test_resume_enforces_the_tokenizer_hash(one_thread, tmp_path, tiny_vq):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    tok = tmp_path / "tok"
    shutil.copytree(tiny_vq, tok)
    run(ar_run_cfg(tmp_path / "gen", tok, 2, ckpt_every=2), log=lambda m: None)
    w = load_file(tok / "model.safetensors")
    with safe_open(str(tok / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    w["codebook"] = w["codebook"].flip(0)  # another tokenizer: the same ids now mean other codes
    save_file(w, str(tok / "model.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="tokenizer .*changed since that checkpoint was written"):
        run(ar_run_cfg(tmp_path / "gen", tok, 4, ckpt_every=2, resume=True), log=lambda m: None)
    assert len(read_log(tmp_path / "gen")) == 2


def test_run_lock_refuses_a_second_training_and_takes_over_stale_locks(one_thread, tmp_path):
    from vargen.checkpoint import run_lock

    run(vq_cfg(tmp_path, 2, ckpt_every=2), log=lambda m: None)
    record = (tmp_path / "config.yaml").read_bytes()
    with run_lock(str(tmp_path)):  # a live training holds the folder
        with pytest.raises(
            CheckpointError, match=f"another training .pid {os.getpid()}.*nothing was changed"
        ):
            run(vq_cfg(tmp_path, 4, ckpt_every=2, resume=True), log=lambda m: None)
    assert len(read_log(tmp_path)) == 2
    # a refused command (fresh start over checkpoints) leaves the run's record alone
    with pytest.raises(TrainingError, match="resume=true"):
        run(vq_cfg(tmp_path, 4, ckpt_every=2, lr=0.5), log=lambda m: None)
    assert (tmp_path / "config.yaml").read_bytes() == record
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "train.lock").write_text(f"{dead.pid}\n")  # left by a killed run
    msgs = []
    run(vq_cfg(tmp_path, 4, ckpt_every=2, resume=True), log=msgs.append)
    assert any(f"left by pid {dead.pid}" in m for m in msgs) and len(read_log(tmp_path)) == 4
    assert not (tmp_path / "train.lock").exists()


def test_sample_cli_keeps_every_call_with_its_record(one_thread, tiny_gen, tmp_path):
    import shutil

    from omegaconf import OmegaConf

    import sample

    gen = tmp_path / "ar"
    shutil.copytree(tiny_gen, gen)
    args = ["num_samples=4", "batch_size=4", "progress=false"]
    assert sample.main(["--ckpt", str(gen), "seed=1", "sampler.top_k=5", *args]) == 0
    assert sample.main(["--ckpt", str(gen), "seed=2", *args]) == 0
    first, second = gen / "samples" / "001", gen / "samples" / "002"
    a, b = np.load(first / "samples.npz"), np.load(second / "samples.npz")
    assert not np.array_equal(a["ids"], b["ids"])  # the second call did not overwrite the first
    rec = OmegaConf.load(first / "sample_config.yaml")
    assert rec.seed == 1 and rec.sampler.name == "ar" and rec.sampler.top_k == 5
    assert rec.run.ckpt == str(gen / "model.safetensors") and len(rec.run.ckpt_sha256) == 64
    assert json.load(open(second / "metrics.json"))["seed"] == 2
    before = (first / "samples.npz").read_bytes()
    assert sample.main(["--ckpt", str(gen), f"out={first}", *args]) == 1  # refuses to overwrite
    assert (first / "samples.npz").read_bytes() == before


def test_forwards_per_image_with_a_short_last_batch(one_thread, tiny_gen, tmp_path):
    """5 samples in batches of 4 and 1: every row costs num_tokens forwards (16), not 32 * 4 / 5."""
    import sample

    args = ["num_samples=5", "batch_size=4", "progress=false", f"out={tmp_path / 's'}"]
    assert sample.main(["--ckpt", str(tiny_gen), *args]) == 0
    metrics = json.load(open(tmp_path / "s" / "metrics.json"))
    assert metrics["stats.target_forwards"] == 2 * 16
    assert metrics["forwards_per_image"] == 16


def test_sampler_that_does_not_fit_the_model_is_a_clear_error(
    one_thread, tiny_gen, tiny_vq, tmp_path, capsys
):
    import sample

    for name in ["var", "tarflow", "ddim", "xar"]:
        code = sample.main(["--ckpt", str(tiny_gen), f"sampler.name={name}", f"out={tmp_path / name}"])
        assert code == 1
        err = capsys.readouterr().err
        assert f"sampler '{name}'" in err and "'llamagen' model: use sampler.name=ar" in err
        assert not (tmp_path / name).exists()
    assert sample.main(["--ckpt", str(tiny_vq)]) == 1  # not a generator at all: says so first
    assert "sample.py needs a generator" in capsys.readouterr().err


def test_cuda_requested_without_cuda_is_an_error(monkeypatch):
    from vargen import distributed as D

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device=cuda but CUDA is not available.*device=cpu"):
        D.setup("cuda")
    assert D.setup("auto") == torch.device("cpu")


def test_abandoned_temporary_checkpoint_folders_are_removed(one_thread, tmp_path):
    run(vq_cfg(tmp_path, 2, ckpt_every=2), log=lambda m: None)
    (tmp_path / "checkpoints" / ".step_0000004-x1y2").mkdir()  # what a kill -9 mid-write leaves
    (tmp_path / "checkpoints" / ".step_0000004-x1y2" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".tmp-abc").write_bytes(b"half a latest file")
    msgs = []
    run(vq_cfg(tmp_path, 4, ckpt_every=2, resume=True), log=msgs.append)
    assert not [p for p in tmp_path.rglob(".*") if p.name != ".lock"]
    assert sum("left by an interrupted checkpoint write" in m for m in msgs) == 2


def test_full_disk_during_a_checkpoint_says_what_to_do(one_thread, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import vargen.checkpoint as C

    calls, real = [], C.save_file

    def disk_full_on_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")
        return real(*a, **kw)

    monkeypatch.setattr(C, "save_file", disk_full_on_second)
    with pytest.raises(
        CheckpointError, match="cannot write .*step_0000004.*free disk space.*resume=true.*step_0000002"
    ):
        run(vq_cfg(tmp_path, 6, ckpt_every=2), log=lambda m: None)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_0000002"]  # no half-written folder


def test_fid_against_a_small_reference_set_warns(one_thread, tiny_gen, tmp_path, monkeypatch, capsys):
    import sample
    from vargen.eval import fid

    class Tiny:
        num_real = 12

        def score(self, images):
            return 1.0

    monkeypatch.setattr(fid.FIDEvaluator, "for_dataset", classmethod(lambda cls, *a, **kw: Tiny()))
    argv = ["--ckpt", str(tiny_gen), "num_samples=4", "batch_size=4", "fid=true", f"out={tmp_path / 's'}"]
    assert sample.main(argv) == 0
    assert "warning: only 12 reference images" in capsys.readouterr().out
    assert "only 12 reference images" in json.load(open(tmp_path / "s" / "metrics.json"))["fid_warning"]


def test_load_cached_memoises_per_file_and_device_and_reloads_a_rewritten_file(tmp_path, tiny_vq):
    """Samplers share one loader: the same file on the same device is built once; another device
    key or a rewritten file (new mtime) builds anew, with the file's current weights."""
    import shutil

    from vargen.checkpoint import WEIGHTS, load_cached

    path = tmp_path / WEIGHTS
    shutil.copyfile(tiny_vq / WEIGHTS, path)
    a, cfg = load_cached(str(path))
    assert load_cached(str(tmp_path))[0] is a  # a run dir names the same file
    assert load_cached(str(path), torch.device("cpu"))[0] is a
    assert load_cached(str(path), "cpu:0")[0] is not a  # another device key
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    b = load_cached(str(path))[0]
    assert b is not a and cfg.task == "tokenizer"
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
