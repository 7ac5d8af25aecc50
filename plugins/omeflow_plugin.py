"""omeflow's Airflow plugin: its FastAPI app, nav entries and the "Cluster job log" link.

- ``fastapi_apps``: a small FastAPI app mounted at :data:`URL_PREFIX` (``/omeflow``) with the
  HPC jobs page (:mod:`hpc_jobs_page`: jobs, job view with the live log, cancel, the cluster
  queue), the annotation page (:mod:`annotation_page`) and the run-link page
  (:mod:`run_link`: ``/omeflow/run/<dag_id>?image=…`` starts a run in two clicks). Airflow 3
  gives plugin apps no authentication: every route enforces it itself.
- ``external_views``: nav entries "HPC jobs" and "Annotate" that frame the pages in the UI.
- ``operator_extra_links``: "Cluster job log" on ``HpcStepOperator`` (and its subclasses known
  when the plugin loads) → the job view (status, progress, live log, cancel) of the task try.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink
from annotation_page import router as annotation_router
from fastapi import FastAPI
from hpc_jobs_data import HPC_JOB_XCOM, URL_PREFIX, has_hpc_job, log_path
from hpc_jobs_page import router as jobs_router
from run_link import router as run_link_router

from operators.hpc_step import HpcStepOperator

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

log = logging.getLogger(__name__)

app = FastAPI(
    title="omeflow",
    description="HPC jobs and annotation pages of omeflow (need an Airflow login).",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)
app.include_router(jobs_router)
app.include_router(annotation_router)
app.include_router(run_link_router)


# ------------------------------------------------------------------------------------------------
# Operator extra link
# ------------------------------------------------------------------------------------------------
def _base_url() -> str:
    try:
        from airflow.configuration import conf
    except ImportError:  # pragma: no cover - a worker without airflow-core
        from airflow.sdk.configuration import conf  # type: ignore[no-redef]
    return (conf.get("api", "base_url", fallback="") or "").rstrip("/")


def _submitted_a_job(ti_key: TaskInstanceKey) -> bool:
    """Whether the task instance pushed its ``hpc_job`` XCom (Task SDK inside a task, else the
    DB). Only decides whether the link shows: the link itself names the task try."""
    try:
        from airflow.sdk.execution_time import task_runner

        in_task = getattr(task_runner, "SUPERVISOR_COMMS", None) is not None
    except ImportError:  # pragma: no cover
        in_task = False
    if in_task:
        from airflow.sdk import XCom

        return has_hpc_job(XCom.get_value(ti_key=ti_key, key=HPC_JOB_XCOM))

    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        raw = session.execute(
            XComModel.get_many(
                key=HPC_JOB_XCOM, run_id=ti_key.run_id, dag_ids=ti_key.dag_id,
                task_ids=ti_key.task_id, map_indexes=ti_key.map_index,
            ).with_only_columns(XComModel.value)
        ).scalar()
    return has_hpc_job(raw)


class ClusterJobLogLink(BaseOperatorLink):
    """"Cluster job log": the plugin's log view of the task try's cluster job.

    Works where Airflow calls it: in the API server (registered through this plugin) and in the
    worker (if listed in an operator's ``operator_extra_links``). Empty when the task has not
    submitted a job yet.
    """

    name = "Cluster job log"
    operators: list[type[BaseOperator]] = []  # filled by the plugin (see _hpc_operator_classes)

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        if not _submitted_a_job(ti_key):
            return ""
        return _base_url() + log_path(
            ti_key.dag_id, ti_key.run_id, ti_key.task_id, ti_key.map_index, ti_key.try_number
        )


def _hpc_operator_classes() -> list[type[BaseOperator]]:
    """HpcStepOperator and its subclasses in the ``operators`` package (Airflow matches a
    plugin's link to exact classes, so each per-step subclass must be listed)."""
    import importlib
    import pkgutil

    import operators

    for mod in pkgutil.iter_modules(operators.__path__, prefix="operators."):
        try:
            importlib.import_module(mod.name)
        except Exception as exc:  # noqa: BLE001 - one broken module must not hide the plugin
            log.warning("omeflow plugin: cannot import %s (%s); its operators get no "
                        "'Cluster job log' link until the import error is fixed", mod.name, exc)
    found: list[type[BaseOperator]] = []
    todo: list[type[BaseOperator]] = [HpcStepOperator]
    while todo:
        cls = todo.pop()
        if cls not in found:
            found.append(cls)
            todo.extend(cls.__subclasses__())
    return found


ClusterJobLogLink.operators = _hpc_operator_classes()


# ------------------------------------------------------------------------------------------------
# The plugin
# ------------------------------------------------------------------------------------------------
class OmeflowPlugin(AirflowPlugin):
    """omeflow: the HPC jobs page (auth enforced), its nav entry and the cluster job log link."""

    name = "omeflow"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "omeflow HPC jobs"}]
    external_views = [
        {
            "name": "HPC jobs",
            # relative to the API server's base URL (no leading slash)
            "href": URL_PREFIX.lstrip("/") + "/jobs",
            "destination": "nav",
            "url_route": "omeflow-hpc-jobs",
            "category": "browse",
        },
        {
            "name": "Annotate",
            "href": URL_PREFIX.lstrip("/") + "/annotate",
            "destination": "nav",
            "url_route": "omeflow-annotate",
            "category": "browse",
        },
    ]
    operator_extra_links = [ClusterJobLogLink()]
