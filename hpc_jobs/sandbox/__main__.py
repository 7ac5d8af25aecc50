"""``python -m hpc_jobs.sandbox start|stop|status|env|fix-permissions``."""

from __future__ import annotations

import argparse

from hpc_jobs.sandbox import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m hpc_jobs.sandbox", description=__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
