#!/usr/bin/env bash
# Set up omeflow on a fresh Debian 12 machine (idempotent; safe to rerun).
#   - a virtualenv in .venv with torch (CPU) first, then omeflow[hpc,airflow,dev]
#   - the Airflow metadata database (SQLite under var/, AIRFLOW_HOME = repo root)
#   - the small Cellpose model trained on synthetic nuclei (cached in $OMEFLOW_CACHE)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
export AIRFLOW_HOME="$REPO"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# The annotation page's browser test drives Debian's chromium through its chromedriver
# (Selenium; no browser can be downloaded in CI).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        echo "== apt-get install chromium chromium-driver (the annotation page's browser test)"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            chromium chromium-driver >/dev/null
    else
        echo "note: chromium/chromium-driver are missing; the annotation page's browser test" \
             "fails until root runs: apt-get install chromium chromium-driver"
    fi
fi

if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
stamp=.venv/.omeflow-deps
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "== installing dependencies (torch CPU first, then omeflow[hpc,airflow,dev])"
    .venv/bin/pip install -q --upgrade pip wheel
    # torch first and pinned: an unpinned resolve pulls the CUDA build (GBs)
    .venv/bin/pip install -q "torch==2.13.0"
    .venv/bin/pip install -q -e ".[hpc,airflow,dev]"
    echo "$want" > "$stamp"
else
    .venv/bin/pip install -q --no-deps -e . >/dev/null
fi

mkdir -p var
echo "== airflow db migrate"
.venv/bin/airflow db migrate >var/db-migrate.log 2>&1 || { tail -20 var/db-migrate.log; exit 1; }

echo "== Cellpose model (trained once on synthetic nuclei, then cached)"
.venv/bin/omeflow bootstrap-model
