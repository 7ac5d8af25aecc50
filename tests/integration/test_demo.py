"""The main job (``scripts/demo.py --small``) end to end in a throw-away AIRFLOW_HOME.

Three synthetic slides with decoys → preprocess (real Cellpose) → candidates → labels by the
auto-annotator (a stand-in for people) → train → active learning → predict + writeback on
the held-out slide. What a user checks at the end: it succeeded, the held-out slide has ROIs
for its predicted positives, the metrics are computed against the truth on that slide for
both the model and the marker-mean baseline, and the unlabelled candidates were scored.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_demo_small_runs_the_whole_loop(airflow_env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--small"],
                          env=airflow_env, capture_output=True, text=True, timeout=900,
                          check=False, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("OMEFLOW_DEMO ")]
    demo = json.loads(line.split(" ", 1)[1])
    model, base = demo["held_out"]["model"], demo["held_out"]["baseline_marker_mean"]
    assert model["n"] == base["n"] > 50 and 0 < model["positives"] < model["n"]
    assert model["roc_auc"] is not None and base["roc_auc"] is not None
    cm = model["confusion"]
    assert demo["rois"] == cm["tp"] + cm["fp"] + demo["held_out"]["unmatched_positive"]
    assert sum(r["scored"] for r in demo["scored"] or []) > 0
    assert "start the UI: make ui" in proc.stdout
    print(f"\ndemo --small held out: ROC-AUC {model['roc_auc']} vs marker mean "
          f"{base['roc_auc']}; PR-AUC {model['pr_auc']} vs {base['pr_auc']}; F1 "
          f"{model['f1']} vs {base['f1']}")
