"""Training tasks: what ``train.py`` can train. Each task is a run schema (which
registry its ``model`` section names) and a ``run(cfg)`` function.

- ``tokenizer``: an image tokenizer (``model`` from TOKENIZERS) on the dataset's images.
- ``generator``: a token model (``model`` from MODELS) on the ids of a trained tokenizer,
  referenced by path and checked by hash.
- ``pixel_generator``: a generator on pixels (``model`` from MODELS, e.g. TarFlow).
- ``feature_net``: the dataset classifier used as FID feature net and reward.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

import torch

from vargen import distributed as D
from vargen.checkpoint import (
    WEIGHTS,
    file_sha256,
    load_tokenizer_for,
    model_registry,
    resolve_weights_path,
    run_lock,
    save_weights,
)
from vargen.config import RunConfig, component, resolve_paths, to_plain
from vargen.data import build_dataset
from vargen.eval.feature_net import classify_accuracy
from vargen.registry import TASKS
from vargen.train.loop import fit, heldout_metrics, write_run_config
from vargen.train.visuals import generator_preview


@dataclass
class TokenizerRun(RunConfig):
    task: str = "tokenizer"
    model: dict = component("TOKENIZERS", {"name": "vq"})


@dataclass
class GeneratorRun(RunConfig):
    task: str = "generator"
    model: dict = component("MODELS", {"name": "llamagen"})
    tokenizer_ckpt: str = "???"  # weights file or run directory of a trained tokenizer
    tokenizer_sha256: str = ""  # filled in at training time; checked when loading


@dataclass
class PixelGeneratorRun(RunConfig):
    """A generator that models pixels directly (TarFlow): no tokenizer."""

    task: str = "pixel_generator"
    model: dict = component("MODELS", {"name": "tarflow"})


@dataclass
class FeatureNetRun(RunConfig):
    task: str = "feature_net"
    model: dict = component("FEATURE_NETS", {"name": "classifier"})


def _device(cfg):
    dev = D.setup(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    return dev


def _write_eval(cfg, metrics: dict, log) -> None:
    if D.world()[0] == 0:
        with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        log(f"[{cfg.task}] eval: " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))


@torch.no_grad()
def _tokenizer_eval(tok, images, device, batch=256) -> dict:
    discrete = tok.tokens_spec["kind"] != "continuous"
    mse, used = 0.0, torch.zeros(tok.tokens_spec["vocab_size"], dtype=torch.bool)
    for i in range(0, images.shape[0], batch):
        x = images[i : i + batch].to(device)
        ids = tok.encode(x)  # (B, N) ids, a list of (B, n_k) for multi-scale, (B, N, D) continuous
        if discrete:
            flat = torch.cat([t.flatten() for t in ids]) if isinstance(ids, list) else ids.flatten()
            used[flat.cpu()] = True
        mse += torch.nn.functional.mse_loss(tok.decode(ids), x, reduction="sum").item()
    out = {"heldout_recon_mse": mse / images.numel()}
    if discrete:
        out["codebook_usage"] = used.float().mean().item()
    return out


def _train_on_images(cfg, schema: type, log, fill_classes: bool, preview: bool = False):
    """Build the dataset and the model (shapes filled in from the data) and fit on images."""
    device = _device(cfg)
    torch.manual_seed(cfg.seed)
    data = build_dataset(cfg.data)
    if data.report:
        log(f"[{cfg.task}] data: {data.report}")
    cfg.model.channels, cfg.model.resolution = data.channels, data.resolution
    if fill_classes:
        cfg.model.num_classes = data.num_classes
    model = model_registry(schema).build(cfg.model)
    log(f"[{cfg.task}] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    heldout = (data.heldout_images, data.heldout_labels)
    draw = (
        generator_preview(cfg, None, device, data.num_classes) if preview and cfg.train.sample_every else None
    )
    fit(model, data.train_images, data.train_labels, cfg, device, cfg.task, log, heldout, draw)
    return model, data, device


@TASKS.register("tokenizer", TokenizerRun)
def run_tokenizer(cfg, log=print):
    tok, data, device = _train_on_images(cfg, TokenizerRun, log, fill_classes=False)
    _write_eval(cfg, _tokenizer_eval(tok, data.heldout_images, device), log)
    return tok


@torch.no_grad()
def encode_all(tok, images, device, batch=256) -> torch.Tensor:
    """Token ids of every image, (N, num_tokens); multi-scale ids are concatenated by scale."""
    out = []
    for i in range(0, len(images), batch):
        ids = tok.encode(images[i : i + batch].to(device))
        out.append((torch.cat(ids, dim=1) if isinstance(ids, list) else ids).cpu())
    return torch.cat(out)


def _fill_from_tokenizer(model_cfg, spec: dict, num_classes: int) -> None:
    """Fill the shape fields a generator schema declares from the tokenizer's tokens_spec."""
    fills = {
        "vocab_size": spec["vocab_size"],
        "grid": list(spec.get("grid", ())),
        "scales": list(spec.get("scales", ())),
        "code_dim": spec.get("code_dim", 0),
        "num_classes": num_classes,
    }
    fills.update(spec.get("quantizer", {}))  # TokenBridge: the range and bins to dequantize with
    for key, value in fills.items():
        if key in model_cfg:
            model_cfg[key] = value


@TASKS.register("generator", GeneratorRun)
def run_generator(cfg, log=print):
    device = _device(cfg)
    torch.manual_seed(cfg.seed)
    path = resolve_weights_path(cfg.tokenizer_ckpt)
    cfg.tokenizer_sha256 = file_sha256(path)
    tok = load_tokenizer_for(cfg, device)
    data = build_dataset(cfg.data)
    if data.report:
        log(f"[generator] data: {data.report}")
    spec = tok.tokens_spec
    ids = encode_all(tok, data.train_images, device)
    _fill_from_tokenizer(cfg.model, spec, data.num_classes)
    model = model_registry(GeneratorRun).build(cfg.model)
    expects = getattr(model, "token_kind", "ids")
    if spec["kind"] != expects:
        raise ValueError(
            f"generator '{cfg.model.name}' models {expects}; the tokenizer at {path} gives {spec['kind']}"
        )
    if hasattr(model, "attach_tokenizer"):  # next-scale models rebuild their inputs from ids
        model.attach_tokenizer(tok)
    log(
        f"[generator] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{ids.shape[0]} sequences of {ids.shape[1]} tokens"
    )
    heldout = (encode_all(tok, data.heldout_images, device), data.heldout_labels)
    preview = generator_preview(cfg, tok, device, data.num_classes) if cfg.train.sample_every else None
    fit(model, ids, data.train_labels, cfg, device, "generator", log, heldout, preview)
    _write_eval(cfg, heldout_metrics(model, *heldout, device), log)
    return model


@TASKS.register("pixel_generator", PixelGeneratorRun)
def run_pixel_generator(cfg, log=print):
    model, data, device = _train_on_images(cfg, PixelGeneratorRun, log, fill_classes=True, preview=True)
    _write_eval(cfg, heldout_metrics(model, data.heldout_images, data.heldout_labels, device), log)
    return model


@TASKS.register("feature_net", FeatureNetRun)
def run_feature_net(cfg, log=print):
    net, data, device = _train_on_images(cfg, FeatureNetRun, log, fill_classes=True)
    acc = classify_accuracy(net, data.heldout_images.to(device), data.heldout_labels.to(device))
    _write_eval(cfg, {"heldout_acc": acc}, log)
    return net


def run(cfg, log=print):
    """Run the task a validated config names (its paths made absolute first)."""
    resolve_paths(cfg)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        with run_lock(cfg.out_dir, log) if rank0 else contextlib.nullcontext():
            return TASKS.get(cfg.task).builder(cfg, log=log)
    finally:
        D.teardown()


@dataclass
class TokenBridgeRun(RunConfig):
    task: str = "tokenbridge"
    model: dict = component("TOKENIZERS", {"name": "tokenbridge"})


@TASKS.register("tokenbridge", TokenBridgeRun)
def run_tokenbridge(cfg, log=print):
    """Wrap a trained KL tokenizer with TokenBridge's training-free quantizer and save it (no training)."""
    data = build_dataset(cfg.data)
    cfg.model.channels, cfg.model.resolution = data.channels, data.resolution
    tok = model_registry(TokenBridgeRun).build(cfg.model)
    os.makedirs(cfg.out_dir, exist_ok=True)
    write_run_config(cfg.out_dir, to_plain(cfg))
    save_weights(os.path.join(cfg.out_dir, WEIGHTS), tok, to_plain(cfg), 0, cfg.task)
    _write_eval(cfg, _tokenizer_eval(tok, data.heldout_images, _device(cfg)), log)
    return tok


__all__ = ["encode_all", "run"]
