"""The annotation page: people label candidate cells inside the Airflow UI.

Mounted by the omeflow plugin under ``/omeflow`` (``router`` is included in its FastAPI app):

``GET  /omeflow/annotate[?set=<id>]``                  the page (HTML; JS and CSS beside it)
``GET  /omeflow/annotate/static/<file>``               ``annotation_page.js`` / ``.css``
``GET  /omeflow/annotate/api/sets``                    candidate sets the user may read, with
                                                       progress
``GET  /omeflow/annotate/api/sets/<id>``               one set: progress per annotator,
                                                       agreement (counts, Cohen's kappa),
                                                       whether it has scores, whether the user
                                                       may label it
``GET  /omeflow/annotate/api/sets/<id>/candidates``    the set's candidates (queue order)
``GET  /omeflow/annotate/api/sets/<id>/export``        labels as ``format=csv|parquet``
``GET  /omeflow/annotate/api/candidates/<id>``         one candidate and the crops it has
``GET  /omeflow/annotate/api/candidates/<id>/crops/<kind>/<zoom>``  one crop (PNG)
``POST /omeflow/annotate/api/sets/<id>/next``          lease the next candidate(s) of the queue
``POST /omeflow/annotate/api/candidates/<id>/label``   ``{"label": "positive"|...}``
``POST /omeflow/annotate/api/candidates/<id>/undo``    undo the user's current label

Authorisation (plugin apps get none from Airflow): every route depends on Airflow's
:func:`~airflow.api_fastapi.core_api.security.get_user` (401 without a token, 403 for a bad
one), then asks the auth manager about the candidate set's Dag (``dag_id`` stored with the
set): reading needs read access to its Dag runs (``DagAccessEntity.RUN``, GET); leasing and
labelling need edit access to the Dag (PUT on ``DagDetails``). The annotator is always the
logged-in user, never a request field.

Cross-site requests: the UI's JWT cookie authenticates, so a page elsewhere could make the
browser POST here. Every POST needs the header :data:`CSRF_HEADER` ``: 1`` (a cross-site form
cannot set it without a CORS preflight, which this app does not answer) and, when the browser
sends ``Origin`` (or ``Sec-Fetch-Site``), the request must come from this server's own
origin; else 403.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.core_api.security import get_user
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from hooks.annotations import (
    LABELS,
    AnnotationHook,
    AnnotationInputError,
    AnnotationStore,
    AnnotationStoreError,
    NotFound,
)

log = logging.getLogger(__name__)

#: Header every state-changing request must carry (value ``1``): the CSRF defence.
CSRF_HEADER = "X-Omeflow-Request"
#: Files served under ``annotate/static/`` (nothing else is: no path from the request is
#: ever joined to the file system).
STATIC = {
    "annotation_page.js": "text/javascript; charset=utf-8",
    "annotation_page.css": "text/css; charset=utf-8",
}
HERE = Path(__file__).resolve().parent
#: Candidates one ``next`` call may lease (the grid shows 4 x 4).
MAX_BATCH = 16
_NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

router = APIRouter()
UserDep = Annotated[BaseUser, Depends(get_user)]


# ------------------------------------------------------------------------------------------------
# store and authorisation
# ------------------------------------------------------------------------------------------------
def _store() -> AnnotationStore:
    try:
        return AnnotationHook().get_store()
    except AnnotationStoreError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc


def _auth_manager() -> Any:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()


def may_read(user: BaseUser, dag_id: str) -> bool:
    """Whether ``user`` may read the Dag runs of ``dag_id`` (and so its candidate sets)."""
    return bool(_auth_manager().is_authorized_dag(
        method="GET", access_entity=DagAccessEntity.RUN, details=DagDetails(id=dag_id), user=user,
    ))


def may_label(user: BaseUser, dag_id: str) -> bool:
    """Whether ``user`` may edit ``dag_id`` (needed to label its candidates)."""
    return bool(_auth_manager().is_authorized_dag(
        method="PUT", details=DagDetails(id=dag_id), user=user,
    ))


def _require(allowed: bool, user: BaseUser, what: str, dag_id: str) -> None:
    if not allowed:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"Forbidden: {user.get_name()!r} may not {what} of Dag {dag_id!r}; ask an admin for "
            f"{'edit' if what.startswith('label') else 'read'} access to that Dag",
        )


def _set(store: AnnotationStore, set_id: int) -> dict[str, Any]:
    found = next((s for s in store.candidate_sets() if s["id"] == set_id), None)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no candidate set {set_id}")
    return found


def _candidate(store: AnnotationStore, candidate_id: int) -> dict[str, Any]:
    try:
        return store.candidate(candidate_id)
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc


def own_origins(request: Request) -> set[str]:
    """This server's origins: the one the request was addressed to and ``[api] base_url``'s."""
    from airflow.configuration import conf

    origins = {f"{request.url.scheme}://{request.headers.get('host', '')}".lower()}
    base = urlsplit(conf.get("api", "base_url", fallback="") or "")
    if base.scheme and base.netloc:
        origins.add(f"{base.scheme}://{base.netloc}".lower())
    return origins


def same_site_request(request: Request, user: UserDep) -> BaseUser:
    """A logged-in user's state-changing request that came from this server's own pages.

    Authentication first (401 beats 403), then the CSRF checks: the custom header, the
    ``Origin`` (when sent) and ``Sec-Fetch-Site`` (when sent).
    """
    if request.headers.get(CSRF_HEADER) != "1":
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"Forbidden: state-changing requests need the header '{CSRF_HEADER}: 1' (send them "
            "from the annotation page)",
        )
    origin = request.headers.get("origin")
    if origin is not None and origin.lower() not in own_origins(request):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"Forbidden: cross-origin request from {origin!r}; label from this server's own "
            "annotation page",
        )
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            "Forbidden: cross-site request (Sec-Fetch-Site)")
    return user


WriterDep = Annotated[BaseUser, Depends(same_site_request)]
SetId = Annotated[int, PathParam(ge=1, le=2**62)]
CandidateId = Annotated[int, PathParam(ge=1, le=2**62)]


# ------------------------------------------------------------------------------------------------
# request bodies
# ------------------------------------------------------------------------------------------------
class NextRequest(BaseModel):
    """What the page asks the queue for."""

    model_config = ConfigDict(extra="forbid")
    n: int = Field(1, ge=1, le=MAX_BATCH)
    order: Literal["random", "uncertain"] = "random"
    agreement: bool = False
    exclude: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list, max_length=5000)


class LabelRequest(BaseModel):
    """One label; the annotator is the logged-in user."""

    model_config = ConfigDict(extra="forbid")
    label: str = Field(description=f"one of {', '.join(LABELS)}")


def _json_candidate(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("id", "set_id", "image_id", "nucleus_id", "x", "y", "area", "roi", "stats", "score",
            "crops")
    return {k: row[k] for k in keep if k in row}


def _bad_input(exc: AnnotationInputError) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc))


# ------------------------------------------------------------------------------------------------
# the page and its static files
# ------------------------------------------------------------------------------------------------
@router.get("/annotate", response_class=HTMLResponse, name="annotate")
def annotate_page(user: UserDep) -> HTMLResponse:
    """The page (a static shell; its script asks the API below, with the UI's cookie)."""
    html = (HERE / "annotation_page.html").read_text(encoding="utf-8")
    return HTMLResponse(html.replace("{{user}}", _escape(user.get_name())), headers=_NO_STORE)


@router.get("/annotate/static/{name}")
def annotate_static(name: str, user: UserDep) -> Response:
    """``annotation_page.js`` / ``.css`` (a fixed list)."""
    if name not in STATIC:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no static file {name!r}")
    return Response((HERE / name).read_bytes(), media_type=STATIC[name], headers=_NO_STORE)


def _escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
@router.get("/annotate/api/sets")
def list_sets(user: UserDep) -> dict[str, Any]:
    """The candidate sets of Dags whose runs the user may read, newest first, with progress."""
    store = _store()
    allowed: dict[str, bool] = {}
    sets = []
    for s in store.candidate_sets():
        if s["dag_id"] not in allowed:
            allowed[s["dag_id"]] = may_read(user, s["dag_id"])
        if allowed[s["dag_id"]]:
            progress = store.progress(s["id"])
            sets.append({**s, "labelled": progress["labelled"],
                         "annotators": sorted(progress["annotators"])})
    return {"sets": sets, "user": user.get_name()}


@router.get("/annotate/api/sets/{set_id}")
def set_summary(set_id: SetId, user: UserDep) -> dict[str, Any]:
    """One set: progress per annotator, agreement, scores present, may the user label it."""
    store = _store()
    found = _set(store, set_id)
    _require(may_read(user, found["dag_id"]), user, "read the runs", found["dag_id"])
    return {
        "set": found,
        "progress": store.progress(set_id),
        "agreement": store.agreement(set_id=set_id),
        "has_scores": any(c["score"] is not None for c in store.candidates(set_id)),
        "can_label": may_label(user, found["dag_id"]),
        "user": user.get_name(),
        "labels": list(LABELS),
    }


@router.get("/annotate/api/sets/{set_id}/candidates")
def set_candidates(set_id: SetId, user: UserDep) -> dict[str, Any]:
    """The set's candidates in queue order (without crops)."""
    store = _store()
    found = _set(store, set_id)
    _require(may_read(user, found["dag_id"]), user, "read the runs", found["dag_id"])
    return {"candidates": [_json_candidate(c) for c in store.candidates(set_id)]}


@router.get("/annotate/api/sets/{set_id}/export")
def export_labels(
    set_id: SetId, user: UserDep,
    format: Annotated[Literal["csv", "parquet"], Query()] = "csv",  # noqa: A002
    history: bool = False,
) -> Response:
    """The set's current labels (``history=true``: every revision) as CSV or Parquet."""
    store = _store()
    found = _set(store, set_id)
    _require(may_read(user, found["dag_id"]), user, "read the runs", found["dag_id"])
    data = store.export_labels(set_id, fmt=format, history=history)
    name = f"labels_set{set_id}_image{found['image_id']}{'_history' if history else ''}.{format}"
    media = "text/csv; charset=utf-8" if format == "csv" else "application/vnd.apache.parquet"
    return Response(data, media_type=media, headers={
        **_NO_STORE, "Content-Disposition": f'attachment; filename="{name}"'})


@router.get("/annotate/api/candidates/{candidate_id}")
def get_candidate(candidate_id: CandidateId, user: UserDep) -> dict[str, Any]:
    """One candidate, the crops it has, and the user's current label of it."""
    store = _store()
    row = _candidate(store, candidate_id)
    _require(may_read(user, row["dag_id"]), user, "read the runs", row["dag_id"])
    mine = store.labels(candidate_id=candidate_id, annotator=user.get_name())
    return {**_json_candidate(row), "label": mine[-1]["label"] if mine else None}


@router.get("/annotate/api/candidates/{candidate_id}/crops/{kind}/{zoom}")
def get_crop(
    candidate_id: CandidateId, user: UserDep,
    kind: Annotated[str, PathParam(pattern=r"^[a-z0-9_]{1,32}$")],
    zoom: Annotated[int, PathParam(ge=1, le=16)],
) -> Response:
    """One crop PNG (rendered on the cluster, stored in the annotation store)."""
    store = _store()
    row = _candidate(store, candidate_id)
    _require(may_read(user, row["dag_id"]), user, "read the runs", row["dag_id"])
    try:
        png = store.crop(candidate_id, kind, zoom)
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    # crops never change once stored for a candidate id: the browser may keep them
    return Response(png, media_type="image/png", headers={
        "Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"})


# ------------------------------------------------------------------------------------------------
# writing (edit access + same-site request)
# ------------------------------------------------------------------------------------------------
@router.post("/annotate/api/sets/{set_id}/next")
def next_candidates(set_id: SetId, body: NextRequest, user: WriterDep) -> dict[str, Any]:
    """Lease the next ``n`` candidates of the queue to the user (``[]``: nothing left)."""
    store = _store()
    found = _set(store, set_id)
    _require(may_label(user, found["dag_id"]), user, "label candidates", found["dag_id"])
    try:
        rows = store.next_candidates(set_id, user.get_name(), n=body.n, order=body.order,
                                     agreement=body.agreement, exclude=body.exclude)
    except AnnotationInputError as exc:
        raise _bad_input(exc) from exc
    return {"candidates": [_json_candidate(r) for r in rows]}


@router.post("/annotate/api/candidates/{candidate_id}/label")
def label_candidate(
    candidate_id: CandidateId, body: LabelRequest, user: WriterDep
) -> dict[str, Any]:
    """Store the user's label of a candidate (a new revision; the latest is current)."""
    store = _store()
    row = _candidate(store, candidate_id)
    _require(may_label(user, row["dag_id"]), user, "label candidates", row["dag_id"])
    try:
        saved = store.label(candidate_id, user.get_name(), body.label)
    except AnnotationInputError as exc:
        raise _bad_input(exc) from exc
    return {**saved, "created_at": saved["created_at"].isoformat()}


@router.post("/annotate/api/candidates/{candidate_id}/undo")
def undo_label(candidate_id: CandidateId, user: WriterDep) -> dict[str, Any]:
    """Undo the user's current label of a candidate (kept as an undone revision)."""
    store = _store()
    row = _candidate(store, candidate_id)
    _require(may_label(user, row["dag_id"]), user, "label candidates", row["dag_id"])
    result = store.undo(candidate_id, user.get_name())
    return {k: (None if v is None else {"id": v["id"], "label": v["label"]})
            for k, v in result.items()}
