"""``omeflow``: the project's command line. Each subcommand lives in its own module.

A subcommand module exposes ``add_arguments(parser)`` and ``main(args) -> int``; it is
imported only when that subcommand runs, so ``omeflow keys`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("hpc_jobs.synth", "generate a synthetic whole-slide image with ground truth"),
    "bootstrap-model": (
        "hpc_jobs.segmentation.bootstrap",
        "train the small Cellpose model used when no real weights are configured",
    ),
    "keys": ("hpc_jobs.keys", "create / rotate / revoke / list per-user gateway SSH keys"),
    "sandbox": ("hpc_jobs.sandbox", "HPC in a box: Slurm + munge + sshd on 127.0.0.1"),
    "step": ("hpc_jobs.step_cli", "run one step by itself through the gateway (development)"),
    "annotations": (
        "hooks.annotations_cli",
        "migrate the annotation store (Airflow side) or show its schema revision",
    ),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``omeflow`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="omeflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(sp)
            sp.set_defaults(_main=mod.main)
    args = parser.parse_args(argv)
    return int(args._main(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
