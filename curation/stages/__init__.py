"""Pipeline stages. Each module here defines one :class:`~curation.stages.base.Stage` subclass with a ``name``;
the registry is built by scanning this folder, so adding a stage is adding a file."""

from __future__ import annotations

import importlib
import pkgutil

from curation.stages.base import Stage, StageContext

__all__ = ["STAGES", "Stage", "StageContext", "get_stage"]


def _scan() -> dict[str, type[Stage]]:
    found: dict[str, type[Stage]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, Stage)
                and obj is not Stage
                and obj.__module__ == module.__name__
            ):
                found[obj.name] = obj
    # pipeline order: a stage declares where it sits in the data flow
    return dict(sorted(found.items(), key=lambda kv: kv[1].order))


STAGES: dict[str, type[Stage]] = _scan()


def get_stage(name: str) -> type[Stage]:
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(STAGES)}") from None
