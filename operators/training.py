"""Airflow-side tasks of ``celldetector_train``: the label snapshot and the model registry.

- :func:`build_snapshot` turns the annotation store's current labels of the chosen candidate
  sets / images into the compact snapshot ``train_classifier`` takes
  (``[image_id, nucleus_id, 1|0]``, unsure and conflicting labels dropped) with its sha256,
  and refuses with fewer than ``[omeflow] min_labels_per_class`` labels of a class, naming
  how many are missing.
- :func:`register_model` records the trained model in the store's ``models`` table (path,
  params, snapshot hash, label snapshot time, metrics, git commit) and marks it current when
  none is, when it beats the current one on the same held-out cells (``compare_with`` in the
  job's metrics), or when ``promote`` is set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowFailException

if TYPE_CHECKING:
    from hooks.annotations import AnnotationStore

#: Default of ``[omeflow] min_labels_per_class``.
MIN_LABELS_PER_CLASS = 20
#: Store label -> class (``unsure`` is left out).
CLASS_OF = {"positive": 1, "negative": 0}


def min_labels_per_class() -> int:
    """``[omeflow] min_labels_per_class`` (default :data:`MIN_LABELS_PER_CLASS`)."""
    from airflow.configuration import conf

    return conf.getint("omeflow", "min_labels_per_class", fallback=MIN_LABELS_PER_CLASS)


def build_snapshot(store: AnnotationStore, set_ids: Iterable[int] = (),
                   image_ids: Iterable[int] = (), min_per_class: int = MIN_LABELS_PER_CLASS
                   ) -> dict[str, Any]:
    """The label snapshot of the sets and images given (their union).

    Per nucleus, the current labels of every annotator: unsure ones are dropped, and a
    nucleus whose annotators disagree (positive vs negative) is left out and counted.
    """
    from hpc_jobs.classifier.snapshot import MAX_LABELS, canonical, snapshot_hash

    set_ids, image_ids = [int(i) for i in set_ids], [int(i) for i in image_ids]
    if not set_ids and not image_ids:
        raise AirflowFailException("give set_ids or image_ids: the candidate sets or images "
                                   "whose labels train the model")
    rows: dict[int, dict[str, Any]] = {}
    for sid in set_ids:
        rows.update({r["id"]: r for r in store.labels(set_id=sid)})
    for iid in image_ids:
        rows.update({r["id"]: r for r in store.labels(image_id=iid)})
    votes: dict[tuple[int, int], set[int]] = {}
    newest: datetime | None = None
    unsure = 0
    for r in rows.values():
        if r["label"] not in CLASS_OF:
            unsure += 1
            continue
        votes.setdefault((int(r["image_id"]), int(r["nucleus_id"])), set()).add(
            CLASS_OF[r["label"]])
        newest = r["created_at"] if newest is None else max(newest, r["created_at"])
    conflicts = sum(1 for v in votes.values() if len(v) > 1)
    labels = canonical([i, n, next(iter(v))] for (i, n), v in votes.items() if len(v) == 1)
    counts = {"positive": sum(1 for r in labels if r[2] == 1),
              "negative": sum(1 for r in labels if r[2] == 0)}
    missing = {k: min_per_class - n for k, n in counts.items() if n < min_per_class}
    if missing:
        raise AirflowFailException(
            f"not enough labels to train: {counts['positive']} positive and "
            f"{counts['negative']} negative (unsure {unsure} and {conflicts} conflicting "
            f"left out); need {min_per_class} per class ([omeflow] min_labels_per_class): "
            + ", ".join(f"{n} more {k}" for k, n in missing.items())
            + " — label more candidates on the annotation page")
    if len(labels) > MAX_LABELS:
        raise AirflowFailException(
            f"{len(labels)} labels are more than one training job takes ({MAX_LABELS}): "
            "train on fewer candidate sets or images")
    return {"labels": labels, "snapshot_hash": snapshot_hash(labels),
            "labels_at": newest.isoformat() if newest else None, "counts": counts,
            "unsure_dropped": unsure, "conflicts_dropped": conflicts,
            "set_ids": set_ids, "image_ids": image_ids}


def beats(metrics: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether a new model beats the one it was compared with on the same held-out cells
    (higher ROC-AUC, ties by PR-AUC), and why."""
    new, old = metrics.get("model", {}), metrics.get("compare_with")
    if not old:
        return False, "no comparison with the current model in the job's metrics"
    key_new = (new.get("roc_auc") or 0.0, new.get("pr_auc") or 0.0)
    key_old = (old.get("roc_auc") or 0.0, old.get("pr_auc") or 0.0)
    why = (f"held-out ROC-AUC/PR-AUC {key_new[0]}/{key_new[1]} vs current "
           f"{old.get('name')} {key_old[0]}/{key_old[1]}")
    return key_new > key_old, why


def register_model(store: AnnotationStore, summary: Mapping[str, Any],
                   snapshot: Mapping[str, Any], promote: bool = False,
                   current_id: int | None = None) -> dict[str, Any]:
    """Add the trained model to the registry; make it current by the rule above.

    ``current_id`` is the model that was current when the job was built (the one it was
    compared with); if another became current meanwhile the new one is not promoted.
    """
    if summary.get("snapshot_hash") != snapshot["snapshot_hash"]:
        raise AirflowFailException(
            f"the job trained on snapshot {summary.get('snapshot_hash')}, not the one this run "
            f"built ({snapshot['snapshot_hash']}): rerun the whole DAG run")
    labels_at = datetime.fromisoformat(snapshot["labels_at"]) if snapshot.get(
        "labels_at") else None
    params = {**dict(summary.get("params", {})), "set_ids": snapshot.get("set_ids"),
              "image_ids": snapshot.get("image_ids"), "label_counts": snapshot.get("counts"),
              "split": summary.get("split"), "training": {
                  k: v for k, v in dict(summary.get("training", {})).items() if k != "history"},
              "device": summary.get("device")}
    model_id = store.add_model(
        str(summary["path"]), params, str(summary["snapshot_hash"]),
        dict(summary.get("metrics", {})), name=summary.get("name"), labels_at=labels_at,
        git_commit=summary.get("git_commit"))
    current = store.current_model()
    if promote:
        why, make_current = "promote requested", True
    elif current is None:
        why, make_current = "no model was current", True
    elif current["id"] != current_id:
        why, make_current = (f"model {current['id']} became current while this one trained; "
                             "promote explicitly if wanted"), False
    else:
        make_current, why = beats(summary.get("metrics", {}))
    if make_current:
        store.promote_model(model_id)
    return {"model_id": model_id, "current": make_current, "reason": why,
            "path": summary["path"], "metrics": summary.get("metrics")}
