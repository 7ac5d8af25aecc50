"""Start a run from a link: ``/omeflow/run/<dag_id>?image=101&image=102`` (issue 11 item 10).

Airflow 3.3's UI cannot open its trigger form with values filled in from a URL, so omeflow
serves the page a link lands on. A link from OMERO.web ("Open with"), an e-mail or a wiki
names the images; the page shows the run that would start (the images picked, every other
parameter at the form's default) and starts it with one click. Two clicks from OMERO.web:
"Open with → omeflow", then "Start run".

Query parameters (see :func:`link_conf`):

- ``image=101&image=102`` (what OMERO.web's open-with sends), ``image_ids=101,102``;
- ``dataset=5`` (``dataset=5&dataset=6`` is refused: one dataset per run);
- ``tag=to-score`` (a tag's text) or ``tag=42`` (its annotation id);
- any other parameter of the Dag's form by name, its value as JSON or as text
  (``block_size=1024``, ``steps=["export_zarr"]``).

The page needs a login (a visitor without one is sent to Airflow's login page and back) and
the right to trigger the Dag. The run is started by the page's script through Airflow's own
REST API (``POST /api/v2/dags/<dag_id>/dagRuns``, with the UI's session cookie), so Airflow
validates the conf against the Dag's params and checks the permission again; nothing here
writes to Airflow's database.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from fastapi import APIRouter, HTTPException, Request, status
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse, Response

HERE = Path(__file__).resolve().parent
router = APIRouter()
DagId = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_.-]{1,250}$")]
#: Query names OMERO.web and people use for images; all become the ``image_ids`` param.
IMAGE_KEYS = ("image", "image_ids", "images")
_NO_STORE = {"Cache-Control": "no-store"}


class LinkError(ValueError):
    """A link's query cannot become a run's conf; the message names the fix."""


def _ids(values: Iterable[str], what: str) -> list[int]:
    ids: list[int] = []
    for value in values:
        for part in value.replace(" ", ",").split(","):
            if not part:
                continue
            if not part.isdigit() or int(part) < 1:
                raise LinkError(f"{what}={part!r} is not an id: give positive integers, e.g. "
                                f"{what}=101,102")
            ids.append(int(part))
    return ids


def _value(text: str) -> Any:
    """A form value from a query: JSON when it parses (numbers, lists, true), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def link_conf(query: Iterable[tuple[str, str]], params: Mapping[str, Any]) -> dict[str, Any]:
    """The run conf a link asks for: its images, dataset, tag and any other form values.

    ``params`` are the Dag's params (names → defaults); a name that is not one of them is
    refused, naming the valid ones. Values are validated by Airflow (the Dag's param schema)
    and by the run's first task (the images exist, the dataset holds images).
    """
    grouped: dict[str, list[str]] = {}
    for key, value in query:
        grouped.setdefault(key, []).append(value)
    conf: dict[str, Any] = {}
    image_values = [v for k in IMAGE_KEYS for v in grouped.pop(k, [])]
    if image_values:
        if "image_ids" not in params:
            raise LinkError("this Dag does not take images by id")
        conf["image_ids"] = sorted(set(_ids(image_values, "image")))
    for key, values in grouped.items():
        if key not in params:
            raise LinkError(f"unknown parameter {key!r} in the link; this Dag's parameters: "
                            f"{', '.join(sorted(params))}")
        if len(values) > 1:
            raise LinkError(f"{key} is given {len(values)} times in the link; give it once")
        if key == "dataset":
            conf[key] = _ids(values, "dataset")[0]
        elif key == "tag":
            conf[key] = int(values[0]) if values[0].isdigit() else values[0]
        else:
            conf[key] = _value(values[0])
    if not conf:
        raise LinkError("the link picks nothing: add image=<id> (repeatable), dataset=<id> or "
                        "tag=<text or id>")
    return conf


def _auth_manager() -> Any:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()


async def _user_or_none(request: Request) -> BaseUser | None:
    from airflow.api_fastapi.core_api.security import get_user

    bearer = request.headers.get("authorization", "")
    try:
        if bearer.lower().startswith("bearer "):
            from fastapi.security import HTTPAuthorizationCredentials

            creds = HTTPAuthorizationCredentials(scheme="Bearer", credentials=bearer[7:])
            return await get_user(request, None, creds)
        return await get_user(request, None, None)
    except HTTPException:
        return None


def _dag_params(dag_id: str) -> dict[str, Any]:
    from airflow.models.serialized_dag import SerializedDagModel

    dag = SerializedDagModel.get_dag(dag_id)
    if dag is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"no Dag {dag_id!r}: check the link's Dag id (case matters)")
    return dict(dag.params.dump())


def _page(dag_id: str, user: BaseUser, conf: dict[str, Any] | None, error: str | None,
          params: Mapping[str, Any]) -> str:
    picked = ""
    if conf is not None:
        rows = "".join(
            f"<tr><th>{html.escape(k)}</th><td><code>{html.escape(json.dumps(v))}</code></td></tr>"
            for k, v in conf.items())
        defaults = "".join(
            f"<tr><th>{html.escape(k)}</th><td><code>{html.escape(json.dumps(v))}</code></td></tr>"
            for k, v in params.items() if k not in conf)
        picked = (f"<table class='picked'>{rows}</table>"
                  f"<details><summary>Every other parameter keeps the form's default</summary>"
                  f"<table class='defaults'>{defaults}</table></details>")
    template = (HERE / "run_link.html").read_text(encoding="utf-8")
    values = {
        "dag_id": html.escape(dag_id),
        "user": html.escape(user.get_name()),
        "picked": picked,
        "error": (f"<p class='error' role='alert'>{html.escape(error)}</p>" if error else ""),
        "conf_json": html.escape(json.dumps(conf) if conf is not None else "null"),
        "form_url": html.escape(f"../../dags/{dag_id}"),
    }
    for key, value in values.items():
        template = template.replace("{{" + key + "}}", value)
    return template


@router.get("/run/{dag_id}", response_class=HTMLResponse, name="run_link")
async def run_link_page(dag_id: DagId, request: Request) -> Response:
    """The page a run link opens: what would run, and a "Start run" button."""
    user = await _user_or_none(request)
    if user is None:
        login = _auth_manager().get_url_login(next_url=str(request.url))
        return RedirectResponse(login, status.HTTP_303_SEE_OTHER)
    if not _auth_manager().is_authorized_dag(
        method="POST", access_entity=DagAccessEntity.RUN, details=DagDetails(id=dag_id),
        user=user,
    ):
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            f"Forbidden: {user.get_name()!r} may not start runs of Dag "
                            f"{dag_id!r}; ask an admin for that permission")
    params = _dag_params(dag_id)
    try:
        conf, error = link_conf(request.query_params.multi_items(), params), None
    except LinkError as exc:
        conf, error = None, f"This link cannot start a run: {exc}."
    return HTMLResponse(_page(dag_id, user, conf, error, params), headers=_NO_STORE)


@router.get("/run-static/run_link.js")
async def run_link_script() -> Response:
    """The page's script (static, no data)."""
    return Response((HERE / "run_link.js").read_bytes(), media_type="text/javascript",
                    headers=_NO_STORE)
