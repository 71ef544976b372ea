"""The crawled record's Arrow schema, and the JSON Schemas in schemas/ (the files the project writes are checked
against them in the tests, and releases publish them)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pyarrow as pa

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"

# what the crawl's probe measures of a media file (null where it does not apply to the modality); the release
# index carries these too
_MEDIA_METADATA_FIELDS = [
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("duration_s", pa.float64()),
    ("fps", pa.float64()),
    ("num_frames", pa.int32()),
    ("sample_rate", pa.int32()),
    ("channels", pa.int32()),
]
MEDIA_METADATA = tuple(name for name, _ in _MEDIA_METADATA_FIELDS)

# a crawled record (crawl/shards/*.parquet; schemas/record.schema.json is its JSON form)
RECORD_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("modality", pa.string()),
        ("source", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("shard", pa.string()),
        ("ext", pa.string()),
        ("mime", pa.string()),
        ("sha256", pa.string()),
        ("num_bytes", pa.int64()),
        *_MEDIA_METADATA_FIELDS,
    ]
)


@cache
def load_schema(name: str) -> dict[str, Any]:
    """``name`` without the suffix: ``record``, ``ledger_row``, ``instruction_sample``, ``manifest``."""
    return json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())


def validator(name: str):
    """A validator of one of our schemas that resolves the ``$ref`` between them: jsonschema-rs, which gives the
    jsonschema package's verdicts (a test compares them) at 8.5 against 543 us a release sample, the release stage
    checking every sample it writes."""
    import jsonschema_rs

    registry = jsonschema_rs.Registry(
        [(f"curation/{p.name}", json.loads(p.read_text())) for p in SCHEMA_DIR.glob("*.json")]
    )
    schema = load_schema(name)
    jsonschema_rs.meta.validate(schema)
    return jsonschema_rs.validator_for(schema, registry=registry)


def validate(name: str, instance: dict[str, Any]) -> None:
    """Raise ``jsonschema_rs.ValidationError`` naming the failing field when ``instance`` does not match."""
    validator(name).validate(instance)
