"""HPC in a box: munge, Slurm with accounting (slurmdbd, MariaDB) and an sshd on 127.0.0.1,
for tests and demos.

``python -m hpc_jobs.sandbox start|stop|status|env|fix-permissions`` or
``omeflow sandbox ...`` (root only for everything but ``env``). ``start`` is idempotent;
``stop`` ends every daemon ``start`` started. ``env`` prints the JSON the Airflow side uses
to build its SSH connection; :func:`sandbox_env` returns the same dict.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hpc_jobs.sandbox import paths as P

__all__ = ["add_arguments", "main", "sandbox_env", "fix_permissions", "is_running"]


def sandbox_env() -> dict[str, Any]:
    """Connection facts of the sandbox (host, port, user, key, host key, site paths).

    Raises FileNotFoundError when the sandbox was never started (no host key yet).
    """
    pub = P.SSHD_HOST_KEY.with_suffix(".pub").read_text().split()
    return {
        "host": P.HOST,
        "port": P.SSH_PORT,
        "user": P.USER,
        "key_file": str(P.CLIENT_KEY),
        "known_hosts": str(P.KNOWN_HOSTS),
        "host_key": pub[1],
        "host_key_type": pub[0],
        "site_config": str(P.SITE_TOML),
        "job_root": str(P.JOBS),
        "data_root": str(P.DATA),
        "store": str(P.STORE),
        "python": str(P.HPC_PYTHON),
        "gateway": str(P.HPC_GATEWAY),
        "caller": P.CALLER,
        "partition": P.PARTITION,
    }


def is_running() -> bool:
    """True when slurmctld, slurmd, accounting (slurmdbd, MariaDB) and the sshd are alive."""
    from hpc_jobs.sandbox.setup import status

    st = status()
    return all(st[k] for k in ("slurmctld", "slurmd", "slurmdbd", "mariadbd", "sshd"))


def fix_permissions() -> None:
    """chown store/, data/ and jobs/ to the service user (tests running as root write there)."""
    from hpc_jobs.sandbox.setup import fix_permissions as _fix

    _fix()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``omeflow sandbox`` arguments."""
    parser.add_argument(
        "action", choices=["start", "stop", "status", "env", "fix-permissions"],
        help="start (idempotent), stop, status, env (JSON for the SSH connection), "
        "fix-permissions (chown store/data/jobs to the service user)",
    )


def main(args: argparse.Namespace) -> int:
    """Run ``omeflow sandbox ACTION``."""
    from hpc_jobs.sandbox import setup

    try:
        if args.action == "start":
            setup.start()
            print(json.dumps(sandbox_env(), indent=2))
        elif args.action == "stop":
            stopped = setup.stop()
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        elif args.action == "status":
            st = setup.status()
            for name, pid in st.items():
                state = f"running pid {pid}" if pid else "not running (by the sandbox)"
                print(f"{name:10} {state}")
            return 0 if is_running() else 1
        elif args.action == "env":
            try:
                print(json.dumps(sandbox_env(), indent=2))
            except FileNotFoundError:
                print("sandbox not set up; run `make hpc-sandbox` first", file=sys.stderr)
                return 1
        else:
            setup.require_root()
            fix_permissions()
    except setup.SandboxError as exc:
        print(f"omeflow sandbox: error: {exc}", file=sys.stderr)
        return 1
    return 0
