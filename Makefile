# omeflow: the commands a fresh machine needs are `make demo`, `make test` and `make ui`.
PY ?= .venv/bin/python
export AIRFLOW_HOME := $(CURDIR)

.PHONY: setup demo ui test test-fast test-omero-lane lint bench-overhead hpc-sandbox hpc-sandbox-stop clean

# venv (torch CPU first), Airflow DB (SQLite under var/), Cellpose model (cached outside git)
setup:
	bash scripts/setup.sh

# The main job, end to end on the embedded defaults: synthetic image -> celldetector_preprocess
demo: setup
	$(PY) scripts/demo.py

# The Airflow UI on http://127.0.0.1:$(UI_PORT): api-server, scheduler, dag-processor and
# triggerer sharing one JWT secret (var/ui_secrets.json); prints the login; Ctrl-C stops all.
UI_PORT ?= 8080
ui: setup
	$(PY) scripts/ui.py --port $(UI_PORT)

# Everything CI runs: lint, the HPC sandbox (Slurm + munge + sshd on 127.0.0.1), all tests.
test: setup
	bash scripts/test.sh

# Unit + security tests only (no sandbox, no Airflow runs)
test-fast: setup
	$(PY) -m pytest -q tests/unit tests/security tests/contract

# Optional: OmeroStore against real omero-py classes (Python 3.10 + zeroc-ice; not in CI)
test-omero-lane:
	bash scripts/omero_lane.sh

lint:
	$(PY) -m ruff check .

bench-overhead: setup
	$(PY) benchmarks/orchestration_overhead.py --runs 10 --sandbox

# HPC in a box: munge + Slurm + sshd on 127.0.0.1:2222 (root; first start installs the
# cluster venv under /opt/omeflow-hpc and takes a few minutes).
hpc-sandbox:
	$(PY) -m hpc_jobs.sandbox start

hpc-sandbox-stop:
	$(PY) -m hpc_jobs.sandbox stop

clean:
	rm -rf var
