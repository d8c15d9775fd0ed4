"""Named experiments: the small recipe modules in experiments/.

An experiment module holds a docstring (its first line is the description in
`python run.py list`), `OVERRIDES` (a {dotted key: value} dict applied on top of the
defaults, or on top of `BASE`, another experiment's recipe), optionally `SEARCH_SPACE` (what
a sweep of it searches: research/search_space.py; inherited from `BASE` too) and, optionally,
`main(cfg)` when it is not a plain training run (a benchmark, say).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from types import ModuleType
from typing import Any

from omegaconf import DictConfig

from research.config import apply_overrides, make_config, validate
from research.errors import UserError

PACKAGE = "experiments"


def names() -> list[str]:
    package = importlib.import_module(PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def load(name: str) -> ModuleType:
    if name not in names():
        close = difflib.get_close_matches(name, names(), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"unknown experiment '{name}'; {hint}available: {', '.join(names())} (python run.py list)")
    return importlib.import_module(f"{PACKAGE}.{name}")


def description(name: str) -> str:
    doc = (load(name).__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def recipe(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The experiment's overrides, its BASE's first (recursively)."""
    if name in seen:
        raise UserError(f"experiment '{name}' inherits from itself via BASE: {' -> '.join(seen + (name,))}")
    module = load(name)
    base = getattr(module, "BASE", None)
    merged = recipe(base, seen + (name,)) if base else {}
    merged.update(getattr(module, "OVERRIDES", {}))
    return merged


def search_space(name: str) -> dict[str, Any]:
    """The experiment's SEARCH_SPACE, or its BASE's (recursively), or the default space of research/search_space.py."""
    from research.search_space import DEFAULT_SPACE

    while name:
        module = load(name)
        if hasattr(module, "SEARCH_SPACE"):
            return dict(module.SEARCH_SPACE)
        name = getattr(module, "BASE", None)
    return dict(DEFAULT_SPACE)


def build(name: str, overrides: list[str] | dict[str, Any] = ()) -> DictConfig:
    """Defaults, then the experiment's recipe, then the command line; validated once at the end."""
    from research.model import model_config  # torch and transformers: only once the keys and types are known good

    cfg = make_config({"exp": name})
    apply_overrides(cfg, recipe(name))
    apply_overrides(cfg, overrides)
    cfg.exp = name
    validate(cfg)
    model_config(cfg.model)  # the model's shape, checked where the model defines it
    return cfg
