#!/usr/bin/env bash
# The OMERO lane: Python 3.10 (zeroc-ice 3.6.5 does not build on 3.11) with omero-py.
#
#   bash scripts/omero_lane.sh             # tests/omero: real omero.model classes, no server
#   bash scripts/omero_lane.sh contract    # + the store contract suite against YOUR test OMERO
#
# contract needs OMERO_HOST, OMERO_USER, OMERO_PASSWORD (optional: OMERO_PORT, OMERO_SECURE,
# OMERO_CA_FILE, OMERO_USER2 + OMERO_PASSWORD2 for the not-the-owner writes,
# OMERO_MULTILEVEL_IMAGE, OMERO_PYRAMID_TIMEOUT); see docs/omero.md. Never point it at a
# production server: it creates and deletes images, ROIs and annotations.
# Extra arguments go to pytest. The first run compiles zeroc-ice (~12 min on 2 cores); pip
# caches the wheel afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=lane
if [ "${1:-}" = contract ]; then MODE=contract; shift; fi
if [ $MODE = contract ]; then
    for v in OMERO_HOST OMERO_USER OMERO_PASSWORD; do
        if [ -z "${!v:-}" ]; then
            echo "contract mode needs $v (a test OMERO server and a user on it)" >&2
            exit 2
        fi
    done
fi
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
# --noconftest: the repository's conftest sets up Airflow, which this lane does not install
TESTS=(tests/omero)
if [ $MODE = contract ]; then
    TESTS+=(tests/contract/test_store_contract.py -k omero)
fi
exec $VENV/bin/python -m pytest -q -p no:cacheprovider --noconftest -rs "${TESTS[@]}" "$@"
