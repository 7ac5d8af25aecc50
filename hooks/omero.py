"""``OmeroSessionHook``: one short-lived OMERO session key per cluster job, ended after it.

OMERO passwords never travel to the cluster. The orchestrator logs in with the *minting
account* of an Airflow connection, creates a new session for the job's OMERO user with an
explicit time-to-live and idle timeout, and sends only that session's key in the submit body
(stdin, then a 0600 file on the cluster). The cluster side ends the session when the job
ends (``hpc_jobs.stores.end_session``); :meth:`OmeroSessionHook.close_session` ends a key that
no job took. The model (docs/omero.md, "Sessions"):

- **Recommended**: the minting account is a *light administrator with only the Sudo
  privilege*; it mints sessions for the user the job works for (the image owner, or a
  pipeline user) with ``ISession.createSessionWithTimeouts(principal, ttl, idle)``. That call
  is a sudo: OMERO allows it to administrators and to owners of the principal's group
  (server ``components/server/src/ome/services/sessions/SessionBean.java``,
  ``createSessionWithTimeouts``: ``@RolesAllowed("user" /*group owner*/)``, ``groupsLed``
  passed to ``SessionManagerImpl``; light-admin privilege ``AdminPrivilegeSudo``). The key a
  job carries is the *user's* key, never an admin's.
- **Without any admin**: a normal pipeline account mints sessions for itself with
  ``ISession.createUserSession(ttl, idle, group)`` (``SessionBean.createUserSession``,
  ``@RolesAllowed({"user", "HasPassword"})``: needs a password login, which this hook does).
- A *full* administrator as minting account is refused unless the connection says
  ``"allow_full_admin": true``; minting a key *for* an administrator is refused the same way.

Connection (type ``generic``): host, port, login, password; extras ``secure`` (default
true), ``ca_file`` (PEM of the CA that signed the server's certificate: the server is then
verified, :mod:`hpc_jobs.stores.omero_tls`), ``job_user`` (the user jobs run as when the
caller names none), ``allow_full_admin`` (default false).

omero-py is an optional extra (zeroc-ice 3.6.5 builds on Python 3.10 only); it is imported
lazily and its absence gives an error that names the fix.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk.bases.hook import BaseHook

#: Upper bound of a session's time-to-live (queue time + the job's time limit must fit).
MAX_TTL_S = 8 * 24 * 3600
#: Names of the Ice/OMERO exceptions that mean "this session does not exist (any more)".
_GONE = {
    "PermissionDeniedException",
    "CannotCreateSessionException",
    "RemovedSessionException",
    "SessionTimeoutException",
    "SessionException",
}


class OmeroUnavailable(RuntimeError):
    """omero-py is not installed here."""


class OmeroSessionError(RuntimeError):
    """A session could not be minted or ended. The message names the fix."""


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


def _principal(user: str, group: str | None) -> Any:
    """An ``omero.sys.Principal`` for a user session (group None = the user's default)."""
    import omero.clients  # noqa: F401 - loads the generated omero.sys classes
    import omero.sys

    p = omero.sys.Principal()
    p.name = user
    p.group = group
    p.eventType = "User"
    return p


def _session_uuid(session: Any) -> str:
    uuid = session.getUuid()
    return uuid.getValue() if hasattr(uuid, "getValue") else str(uuid)


def _flag(value: Any, default: bool) -> bool:
    if value is None:
        return default
    return str(value).strip().lower() in {"1", "true", "yes", "on"}


def timeouts_ms(ttl_s: int, idle_s: int | None) -> tuple[int, int]:
    """Validated ``(time-to-live, time-to-idle)`` in milliseconds for OMERO.

    ``0`` means "never" to OMERO (``ISession.createSessionWithTimeouts`` javadoc), so both
    must be positive; idle defaults to the whole lifetime (a job may wait in the queue
    before it first connects) and cannot exceed it.
    """
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not 0 < ttl_s <= MAX_TTL_S:
        raise OmeroSessionError(
            f"session ttl_s={ttl_s!r} must be an integer in 1..{MAX_TTL_S} s (queue time plus "
            "the job's time limit); 0 would mean a session that never expires"
        )
    idle = ttl_s if idle_s is None else idle_s
    if isinstance(idle, bool) or not isinstance(idle, int) or not 0 < idle <= ttl_s:
        raise OmeroSessionError(
            f"session idle_s={idle_s!r} must be an integer in 1..ttl_s ({ttl_s} s)"
        )
    return ttl_s * 1000, idle * 1000


class OmeroSessionHook(BaseHook):
    """Mints per-job OMERO session keys from a minting account, and ends them.

    :param omero_conn_id: Airflow connection with the OMERO host, port, login and password
        of the minting account (extras: ``secure``, ``ca_file``, ``job_user``,
        ``allow_full_admin``).
    """

    conn_name_attr = "omero_conn_id"
    default_conn_name = "omero_default"
    conn_type = "generic"
    hook_name = "OMERO session keys"

    def __init__(self, omero_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.omero_conn_id = omero_conn_id
        self._extra: dict[str, Any] = {}
        self._where = ""

    # connections -------------------------------------------------------------
    def _client(self) -> tuple[Any, Any]:
        """A new ``omero.client`` for the connection's server, and the connection."""
        from hpc_jobs.stores.omero_tls import new_client

        _omero_gateway()  # a clear error when omero-py is missing
        conn = self.get_connection(self.omero_conn_id)
        self._extra = conn.extra_dejson
        port = conn.port or 4064
        self._where = f"{conn.host}:{port} (connection {self.omero_conn_id!r})"
        return new_client(conn.host, port, self._extra.get("ca_file")), conn

    def _connect(self) -> Any:
        """A BlitzGateway logged in as the minting account."""
        client, conn = self._client()
        try:
            client.createSession(conn.login, conn.password)
        except Exception as exc:  # noqa: BLE001 - Ice raises many types
            client.__del__()
            raise OmeroSessionError(
                f"cannot log in to OMERO at {self._where} as {conn.login} "
                f"({type(exc).__name__}); check the login, password, host and ca_file"
            ) from None
        gateway = _omero_gateway()(client_obj=client)
        if not _flag(self._extra.get("secure"), True):
            gateway.setSecure(False)
        return gateway

    # minting -----------------------------------------------------------------
    def _check_minting_account(self, gateway: Any) -> None:
        allow = _flag(self._extra.get("allow_full_admin"), False)
        if gateway.isFullAdmin() and not allow:
            raise OmeroSessionError(
                f"the OMERO minting account {gateway.getUser().getName()!r} of {self._where} "
                "is a full administrator: use a light administrator with only the Sudo "
                "privilege (docs/omero.md, 'Sessions'), or set the connection extra "
                '"allow_full_admin": true to accept the risk'
            )

    def _check_target(self, gateway: Any, user: str) -> None:
        exp = gateway.getObject("Experimenter", attributes={"omeName": user})
        if exp is None:
            raise OmeroSessionError(f"OMERO user {user!r} does not exist on {self._where}")
        if exp.isAdmin() and not _flag(self._extra.get("allow_full_admin"), False):
            raise OmeroSessionError(
                f"refusing to mint a session for OMERO user {user!r}: it is an administrator, "
                "and a job must not carry an administrator's key; run jobs as the image owner "
                "or a pipeline user"
            )

    def mint_session_key(
        self,
        ttl_s: int = 24 * 3600,
        idle_s: int | None = None,
        user: str | None = None,
        group: str | None = None,
    ) -> str:
        """A new session key for one job, valid ``ttl_s`` seconds (idle: ``idle_s``).

        :param ttl_s: lifetime of the session: the job's queue time plus its time limit.
        :param idle_s: idle timeout (default ``ttl_s``: the job may wait in the queue).
        :param user: the OMERO user the job works for (default: the connection extra
            ``job_user``; none: a session of the minting account itself, non-admins only).
        :param group: OMERO group name of the session (default: the user's default group).
        """
        ttl_ms, idle_ms = timeouts_ms(ttl_s, idle_s)
        gateway = self._connect()
        try:
            self._check_minting_account(gateway)
            user = user or self._extra.get("job_user") or None
            me = gateway.getUser().getName()
            service = gateway.getSessionService()
            if user is None or user == me:
                if gateway.isAdmin():
                    raise OmeroSessionError(
                        f"the minting account {me!r} is an administrator: name the user the "
                        "job works for (mint_session_key(user=...) or the connection extra "
                        "'job_user'); jobs must not carry an administrator's key"
                    )
                session = service.createUserSession(ttl_ms, idle_ms, group)
            else:
                self._check_target(gateway, user)
                privileges = (
                    set(gateway.getCurrentAdminPrivileges()) if gateway.isAdmin() else set()
                )
                if gateway.isAdmin() and "Sudo" not in privileges:
                    raise OmeroSessionError(
                        f"the minting account {me!r} is a light administrator without the "
                        "Sudo privilege: grant it Sudo (and nothing else) in OMERO.web Admin"
                    )
                session = service.createSessionWithTimeouts(
                    _principal(user, group), ttl_ms, idle_ms
                )
            return _session_uuid(session)
        except OmeroSessionError:
            raise
        except Exception as exc:  # noqa: BLE001 - server refusals arrive as Ice exceptions
            raise OmeroSessionError(
                f"OMERO at {self._where} refused to create a session for "
                f"{user or 'the minting account'} ({type(exc).__name__}: "
                f"{getattr(exc, 'message', '') or exc}); the minting account needs the Sudo "
                "privilege or must own the user's group (docs/omero.md, 'Sessions')"
            ) from None
        finally:
            gateway.close()  # hard close of the minting account's own session

    # ending ------------------------------------------------------------------
    def close_session(self, key: str) -> bool:
        """End the session ``key`` for good; False if it had already ended.

        Joins it and destroys it: ``omero.client.killSession`` calls
        ``ISession.closeSession`` until the reference count is 0 (omero-py
        ``src/omero/clients.py``, ``destroySession``); a plain detach or ``close(hard=False)``
        only lowers the count (server ``SessionManagerImpl.close``) and the key stays valid
        until its time-to-live.
        """
        if not key:
            return False
        client, _ = self._client()
        try:
            client.joinSession(key)
        except Exception as exc:  # noqa: BLE001 - Ice raises many types
            client.__del__()
            if {c.__name__ for c in type(exc).__mro__} & _GONE:
                return False  # expired or already closed: nothing to end
            raise OmeroSessionError(
                f"cannot reach OMERO at {self._where} to end a job's session "
                f"({type(exc).__name__}); it expires by its time-to-live"
            ) from None
        try:
            client.killSession()
        finally:
            client.__del__()
        return True
