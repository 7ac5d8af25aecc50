"""Active learning: a newly registered classifier scores the unlabelled candidates.

After ``celldetector_train`` registers a model, :func:`scoring_plan` lists, per image whose
labels trained it, the nucleus ids of every candidate (in any candidate set of that image)
that nobody has labelled yet. One ``predict`` job per image (and per
``MAX_SCORE_NUCLEI`` ids) classifies only those nuclei on the cluster and returns their
probabilities as small ``scores.<nnnn>.json`` chunks, fetched through the gateway's
``result`` verb (:func:`fetch_probabilities`); the cluster never sees the annotation store.
:func:`apply_scores` writes each candidate's uncertainty, :func:`uncertainty` =
``1 - |2p - 1|`` (1 at p = 0.5, 0 at p = 0 or 1), with ``AnnotationStore.set_scores``, so the
annotation page's ``order="uncertain"`` queue serves the candidates the model is least sure
of first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowFailException

from hpc_jobs.steps.predict import MAX_SCORE_NUCLEI

if TYPE_CHECKING:
    from hooks.annotations import AnnotationStore
    from hooks.hpc import HpcGatewayHook


def uncertainty(p: float) -> float:
    """``1 - |2p - 1|``: 1 when the model is undecided (p = 0.5), 0 when it is sure."""
    return 1.0 - abs(2.0 * float(p) - 1.0)


def unlabelled_nuclei(store: AnnotationStore, image_id: int) -> dict[int, list[int]]:
    """``{set_id: [nucleus ids]}`` of the image's candidates nobody has labelled (current
    labels of any annotator, unsure included)."""
    out: dict[int, list[int]] = {}
    for cset in store.candidate_sets(image_id=image_id):
        sid = int(cset["id"])
        labelled = {int(r["nucleus_id"]) for r in store.labels(set_id=sid)}
        free = sorted(int(c["nucleus_id"]) for c in store.candidates(sid)
                      if int(c["nucleus_id"]) not in labelled)
        if free:
            out[sid] = free
    return out


def scoring_plan(store: AnnotationStore, image_ids: Iterable[int], model_path: str
                 ) -> list[dict[str, Any]]:
    """The ``predict`` jobs that score the images' unlabelled candidates: one mapping of
    step arguments (``image_id``, ``classifier``, ``score_nuclei``) per image and per
    :data:`~hpc_jobs.steps.predict.MAX_SCORE_NUCLEI` ids; none when nothing is unlabelled."""
    classifier = PurePosixPath(str(model_path)).stem
    plan: list[dict[str, Any]] = []
    for image_id in sorted({int(i) for i in image_ids}):
        ids = sorted({n for free in unlabelled_nuclei(store, image_id).values() for n in free})
        for k in range(0, len(ids), MAX_SCORE_NUCLEI):
            plan.append({"image_id": image_id, "classifier": classifier,
                         "score_nuclei": ids[k : k + MAX_SCORE_NUCLEI]})
    return plan


def fetch_probabilities(hook: HpcGatewayHook, summary: Mapping[str, Any]) -> dict[int, float]:
    """``{nucleus_id: p}`` of one scoring job, its chunks fetched through ``result``."""
    job_id, scores = str(summary.get("job_id")), summary.get("scores")
    if not isinstance(scores, Mapping) or "chunks" not in scores:
        raise AirflowFailException(f"job {job_id} is not a scoring predict job (no "
                                   "scores.chunks in its summary): pass score_nuclei")
    probs: dict[int, float] = {}
    for name in scores["chunks"]:
        data = hook.result(job_id, str(name)).data
        if not isinstance(data, dict) or not isinstance(data.get("probabilities"), dict):
            raise AirflowFailException(f"output {name} of job {job_id} is not a scores chunk; "
                                       "rerun the scoring")
        for nid, p in data["probabilities"].items():
            p = float(p)
            if not 0.0 <= p <= 1.0:
                raise AirflowFailException(f"output {name} of job {job_id}: probability {p} "
                                           f"of nucleus {nid} is outside [0, 1]")
            probs[int(nid)] = p
    return probs


def apply_scores(store: AnnotationStore, image_id: int, probs: Mapping[int, float]
                 ) -> dict[str, Any]:
    """Write the uncertainty of ``probs`` on the image's unlabelled candidates (every set);
    returns counts. A candidate labelled since the plan keeps its old score (it has left
    the queue anyway)."""
    scored = 0
    sets = unlabelled_nuclei(store, image_id)
    for sid, free in sets.items():
        scores = {n: uncertainty(probs[n]) for n in free if n in probs}
        scored += store.set_scores(sid, scores) if scores else 0
    return {"image_id": int(image_id), "sets": sorted(sets), "scored": scored,
            "probabilities": len(probs)}


def score_all(store: AnnotationStore, hook: HpcGatewayHook, summaries: Iterable[Any]
              ) -> list[dict[str, Any]]:
    """Fetch every scoring job's probabilities and apply them (see :func:`apply_scores`)."""
    by_image: dict[int, dict[int, float]] = {}
    for summary in summaries:
        if summary is None:
            continue
        by_image.setdefault(int(summary["image_id"]), {}).update(
            fetch_probabilities(hook, summary))
    return [apply_scores(store, i, p) for i, p in sorted(by_image.items())]
