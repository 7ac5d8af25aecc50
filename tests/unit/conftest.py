"""Fixtures of the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc_jobs.config import SiteConfig


@pytest.fixture()
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SiteConfig:
    """An embedded-default site under tmp_path (local transport, local scheduler); no
    ``omeflow_hpc`` connection."""
    site = SiteConfig.local(tmp_path)
    path = tmp_path / "site.toml"
    path.write_text(site.to_toml())
    monkeypatch.setenv("OMEFLOW_SITE_CONFIG", str(path))
    monkeypatch.setenv("AIRFLOW__OMEFLOW__HPC_TRANSPORT", "local")
    monkeypatch.delenv("AIRFLOW_CONN_OMEFLOW_HPC", raising=False)
    return site
