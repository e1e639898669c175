"""What a person looks at while a run trains (rank 0 only):

- ``<run>/loss.png``: training and held-out loss from ``log.jsonl``, redrawn at every evaluation
  (``train.eval_every``) and at the end of the run;
- ``<run>/samples/step_N.png``: a small grid drawn by a generator every ``train.sample_every``
  steps, with a fixed seed so grids of different steps are comparable;
- TensorBoard scalars and grids under ``<run>/tb`` when ``tensorboard`` is installed (the
  ``tensorboard`` extra); nothing is needed otherwise.

A picture that cannot be written (full disk) is reported once and never stops training.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from vargen.io import make_grid, save_grid
from vargen.plot import write_loss_png
from vargen.sampling.generate import build_sampler, class_labels, counting, default_sampler_for, generate


class TrainingVisuals:
    def __init__(self, out_dir: str, sample_fn=None, sample_every: int = 0, log=print):
        self.out_dir, self.sample_fn, self.sample_every, self.log = out_dir, sample_fn, sample_every, log
        self.broken = False
        self.tb = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))

    def _guard(self, what: str, fn) -> None:
        if self.broken:
            return
        try:
            fn()
        except OSError as e:
            self.broken = True
            self.log(f"warning: cannot write {what} ({e}); training goes on without pictures")

    def logged(self, row: dict, evaluated: bool, last: bool) -> None:
        """A row was appended to log.jsonl; redraw loss.png after an evaluation and at the end."""
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, row["step"])
        if evaluated or last:
            self._guard("loss.png", lambda: write_loss_png(self.out_dir))

    def step_done(self, model, step: int) -> None:
        """Every ``sample_every`` steps, a grid of ``sample_fn(model)`` to samples/step_N.png."""
        if self.sample_fn is None or self.sample_every <= 0 or step % self.sample_every:
            return
        images = self.sample_fn(model)  # (N, C, H, W) in [0, 1]
        path = os.path.join(self.out_dir, "samples", f"step_{step}.png")
        self._guard(path, lambda: save_grid(images, path, nrow=min(10, len(images))))
        if self.tb is not None:
            self.tb.add_image("samples", make_grid(images, min(10, len(images))), step, dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def generator_preview(run_cfg, tokenizer, device, num_classes: int, max_images: int = 10):
    """``model -> images``: one image per class (at most ``max_images``) drawn by the model's own
    sampler (its registered default) with generator seed ``run_cfg.seed``, in eval mode, leaving the
    global RNG and the model's mode as they were."""
    built = {}

    def draw(model):
        if "sampler" not in built:  # built on first use: some samplers tune themselves on data
            name = default_sampler_for(run_cfg.model.name)
            built["sampler"] = build_sampler({"name": name}, model, run_cfg, device)
        labels_B = class_labels(min(max_images, num_classes), num_classes, [])
        was_training = model.training
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            g = torch.Generator(device=device).manual_seed(run_cfg.seed)
            draw_B = counting(built["sampler"], [])  # batch by batch, as sample.py draws
            images, _, _ = generate(model, tokenizer, labels_B, draw_B, g, len(labels_B))
        model.train(was_training)
        return images.clamp(0, 1)

    return draw
