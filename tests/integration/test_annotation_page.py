"""The annotation page's API against a real Airflow api-server (started by ``scripts/ui.py``, as
``make ui`` does) and the embedded annotation store of that AIRFLOW_HOME.

A candidate set with crops rendered by ``hpc_jobs/crops.py`` is loaded into
``$AIRFLOW_HOME/var/annotations.sqlite`` (what ``AnnotationHook`` opens when the connection
``omeflow_annotations`` does not exist); four SimpleAuthManager users log in: ``admin``,
``alice`` (role user: may edit Dags, so label), ``viewer`` (may read every Dag, edit none) and
``nobody`` (no role: no access to any Dag).

The stack is started once for this module and ``test_annotation_browser.py``
(:func:`annotation_ui`, shared through :func:`shared_stack`) and stopped after the last of
them.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from hooks.annotations import AnnotationStore
from hpc_jobs import crops as crop_render
from tests.stack_fixture import START_TIMEOUT_S, Stack, free_port

pytestmark = pytest.mark.slow

USERS = "admin:admin,alice:user,viewer:viewer,nobody:"
DAG_ID = "celldetector_candidates"
CROP_SIZE = 32
ORIGIN_HEADER = {"X-Omeflow-Request": "1"}


@dataclass
class AnnotationUi:
    """The running stack, one token per user, the store it reads, and the loaded sets."""

    stack: Stack
    store: AnnotationStore
    tokens: dict[str, str]
    passwords: dict[str, str]
    sets: dict[str, int] = field(default_factory=dict)

    def call(self, method: str, path: str, user: str | None = "admin", **kw: Any
             ) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if user is not None:
            headers["Authorization"] = f"Bearer {self.tokens[user]}"
        return self.stack.http.request(method, path, headers=headers, **kw)


def synthetic_crops(label_id: int, bright: bool, rng: np.random.Generator) -> dict[str, Any]:
    """Crops of one nucleus (3 channels: DAPI, another, the marker) rendered by the cluster's
    own renderer."""
    wide = 2 * CROP_SIZE
    yy, xx = np.mgrid[:wide, :wide]
    disc = (yy - wide / 2) ** 2 + (xx - wide / 2) ** 2 < (5 + label_id % 4) ** 2
    labels = np.where(disc, label_id, 0).astype(np.int32)
    pixels = rng.normal(300, 40, size=(3, wide, wide)).clip(0, 65535)
    pixels[0][disc] += 2500
    pixels[2][disc] += 1800 if bright else 200
    display = crop_render.Display(lo=[200, 200, 200], hi=[3000, 1500, 2200])
    return crop_render.render(pixels.astype(np.uint16), labels, label_id, display, CROP_SIZE,
                              (1, 2), dapi_channel=0, marker_channel=2)


def load_set(store: AnnotationStore, image_id: int, n: int, run_id: str) -> int:
    """A candidate set of ``n`` nuclei with their crops; returns its id."""
    rng = np.random.default_rng(image_id)
    cands = [{"nucleus_id": i, "x": 100.0 + 40 * i, "y": 200.0 + 3 * i, "area": 90.0 + i,
              "roi": "tissue_1", "marker_mean": 250.0 + 10 * i} for i in range(1, n + 1)]
    set_id = store.add_candidate_set(image_id, run_id, "quantile", {"q": 0.95},
                                     {"tissue_1": 240.0}, cands, dag_id=DAG_ID)
    items = []
    for c in cands:
        for zoom, kinds in synthetic_crops(c["nucleus_id"], c["nucleus_id"] % 3 == 0, rng).items():
            items += [(c["nucleus_id"], kind, int(zoom), base64.b64decode(b64))
                      for kind, b64 in kinds.items()]
    store.add_crops(set_id, items)
    return set_id


def _start(airflow_env: dict[str, str], tmp: Path) -> AnnotationUi:
    home = tmp / "home"
    (home / "var").mkdir(parents=True)
    shutil.copy(Path(airflow_env["AIRFLOW_HOME"]) / "airflow.cfg", home / "airflow.cfg")
    # the session's home is migrated already: its metadata DB saves a second `db migrate`
    shutil.copy(Path(airflow_env["AIRFLOW_HOME"]) / "var" / "airflow.db", home / "var")
    env = dict(
        airflow_env, AIRFLOW_HOME=str(home), AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=USERS,
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="30",
    )
    store = AnnotationStore.from_url(f"sqlite:///{home / 'var' / 'annotations.sqlite'}")
    store.migrate()
    port = free_port()
    stack = Stack(f"http://127.0.0.1:{port}", env, tmp)
    stack.start(port)
    try:
        stack.wait_for("scripts/ui.py to say the UI is ready",
                       lambda: re.search(r"omeflow UI ready: (\S+)", stack.output()),
                       START_TIMEOUT_S)
        pids_line = stack.output().split("components:")[1].split("\n")[0]
        stack.pids = {name: int(pid) for name, pid in re.findall(r"([a-z-]+)=(\d+)", pids_line)}
        passwords = dict(re.findall(r"user '(\w+)', password '([^']+)'", stack.output()))
        assert set(passwords) == {"admin", "alice", "viewer", "nobody"}, stack.output()
        tokens = {}
        for user, password in passwords.items():
            reply = stack.http.post("/auth/token", json={"username": user, "password": password})
            assert reply.status_code == 201, reply.text
            tokens[user] = reply.json()["access_token"]
    except BaseException:
        stack.stop()
        raise
    ui = AnnotationUi(stack, store, tokens, passwords)
    ui.sets["api"] = load_set(store, 11, 8, "manual__api")
    ui.sets["browser"] = load_set(store, 12, 30, "manual__browser")
    ui.sets["scored"] = load_set(store, 13, 6, "manual__scored")
    return ui


_SHARED: dict[str, Any] = {}


def shared_stack(request: pytest.FixtureRequest) -> Iterator[AnnotationUi]:
    """One stack for every module that uses :func:`annotation_ui`; stopped after the last."""
    if "ui" not in _SHARED:
        users = {item.module.__name__ for item in request.session.items
                 if "annotation_ui" in getattr(item, "fixturenames", ())}
        airflow_env = request.getfixturevalue("airflow_env")
        tmp = request.getfixturevalue("tmp_path_factory").mktemp("annotation_ui")
        _SHARED.update(ui=_start(airflow_env, tmp), modules=users)
    try:
        yield _SHARED["ui"]
    finally:
        _SHARED["modules"].discard(request.module.__name__)
        if not _SHARED["modules"]:
            _SHARED.pop("ui").stack.stop()


@pytest.fixture(scope="module")
def annotation_ui(request: pytest.FixtureRequest) -> Iterator[AnnotationUi]:
    """The UI stack with the annotation sets loaded (shared with the browser test)."""
    yield from shared_stack(request)


def _routes(ui: AnnotationUi) -> list[tuple[str, str, dict[str, Any]]]:
    set_id = ui.sets["api"]
    cand = ui.store.candidates(set_id)[0]["id"]
    label = {"json": {"label": "positive"}}
    return [
        ("GET", "/omeflow/annotate", {}),
        ("GET", f"/omeflow/annotate?set={set_id}", {}),
        ("GET", "/omeflow/annotate/static/annotation_page.js", {}),
        ("GET", "/omeflow/annotate/api/sets", {}),
        ("GET", f"/omeflow/annotate/api/sets/{set_id}", {}),
        ("GET", f"/omeflow/annotate/api/sets/{set_id}/candidates", {}),
        ("GET", f"/omeflow/annotate/api/sets/{set_id}/export?format=csv", {}),
        ("GET", f"/omeflow/annotate/api/candidates/{cand}", {}),
        ("GET", f"/omeflow/annotate/api/candidates/{cand}/crops/composite/1", {}),
        ("POST", f"/omeflow/annotate/api/sets/{set_id}/next", {"json": {"n": 1}}),
        ("POST", f"/omeflow/annotate/api/candidates/{cand}/label", label),
        ("POST", f"/omeflow/annotate/api/candidates/{cand}/undo", {}),
    ]


# ------------------------------------------------------------------------------------------------
def test_every_route_needs_a_login(annotation_ui: AnnotationUi) -> None:
    ui = annotation_ui
    for method, path, kw in _routes(ui):
        anon = ui.call(method, path, user=None, headers=ORIGIN_HEADER, **kw)
        assert anon.status_code == 401, (method, path, anon.status_code, anon.text)
        forged = ui.call(method, path, user=None, cookies={"_token": "not.a.jwt"},
                         headers=ORIGIN_HEADER, **kw)
        assert forged.status_code in (401, 403), (method, path, forged.status_code)
    assert ui.store.labels(set_id=ui.sets["api"]) == []


def test_the_page_and_its_nav_entry(annotation_ui: AnnotationUi) -> None:
    ui = annotation_ui
    plugin = next(p for p in ui.call("GET", "/api/v2/plugins").json()["plugins"]
                  if p["name"] == "omeflow")
    views = {v["name"]: v for v in plugin["external_views"]}
    assert views["Annotate"]["href"] == "omeflow/annotate", views
    assert views["Annotate"]["destination"] == "nav"
    # the UI's iframe authenticates with the _token cookie
    page = ui.call("GET", f"/omeflow/annotate?set={ui.sets['api']}", user=None,
                   cookies={"_token": ui.tokens["admin"]})
    assert page.status_code == 200 and "Annotate candidates" in page.text
    assert "<b id=\"annotator\">admin</b>" in page.text, "the annotator is the logged-in user"
    assert ui.call("GET", "/omeflow/annotate/static/../annotation_page.py").status_code == 404
    assert ui.call("GET", "/omeflow/annotate/static/annotation_page.py").status_code == 404


def test_reading_a_set_crops_and_summary(annotation_ui: AnnotationUi) -> None:
    ui = annotation_ui
    set_id = ui.sets["api"]
    listed = ui.call("GET", "/omeflow/annotate/api/sets").json()["sets"]
    assert {s["id"] for s in listed} >= {set_id, ui.sets["browser"]}
    summary = ui.call("GET", f"/omeflow/annotate/api/sets/{set_id}").json()
    assert summary["set"]["image_id"] == 11 and summary["progress"]["total"] == 8
    assert summary["can_label"] is True and summary["has_scores"] is False
    cand = ui.store.candidates(set_id)[0]
    row = ui.call("GET", f"/omeflow/annotate/api/candidates/{cand['id']}").json()
    kinds = {(c["kind"], c["zoom"]) for c in row["crops"]}
    assert kinds == {(k, z) for k in ("composite", "dapi", "marker", "c1") for z in (1, 2)}
    png = ui.call("GET", f"/omeflow/annotate/api/candidates/{cand['id']}/crops/composite/2")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content == ui.store.crop(cand["id"], "composite", 2)
    from PIL import Image

    assert Image.open(io.BytesIO(png.content)).size == (CROP_SIZE, CROP_SIZE)
    missing = ui.call("GET", f"/omeflow/annotate/api/candidates/{cand['id']}/crops/composite/3")
    assert missing.status_code == 404
    bad_kind = ui.call("GET", f"/omeflow/annotate/api/candidates/{cand['id']}/crops/..%2Fx/1")
    assert bad_kind.status_code in (404, 422)
    assert ui.call("GET", "/omeflow/annotate/api/sets/999999").status_code == 404


def test_users_without_access_get_403_and_change_nothing(annotation_ui: AnnotationUi) -> None:
    ui = annotation_ui
    set_id = ui.sets["api"]
    for method, path, kw in _routes(ui):
        if "/api/" not in path:
            continue  # the page shell itself holds no data; its API calls are checked here
        if path.endswith("/api/sets"):
            reply = ui.call(method, path, user="nobody")
            assert reply.status_code == 200 and all(
                s["id"] != set_id for s in reply.json()["sets"]), reply.text
            continue
        reply = ui.call(method, path, user="nobody", headers=ORIGIN_HEADER, **kw)
        assert reply.status_code == 403, (method, path, reply.status_code, reply.text)
        # viewer: may read, may not lease or label
        reply = ui.call(method, path, user="viewer", headers=ORIGIN_HEADER, **kw)
        expected = 403 if method == "POST" else 200
        assert reply.status_code == expected, (method, path, reply.status_code, reply.text)
        if expected == 403:
            assert DAG_ID in reply.json()["detail"], reply.text
    assert ui.call("GET", f"/omeflow/annotate/api/sets/{set_id}",
                   user="viewer").json()["can_label"] is False
    assert ui.store.labels(set_id=set_id) == []


def test_cross_site_posts_are_refused(annotation_ui: AnnotationUi) -> None:
    ui = annotation_ui
    cand = ui.store.candidates(ui.sets["api"])[1]["id"]
    path = f"/omeflow/annotate/api/candidates/{cand}/label"
    body = {"json": {"label": "negative"}}
    no_header = ui.call("POST", path, **body)
    assert no_header.status_code == 403 and "X-Omeflow-Request" in no_header.text
    # the JWT cookie alone (what a browser sends cross-site) does not do either
    by_cookie = ui.call("POST", path, user=None, cookies={"_token": ui.tokens["admin"]}, **body)
    assert by_cookie.status_code == 403
    foreign = ui.call("POST", path, headers={**ORIGIN_HEADER, "Origin": "http://evil.example"},
                      **body)
    assert foreign.status_code == 403 and "evil.example" in foreign.text
    null_origin = ui.call("POST", path, headers={**ORIGIN_HEADER, "Origin": "null"}, **body)
    assert null_origin.status_code == 403
    cross = ui.call("POST", path, headers={**ORIGIN_HEADER, "Sec-Fetch-Site": "cross-site"},
                    **body)
    assert cross.status_code == 403
    undo = ui.call("POST", f"/omeflow/annotate/api/candidates/{cand}/undo",
                   headers={"Origin": ui.stack.base_url})
    assert undo.status_code == 403
    assert ui.store.labels(candidate_id=cand, history=True) == []
    # the page's own request: the header and this server's origin
    own = ui.call("POST", path, headers={**ORIGIN_HEADER, "Origin": ui.stack.base_url},
                  cookies={"_token": ui.tokens["admin"]}, **body)
    assert own.status_code == 200, own.text
    assert [r["label"] for r in ui.store.labels(candidate_id=cand)] == ["negative"]


def test_a_bad_label_gets_422_naming_the_allowed_values(annotation_ui: AnnotationUi) -> None:
    ui = annotation_ui
    cand = ui.store.candidates(ui.sets["api"])[2]["id"]
    path = f"/omeflow/annotate/api/candidates/{cand}/label"
    for bad in ({"label": "maybe"}, {"label": "POSITIVE"}, {"label": ""}):
        reply = ui.call("POST", path, headers=ORIGIN_HEADER, json=bad)
        assert reply.status_code == 422, (bad, reply.text)
        assert "positive, negative, unsure" in reply.json()["detail"], reply.text
    # the annotator comes from the login, never from the request
    forged = ui.call("POST", path, headers=ORIGIN_HEADER,
                     json={"label": "positive", "annotator": "someone_else"})
    assert forged.status_code == 422
    assert ui.store.labels(candidate_id=cand, history=True) == []


def test_labels_undo_queue_and_export_land_in_the_store(annotation_ui: AnnotationUi) -> None:
    ui = annotation_ui
    set_id = ui.sets["api"]
    served = ui.call("POST", f"/omeflow/annotate/api/sets/{set_id}/next", headers=ORIGIN_HEADER,
                     json={"n": 2}).json()["candidates"]
    assert len(served) == 2
    first, second = (c["id"] for c in served)
    assert all(c["set_id"] == set_id for c in served)
    for cid, value in ((first, "positive"), (second, "unsure"), (second, "negative")):
        reply = ui.call("POST", f"/omeflow/annotate/api/candidates/{cid}/label",
                        headers=ORIGIN_HEADER, json={"label": value})
        assert reply.status_code == 200, reply.text
        assert reply.json()["annotator"] == "admin"
    undone = ui.call("POST", f"/omeflow/annotate/api/candidates/{second}/undo",
                     headers=ORIGIN_HEADER).json()
    assert undone == {"undone": {"id": undone["undone"]["id"], "label": "negative"},
                      "current": {"id": undone["current"]["id"], "label": "unsure"}}
    current = {r["candidate_id"]: (r["annotator"], r["label"])
               for r in ui.store.labels(set_id=set_id, candidate_id=None)
               if r["candidate_id"] in (first, second)}
    assert current == {first: ("admin", "positive"), second: ("admin", "unsure")}
    # the queue never serves what this annotator labelled
    nxt = ui.call("POST", f"/omeflow/annotate/api/sets/{set_id}/next", headers=ORIGIN_HEADER,
                  json={"n": 16}).json()["candidates"]
    assert {c["id"] for c in nxt}.isdisjoint({first, second})
    bad = ui.call("POST", f"/omeflow/annotate/api/sets/{set_id}/next", headers=ORIGIN_HEADER,
                  json={"n": 17})
    assert bad.status_code == 422
    summary = ui.call("GET", f"/omeflow/annotate/api/sets/{set_id}").json()
    assert summary["progress"]["annotators"]["admin"]["positive"] >= 1
    csv = ui.call("GET", f"/omeflow/annotate/api/sets/{set_id}/export", params={"format": "csv"})
    assert csv.status_code == 200 and "attachment" in csv.headers["content-disposition"]
    assert csv.content == ui.store.export_labels(set_id, fmt="csv")
    parquet = ui.call("GET", f"/omeflow/annotate/api/sets/{set_id}/export",
                      params={"format": "parquet"})
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(parquet.content)).to_pylist()
    assert {(r["nucleus_id"], r["label"]) for r in table} >= {
        (c["nucleus_id"], lab) for c, lab in ((served[0], "positive"), (served[1], "unsure"))}


def test_queue_serves_the_most_uncertain_first_once_scored(annotation_ui: AnnotationUi) -> None:
    ui = annotation_ui
    set_id = ui.sets["scored"]
    assert ui.call("GET", f"/omeflow/annotate/api/sets/{set_id}").json()["has_scores"] is False
    ui.store.set_scores(set_id, {1: 0.1, 2: 0.9, 3: 0.5, 4: 0.7, 5: None, 6: 0.2})
    assert ui.call("GET", f"/omeflow/annotate/api/sets/{set_id}").json()["has_scores"] is True
    served = ui.call("POST", f"/omeflow/annotate/api/sets/{set_id}/next", headers=ORIGIN_HEADER,
                     json={"n": 6, "order": "uncertain"}, user="alice").json()["candidates"]
    assert [c["nucleus_id"] for c in served] == [2, 4, 3, 6, 1, 5]
    # leased to alice: admin is served none of them meanwhile
    other = ui.call("POST", f"/omeflow/annotate/api/sets/{set_id}/next", headers=ORIGIN_HEADER,
                    json={"n": 6, "order": "uncertain"}).json()["candidates"]
    assert other == []


def test_agreement_of_two_annotators_with_kappa(annotation_ui: AnnotationUi) -> None:
    ui = annotation_ui
    set_id = ui.sets["scored"]
    cands = ui.store.candidates(set_id)
    given = {"admin": ["positive", "positive", "negative", "negative", "unsure", "negative"],
             "alice": ["positive", "negative", "negative", "negative", "unsure", "positive"]}
    for user, labels in given.items():
        for cand, label in zip(cands, labels, strict=True):
            reply = ui.call("POST", f"/omeflow/annotate/api/candidates/{cand['id']}/label",
                            headers=ORIGIN_HEADER, json={"label": label}, user=user)
            assert reply.status_code == 200, reply.text
    [row] = ui.call("GET", f"/omeflow/annotate/api/sets/{set_id}").json()["agreement"]
    assert {row["a"], row["b"]} == {"admin", "alice"} and row["n"] == 6 and row["agree"] == 4
    # hand computation: po = 4/6; pe = (2*2 + 3*3 + 1*1) / 36 = 14/36 -> kappa = 0.4545...
    assert abs(row["kappa"] - (4 / 6 - 14 / 36) / (1 - 14 / 36)) < 1e-9, row
