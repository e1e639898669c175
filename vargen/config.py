"""Structured configs: dataclass schemas, YAML composition, dotlist overrides, validation.

A run config is a YAML file (optionally listing ``defaults:`` files it is composed
from, merged in order, paths relative to the file) plus ``key=value`` overrides. The
task named by ``task`` picks the run schema; each component section (``data``,
``model``, ``sampler``, ...) names a registered component whose schema validates the
section. Unknown keys and wrong types raise :class:`ConfigError` before any work starts,
naming the full key and, when there is one, the closest valid key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vargen.registry import REGISTRIES, TASKS, closest, import_components


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending key."""


def ranged(default, *, ge=None, gt=None, le=None, lt=None, choices=None, pattern=None):
    """A scalar config field whose value :func:`validate` checks before any work starts:
    bounds (``ge``/``gt``/``le``/``lt``), a set of ``choices`` or a regex ``pattern``."""
    rule = {
        k: v
        for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, pattern=pattern).items()
        if v is not None
    }
    return field(default=default, metadata={"rule": rule})


def _check_rule(key: str, value, rule: dict) -> None:
    import re

    ops = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b)}
    ops.update({"le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)})
    for name, (sym, ok) in ops.items():
        if name in rule and not ok(value, rule[name]):
            raise ConfigError(f"config key '{key}' must be {sym} {rule[name]}, got {value}")
    if "choices" in rule and value not in rule["choices"]:
        raise ConfigError(f"config key '{key}' must be one of {list(rule['choices'])}, got {value!r}")
    if "pattern" in rule and not re.fullmatch(rule["pattern"], str(value)):
        raise ConfigError(f"config key '{key}' must match {rule['pattern']!r}, got {value!r}")


DEVICE = r"auto|cpu|cuda(:\d+)?"  # config values a device field accepts


def component(registry: str, default: dict | None = None, help: str = ""):
    """A config field holding a registered component section, validated by its schema."""
    default = dict(default or {})
    return field(default_factory=lambda: dict(default), metadata={"registry": registry, "help": help})


# --------------------------------------------------------------------------------------
# Shared schemas
# --------------------------------------------------------------------------------------


@dataclass
class TrainLoopConfig:
    steps: int = ranged(1000, ge=1)  # optimiser steps in total (resume continues up to this)
    batch_size: int = ranged(64, ge=1)  # global batch; split evenly across DDP processes
    lr: float = ranged(1e-3, gt=0)
    min_lr_ratio: float = ranged(0.1, ge=0, le=1)  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = ranged(50, ge=0)
    weight_decay: float = ranged(0.0, ge=0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = ranged(1.0, ge=0)  # 0 disables clipping
    max_nonfinite_steps: int = ranged(
        10, ge=1
    )  # a NaN/inf loss or gradient skips the update; this many in a row stop
    log_every: int = ranged(50, ge=1)
    eval_every: int = ranged(0, ge=0)  # held-out loss every N steps (0 = only the task's final evaluation)
    sample_every: int = ranged(
        0, ge=0
    )  # generators: a sample grid to samples/step_N.png every N steps (0 = off)
    ckpt_every: int = ranged(500, ge=1)  # also written at the end of training
    keep_last: int = ranged(2, ge=1)  # checkpoints kept on disk (older ones are pruned)
    resume: bool = False  # continue from the newest usable checkpoint in out_dir
    device: str = ranged("auto", pattern=DEVICE)  # auto | cpu | cuda | cuda:N
    amp: bool = False  # bf16 autocast; only takes effect on CUDA
    compile: bool = False  # torch.compile the model; only takes effect on CUDA
    threads: int = ranged(0, ge=0)  # torch.set_num_threads; 0 leaves torch's default
    progress: bool = True  # tqdm bar (silent when stderr is not a terminal)


@dataclass
class RunConfig:
    """Fields every training task shares; tasks subclass it to add their components."""

    task: str = "?"
    out_dir: str = "runs/default"
    seed: int = 0
    data: Any = component("DATASETS", {"name": "digits"})
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)


# --------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------


def _load_yaml_composed(path: str, _seen: tuple = ()) -> DictConfig:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    apath = os.path.abspath(path)
    if apath in _seen:
        raise ConfigError(f"config {path} includes itself through 'defaults'")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml errors
        raise ConfigError(f"cannot parse {path}: {e}") from e
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    defaults = raw.pop("defaults", [])
    merged = OmegaConf.create({})
    for inc in defaults:
        inc_path = os.path.join(os.path.dirname(path), str(inc))
        merged = OmegaConf.merge(merged, _load_yaml_composed(inc_path, _seen + (apath,)))
    return OmegaConf.merge(merged, raw)


def parse_overrides(overrides: list[str]) -> DictConfig:
    for ov in overrides:
        if "=" not in ov or ov.startswith("="):
            raise ConfigError(f"override '{ov}' is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {e}") from e


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def validate(schema: type, raw: dict, path: str = "") -> dict:
    """Check ``raw`` against dataclass ``schema``; return a plain dict with defaults filled.

    Component fields (declared with :func:`component`) are validated against the schema
    registered under their ``name``.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{path.rstrip('.') or '<root>'}' must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in raw:
        if key not in fields:
            hint = closest(str(key), fields)
            msg = f"unknown config key '{path}{key}'"
            if hint:
                msg += f" (did you mean '{path}{hint}'?)"
            msg += f"; valid keys here: {sorted(fields)}"
            raise ConfigError(msg)
    plain: dict[str, Any] = {}
    components: dict[str, dict] = {}
    hints = typing.get_type_hints(schema)
    for name, f in fields.items():
        if "registry" in f.metadata:
            default = f.default_factory()
            section = raw.get(name, default)
            if isinstance(section, dict) and "name" not in section and "name" in default:
                section = {"name": default["name"], **section}  # e.g. sampler.top_k=3 alone
            components[name] = _validate_component(f.metadata["registry"], section, f"{path}{name}")
        elif _is_dataclass_type(hints.get(name)) and isinstance(raw.get(name), dict):
            plain[name] = validate(hints[name], raw[name], f"{path}{name}.")
        elif name in raw:
            plain[name] = raw[name]
    # Types (and nested dataclasses) are checked by OmegaConf's structured merge.
    base = OmegaConf.structured(schema)
    for name in components:
        base[name] = {}  # replaced by the validated component below
    try:
        merged = OmegaConf.merge(base, plain)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"config key '{path}{key}': {str(e).splitlines()[0]}") from None
    out = OmegaConf.to_container(merged, resolve=True)
    for name, f in fields.items():
        if "rule" in f.metadata and name in out:
            _check_rule(f"{path}{name}", out[name], f.metadata["rule"])
    out.update(components)
    missing = OmegaConf.missing_keys(merged)
    if missing:
        raise ConfigError(f"config key '{path}{sorted(missing)[0]}' is required but not set")
    return out


def validated_section(schema: type, cfg, key: str = "") -> DictConfig:
    """A component section (a dict or DictConfig) validated against ``schema``: defaults filled,
    unknown or mistyped keys refused with a ``ConfigError`` naming ``key.<field>``."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    raw = OmegaConf.to_container(node, resolve=True)
    return OmegaConf.create(validate(schema, raw, f"{key}." if key else ""))


def _validate_component(registry_name: str, section, path: str) -> dict:
    registry = REGISTRIES[registry_name]
    if not isinstance(section, dict) or "name" not in section:
        raise ConfigError(f"config key '{path}' must be a mapping with a 'name' (one of {registry.names()})")
    try:
        entry = registry.get(section["name"])
    except KeyError as e:
        raise ConfigError(f"config key '{path}.name': {e.args[0]}") from None
    return validate(entry.schema, section, f"{path}.")


def _task_schema(raw: dict) -> type:
    if "task" not in raw:
        raise ConfigError(f"config key 'task' is required; one of {TASKS.names()}")
    try:
        return TASKS.get(raw["task"]).schema
    except KeyError as e:
        raise ConfigError(f"config key 'task': {e.args[0]}") from None


def _merge_overrides(raw: DictConfig, overrides: list[str]) -> dict:
    """Merge overrides into ``raw``. Switching a component (``data.name=imagefolder``)
    replaces that whole section, so fields of the previous component do not leak in."""
    ov = parse_overrides(list(overrides))
    raw = OmegaConf.to_container(raw, resolve=True)
    for key, section in OmegaConf.to_container(ov).items():
        old = raw.get(key)
        if (
            isinstance(section, dict)
            and isinstance(old, dict)
            and section.get("name", old.get("name")) != old.get("name")
        ):
            raw.pop(key)
    return OmegaConf.to_container(OmegaConf.merge(raw, ov), resolve=True)


def load_run_config(path: str, overrides: list[str] = ()) -> DictConfig:
    """Load, compose, override and validate a training config. Raises ConfigError."""
    import_components()
    return from_dict(_merge_overrides(_load_yaml_composed(path), overrides))


def from_dict(raw: dict, schema: type | None = None) -> DictConfig:
    """Validate a plain dict (e.g. the config stored in a checkpoint) into a DictConfig."""
    import_components()
    schema = schema or _task_schema(raw)
    cfg = OmegaConf.create(validate(schema, raw))
    OmegaConf.set_struct(cfg, True)
    return cfg


def load_config(schema: type, path: str | None, overrides: list[str] = (), base: dict | None = None):
    """Validate ``base`` (dict) <- YAML ``path`` <- ``overrides`` against ``schema``."""
    import_components()
    raw = OmegaConf.create(base or {})
    if path:
        raw = OmegaConf.merge(raw, _load_yaml_composed(path))
    return from_dict(_merge_overrides(raw, overrides), schema)


def resolve_paths(cfg) -> None:
    """Make a run config's paths absolute in place (``out_dir``, every ``*_ckpt`` and
    ``data.root``), so the config stored with the run still names the same files when it
    is read from another working directory."""

    def absolute(path: str) -> str:
        return os.path.abspath(os.path.expanduser(path)) if path and path != "???" else path

    for key in list(cfg.keys()):
        if key == "out_dir" or (key.endswith("_ckpt") and isinstance(cfg[key], str)):
            cfg[key] = absolute(cfg[key])
    data = cfg.get("data")
    if data is not None and isinstance(data.get("root"), str):
        data.root = absolute(data.root)


def to_plain(cfg) -> dict:
    """A resolved config as plain JSON-serialisable data."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return json.loads(json.dumps(cfg))
