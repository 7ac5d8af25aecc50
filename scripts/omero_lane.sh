#!/usr/bin/env bash
# Optional OMERO lane: Python 3.10 (zeroc-ice 3.6.5 does not build on 3.11) with omero-py.
# Runs tests/omero: OmeroStore with real omero.model classes (no server needed). The store
# contract suite against a live server needs OMERO_HOST, OMERO_USER and OMERO_PASSWORD.
# The first run compiles zeroc-ice (~10 min on 2 cores); pip caches the wheel afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PY310=${PYTHON310:-}
if [ -z "$PY310" ]; then
    if command -v pyenv >/dev/null && pyenv prefix 3.10 >/dev/null 2>&1; then
        PY310="$(pyenv prefix 3.10)/bin/python"
    elif python3.10 -c "" >/dev/null 2>&1; then PY310=$(command -v python3.10)
    else
        echo "no Python 3.10 found: install one (e.g. pyenv install 3.10) or set PYTHON310" >&2
        exit 2
    fi
fi
VENV=.venv-omero
[ -x $VENV/bin/python ] || "$PY310" -m venv $VENV
$VENV/bin/pip install -q --upgrade pip wheel
$VENV/bin/pip install -q "zeroc-ice==3.6.5" "omero-py>=5.19" numpy shapely pytest
$VENV/bin/pip install -q --no-deps -e .
$VENV/bin/pip install -q "pydantic>=2.7,<3" "tomli>=2"
$VENV/bin/python -m pytest -q -p no:cacheprovider tests/omero "$@"
