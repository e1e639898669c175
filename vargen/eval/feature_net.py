"""A small per-dataset classifier whose penultimate layer is the FID feature space.

Why not Inception: its weights are a download (torchmetrics fetches them), it was trained on
299x299 photos, and on 16x16 digits its features say little. A classifier trained on the
dataset itself separates exactly the modes a generator must cover, trains in seconds on
2 cores, and makes FID meaningful at these sizes (the scale is not comparable to
Inception FID). The same net doubles as a class-recognition / reward model.

Trained nets are cached as safetensors under ``$VARGEN_CACHE/feature_nets`` (default
``~/.cache/vargen``), keyed by a hash of everything that determines the weights, so the
FID of every run on a dataset is measured with the same features.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from vargen.config import to_plain, validate
from vargen.data import DATASETS, ImageSplits, build_dataset
from vargen.registry import FEATURE_NETS

log = logging.getLogger(__name__)

# Part of the cache key: bump it when the architecture or the training recipe changes,
# so stale cache files are never mistaken for the current net.
FORMAT_VERSION = 1
DEFAULT_STEPS = 600


@dataclass
class FeatureNetConfig:
    name: str = "classifier"
    channels: int = 0  # 0 = taken from the dataset
    resolution: int = 0  # 0 = taken from the dataset
    num_classes: int = 0  # 0 = taken from the dataset
    width: int = 32  # channels of every conv stage
    features: int = 64  # penultimate (feature) dimension


class FeatureNet(nn.Module):
    """Conv stages (3x3 conv, ReLU, 2x max-pool) down to <= 4x4, then linear features and logits.

    Every stage has the same width: doubling it per stage cost 3x the time on 32x32 shapes
    for no accuracy gain. The features are the linear layer's output *before* the ReLU,
    which is closer to Gaussian than a rectified vector; FID models features as Gaussian.
    """

    def __init__(
        self, *, channels: int, resolution: int, num_classes: int, width: int = 32, features: int = 64
    ):
        super().__init__()
        self.config = dict(
            name="classifier",
            channels=channels,
            resolution=resolution,
            num_classes=num_classes,
            width=width,
            features=features,
        )
        self.channels, self.resolution, self.num_classes = channels, resolution, num_classes
        self.num_features = features  # read by torchmetrics' FrechetInceptionDistance
        layers, c, side = [], channels, resolution
        while side > 4:
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, side = width, side // 2
        self.trunk = nn.Sequential(*layers, nn.Flatten())
        self.to_features = nn.Linear(c * side * side, features)
        self.head = nn.Linear(features, num_classes)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        want = (self.channels, self.resolution, self.resolution)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(
                f"feature net expects images (N, {want[0]}, {want[1]}, {want[2]}), "
                f"got {tuple(images.shape)}: use the feature net trained for this dataset and resolution"
            )
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        return images * 2.0 - 1.0  # (B, C, H, W) in [-1, 1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features (B, F) of images (B, C, H, W), float in [0, 1] or uint8."""
        return self.to_features(self.trunk(self._prepare(images)))  # (B, F)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self(images)))  # (B, num_classes)

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The last conv stage's map as tokens (B, h*w, width): one token per spatial cell."""
        fmap = self.trunk[:-1](self._prepare(images))  # (B, width, h, w), trunk ends in Flatten
        return fmap.flatten(2).transpose(1, 2)  # (B, h*w, width)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """Cross-entropy and accuracy; the generic trainer optimises ``out["loss"]``."""
        logits = self.logits(images)  # (B, num_classes)
        return {
            "loss": F.cross_entropy(logits, labels),
            "acc": (logits.argmax(-1) == labels).float().mean().detach(),
        }


def _as_dict(cfg) -> dict:
    """A feature-net config (dataclass, dict or DictConfig) validated, defaults filled."""
    if cfg is None:
        cfg = FeatureNetConfig()
    raw = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else to_plain(cfg)
    return validate(FeatureNetConfig, raw)


@FEATURE_NETS.register("classifier", FeatureNetConfig)
def build_feature_net(cfg) -> FeatureNet:
    cfg = _as_dict(cfg)
    unset = [k for k in ("channels", "resolution", "num_classes") if cfg[k] <= 0]
    if unset:
        raise ValueError(
            f"feature net config has {', '.join(f'{k}=0' for k in unset)}: these come from the dataset; "
            "use train_feature_net(splits, cfg) or set them explicitly"
        )
    return FeatureNet(**{k: v for k, v in cfg.items() if k != "name"})


def _fill_from_data(cfg, splits: ImageSplits) -> dict:
    cfg = _as_dict(cfg)
    for key, value in (
        ("channels", splits.channels),
        ("resolution", splits.resolution),
        ("num_classes", splits.num_classes),
    ):
        if cfg[key] == 0:
            cfg[key] = value
        elif cfg[key] != value:
            raise ValueError(
                f"feature net config has {key}={cfg[key]} but dataset '{splits.name}' has {value}"
            )
    return cfg


def train_feature_net(splits: ImageSplits, cfg=None, steps: int = DEFAULT_STEPS, seed: int = 0) -> FeatureNet:
    """Train the classifier on ``splits.train_images``; returned in eval mode.

    Deterministic: the init is drawn under ``torch.random.fork_rng`` (the caller's global
    RNG is untouched) and batches come from a local generator, so the same inputs give the
    same weights bit for bit on the same machine and thread count. No augmentation: random
    shifts make the features blind to blur, which FID must see (README, "What the main job
    does"). AdamW, batch 64, cosine decay from 2e-3 to 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cfg = _fill_from_data(cfg, splits)
    if cfg["num_classes"] < 2:
        warnings.warn(
            f"dataset '{splits.name}' has one class: the classifier cannot learn anything, "
            "so its features are those of a randomly initialised CNN",
            stacklevel=2,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_feature_net(cfg)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    x, y = splits.train_images, splits.train_labels  # (N, C, H, W), (N,)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)  # (64,)
        loss = net.loss(x[idx], y[idx])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def classify_accuracy(
    net: FeatureNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> float:
    """Fraction of ``images`` whose argmax class equals ``labels``, in batches on the net's device."""
    device = next(net.parameters()).device
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)  # (b, C, H, W)
        y = labels[start : start + batch_size].to(device)  # (b,)
        correct += (net.logits(x).argmax(-1) == y).sum().item()
    return correct / max(1, images.shape[0])


# --------------------------------------------------------------------------------------
# Files and the cache
# --------------------------------------------------------------------------------------


def load_feature_net(path, device="cpu") -> FeatureNet:
    """A feature net from a safetensors file whose metadata "config" holds {"model": {...}}.

    Reads both the cache files written here and the weights a ``feature_net`` training run
    writes (``out_dir/model.safetensors``). Never unpickles anything. The net comes back
    in eval mode with gradients off, ready for FID or as a frozen reward model.
    """
    path = os.fspath(path)
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if "config" not in meta:
        raise ValueError(f"{path} has no 'config' in its safetensors metadata: not a vargen feature net")
    config = json.loads(meta["config"])
    model_cfg = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict):
        raise ValueError(f"{path}: metadata config has no 'model' section: not a vargen feature net")
    net = FEATURE_NETS.build(model_cfg)
    net.load_state_dict(state)  # strict: a missing or extra tensor raises
    return net.to(device).eval().requires_grad_(False)


def _full_data_config(data_cfg) -> dict:
    """The dataset config validated with its defaults filled, so equal datasets hash equal."""
    raw = to_plain(data_cfg)
    return validate(DATASETS.get(raw["name"]).schema, raw)


def cache_dir() -> Path:
    return Path(os.environ.get("VARGEN_CACHE", Path.home() / ".cache" / "vargen")) / "feature_nets"


def _cache_record(data_cfg, cfg, steps: int, seed: int) -> dict:
    return {
        "data": _full_data_config(data_cfg),
        "model": _as_dict(cfg),
        "steps": steps,
        "seed": seed,
        "format_version": FORMAT_VERSION,
    }


def _cache_path(record: dict) -> Path:
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"{record['data']['name']}-{digest}.safetensors"


def feature_net_path(data_cfg, cfg=None, steps: int = DEFAULT_STEPS, seed: int = 0) -> Path:
    """Where :func:`get_feature_net` caches the net for these inputs.

    The key is the configuration, not the pixels: for an ``imagefolder`` dataset, delete
    the file after changing the folder's contents.
    """
    return _cache_path(_cache_record(data_cfg, cfg, steps, seed))


def _save(net: FeatureNet, path: Path, record: dict) -> None:
    """Write atomically (temp file in the same directory + os.replace): readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": json.dumps({**record, "model": net.config}), "format_version": str(FORMAT_VERSION)}
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_MEMO: dict[tuple[str, str], FeatureNet] = {}


def get_feature_net(
    data_cfg, device="cpu", *, cfg=None, steps: int = DEFAULT_STEPS, seed: int = 0
) -> FeatureNet:
    """The feature net of a dataset config: memoised in-process, cached on disk, else trained.

    A cache file that cannot be read is retrained and rewritten, with a warning. The
    returned module is shared between callers (eval mode, gradients off): do not train it.
    """
    record = _cache_record(data_cfg, cfg, steps, seed)
    path = _cache_path(record)
    key = (str(path), str(device))
    if key in _MEMO:
        return _MEMO[key]
    net = None
    if path.exists():
        try:
            net = load_feature_net(path)
        except Exception as e:  # any unreadable file is just a cache miss
            warnings.warn(f"feature-net cache {path} is unreadable ({e}); retraining it", stacklevel=2)
    if net is None:
        log.info("training the %s feature net (%d steps) into %s", record["data"]["name"], steps, path)
        net = train_feature_net(build_dataset(record["data"]), cfg, steps, seed)
        _save(net, path, record)
    net = net.to(device).eval().requires_grad_(False)
    _MEMO[key] = net
    return net
