"""``omeflow annotations``: migrate the annotation store, or show where it is and its revision.

    omeflow annotations migrate [--url URL | --conn-id ID]
    omeflow annotations status  [--url URL | --conn-id ID]

Without ``--url`` the store is the one the Airflow deployment uses (:class:`AnnotationHook`:
the connection ``omeflow_annotations``, else ``$AIRFLOW_HOME/var/annotations.sqlite``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from hooks.annotations import (
    DEFAULT_CONN_ID,
    AnnotationHook,
    AnnotationStore,
    AnnotationStoreError,
    engine_from_url,
    head_revision,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``omeflow annotations``."""
    parser.add_argument("action", choices=("migrate", "status"),
                        help="migrate: upgrade to the newest schema (no-op when there); "
                             "status: the database and its revision")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="SQLAlchemy URL of the database (sqlite:////abs/path or "
                                     "postgresql+psycopg://user:pw@host/db)")
    where.add_argument("--conn-id", default=DEFAULT_CONN_ID,
                       help=f"Airflow connection of type postgres (default {DEFAULT_CONN_ID}; "
                            "missing: the embedded SQLite)")


def main(args: argparse.Namespace) -> int:
    """Run the action; 0 on success, 1 with a message on stderr otherwise."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # our one line says what happened
    try:
        if args.url:
            engine = engine_from_url(args.url)
        else:
            engine = AnnotationHook(annotations_conn_id=args.conn_id).get_engine()
        store = AnnotationStore(engine, check_schema=False)
        if args.action == "migrate":
            before, after = store.migrate()
            change = "already at" if before == after else f"migrated {before or 'empty'} ->"
            print(f"annotation store {store.where}: {change} revision {after}")
        else:
            current, head = store.revision(), head_revision()
            state = "up to date" if current == head else "needs `omeflow annotations migrate`"
            print(f"annotation store {store.where}: revision {current or 'none'} "
                  f"(head {head}): {state}")
            return 0 if current == head else 1
    except (AnnotationStoreError, ValueError) as exc:
        print(f"omeflow annotations: {exc}", file=sys.stderr)
        return 1
    return 0
