"""``OmeroSessionHook``: one short-lived OMERO session key per cluster job.

OMERO passwords never travel to the cluster. The orchestrator logs in once with the service
account of an Airflow connection (type ``generic``: host, port, login, password; extras
``secure`` and ``session_ttl_min``), asks the session service for a new session for the job
(``createSessionWithTimeouts``) and sends only that session's key in the submit body (stdin,
then a 0600 file on the cluster). Each job gets its own key: jobs of different OMERO groups
cannot race over one session's group (the thesis's finding), and a job may close its session
when done.

omero-py is an optional extra (zeroc-ice 3.6.5 builds on Python 3.10 only); it is imported
lazily and its absence gives an error that names the fix.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk.bases.hook import BaseHook


class OmeroUnavailable(RuntimeError):
    """omero-py is not installed here."""


def _omero_gateway() -> Any:
    try:
        from omero.gateway import BlitzGateway
    except ImportError:
        raise OmeroUnavailable(
            "omero-py is not installed in the Airflow environment; install the extra "
            "`pip install 'omeflow[omero]'` (zeroc-ice 3.6.5 needs Python 3.10), or run the "
            "workflow on the local store (no omero_conn_id)"
        ) from None
    return BlitzGateway


class OmeroSessionHook(BaseHook):
    """Mints per-job OMERO session keys from a service account.

    :param omero_conn_id: Airflow connection with the OMERO host, port, login and password.
    :param session_ttl_min: lifetime of a minted session (long enough for the job to start:
        queueing time counts). Overridden by the connection extra ``session_ttl_min``.
    """

    conn_name_attr = "omero_conn_id"
    default_conn_name = "omero_default"
    conn_type = "generic"
    hook_name = "OMERO session keys"

    def __init__(self, omero_conn_id: str = default_conn_name, session_ttl_min: int = 24 * 60):
        super().__init__()
        self.omero_conn_id = omero_conn_id
        self.session_ttl_min = session_ttl_min

    def _connect(self) -> Any:
        conn = self.get_connection(self.omero_conn_id)
        extra = conn.extra_dejson
        gateway = _omero_gateway()(
            conn.login, conn.password, host=conn.host, port=conn.port or 4064,
            secure=str(extra.get("secure", "true")).lower() == "true",
        )
        if not gateway.connect():
            raise RuntimeError(
                f"cannot log in to OMERO at {conn.host}:{conn.port or 4064} as {conn.login} "
                f"(connection {self.omero_conn_id!r}); check the login and password"
            )
        self.session_ttl_min = int(extra.get("session_ttl_min", self.session_ttl_min))
        return gateway

    def mint_session_key(self, group_id: int | None = None) -> str:
        """A new session key for one job (optionally in an OMERO group)."""
        import omero  # present: _connect succeeded

        gateway = self._connect()
        try:
            service = gateway.getSessionService()
            principal = omero.sys.Principal()
            principal.name = gateway.getUser().getName()
            principal.group = (
                gateway.getGroupFromContext().getName() if group_id is None
                else gateway.getObject("ExperimenterGroup", group_id).getName()
            )
            principal.eventType = "User"
            ttl_ms = self.session_ttl_min * 60 * 1000
            # idle timeout == lifetime: a job may sit in the queue before it first connects
            session = service.createSessionWithTimeouts(principal, ttl_ms, ttl_ms)
            return session.getUuid().getValue()
        finally:
            gateway.close()
