#!/usr/bin/env bash
# The full test suite: lint, start the HPC sandbox, run every test (sandbox tests must run,
# not skip), stop the sandbox. Called by `make test` (after `make setup`) and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
export AIRFLOW_HOME=$(pwd)
export OMEFLOW_REQUIRE_SANDBOX=1
export OMEFLOW_SLOW_TESTS=1  # the bounded-memory synth test (~40 s)
PY=.venv/bin/python

echo "== ruff"
$PY -m ruff check .

echo "== HPC sandbox (munge, slurmctld, slurmd, sshd on 127.0.0.1:2222)"
$PY -m hpc_jobs.sandbox start
trap '$PY -m hpc_jobs.sandbox stop || true' EXIT

echo "== PostgreSQL for the annotation store tests (installed if missing, 127.0.0.1)"
$PY -m tests.postgres_fixture
export OMEFLOW_REQUIRE_POSTGRES=1  # its tests must run, not skip

echo "== pytest"
$PY -m pytest -ra --timeout=1200 "$@"
