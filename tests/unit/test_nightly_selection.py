"""Nightly selection pieces: the OMERO listing queries, the ``find_images`` step on a real
local store, and the ``[omeflow] nightly_*`` settings that schedule ``celldetector_nightly``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from hpc_jobs.config import SiteConfig
from hpc_jobs.predictions import namespace_for
from hpc_jobs.protocol import Resources, Secrets
from hpc_jobs.steps import find_images
from hpc_jobs.steps.base import StepContext
from hpc_jobs.stores.base import StoreError
from hpc_jobs.stores.local import LocalStore
from hpc_jobs.stores.omero_query import QUERIES, existence_checks, image_ids_query

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------ OMERO queries
@pytest.mark.parametrize(("dataset", "tag", "params"), [
    (5, None, {"did": 5}),
    (None, 7, {"tid": 7}),
    (None, "night' or 1=1 --", {"text": "night' or 1=1 --"}),
    (5, "nightly", {"did": 5, "text": "nightly"}),
    (5, 7, {"did": 5, "tid": 7}),
])
def test_omero_listing_binds_every_value(dataset, tag, params) -> None:
    hql, bound = image_ids_query(dataset, tag)
    assert bound == params
    assert hql in QUERIES.values()  # fixed texts: a value never becomes query text
    assert all(f":{name}" in hql for name in params)
    assert "order by" in hql and "select distinct" in hql  # pageable, one row per image
    if dataset is not None:
        assert "DatasetImageLink" in hql
    if tag is not None:
        assert "ImageAnnotationLink" in hql and "TagAnnotation" in hql
        assert ("textValue" in hql) == isinstance(tag, str)


def test_omero_listing_refuses_bad_selection_and_checks_existence() -> None:
    for bad in [(None, None), (0, None), (None, ""), (True, None), (None, 0), (None, 1.5)]:
        with pytest.raises(StoreError):
            image_ids_query(*bad)
    assert [w for w, _, _ in existence_checks(3, "x")] == ["dataset 3", "tag 'x'"]


# ------------------------------------------------------------------------ find_images
def _store_with_images(root: Path, n: int) -> tuple[LocalStore, list[int]]:
    store = LocalStore(root / "store")
    pixels = np.full((2, 64, 64), 100, dtype=np.uint16)
    return store, [store.add_image(f"slide {i}", pixels, ["DAPI", "CD8"]) for i in range(n)]


def _run(tmp_path: Path, **params) -> dict:
    ctx = StepContext(job_dir=tmp_path / "jobs" / "j", site=SiteConfig.local(tmp_path),
                      resources=Resources(cpus=1), secrets=Secrets())
    return find_images.run(find_images.Params(**params), ctx)


def test_find_images_skips_images_with_the_models_results(tmp_path) -> None:
    store, (new, done, other_model, outside) = _store_with_images(tmp_path, 4)
    dataset = store.create_dataset("nightly", [new, done, other_model])
    store.tag_images("nightly", [new, outside])
    store.write_map_annotation(done, namespace_for("m1"), {"model": "m1"})
    store.write_map_annotation(other_model, namespace_for("m0"), {"model": "m0"})

    out = _run(tmp_path, dataset=dataset, classifier="m1")
    assert out["image_ids"] == [new, other_model]
    assert out["skipped"] == {str(done): f"has results for model m1 ({namespace_for('m1')})"}
    assert _run(tmp_path, tag="nightly", classifier="m1")["image_ids"] == [new, outside]
    capped = _run(tmp_path, dataset=dataset, classifier="m1", max_images=1)
    assert capped["image_ids"] == [new]
    assert "max_images=1" in capped["skipped"][str(other_model)]


def test_find_images_needs_a_selection_naming_the_settings(tmp_path) -> None:
    with pytest.raises(ValidationError, match="nightly_dataset or nightly_tag"):
        find_images.Params(classifier="m1")
    _store_with_images(tmp_path, 1)
    with pytest.raises(StoreError, match="no dataset 42"):
        _run(tmp_path, dataset=42, classifier="m1")


# ------------------------------------------------------------------------ the DAG's schedule
def _nightly_dag(tmp_path: Path, **settings: str) -> str:
    env = {"AIRFLOW_HOME": str(tmp_path), "PYTHONPATH": str(REPO),
           "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
           **{f"AIRFLOW__OMEFLOW__{k.upper()}": v for k, v in settings.items()}}
    code = ("import dags.celldetector_nightly as m; d = m.dag; "
            "print(d.schedule, d.max_active_runs, d.catchup, "
            "d.params['nightly_dataset'], d.params['nightly_tag'], d.params['nightly_max_images'])")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0 or settings, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else proc.stderr


def test_nightly_schedule_and_selection_come_from_the_settings(tmp_path) -> None:
    import shutil

    shutil.copy(REPO / "airflow.cfg", tmp_path / "airflow.cfg")
    assert _nightly_dag(tmp_path) == "0 2 * * * 1 False None None None"
    assert _nightly_dag(tmp_path, nightly_cron="30 23 * * 1-5", nightly_dataset="12",
                        nightly_tag="to-score", nightly_max_images="5"
                        ) == "30 23 * * 1-5 1 False 12 to-score 5"
    assert _nightly_dag(tmp_path, nightly_tag="77").endswith("None 77 None")
    bad = _nightly_dag(tmp_path, nightly_cron="at two")
    assert "nightly_cron = 'at two' is not a cron expression" in bad
