PY ?= .venv/bin/python

.PHONY: hpc-sandbox hpc-sandbox-stop

# HPC in a box: munge + Slurm + sshd on 127.0.0.1:2222 (root; first start installs the
# cluster venv under /opt/omeflow-hpc and takes a few minutes).
hpc-sandbox:
	$(PY) -m hpc_jobs.sandbox start

hpc-sandbox-stop:
	$(PY) -m hpc_jobs.sandbox stop
