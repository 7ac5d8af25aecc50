"""``celldetector_nightly`` on the embedded default with ``dag.test()``: the selection.

A dataset in the embedded local store holds three images: a new synthetic slide, a finished
one (it already has writeback's map annotation for the current model) and one that fails (no
tissue ROI). An untrained ResNet-50 is registered and promoted current (plumbing: accuracy is
the training tests' business). The first run picks the new and the failing image and skips the
finished one; the new image goes through preprocess (real Cellpose) + predict + writeback while
the failing one stops only its own group. A second run finds nothing left to do but the
failing image; with that image removed, a third run finds nothing at all.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_nightly_picks_new_images_skips_finished_and_isolates_failures(
    run_dag, airflow_env, monkeypatch, tmp_path, embedded_site, embedded_annotations
) -> None:
    from hpc_jobs.predictions import namespace_for
    from hpc_jobs.stores.local import LocalStore
    from hpc_jobs.synth import SynthSpec, generate
    from tests.science.test_predict import save_untrained

    site = embedded_site
    path = save_untrained(site.models.classifier_dir(site.data_root), "nightly", threshold=0.0)
    ns = namespace_for("nightly")
    store = LocalStore(site.store.path)
    new = generate(SynthSpec(width=384, height=256, seed=1), store,
                   out_truth=tmp_path / "new")["image_id"]
    done = generate(SynthSpec(width=384, height=256, seed=2), store,
                    out_truth=tmp_path / "done")["image_id"]
    store.write_map_annotation(done, ns, {"model": "nightly"})
    failing = store.add_image("no tissue", np.full((2, 128, 128), 100, np.uint16),
                              ["DAPI", "CD8"], (0.5, 0.5))
    dataset = store.create_dataset("nightly slides", [new, done, failing])
    conf = {"nightly_dataset": dataset}

    # no model marked current: the run ends with a message, nothing runs
    result, output = run_dag("celldetector_nightly", conf)
    assert result["state"] == "success", output[-6000:]
    assert result["tasks"]["current_model"]["state"] == "skipped"
    assert "no model is marked current" in output
    assert result["tasks"]["find_images"]["state"] == "skipped"

    annotations = embedded_annotations
    annotations.add_model(str(path.with_name("newer-not-current.pt")), {}, "x", {})
    annotations.promote_model(annotations.add_model(str(path), {}, "hash", {}))
    annotations.add_model(str(path.with_name("newest-not-current.pt")), {}, "y", {})

    result, output = run_dag("celldetector_nightly", conf)
    tasks = result["tasks"]
    assert tasks["current_model"]["xcom"]["classifier"] == "nightly", output[-6000:]
    found = tasks["find_images"]["xcom"]
    assert found["image_ids"] == [new, failing], output[-6000:]
    assert set(found["skipped"]) == {str(done)} and "has results" in found["skipped"][str(done)]
    by_image = {found["image_ids"][i]: i for i in range(2)}
    ok, bad = by_image[new], by_image[failing]
    assert tasks[f"image.check_images[{bad}]"]["state"] == "failed"
    assert "has no tissue ROI" in output
    assert tasks[f"image.writeback[{bad}]"]["state"] == "upstream_failed"
    assert tasks[f"image.writeback[{ok}]"]["state"] == "success", output[-6000:]
    wb = tasks[f"image.writeback[{ok}]"]["xcom"]
    assert wb["cells"] > 0 and wb["rois"] == wb["positives"] == wb["cells"]  # threshold 0
    assert store.get_map_annotations(new, ns)[0].values["run"] == result["run_id"]

    # the same night again: the new image now has results; only the failing one is left
    result, output = run_dag("celldetector_nightly", conf)
    found = result["tasks"]["find_images"]["xcom"]
    assert found["image_ids"] == [failing], output[-6000:]
    assert set(found["skipped"]) == {str(new), str(done)}
    store.delete_image(failing)
    result, output = run_dag("celldetector_nightly", conf)
    assert result["state"] == "success", output[-6000:]
    assert result["tasks"]["find_images"]["xcom"]["image_ids"] == []
    assert not any(k.startswith("image.") and v["state"] == "success"
                   for k, v in result["tasks"].items())
