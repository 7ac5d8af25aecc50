"""Loading a ``select_candidates`` job's candidates and crops into the annotation store.

The crops are rendered on the cluster (``hpc_jobs/crops.py``) and written as
``crops.<nnnn>.json`` chunks in the job's ``outputs/``, listed in its summary. This operator
fetches them one at a time through the gateway's ``result`` verb (the only way data crosses
from the cluster: each chunk is below ``protocol.MAX_CHUNK_BYTES``), keeps them in a
temporary cache on the Airflow side, stores the candidate set (idempotent: image, run, rule
and params) and then the crops, chunk by chunk, so memory holds one chunk at a time.

The set's annotation page is :data:`ANNOTATE_PATH` (``/omeflow/annotate?set=<id>``, served by
the omeflow plugin), prefixed with ``[api] base_url``; the task log names it and the task's
extra link "Annotate candidates" opens it.
"""

from __future__ import annotations

import base64
import json
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, BaseOperatorLink, Context
from airflow.sdk.exceptions import AirflowFailException

from hooks.hpc import DEFAULT_CONN_ID as HPC_CONN_ID
from hooks.hpc import HpcGatewayHook

if TYPE_CHECKING:
    from hooks.annotations import AnnotationStore

#: The annotation page of one candidate set, relative to the API server's base URL.
ANNOTATE_PATH = "/omeflow/annotate?set={set_id}"
#: XCom key of the stored set's id (the extra link reads it).
SET_XCOM = "annotation_set"
#: Row keys of a chunk that are the candidate's identity/geometry, not statistics.
_ROW_KEYS = ("id", "x", "y", "area", "roi", "crops")
#: Statistics kept with a candidate: the per-channel window statistics and the marker value.
_STAT_KEY = re.compile(r"^(c\d+_[a-z]+|marker_value|roi_id)$")


def annotate_url(set_id: int) -> str:
    """The annotation page of ``set_id``: ``[api] base_url`` + :data:`ANNOTATE_PATH`."""
    from airflow.configuration import conf

    base = (conf.get("api", "base_url", fallback="") or "").rstrip("/")
    return base + ANNOTATE_PATH.format(set_id=int(set_id))


class AnnotationPageLink(BaseOperatorLink):
    """"Annotate candidates": the annotation page of the set the task stored."""

    name = "Annotate candidates"

    def get_link(self, operator: BaseOperator, *, ti_key: Any) -> str:
        # Airflow 3 calls this in the worker when the task ends (``ti_key`` is then the
        # running task instance, ``operator`` the task that executed) and keeps the result as
        # an XCom the UI shows
        url = getattr(operator, "annotate_url", None)
        if url:
            return str(url)
        pull = getattr(ti_key, "xcom_pull", None)
        set_id = pull(task_ids=ti_key.task_id, key=SET_XCOM) if pull is not None else None
        return annotate_url(set_id) if set_id is not None else ""


def open_annotation_store(conn_id: str, log: Any) -> AnnotationStore:
    """The annotation store of ``conn_id``; the embedded SQLite is migrated on first use (a
    PostgreSQL store is migrated by its admin: ``omeflow annotations migrate``)."""
    from hooks.annotations import AnnotationHook, head_revision

    store = AnnotationHook(annotations_conn_id=conn_id).get_store()
    if store.engine.dialect.name == "sqlite" and store.revision() != head_revision():
        before, after = store.migrate()
        log.info("embedded annotation store %s migrated (%s -> %s)", store.where, before, after)
    return store


class LoadCandidatesOperator(BaseOperator):
    """Fetch a ``select_candidates`` job's chunks through the gateway into the annotation store.

    :param summary: the step's summary (the ``select_candidates`` task's return value:
        ``job_id``, ``image_id``, ``rule``, ``rule_params``, ``thresholds``, ``crops.chunks``).
        Templated.
    :param hpc_conn_id: the gateway connection (as for the step's operator).
    :param annotations_conn_id: the annotation store's connection (PostgreSQL); when it does
        not exist, the embedded SQLite store.

    Returns ``{"set_id", "image_id", "candidates", "chunks", "bytes", "url", "fetch_s",
    "load_s"}``; pushes the set id as XCom ``annotation_set`` (read by the extra link).
    """

    template_fields: Sequence[str] = ("summary",)
    operator_extra_links = (AnnotationPageLink(),)
    ui_color = "#e8f4ea"

    def __init__(
        self,
        *,
        summary: Any,
        hpc_conn_id: str = HPC_CONN_ID,
        annotations_conn_id: str = "omeflow_annotations",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.summary = summary
        self.hpc_conn_id = hpc_conn_id
        self.annotations_conn_id = annotations_conn_id
        #: The annotation page of the stored set (set by ``execute``; the extra link).
        self.annotate_url: str | None = None

    def _summary(self) -> dict[str, Any]:
        s = self.summary
        if isinstance(s, str):
            s = json.loads(s)
        if not isinstance(s, dict) or not {"job_id", "image_id", "crops"} <= set(s):
            raise AirflowFailException(
                f"summary is not a select_candidates summary (need job_id, image_id, crops): "
                f"{str(s)[:300]}; pass the select_candidates task's output"
            )
        return s

    def fetch_chunks(self, hook: HpcGatewayHook, job_id: str, names: Sequence[str],
                     cache: Path) -> Iterator[Path]:
        """Fetch every chunk into ``cache`` (one file each); yield their paths in order."""
        for name in names:
            reply = hook.result(job_id, name)
            if not isinstance(reply.data, dict) or "candidates" not in reply.data:
                raise AirflowFailException(
                    f"output {name} of job {job_id} is not a crops chunk; rerun select_candidates"
                )
            path = cache / name
            path.write_text(json.dumps(reply.data))
            yield path

    def execute(self, context: Context) -> dict[str, Any]:
        summary = self._summary()
        job_id, image_id = str(summary["job_id"]), int(summary["image_id"])
        names = list(summary["crops"]["chunks"])
        hook = HpcGatewayHook(hpc_conn_id=self.hpc_conn_id)
        store = open_annotation_store(self.annotations_conn_id, self.log)
        t0 = time.perf_counter()
        rows: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(prefix="omeflow-crops-") as tmp:
            paths = []
            nbytes = 0
            for path in self.fetch_chunks(hook, job_id, names, Path(tmp)):
                paths.append(path)
                nbytes += path.stat().st_size
                for row in json.loads(path.read_text())["candidates"]:
                    rows.append(candidate_record(row))
            fetch_s = time.perf_counter() - t0
            self.log.info("fetched %d chunk(s), %d bytes, %d candidates of job %s in %.1fs",
                          len(names), nbytes, len(rows), job_id, fetch_s)
            params = {**summary["rule_params"], "crop_size": summary["crops"]["size"],
                      "zooms": summary["crops"]["zooms"], "display": {
                          k: summary["display"][k] for k in ("low", "high")},
                      "channel_names": summary.get("channel_names", []), "job_id": job_id}
            thresholds = {t["roi"]: t["threshold"] for t in summary["thresholds"]}
            t1 = time.perf_counter()
            set_id = store.add_candidate_set(
                image_id, context["run_id"], summary["rule"], params, thresholds, rows,
                dag_id=context["dag"].dag_id,
            )
            n_crops = 0
            for path in paths:
                n_crops += store.add_crops(set_id, crop_items(
                    json.loads(path.read_text())["candidates"]))
            load_s = time.perf_counter() - t1
        url = annotate_url(set_id)
        self.annotate_url = url
        context["ti"].xcom_push(key=SET_XCOM, value=set_id)
        self.log.info("candidate set %d: %d candidates, %d crops of image %d; annotation page: "
                      "%s", set_id, len(rows), n_crops, image_id, url)
        return {"set_id": set_id, "image_id": image_id, "candidates": len(rows),
                "crops": n_crops, "chunks": len(names), "bytes": nbytes, "url": url,
                "fetch_s": round(fetch_s, 3), "load_s": round(load_s, 3)}


def candidate_record(row: dict[str, Any]) -> dict[str, Any]:
    """The annotation store's candidate mapping of one chunk row (statistics in ``stats``)."""
    return {
        "nucleus_id": int(row["id"]), "x": row["x"], "y": row["y"], "area": row["area"],
        "roi": row.get("roi"),
        "stats": {k: v for k, v in row.items() if k not in _ROW_KEYS and _STAT_KEY.match(k)},
    }


def crop_items(rows: Sequence[dict[str, Any]]) -> Iterator[tuple[int, str, int, bytes]]:
    """``(nucleus_id, kind, zoom, png bytes)`` of every crop in a chunk's rows."""
    for row in rows:
        for zoom, kinds in row["crops"].items():
            for kind, b64 in kinds.items():
                yield int(row["id"]), kind, int(zoom), base64.b64decode(b64)
