"""An LSD / LSD+ student (Fu et al. NeurIPS'25): a trained ``mdm`` network, frozen, plus n learned
per-step coefficients ``coef`` (init 1) and, for LSD+, step logits (init 0 = uniform steps).
Written by the ``lsd`` task (vargen/train/lsd_task.py), sampled by the ``lsd`` sampler
(vargen/sampling/decoders/mdm.py); the math is in vargen/diffusion/lsd.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vargen.diffusion.lsd import student_times
from vargen.models.generator import Generator
from vargen.models.mdm import MaskedDiffusionTransformer, MDMConfig
from vargen.registry import MODELS


@dataclass
class LSDStudentConfig:
    name: str = "lsd_student"
    student_steps: int = 8  # n: model forwards per sample
    learn_steps: bool = True  # LSD+ (learned step sizes); false = LSD (coefficients only)
    base: dict = field(default_factory=dict)  # the teacher's mdm model config, filled in by the lsd task


class LSDStudent(Generator):
    def __init__(self, cfg: LSDStudentConfig):
        super().__init__()
        if cfg.student_steps < 1:
            raise ValueError(f"model.student_steps must be >= 1, got {cfg.student_steps}")
        base = dict(cfg.base)
        if base.get("name", "mdm") != "mdm":
            raise ValueError(f"an lsd_student distils an mdm model, not '{base.get('name')}'")
        self.cfg = cfg
        self.base = MaskedDiffusionTransformer(MDMConfig(**base))
        self.coef = nn.Parameter(torch.ones(cfg.student_steps))  # c_i
        self.step_logits = nn.Parameter(torch.zeros(cfg.student_steps), requires_grad=cfg.learn_steps)
        self.num_classes, self.num_tokens = self.base.num_classes, self.base.num_tokens
        self.vocab_size, self.eps = self.base.vocab_size, self.base.eps

    def times(self) -> torch.Tensor:
        """(n+1,) times 1 > ... > eps (uniform unless LSD+ moved the step logits)."""
        return student_times(self.step_logits, self.eps)

    def distilled_parameters(self) -> list[nn.Parameter]:
        return [self.coef] + ([self.step_logits] if self.cfg.learn_steps else [])


@MODELS.register("lsd_student", LSDStudentConfig, samplers=("lsd",))
def build_lsd_student(cfg) -> LSDStudent:
    return LSDStudent(LSDStudentConfig(**dict(cfg)))
