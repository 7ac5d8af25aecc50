"""The embedded default: a site on this machine (local scheduler, local store, this Python).

Its site file lives in a ``var/`` folder: ``$AIRFLOW_HOME/var`` when Airflow runs from this
repository (``make demo``, the tests), else the source checkout's ``var/``. Both the Airflow
side's local transport and ``omeflow step run`` use :func:`embedded_site_path`; no Airflow
import here (cluster side).
"""

from __future__ import annotations

import os
from pathlib import Path

from hpc_jobs.config import SiteConfig
from hpc_jobs.fsutil import atomic_write

#: Environment variable naming a site file to use instead of the embedded one.
SITE_ENV = "OMEFLOW_SITE_CONFIG"


def embedded_site_file(var_dir: Path) -> Path:
    """``var_dir/site.toml`` of the embedded default, created if missing (with the ``jobs``,
    ``data`` and ``store`` folders it names). An existing file is used as it is."""
    var_dir = Path(var_dir).absolute()
    path = var_dir / "site.toml"
    if not path.exists():
        for sub in ("jobs", "data", "store"):
            (var_dir / sub).mkdir(parents=True, exist_ok=True)
        atomic_write(path, SiteConfig.local(var_dir).to_toml(), mode=0o644)
    return path


def embedded_home() -> Path:
    """``$AIRFLOW_HOME``; else the source checkout this package lives in; else the working
    directory."""
    home = os.environ.get("AIRFLOW_HOME")
    if home:
        return Path(home)
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "hpc_jobs").is_dir():
        return checkout
    return Path.cwd()


def embedded_site_path() -> Path:
    """The site file of the embedded default: ``$OMEFLOW_SITE_CONFIG`` if set, else
    ``<embedded_home()>/var/site.toml`` (created if missing)."""
    env = os.environ.get(SITE_ENV)
    if env:
        return Path(env)
    return embedded_site_file(embedded_home() / "var")
