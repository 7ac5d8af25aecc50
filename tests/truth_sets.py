"""Candidate sets labelled from the synthetic truth, for DAG tests that need labels in the
annotation store (a stand-in for people, as ``scripts/demo.py``'s auto-annotator)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def add_truth_set(
    store: Any, image_id: int, table: Any, run_id: str, annotator: str,
    labelled: Callable[[int], bool] = lambda k: True,
) -> tuple[int, dict[int, int], list[list[int]]]:
    """One candidate set of the nuclei ``truth_labels`` keeps for ``image_id``; the ``k``-th of
    them is labelled by ``annotator`` from the truth when ``labelled(k)``.

    :return: the set id, ``{nucleus id: candidate id}`` and the truth rows
        ``[image_id, nucleus_id, 0|1]``.
    """
    from hpc_jobs.classifier.synthetic import truth_labels

    rows = truth_labels(image_id, table)
    by_id = table.set_index("id")
    set_id = store.add_candidate_set(
        image_id, run_id, "fixed", {"threshold": 200}, {},
        [{"nucleus_id": n, "x": float(by_id.x[n]), "y": float(by_id.y[n]), "area": 1.0}
         for _, n, _ in rows])
    cands = {c["nucleus_id"]: c["id"] for c in store.candidates(set_id)}
    for k, (_, n, v) in enumerate(rows):
        if labelled(k):
            store.label(cands[n], annotator, "positive" if v else "negative")
    return set_id, cands, rows
