"""Image stores. :func:`open_store` picks the implementation the site configured."""

from __future__ import annotations

from hpc_jobs.config import StoreConfig
from hpc_jobs.protocol import Secrets
from hpc_jobs.stores.base import ImageStore


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
    )
