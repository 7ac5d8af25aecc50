"""Active learning at the end of ``celldetector_train`` (``operators/scoring.py``).

Two small synthetic slides with decoys (the nuclei table from the truth, as in
``test_train_dag.py``) get candidate sets of which only two thirds are labelled, from the
truth (a stand-in for people). After the DAG trains and registers a model, every unlabelled
candidate must carry the uncertainty ``1 - |2p - 1|`` of that model's probability p, where p
is checked against an independent full-image ``predict`` run of the same model, and the
annotation queue's ``order="uncertain"`` must serve the most uncertain candidates first.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.truth_sets import add_truth_set

pytestmark = pytest.mark.slow


def test_train_dag_scores_unlabelled_candidates_by_uncertainty(
    run_dag, airflow_env, monkeypatch, embedded_site, embedded_annotations
) -> None:
    import pandas as pd

    from hpc_jobs.classifier.synthetic import prepare_slide
    from hpc_jobs.protocol import Resources, Secrets
    from hpc_jobs.steps import predict
    from hpc_jobs.steps.base import StepContext
    from hpc_jobs.synth import SynthSpec

    site = embedded_site
    ctx = StepContext(job_dir=site.job_root / "pytest-al-prep", site=site,
                      resources=Resources(cpus=2), secrets=Secrets())
    store = embedded_annotations
    set_ids, unlabelled = [], {}
    for seed in (31, 32):
        spec = SynthSpec(width=640, height=512, seed=seed, decoy_fraction=0.5)
        image_id, table = prepare_slide(ctx, spec, site.data_root / "truth" / f"al-{seed}")
        # two thirds labelled by the truth; every third left for the queue
        set_id, _, rows = add_truth_set(store, image_id, table, "pytest-al", "auto-truth",
                                        labelled=lambda k: k % 3 != 0)
        unlabelled.update({(set_id, n): image_id for k, (_, n, _) in enumerate(rows) if k % 3 == 0})
        set_ids.append(set_id)
    assert unlabelled

    result, output = run_dag("celldetector_train", {"set_ids": set_ids, "epochs": 2,
                                                    "patience": 1, "input_size": 32},
                             env={"AIRFLOW__OMEFLOW__MIN_LABELS_PER_CLASS": "5"})
    assert result["state"] == "success", output[max(output.find("Traceback"), 0):][:6000]
    (model,) = store.models()
    classifier = Path(model["path"]).stem

    # the model's probabilities from an independent run: predict over every nucleus
    probs: dict[int, pd.Series] = {}
    for image_id in sorted(set(unlabelled.values())):
        pctx = StepContext(job_dir=site.job_root / f"pytest-al-predict-{image_id}", site=site,
                           resources=Resources(cpus=2), secrets=Secrets())
        out = predict.run(predict.Params(image_id=image_id, classifier=classifier), pctx)
        probs[image_id] = pd.read_parquet(out["predictions_path"]).set_index("id").probability

    for sid in set_ids:
        for c in store.candidates(sid):
            key = (sid, c["nucleus_id"])
            if key not in unlabelled:
                assert c["score"] is None, c  # labelled candidates are not scored
                continue
            p = float(probs[unlabelled[key]][c["nucleus_id"]])
            assert c["score"] == pytest.approx(1 - abs(2 * p - 1), abs=1e-5), (c, p)
        # the queue serves the most uncertain first
        scores = sorted((c["score"] for c in store.candidates(sid)
                         if (sid, c["nucleus_id"]) in unlabelled), reverse=True)
        served = store.next_candidates(sid, "someone", n=min(5, len(scores)),
                                       order="uncertain")
        assert [c["score"] for c in served] == pytest.approx(scores[:len(served)])
    spread = [c["score"] for sid in set_ids for c in store.candidates(sid)
              if c["score"] is not None]
    print(f"\nactive learning: {len(spread)} unlabelled candidates scored, uncertainty "
          f"{min(spread):.3f}..{max(spread):.3f}")


def test_predict_score_nuclei_is_bounded() -> None:
    from pydantic import ValidationError

    from hpc_jobs.steps.predict import MAX_SCORE_NUCLEI, Params

    assert Params(image_id=1, classifier="m", score_nuclei=[3, 5]).score_nuclei == [3, 5]
    assert Params(image_id=1, classifier="m").score_nuclei is None  # a plain predict

    with pytest.raises(ValidationError):
        Params(image_id=1, classifier="m", score_nuclei=list(range(MAX_SCORE_NUCLEI + 1)))
    with pytest.raises(ValidationError):
        Params(image_id=1, classifier="m", score_nuclei=[])
    with pytest.raises(ValidationError):
        Params(image_id=1, classifier="m", score_nuclei=[-1])
