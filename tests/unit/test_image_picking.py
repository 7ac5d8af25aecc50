"""Picking a run's images the way a lab member thinks of them (issue 11 item 10): by id, by
OMERO dataset, by tag (id or text), or a mix, in ``check_images`` on a real local store; and
the trigger form every per-image DAG gets from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from hpc_jobs.config import SiteConfig
from hpc_jobs.protocol import Resources, Secrets
from hpc_jobs.steps import check_images
from hpc_jobs.steps.base import StepContext
from hpc_jobs.stores.base import StoreError
from tests.unit.test_nightly_selection import _store_with_images

IMAGE_DAGS = ("celldetector_preprocess", "celldetector_candidates", "celldetector_predict")


def _check(root: Path, **params) -> dict:
    ctx = StepContext(job_dir=root / "jobs" / "j", site=SiteConfig.local(root),
                      resources=Resources(cpus=1), secrets=Secrets())
    return check_images.run(check_images.Params(need_tissue=False, **params), ctx)


def test_images_are_picked_by_dataset_tag_or_ids_and_the_summary_says_which(tmp_path) -> None:
    store, (a, b, c, d) = _store_with_images(tmp_path, 4)
    dataset = store.create_dataset("week 12", [a, b])
    tag_id = store.tag_images("to-score", [b, c])

    by_dataset = _check(tmp_path, dataset=dataset)
    assert by_dataset["image_ids"] == [a, b]
    assert by_dataset["matched"] == {f"dataset {dataset}": [a, b]}
    assert _check(tmp_path, tag="to-score")["image_ids"] == [b, c]
    assert _check(tmp_path, tag=tag_id)["image_ids"] == [b, c]  # a tag by its id
    both = _check(tmp_path, dataset=dataset, tag="to-score")  # images in both
    assert both["image_ids"] == [b]
    mixed = _check(tmp_path, image_ids=[d], tag="to-score")  # ids add to a selection
    assert mixed["image_ids"] == [b, c, d]
    assert mixed["matched"] == {"image_ids": [d], "tag 'to-score'": [b, c]}
    assert [i["name"] for i in mixed["images"]] == ["slide 1", "slide 2", "slide 3"]


def test_a_selection_that_matches_nothing_is_refused_naming_the_fix(tmp_path) -> None:
    store, (a,) = _store_with_images(tmp_path, 1)
    empty = store.create_dataset("empty")
    with pytest.raises(ValidationError, match="give image_ids, a dataset id or a tag"):
        check_images.Params()
    with pytest.raises(StoreError, match="holds no images"):
        _check(tmp_path, dataset=empty)
    with pytest.raises(StoreError, match="no dataset 99"):
        _check(tmp_path, dataset=99)
    for bad in ({"dataset": 0}, {"tag": ""}, {"image_ids": [0]}):
        with pytest.raises(ValidationError):
            check_images.Params(**bad)


def test_too_large_a_selection_is_refused_before_any_image_is_read(tmp_path, monkeypatch) -> None:
    store, ids = _store_with_images(tmp_path, 3)
    dataset = store.create_dataset("big", ids)
    monkeypatch.setattr(check_images, "MAX_IMAGES", 2)
    with pytest.raises(StoreError, match="3 images picked, more than 2 per run"):
        _check(tmp_path, dataset=dataset)


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    repo = Path(__file__).resolve().parents[2]
    bag = DagBag(str(repo / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag


@pytest.mark.parametrize("dag_id", IMAGE_DAGS)
def test_every_image_dag_form_takes_ids_a_dataset_or_a_tag(dagbag, dag_id) -> None:
    params = dagbag.dags[dag_id].params
    assert params["image_ids"] == []  # nothing picked until the user picks
    assert params["dataset"] is None and params["tag"] is None
    schema = {name: params.get_param(name).schema for name in ("dataset", "tag")}
    assert schema["dataset"]["type"] == ["integer", "null"] and schema["dataset"]["minimum"] == 1
    # one widget the UI can render: a tag is an id (integer) or its text (string)
    assert schema["tag"]["type"] == ["integer", "string", "null"]
    assert "anyOf" not in schema["tag"]
    params.validate()  # the form's defaults are a well-formed conf (check_images refuses it)
