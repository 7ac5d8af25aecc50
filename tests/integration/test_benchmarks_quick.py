"""Every benchmark runs in its ``--quick`` mode and prints its ratio lines (no timing asserted).

A benchmark that breaks (e.g. a layout the steps no longer accept) fails here, in CI, instead
of when someone next measures. A new script in ``benchmarks/`` must be added to ``RATIO_LINES``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"
NUM = r"[0-9]+(?:\.[0-9]+)?"

#: script -> the lines its quick run must print (regexes, multiline).
RATIO_LINES: dict[str, list[str]] = {
    "segment_peff.py": [
        r"^\s+p\s+T_tiles\[s\]\s+speedup\s+PEFF\b",
        rf"^\s+1\s+{NUM}\s+1\.00\s+1\.00\s",  # p = 1 row: the reference
        rf"^\s+2\s+{NUM}\s+{NUM}\s+{NUM}\s",  # p = 2 row: speedup and PEFF
        r"^PEFF = T1 / \(p \* Tp\)",
        rf"^tissue only \(p={NUM}, .*: {NUM} of {NUM} tiles segmented, {NUM} skipped; .*"
        rf"saving -?{NUM}%",
    ],
    "predict_classifier.py": [
        rf"^one job:\s+{NUM}s wall, {NUM} crops/s ",
        rf"^2-task array: {NUM}s wall \(tasks {NUM}, {NUM} crops/s\) \+ merge {NUM}s",
        rf"^prediction crops/s on cpu: {NUM} \(1 job, wall\), {NUM} \(2-task array",
        rf"^PEFF = T1 / \(2 \* T2\) = {NUM} / \(2 \* {NUM}\) = {NUM}",
    ],
    "merge_memory.py": [
        rf"^merge: {NUM} nuclei, {NUM} label levels, {NUM} seam masks held",
        rf"^peak RSS: merge {NUM} MiB, imports only {NUM} MiB, merge - imports -?{NUM} MiB",
    ],
    "zarr_files.py": [
        rf"^files unsharded / sharded: {NUM}; write time sharded / unsharded: {NUM}; "
        rf"bytes sharded / unsharded: {NUM}",
    ],
    "ecdf_throughput.py": [
        rf"^lower bound \(decode \+ bincount, no mask\): {NUM}s {NUM} Mpx/s",
        rf"^ratio eCDF / lower-bound throughput: {NUM}",
    ],
    "candidate_crops.py": [
        rf"^render on the cluster: {NUM} candidates, {NUM} PNGs in {NUM}s .*: {NUM} candidates/s",
        rf"^fetch through the gateway: {NUM} chunks, .*: {NUM} chunks/s",
        rf"^load into the annotation store: {NUM} chunks in {NUM}s: {NUM} chunks/s",
        rf"^ratio cold / cached: {NUM}",
    ],
    "omero_tile_decode.py": [
        rf"^ratio \(struct / numpy\): time {NUM}x, memory {NUM}x",
    ],
    "annotation_store.py": [
        rf"^sqlite\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}$",
        rf"^postgresql\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}$",
        rf"^ratio postgresql / sqlite labels/s: {NUM} \(1 annotator\), {NUM} \(2 in parallel\)",
    ],
    "train_classifier.py": [
        r"^epoch\s+crops\s+seconds\s+crops/s$",
        rf"^train crops/s per epoch \(median\): {NUM} on (cpu|cuda)",
        rf"^held-out ROC-AUC classifier {NUM} vs marker mean {NUM}",
    ],
    "orchestration_overhead.py": [
        rf"^run  1: success\s+task\s+{NUM} s\s+job\s+{NUM} s\s+overhead\s+-?{NUM} s",
        rf"^local: runs=1 median overhead -?{NUM} s .* overhead / task = -?{NUM}",
        rf"^gateway process start \(ping on an open connection\): median {NUM} ms",
        r"^breakdown over 1 runs, seconds: median \(min, max\)",
        rf"^\s+task start-up\s+-?{NUM} \(min",
        rf"^\s+task resume\s+-?{NUM} \(min",
    ],
    "poll_cost.py": [
        rf"^local\s+100 jobs:\s+{NUM} polls,\s+{NUM} status calls in {NUM} s \({NUM} per 1 s "
        rf"interval, 100 ids tracked",
        rf"^local\s+1000 jobs: .*1000 ids tracked, call {NUM} s\); triggerer CPU {NUM} s/min",
        rf"^local: ratio 1000/100 jobs: calls per interval {NUM}, triggerer CPU {NUM}",
    ],
}
#: Scripts that import Airflow and need a migrated AIRFLOW_HOME.
AIRFLOW_SCRIPTS = {"orchestration_overhead.py", "poll_cost.py"}


def scripts() -> list[str]:
    """The runnable scripts in benchmarks/ (helper modules have no ``__main__`` block)."""
    return sorted(p.name for p in BENCHMARKS.glob("*.py")
                  if 'if __name__ == "__main__"' in p.read_text())


def test_every_benchmark_script_has_a_quick_check() -> None:
    assert scripts() == sorted(RATIO_LINES), (
        "every script in benchmarks/ needs a --quick mode and its ratio lines in RATIO_LINES")


def run_quick(script: str, env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick"], env=env, cwd=REPO,
        capture_output=True, text=True, timeout=1200, check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} --quick exited {proc.returncode}:\n{output[-4000:]}"
    for pattern in RATIO_LINES[script]:
        assert re.search(pattern, proc.stdout, re.MULTILINE), (
            f"{script} --quick printed no line matching {pattern!r}:\n{proc.stdout[-4000:]}")
    return proc.stdout


@pytest.mark.parametrize("script", sorted(set(RATIO_LINES) - AIRFLOW_SCRIPTS))
def test_cluster_side_benchmark_quick(script: str, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmp_path))
    run_quick(script, env)


def test_orchestration_overhead_quick(airflow_env: dict[str, str]) -> None:
    """One ``dag.test()`` run on the embedded default (local gateway, local scheduler)."""
    run_quick("orchestration_overhead.py", dict(airflow_env))


def test_poll_cost_quick(airflow_env: dict[str, str]) -> None:
    """100 and 1000 tracked jobs polled through the local gateway by the real triggers."""
    run_quick("poll_cost.py", dict(airflow_env))
