"""Airflow ``Param``s and operator arguments derived from the steps' pydantic models.

A step's ``Params`` model (``hpc_jobs/steps/<step>.py``) is the single definition of its
parameters: the gateway validates a submit with it, and the trigger form of a DAG is generated
from its JSON schema here, so the form refuses a bad value before anything reaches the cluster
and the two can never disagree about a bound or a default.

- :func:`field_schema`: the form-ready JSON schema of one field (every validation keyword kept;
  ``Optional[X]`` as ``type: [X, "null"]``, which the Airflow UI renders as an X field that may
  be left empty).
- :func:`step_form`: the ``Param``s of every user-facing field of some steps, one per name
  (a field two steps share must have one schema: declare it in ``hpc_jobs/steps/fields.py``).
- :func:`form_args`: the operator arguments that feed a step from that form
  (``{"block_size": "{{ params.block_size }}", ...}``).
- :func:`form_checker`: a ``pre_execute`` hook that validates a run's params with every step
  model at once (cross-field rules too, e.g. ``halo >= 2 x diameter``), before any job.
- :func:`resources_param`: a form param of per-step cluster resource overrides (the fix that
  TIMEOUT and OUT_OF_MEMORY failures name).
- :func:`check_step_args`: refuse argument names a step does not have, listing the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from airflow.sdk import Param
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined, to_jsonable_python

from hpc_jobs.protocol import ResourceOverrides
from hpc_jobs.registry import require_step

#: JSON-schema keys that are not validation keywords of a form field: the title is the param
#: name and the default is the Param's value.
_NOT_SCHEMA = ("title", "default")


def _inline_refs(node: Any, defs: Mapping[str, Any]) -> Any:
    """``node`` with every ``{"$ref": "#/$defs/X"}`` replaced by the definition of X."""
    if isinstance(node, list):
        return [_inline_refs(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        rest = {k: v for k, v in node.items() if k != "$ref"}
        return _inline_refs({**defs[ref.removeprefix("#/$defs/")], **rest}, defs)
    return {k: _inline_refs(v, defs) for k, v in node.items()}


def _any_of_as_type_list(schema: dict[str, Any]) -> dict[str, Any]:
    """``{"anyOf": [X, Y, ...]}`` of single-type options as ``{**X, **Y, "type": [X.type,
    Y.type, ...]}`` (e.g. an optional integer: ``"type": ["integer", "null"]``).

    The same set of values as long as no two options share a type or a keyword (JSON Schema's
    keywords only constrain values of their own type: ``minimum`` numbers, ``minLength``
    strings), but a form the Airflow UI can render: it picks the input widget from ``type``
    and ignores ``anyOf``. Anything else is returned unchanged.
    """
    options = schema.get("anyOf")
    if not isinstance(options, list) or len(options) < 2:
        return schema
    outer = {k: v for k, v in schema.items() if k != "anyOf"}
    merged: dict[str, Any] = {}
    types: list[str] = []
    for option in options:
        kind = option.get("type") if isinstance(option, dict) else None
        keywords = set(option) - {"type"} if isinstance(option, dict) else set()
        if not isinstance(kind, str) or kind in types or keywords & (set(merged) | set(outer)):
            return schema
        types.append(kind)
        merged.update({k: v for k, v in option.items() if k != "type"})
    return {**merged, **outer, "type": types}


def field_schema(model: type[BaseModel], field: str) -> dict[str, Any]:
    """The form-ready JSON schema of ``model.field``: all its validation keywords and its
    description, without title and default."""
    full = model.model_json_schema()
    try:
        schema = full["properties"][field]
    except KeyError:
        raise ValueError(
            f"{model.__module__}.{model.__qualname__} has no field {field!r}; its fields: "
            f"{', '.join(model.model_fields)}"
        ) from None
    schema = _inline_refs(schema, full.get("$defs", {}))
    return _any_of_as_type_list({k: v for k, v in schema.items() if k not in _NOT_SCHEMA})


def field_default(model: type[BaseModel], field: str) -> Any:
    """The model's default of ``field``, or ``PydanticUndefined`` for a required field."""
    return model.model_fields[field].get_default(call_default_factory=True)


def param_from(model: type[BaseModel], field: str, default: Any = ...) -> Param:
    """A ``Param`` for ``model.field`` with the field's schema; the model's default unless
    the field has none (then ``default`` must be given, or the form requires a value)."""
    model_default = field_default(model, field)
    if model_default is not PydanticUndefined:
        if default is not ... and default != to_jsonable_python(model_default):
            raise ValueError(
                f"{field}: the form default {default!r} differs from the step's default "
                f"{model_default!r}; change the default in {model.__module__} instead"
            )
        default = to_jsonable_python(model_default)  # a form value: JSON (a set -> a list)
    schema = field_schema(model, field)
    description = schema.pop("description", None)
    if default is ...:
        return Param(description=description, **schema)
    return Param(default, description=description, **schema)


def step_fields(step: str, exclude: Collection[str] = ()) -> list[str]:
    """The user-facing fields of a registered step: its model's fields minus ``exclude``."""
    return [f for f in require_step(step).params_model.model_fields if f not in exclude]


def step_form(
    steps: Iterable[str],
    exclude: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Param]:
    """The trigger-form ``Param``s of every field of ``steps`` except ``exclude`` (fields the
    DAG fills itself). ``defaults`` gives form defaults for fields the model requires.

    A name two steps share gets one Param; their schemas must be equal (else ``ValueError``:
    declare the field once in ``hpc_jobs/steps/fields.py``).
    """
    defaults = dict(defaults or {})
    form: dict[str, Param] = {}
    origin: dict[str, str] = {}
    for step in steps:
        model = require_step(step).params_model
        for field in step_fields(step, exclude):
            param = param_from(model, field, defaults.get(field, ...))
            if field in form:
                if (form[field].schema, form[field].description, form[field].value) != (
                    param.schema, param.description, param.value,
                ):
                    raise ValueError(
                        f"steps {origin[field]} and {step} both take {field!r} with different "
                        "schemas or defaults; declare it once in hpc_jobs/steps/fields.py and "
                        "use that type in both models"
                    )
                continue
            form[field], origin[field] = param, step
    unused = set(defaults) - set(form)
    if unused:
        raise ValueError(f"defaults for fields that are not in the form: {sorted(unused)}")
    return form


def form_args(step: str, exclude: Collection[str] = ()) -> dict[str, str]:
    """Operator arguments feeding every form field of ``step`` from the run's params."""
    return {f: "{{ params.%s }}" % f for f in step_fields(step, exclude)}  # noqa: UP031


def check_step_args(step: str, names: Iterable[str], refused: Collection[str] = ()) -> None:
    """Refuse argument names that are not fields of ``step`` (or that the operator fills
    itself: ``refused``), naming the valid ones. Called at DAG-parse time."""
    fields = [f for f in require_step(step).params_model.model_fields if f not in refused]
    unknown = [n for n in names if n not in fields]
    if unknown:
        raise TypeError(
            f"step {step!r} has no parameter(s) {', '.join(map(repr, unknown))}; valid: "
            f"{', '.join(fields)}"
            + (f" (set by the operator itself: {', '.join(sorted(refused))})" if refused else "")
        )


def resources_param(steps: Iterable[str]) -> Param:
    """A form param ``{step: {cpus, mem_mb, time_min, gpus, partition}}`` overriding the
    registry's default resources of ``steps`` (schema from ``protocol.ResourceOverrides``)."""
    full = ResourceOverrides.model_json_schema()
    per_step = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            name: {k: v for k, v in _inline_refs(schema, full.get("$defs", {})).items()
                   if k not in _NOT_SCHEMA}
            for name, schema in full["properties"].items()
            if name != "array"  # array jobs are the operators' business
        },
    }
    return Param(
        {}, type="object", properties={step: per_step for step in steps},
        additionalProperties=False,
        description="cluster resources per step, overriding the defaults, e.g. "
        '{"segment_nuclei": {"time_min": 600, "mem_mb": 32000}} (a job that ran out of time '
        "or memory names this)",
    )


def _placeholder(schema: dict[str, Any]) -> Any:
    """A valid stand-in for a required field the DAG fills later (e.g. ``image_id``): the
    field's first example when it has one (a string with a pattern), else its minimum."""
    if schema.get("examples"):
        return schema["examples"][0]
    if schema.get("type") in ("integer", "number"):
        return schema.get("minimum", 0)
    return None


def form_checker(steps: Iterable[str], exclude: Collection[str] = ()) -> Callable[[Any], None]:
    """A ``pre_execute`` hook for a DAG's first task: validate the run's params with the model
    of every step in ``steps`` (rules across fields, which a JSON-schema form cannot check,
    included), so a bad combination fails in seconds, naming the fix, before any job runs.
    Fields in ``exclude`` (filled by the DAG later) get a valid stand-in."""
    steps = list(steps)

    def check(context: Any) -> None:
        from airflow.sdk.exceptions import AirflowFailException

        values = context["params"]
        problems: list[str] = []
        for step in steps:
            model = require_step(step).params_model
            data = {f: values[f] for f in step_fields(step, exclude) if f in values}
            for f, info in model.model_fields.items():
                if f in exclude and info.is_required():
                    data[f] = _placeholder(field_schema(model, f))
            try:
                model.model_validate(data)
            except ValidationError as exc:
                for err in exc.errors(include_url=False, include_input=False):
                    where = ".".join(str(p) for p in err["loc"])
                    problems.append(f"{step}: {where + ': ' if where else ''}{err['msg']}")
        if problems:
            raise AirflowFailException("the run's params are not valid: " + "; ".join(problems))

    return check
