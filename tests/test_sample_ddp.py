"""``torchrun --nproc_per_node 2 sample.py`` (gloo on CPU): the ranks split ``num_samples``, each
with its own seed, and rank 0 writes one archive whose images are what single-process draws of
each share with that share's seed give."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.conftest import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_split_the_samples_and_rank0_writes_their_union(one_thread, tiny_gen, tmp_path):
    import vargen
    from vargen.io import to_uint8
    from vargen.sampling.generate import shard, shard_seed

    out = tmp_path / "ddp"
    num, seed = 7, 5  # shares of 3 and 4, in batches of 2: ragged on both ranks
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    cmd += [os.path.join(ROOT, "sample.py"), "--ckpt", str(tiny_gen), f"out={out}", f"num_samples={num}"]
    cmd += ["batch_size=2", "classes=[3]", f"seed={seed}", "progress=false", "device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote") == 2, r.stdout  # rank 0 alone reports (grid + npz, then the record)

    arc = np.load(out / "samples.npz")
    images = arc["images"]
    assert images.shape == (num, 16, 16, 1) and (arc["labels"] == 3).all() and arc["ids"].shape == (num, 16)
    assert len({im.tobytes() for im in images}) == num  # one class: equal seeds would repeat images
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["world_size"] == 2 and metrics["num_samples"] == num
    assert metrics["stats.target_forwards"] == 4 * 16 and metrics["forwards_per_image"] == 16  # 2 + 2 batches

    pipe = vargen.load(tiny_gen, device="cpu")
    shares = []
    for rank in range(2):
        lo, hi = shard(num, rank, 2)
        drawn, _ = pipe.sample(labels=[3] * (hi - lo), seed=shard_seed(seed, rank), batch_size=2)
        shares.append(to_uint8(drawn))
    assert np.array_equal(images, np.concatenate(shares))
