"""Image stores. :func:`open_store` picks the implementation the site configured;
:func:`end_session` ends a job's store session when the job is over."""

from __future__ import annotations

import logging

from hpc_jobs.config import StoreConfig
from hpc_jobs.protocol import Secrets
from hpc_jobs.stores.base import ImageStore

_log = logging.getLogger(__name__)


def open_store(config: StoreConfig, secrets: Secrets | None = None) -> ImageStore:
    """Open the configured store. OMERO is imported lazily (it is an optional extra)."""
    if config.kind == "local":
        from hpc_jobs.stores.local import LocalStore

        assert config.path is not None
        return LocalStore(config.path)
    from hpc_jobs.stores.omero import OmeroStore

    key = secrets.omero_session_key if secrets else None
    return OmeroStore.join(
        host=config.host or "",
        port=config.port,
        session_key=key,
        secure=config.secure,
        ca_file=config.ca_file,
        tls_name=config.tls_name,
    )


def end_session(config: StoreConfig, secrets: Secrets) -> str:
    """End the store session of a job that is over; returns what happened (for logs):
    ``"none"`` (local store, or no key), ``"ended"``, ``"already ended"`` or
    ``"failed (<error type>)"``.

    Best-effort: never raises. A failure is logged as a warning (the session then ends by its
    time-to-live); the key itself is never logged.
    """
    key = secrets.omero_session_key
    if config.kind != "omero" or not key:
        return "none"
    from hpc_jobs.stores import omero as omero_store

    try:
        ended = omero_store.end_session(
            config.host or "", config.port, key, config.ca_file, tls_name=config.tls_name
        )
    except Exception as exc:  # noqa: BLE001 - best-effort: the time-to-live still bounds it
        why = f"{type(exc).__name__}: {exc}".replace(key, "***")
        _log.warning(
            "could not end the job's OMERO session (%s); it ends by its time-to-live", why
        )
        return f"failed ({type(exc).__name__})"
    return "ended" if ended else "already ended"
