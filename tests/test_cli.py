"""Entry points (``vargen-train``, ``vargen-sample``, ``vargen``, ``python -m vargen``) and the
loss pictures (``loss.png``, ``vargen plot``)."""

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT


def test_console_scripts_name_the_functions_the_scripts_run():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()  # tomllib is Python >= 3.11 only
    section = text.split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    lines = [ln.split("#")[0].strip() for ln in section.splitlines()]
    scripts = dict((k.strip(), v.strip().strip('"')) for k, v in (ln.split("=") for ln in lines if ln))
    assert set(scripts) == {"vargen", "vargen-train", "vargen-sample"}
    funcs = {}
    for name, target in scripts.items():
        module, attr = target.split(":")
        funcs[name] = getattr(importlib.import_module(module), attr)
    import sample
    import train

    assert train.main is funcs["vargen-train"] and sample.main is funcs["vargen-sample"]


def test_python_m_vargen_dispatches_subcommands(tmp_path, monkeypatch, capsys):
    def run(*args):  # --help and a bad command answer before any heavy import: fast subprocesses
        cmd = [sys.executable, "-m", "vargen", *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)

    r = run("sample", "--help")
    assert r.returncode == 0 and "--ckpt" in r.stdout and "torchrun" in r.stdout, r.stderr
    assert run("nope").returncode == 2
    from vargen.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", os.path.join(ROOT, "configs", "digits_vq.yaml"), "--print-config"]) == 0
    assert f"out_dir: {tmp_path / 'runs' / 'digits_vq'}" in capsys.readouterr().out
    assert main(["sample", "--ckpt", str(tmp_path / "missing")]) == 1
    assert main(["train", "--config", os.path.join(ROOT, "configs", "digits_vq.yaml"), "train.stpes=1"]) == 2


def _colour_mask(path, rgb, tol=40):
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return (np.abs(img - np.array(rgb)).sum(-1) < tol), img.shape[:2]


def test_line_chart_puts_a_falling_curve_top_left_to_bottom_right(tmp_path):
    from vargen.plot import COLORS, MARGIN, line_chart

    xs = list(range(0, 101))
    path = line_chart(
        [{"label": "falling", "x": xs, "y": [1 - x / 100 for x in xs]}], str(tmp_path / "c.png")
    )
    hit, (h, w) = _colour_mask(path, COLORS[0])
    left, top, right, bottom = MARGIN[0], MARGIN[1], w - MARGIN[2], h - MARGIN[3]
    hit[:, right + 1 :] = False  # the legend swatch
    mid_x, mid_y = (left + right) // 2, (top + bottom) // 2
    assert hit[top:mid_y, left:mid_x].any() and hit[mid_y:bottom, mid_x:right].any()
    assert not hit[top:mid_y, mid_x + 10 : right].any() and not hit[mid_y + 10 : bottom, left:mid_x].any()


def _fake_run(path, losses, heldout_every=0):
    os.makedirs(path)
    with open(path / "log.jsonl", "w") as f:
        for i, loss in enumerate(losses, 1):
            row = {"step": i, "loss": loss}
            if heldout_every and i % heldout_every == 0:
                row["heldout_loss"] = loss + 0.5
            f.write(json.dumps(row) + "\n")


def test_vargen_plot_overlays_runs_each_in_its_colour(tmp_path):
    from vargen.cli import main
    from vargen.plot import COLORS, write_loss_png

    _fake_run(tmp_path / "a", [3.0 - 0.01 * i for i in range(100)], heldout_every=25)
    _fake_run(tmp_path / "b", [2.0] * 100)
    assert write_loss_png(str(tmp_path / "a")) == str(tmp_path / "a" / "loss.png")
    out = tmp_path / "cmp.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    for rgb in COLORS[:2]:
        hit, _ = _colour_mask(out, rgb)
        assert hit.sum() > 200  # a drawn curve, not just the legend swatch
    hit_a, _ = _colour_mask(tmp_path / "a" / "loss.png", COLORS[1])  # held-out dots: the second series
    assert hit_a.sum() > 4 * 20
    assert main(["plot", str(tmp_path / "missing")]) == 1


@pytest.mark.parametrize("bad", [[], ["--help"]])
def test_vargen_without_a_command_prints_usage(bad, capsys):
    from vargen.cli import main

    assert main(bad) == (0 if bad else 2)
    assert "usage: vargen {train,sample,plot}" in capsys.readouterr().err


def test_benchmark_results_come_with_a_chart_of_the_main_comparison(tmp_path, monkeypatch):
    from benchmarks import common
    from vargen.plot import COLORS, MARGIN

    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    flat = {"a.nfe": 16, "a.fid_mean": 30.0, "b.nfe": 8, "b.fid_mean": 35.0, "samples_per_seed": 100}
    common.write_results("t", flat, {"quick": True})
    assert json.load(open(tmp_path / "t.json"))["a.nfe"] == 16
    a, (h, w) = _colour_mask(tmp_path / "t.png", COLORS[0])
    b, _ = _colour_mask(tmp_path / "t.png", COLORS[1])
    right, mid_x, mid_y = w - MARGIN[2], (MARGIN[0] + w - MARGIN[2]) // 2, (MARGIN[1] + h - MARGIN[3]) // 2
    a[:, right + 1 :] = b[:, right + 1 :] = False  # legend swatches
    assert a[mid_y:, mid_x:right].any() and not a[:mid_y].any()  # a: more forwards, lower FID
    assert b[:mid_y, :mid_x].any() and not b[mid_y:].any()
    suffixed = {
        "lsd.fid_teacher": 31.0,
        "lsd.nfe_teacher": 64,
        "lsd.fid_student4": 33.0,
        "lsd.nfe_student4": 4,
    }
    assert common.write_chart("s", suffixed) == str(tmp_path / "s.png")
    assert common.write_chart("none", {"x.params": 3, "y.params": 4}) is None
