"""Name -> (schema, builder) registries, one per kind of component.

A config names a component by a short registered ``name``; the registry gives the
dataclass schema that validates the rest of that config section and the builder that
turns the validated section into an object. This module imports nothing of vargen's
at load time; :func:`import_components` imports the packages that register entries.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Packages whose import registers components. Kept here (not in vargen/__init__) so
# `import vargen` stays cheap and so configs can be validated before heavy imports.
_COMPONENT_MODULES = (
    "vargen.data",
    "vargen.tokenizers",
    "vargen.models",
    "vargen.heads",
    "vargen.sampling",
    "vargen.eval",
    "vargen.train.tasks",
    "vargen.train.lsd_task",
    "vargen.train.minority_task",
)


def import_components() -> None:
    """Import every package that registers components (idempotent)."""
    for mod in _COMPONENT_MODULES:
        importlib.import_module(mod)


def closest(name: str, options) -> str | None:
    """The closest valid spelling of ``name`` among ``options``, or None."""
    hits = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return hits[0] if hits else None


@dataclass(frozen=True)
class Entry:
    name: str
    schema: type
    builder: Callable[..., Any]
    meta: dict = field(default_factory=dict)  # declarations made at registration (a model's samplers)


class Registry:
    """Maps a short name to a schema dataclass and a builder ``builder(cfg, **kw)``.

    ``key`` is where a section of this kind sits in a run config (``sampler``, ``model``, ...): the
    path that validation errors name, so :meth:`build` fails with the message the CLI gives.
    """

    def __init__(self, kind: str, key: str = ""):
        self.kind = kind
        self.key = key
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, schema: type, **meta) -> Callable:
        """Decorator registering ``builder(cfg, **kw)`` (a function or a class) under ``name``;
        ``meta`` holds what the entry declares for others to read (``MODELS``: ``samplers``, the
        samplers that can draw from the model, its default first)."""

        def deco(builder):
            if name in self._entries:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = Entry(name, schema, builder, dict(meta))
            return builder

        return deco

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            hint = closest(str(name), self._entries)
            msg = f"unknown {self.kind} '{name}'; registered: {sorted(self._entries)}"
            if hint:
                msg += f" (did you mean '{hint}'?)"
            raise KeyError(msg)
        return self._entries[name]

    def build(self, cfg, **kwargs):
        """Validate ``cfg`` against the entry's schema, then build it.

        The builder receives the section with every default filled in (an OmegaConf DictConfig:
        attribute and item access); an unknown or mistyped key raises ``ConfigError`` naming it,
        before any work, from Python as from the command line.
        """
        from vargen.config import validated_section  # deferred: vargen.config imports this module

        entry = self.get(cfg["name"])
        return entry.builder(validated_section(entry.schema, cfg, self.key), **kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


DATASETS = Registry("dataset", "data")
TOKENIZERS = Registry("tokenizer", "model")
MODELS = Registry("model", "model")
HEADS = Registry("head", "model.head")
SAMPLERS = Registry("sampler", "sampler")
FEATURE_NETS = Registry("feature_net", "model")
TASKS = Registry("task")

REGISTRIES = {
    "DATASETS": DATASETS,
    "TOKENIZERS": TOKENIZERS,
    "MODELS": MODELS,
    "HEADS": HEADS,
    "SAMPLERS": SAMPLERS,
    "FEATURE_NETS": FEATURE_NETS,
    "TASKS": TASKS,
}
