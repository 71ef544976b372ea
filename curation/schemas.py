"""The JSON Schemas in schemas/ (the files the project writes are checked against them in the tests, and
releases publish them)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


@cache
def load_schema(name: str) -> dict[str, Any]:
    """``name`` without the suffix: ``record``, ``ledger_row``, ``instruction_sample``, ``manifest``."""
    return json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())


def validator(name: str):
    """A jsonschema validator that resolves the ``$ref`` between our schemas."""
    import jsonschema
    from referencing import Registry, Resource

    registry = Registry().with_resources(
        (f"curation/{p.name}", Resource.from_contents(json.loads(p.read_text()))) for p in SCHEMA_DIR.glob("*.json")
    )
    schema = load_schema(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=registry)


def validate(name: str, instance: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` naming the failing field when ``instance`` does not match."""
    validator(name).validate(instance)
