"""``vargen.train(config, **overrides)``: train what a config file describes, from Python, as
``train.py --config`` does; returns the run directory."""

from __future__ import annotations

import json
import os

from vargen.config import load_run_config, resolve_paths
from vargen.train.tasks import run

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # where configs/ ships


def _dotlist(overrides: dict, prefix: str = "") -> list[str]:
    """``{"train": {"steps": 4}, "model.dim": 32}`` -> ``["train.steps=4", "model.dim=32"]``;
    values are written as JSON (valid YAML), so strings, lists and booleans keep their type."""
    out = []
    for key, value in overrides.items():
        if isinstance(value, dict) and value:
            out += _dotlist(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def config_path(path: str) -> str:
    """``path`` when it is a file, else a config shipped with the repository under that name
    (``"configs/digits_ar.yaml"``, ``"digits_ar.yaml"`` or ``"digits_ar"``), so a notebook in any
    folder can name one."""
    path = os.path.expanduser(str(path))
    if os.path.isfile(path) or os.path.isabs(path):
        return path
    for base in (_REPO, os.path.join(_REPO, "configs")):
        for name in (path, path + ".yaml"):
            if os.path.isfile(os.path.join(base, name)):
                return os.path.join(base, name)
    return path  # load_run_config says "config file not found"


def train(config: str, overrides: list[str] | tuple = (), log=print, **kw) -> str:
    """Train what the config at ``config`` describes (as ``train.py --config``); returns the
    absolute run directory.

    Overrides are ``key=value`` strings (``"train.steps=200"``) and/or keyword arguments, nested
    (``train={"steps": 200}``) or dotted (``**{"train.steps": 200}``). A bad key raises
    ``vargen.config.ConfigError`` before any work; relative paths are taken from the current
    working directory and stored absolute.
    """
    cfg = load_run_config(config_path(config), [*overrides, *_dotlist(kw)])
    resolve_paths(cfg)
    run(cfg, log=log)
    return cfg.out_dir
