"""The in-job runner's exit status: 0, 1, or EXIT_RETRY_LATER (75) for conditions that pass by
themselves, so the operator retries instead of failing (see operators/hpc_step.py's table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import hpc_jobs.run as run
from hpc_jobs.config import SiteConfig
from hpc_jobs.image_lock import ImageLockedError
from hpc_jobs.jobdir import JobDir
from hpc_jobs.protocol import EXIT_RETRY_LATER
from hpc_jobs.registry import get_step
from hpc_jobs.stores.base import StoreError


class _PyramidNotReady(StoreError):
    retryable = True


def _job(tmp_path: Path) -> JobDir:
    site = SiteConfig.local(tmp_path)
    (tmp_path / "site.toml").write_text(site.to_toml())
    job = JobDir(site.job_root, "k-1")
    job.path.mkdir(parents=True)
    job.request_path.write_text(json.dumps({
        "step": "cluster_check", "params": {}, "resources": {},
        "site_config": str(tmp_path / "site.toml"),
    }))
    return job


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ImageLockedError("image 7 is in use by job other.run", []), EXIT_RETRY_LATER),
        (_PyramidNotReady("the pyramid of image 7 is being built; retry later"),
         EXIT_RETRY_LATER),
        (StoreError("image 7 has no channel 3"), 1),
        (ValueError("a bug"), 1),
    ],
    ids=["image-locked", "pyramid-not-ready", "store-error", "bug"],
)
def test_exit_status_says_whether_a_retry_can_help(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    error: Exception, code: int,
) -> None:
    spec = get_step("cluster_check")
    assert spec is not None

    class Failing:
        name = spec.name
        params_model = spec.params_model
        needs_store = spec.needs_store

        @staticmethod
        def entry(params: Any, ctx: Any) -> dict[str, Any]:
            raise error

    monkeypatch.setattr(run, "get_step", lambda name: Failing)
    job = _job(tmp_path)
    assert run.main(job.path) == code
    assert json.loads(job.exit_marker_path().read_text())["exit_code"] == code
    err = capsys.readouterr().err
    assert str(error) in err
    if code == EXIT_RETRY_LATER:
        assert "Traceback" not in err, "a condition that names its fix needs no traceback"
