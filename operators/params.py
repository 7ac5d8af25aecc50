"""Airflow ``Param``s derived from the steps' pydantic models: one schema, written once.

The cluster validates a step's params with its model; the trigger form validates with the same
model's JSON schema, so a bad value is refused in the form before anything is submitted.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param
from pydantic import BaseModel

_KEEP = ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "items",
         "minItems", "maxItems", "description", "anyOf", "const")


def field_schema(model: type[BaseModel], field: str) -> dict[str, Any]:
    """The JSON schema of one field of ``model`` (without title/default)."""
    schema = model.model_json_schema()["properties"][field]
    return {k: v for k, v in schema.items() if k in _KEEP}


def param_from(model: type[BaseModel], field: str, default: Any = ..., **overrides: Any) -> Param:
    """A ``Param`` for ``model.field``: its type, bounds and description; default from the
    model unless given."""
    if default is ...:
        default = model.model_fields[field].get_default(call_default_factory=True)
    schema = field_schema(model, field)
    schema.update(overrides)
    return Param(default, **schema)
