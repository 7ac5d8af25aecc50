"""The step manifest: every DAG Param, operator and step model agrees with the registry.

A step is defined once, by its params model (``hpc_jobs/steps/<step>.py``). These checks keep
everything else derived from it (fractal-tasks-core style manifest checks):

- every DAG in ``dags/`` loads; each of its Params is a step field with exactly the model's
  schema and default, or is in the DAG module's documented ``DAG_ONLY_PARAMS``;
- every field of every step a DAG runs reaches the step: from the form, or set by the DAG or
  the operator itself (so a field added to a model but not to the form fails here);
- every operator class names a registered step and accepts exactly that step's fields;
- every registered step's model has a JSON schema and a description on every field, and a
  field name two steps share has one schema.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from typing import Annotated, Any

import pendulum
import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk import DAG, Param
from airflow.sdk.exceptions import AirflowFailException, ParamValidationError
from pydantic import BaseModel, Field
from pydantic_core import PydanticUndefined

import operators.celldetector  # noqa: F401 - registers the operator subclasses
from hpc_jobs.registry import EXPORT_ZARR, SEGMENT_NUCLEI, STEPS
from operators.hpc_step import HpcStepOperator
from operators.params import field_default, field_schema, form_args, param_from, step_form
from operators.step import StepOperator, operator_arg_names

REPO = Path(__file__).resolve().parents[2]
DAG_FILES = sorted((REPO / "dags").glob("*.py"))


def _dag_module(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"manifest_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    return DagBag(str(REPO / "dags"))


def _fields_by_name() -> dict[str, list[str]]:
    """field name -> the registered steps that have it."""
    out: dict[str, list[str]] = {}
    for name, spec in STEPS.items():
        for field in spec.params_model.model_fields:
            out.setdefault(field, []).append(name)
    return out


def _step_tasks(dag: DAG) -> list[HpcStepOperator]:
    return [t for t in dag.tasks if isinstance(t, HpcStepOperator)]


def form_problems(dag: DAG, dag_only: dict[str, Param]) -> list[str]:
    """What in ``dag``'s form or step wiring departs from the step models (empty = fine)."""
    problems: list[str] = []
    owners = _fields_by_name()
    for name in dag.params:
        param = dag.params.get_param(name)
        if name in dag_only:
            if name in owners:
                problems.append(f"{dag.dag_id}: DAG-only param {name!r} shadows a field of "
                                f"{owners[name]}")
            continue
        if name not in owners:
            problems.append(f"{dag.dag_id}: param {name!r} is neither a step field nor listed "
                            "in DAG_ONLY_PARAMS")
            continue
        model = STEPS[owners[name][0]].params_model
        schema = {**param.schema, "description": param.description}
        if schema != field_schema(model, name):
            problems.append(f"{dag.dag_id}: param {name!r} has schema {schema}, the model "
                            f"{field_schema(model, name)}")
        default = field_default(model, name)
        if default is not PydanticUndefined and param.value != default:
            problems.append(f"{dag.dag_id}: param {name!r} defaults to {param.value!r}, the "
                            f"model to {default!r}")
    for task in _step_tasks(dag):
        if task.step not in STEPS:
            problems.append(f"{dag.dag_id}.{task.task_id}: unknown step {task.step!r}")
            continue
        fills = getattr(type(task), "fills", frozenset())
        for field in STEPS[task.step].params_model.model_fields:
            wired = task.step_params.get(field)
            if field in dag.params and field not in fills:
                if wired != "{{ params.%s }}" % field:  # noqa: UP031 - Jinja
                    problems.append(f"{dag.dag_id}.{task.task_id}: form param {field!r} does "
                                    f"not reach the step (it gets {wired!r})")
            elif field not in task.step_params and field not in fills:
                problems.append(f"{dag.dag_id}.{task.task_id}: {task.step} field {field!r} is "
                                "neither in the form nor set by the DAG or operator")
        for field in task.step_params:
            if field not in STEPS[task.step].params_model.model_fields:
                problems.append(f"{dag.dag_id}.{task.task_id}: {task.step} has no field "
                                f"{field!r}")
    return problems


# -- DAGs -------------------------------------------------------------------------------------
def test_every_dag_loads(dagbag: DagBag) -> None:
    assert dagbag.import_errors == {}
    assert {"celldetector_preprocess", "omeflow_cluster_check"} <= set(dagbag.dag_ids)
    assert len(DAG_FILES) >= 2


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.stem)
def test_dag_params_are_generated_from_the_step_models(path: Path, dagbag: DagBag) -> None:
    module = _dag_module(path)
    dags = [v for v in vars(module).values() if isinstance(v, DAG)]
    assert dags, f"{path.name} defines no DAG"
    assert isinstance(getattr(module, "DAG_ONLY_PARAMS", None), dict), (
        f"{path.name}: list the params that are not step fields in DAG_ONLY_PARAMS"
    )
    for dag in dags:
        assert form_problems(dag, module.DAG_ONLY_PARAMS) == []
        assert _step_tasks(dag), f"{dag.dag_id} runs no step"


def test_preprocess_form_reaches_every_fix_its_errors_name(dagbag: DagBag) -> None:
    """The fixes the steps' errors name can be set in the form (issue 6, section 7)."""
    params = dagbag.dags["celldetector_preprocess"].params
    # "rerun export_zarr with overwrite=true", "use block_size=...", "use halo >= ...",
    # "dapi_channel=5 is out of range", "deselect the ecdf step", "raise ... time_min"
    for name in ("overwrite", "block_size", "halo", "dapi_channel", "marker_channel", "steps"):
        assert name in params, name
    resources = params.get_param("hpc_resources").schema
    assert resources["properties"][SEGMENT_NUCLEI]["properties"]["time_min"]
    assert resources["properties"][EXPORT_ZARR]["properties"]["mem_mb"]
    # a deselected step, an overwrite and a longer time limit pass the form's own validation
    params.validate()
    overwrite = params.get_param("overwrite")
    assert overwrite.resolve(True) is True


def test_preprocess_run_params_are_checked_across_fields_before_any_job(dagbag: DagBag) -> None:
    """What a JSON-schema form cannot check (halo >= 2 x diameter, chunk_size divides
    block_size) fails the run's first task in seconds, naming the fix."""
    dag = dagbag.dags["celldetector_preprocess"]
    check = dag.get_task("check_images")._pre_execute_hook
    defaults = dag.params.validate()
    with pytest.raises(AirflowFailException) as err:  # the form picks no image by default
        check({"params": defaults})
    assert "give image_ids, a dataset id or a tag" in str(err.value), err.value
    defaults["image_ids"] = [1]
    check({"params": defaults})  # the form's defaults plus an image are a valid run
    with pytest.raises(AirflowFailException) as err:
        check({"params": {**defaults, "diameter": 40.0, "block_size": 512, "chunk_size": 1024}})
    assert "use halo >= 80" in str(err.value), err.value
    assert "block_size=512 must be a multiple of chunk_size=1024" in str(err.value)


def test_a_restated_bound_or_a_missing_field_is_caught() -> None:
    """The checks above fail on a form that drifted from the model (as the landed one did)."""
    form = step_form([EXPORT_ZARR], exclude=("image_id",))
    form["block_size"] = Param(2048, type="integer", minimum=256, maximum=16384,
                               multipleOf=256, description="restated in the DAG")
    del form["overwrite"]
    with DAG("drifted", schedule=None, start_date=pendulum.datetime(2026, 1, 1),
             params=form) as dag:
        args = form_args(EXPORT_ZARR, exclude=("image_id", "overwrite"))
        StepOperator(task_id="export", step=EXPORT_ZARR, image_id=1, **args)
    problems = form_problems(dag, {})
    assert any("'block_size' has schema" in p for p in problems), problems
    assert any("'overwrite' is neither in the form" in p for p in problems), problems


def test_a_step_shared_param_has_one_schema() -> None:
    for name, steps in _fields_by_name().items():
        schemas = [field_schema(STEPS[s].params_model, name) for s in steps]
        defaults = [repr(field_default(STEPS[s].params_model, name)) for s in steps]
        assert all(s == schemas[0] for s in schemas), (name, steps, schemas)
        assert len(set(defaults)) == 1, (name, steps, defaults)
    # the ones the issue names, concretely
    shared = _fields_by_name()
    assert {"export_zarr", "segment_nuclei"} <= set(shared["block_size"])
    assert {"check_images", "segment_nuclei"} <= set(shared["dapi_channel"])


# -- steps ------------------------------------------------------------------------------------
@pytest.mark.parametrize("step", sorted(STEPS))
def test_every_step_model_has_a_schema_and_described_fields(step: str) -> None:
    model = STEPS[step].params_model
    schema = model.model_json_schema()
    assert schema["type"] == "object" and schema.get("additionalProperties") is False
    for name in model.model_fields:
        assert field_schema(model, name).get("description"), f"{step}.{name} has no description"
    clash = set(model.model_fields) & operator_arg_names(StepOperator)
    assert not clash, f"{step} fields {clash} clash with operator arguments; rename them"


# -- operators --------------------------------------------------------------------------------
def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out


OPERATORS = sorted(
    (c for c in _subclasses(HpcStepOperator) if getattr(c, "step_name", "")),
    key=lambda c: c.__name__,
)


def test_operator_classes_exist() -> None:
    names = {c.__name__ for c in OPERATORS}
    assert {"ExportZarrOperator", "SegmentNucleiOperator", "EcdfOperator"} <= names


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
def test_operator_accepts_exactly_its_steps_fields(cls: type[StepOperator]) -> None:
    assert cls.step_name in STEPS
    model = STEPS[cls.step_name].params_model
    accepted = [f for f in model.model_fields if f not in cls.fills]
    args = {f: "{{ params.%s }}" % f for f in accepted}  # noqa: UP031
    op = cls(task_id="t", **args)
    assert op.step == cls.step_name and op.step_params == args
    with pytest.raises(TypeError) as err:
        cls(task_id="t2", image_id=1, bogus_size=3)
    assert "bogus_size" in str(err.value)
    assert all(f in str(err.value) for f in accepted), "the message lists the valid names"
    for filled in cls.fills:
        with pytest.raises(TypeError, match=filled):
            cls(task_id=f"t_{filled}", **{filled: "x"})
    # the constructor's own named arguments are operator arguments, not step fields
    own = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    assert not own & set(model.model_fields)


@pytest.mark.parametrize("step", sorted(STEPS))
def test_generic_operator_takes_every_registered_step(step: str) -> None:
    fields = list(STEPS[step].params_model.model_fields)
    op = StepOperator(task_id="t", step=step, **{f: None for f in fields})
    assert set(op.step_params) == set(fields)
    with pytest.raises(ValueError, match="registered steps"):
        StepOperator(task_id="t2", step=step + "_typo")


def test_form_schema_keeps_every_validation_keyword() -> None:
    """The form refuses what the model refuses (the landed form dropped multipleOf, pattern,
    minLength, uniqueItems ... and so accepted values the cluster then refused)."""

    class Model(BaseModel):
        name: str = Field("ab", min_length=2, pattern=r"^[a-z]+$", description="a name")
        tags: set[Annotated[str, Field(max_length=3)]] = Field(set(), description="tags")
        size: int | None = Field(None, ge=64, multiple_of=64, description="a size")

    name, tags, size = (param_from(Model, f) for f in ("name", "tags", "size"))
    assert name.schema == {"type": "string", "minLength": 2, "pattern": "^[a-z]+$"}
    assert tags.schema["uniqueItems"] is True and tags.schema["items"]["maxLength"] == 3
    assert size.schema["type"] == ["integer", "null"] and size.schema["multipleOf"] == 64
    assert size.resolve(None) is None and size.resolve(128) == 128
    for param, bad, keyword in ((size, 1000, "multipleOf"), (size, 32, "minimum"),
                                (name, "a", "minLength"), (name, "AB", "pattern"),
                                (tags, ["a", "a"], "uniqueItems")):
        with pytest.raises(ParamValidationError, match=f"Failed validating '{keyword}'"):
            param.resolve(bad)
