"""OmeroSessionHook without a server: which account may mint, for whom, for how long, and
that closing really ends a session. A small fake stands in for omero.client/BlitzGateway."""

from __future__ import annotations

import json

import pytest

import hooks.omero as hook_mod
from hooks.omero import OmeroSessionError, OmeroSessionHook, timeouts_ms
from hpc_jobs.stores import omero_tls


class RemovedSessionException(Exception):
    pass


class Server:
    """What the fake OMERO knows: users, live sessions and their reference counts."""

    def __init__(self, admin=False, full=False, privileges=("Sudo",)) -> None:
        self.admin, self.full, self.privileges = admin, full, list(privileges)
        self.sessions: dict[str, int] = {}
        self.created: list[tuple] = []
        self.clients: list[Client] = []


class Session:
    def __init__(self, uuid: str) -> None:
        self.uuid = uuid

    def getUuid(self):  # noqa: N802
        return self.uuid


class SessionService:
    def __init__(self, server: Server) -> None:
        self.server = server

    def _new(self, *record) -> Session:
        uuid = f"key-{len(self.server.created)}"
        self.server.created.append(record)
        self.server.sessions[uuid] = 1
        return Session(uuid)

    def createSessionWithTimeouts(self, principal, ttl, idle):  # noqa: N802
        return self._new("sudo", principal, ttl, idle)

    def createUserSession(self, ttl, idle, group):  # noqa: N802
        return self._new("self", group, ttl, idle)


class Client:
    def __init__(self, server: Server, host, port, ca_file) -> None:
        self.server, self.where, self.ca_file = server, (host, port), ca_file
        self.joined: str | None = None
        server.clients.append(self)

    def createSession(self, user, password):  # noqa: N802
        assert password == "s3cret"

    def joinSession(self, key):  # noqa: N802
        if key not in self.server.sessions:
            raise RemovedSessionException(key)
        self.joined = key
        self.server.sessions[key] += 1

    def killSession(self):  # noqa: N802 - closeSession until the count is 0
        del self.server.sessions[self.joined]

    def __del__(self):
        pass


class Exp:
    def __init__(self, admin: bool) -> None:
        self.admin = admin

    def isAdmin(self):  # noqa: N802
        return self.admin

    def getName(self):  # noqa: N802
        return "minter"


class Gateway:
    def __init__(self, client_obj: Client) -> None:
        self.server = client_obj.server
        self.closed = False

    def isAdmin(self):  # noqa: N802
        return self.server.admin

    def isFullAdmin(self):  # noqa: N802
        return self.server.full

    def getCurrentAdminPrivileges(self):  # noqa: N802
        return self.server.privileges

    def getUser(self):  # noqa: N802
        return Exp(self.server.admin)

    def getObject(self, kind, attributes):  # noqa: N802
        name = attributes["omeName"]
        return None if name == "nobody" else Exp(name == "root")

    def getSessionService(self):  # noqa: N802
        return SessionService(self.server)

    def setSecure(self, secure):  # noqa: N802
        self.secure = secure

    def close(self):
        self.closed = True


@pytest.fixture
def omero(monkeypatch):
    def install(server: Server, **extra) -> OmeroSessionHook:
        conn = {
            "conn_type": "generic",
            "host": "omero.example.org",
            "port": 4064,
            "login": "minter",
            "password": "s3cret",
            "extra": extra,
        }
        monkeypatch.setenv("AIRFLOW_CONN_OMERO_TEST", json.dumps(conn))
        monkeypatch.setattr(hook_mod, "_omero_gateway", lambda: Gateway)
        monkeypatch.setattr(hook_mod, "_principal", lambda user, group: ("Principal", user, group))
        monkeypatch.setattr(omero_tls, "new_client", lambda h, p, ca: Client(server, h, p, ca))
        return OmeroSessionHook("omero_test")

    return install


def test_light_admin_with_sudo_mints_for_the_user_with_explicit_timeouts(omero) -> None:
    server = Server(admin=True, privileges=["Sudo"])
    key = omero(server).mint_session_key(ttl_s=3 * 3600, idle_s=1800, user="alice", group="lab")
    assert key in server.sessions
    assert server.created == [("sudo", ("Principal", "alice", "lab"), 3 * 3600 * 1000, 1800 * 1000)]


def test_full_admin_is_refused_unless_the_site_allows_it(omero) -> None:
    server = Server(admin=True, full=True)
    with pytest.raises(
        OmeroSessionError, match="full administrator.*Sudo privilege.*allow_full_admin"
    ):
        omero(server).mint_session_key(ttl_s=600, user="alice")
    assert server.created == []
    key = omero(server, allow_full_admin=True).mint_session_key(ttl_s=600, user="alice")
    assert key in server.sessions


def test_light_admin_without_sudo_is_told_to_grant_it(omero) -> None:
    with pytest.raises(OmeroSessionError, match="without the Sudo privilege"):
        omero(Server(admin=True, privileges=["ModifyUser"])).mint_session_key(
            ttl_s=600, user="alice"
        )


def test_jobs_never_get_an_admin_key(omero) -> None:
    with pytest.raises(OmeroSessionError, match="name the user the job works for"):
        omero(Server(admin=True)).mint_session_key(ttl_s=600)
    with pytest.raises(OmeroSessionError, match="'root': it is an administrator"):
        omero(Server(admin=True)).mint_session_key(ttl_s=600, user="root")
    with pytest.raises(OmeroSessionError, match="'nobody' does not exist"):
        omero(Server(admin=True)).mint_session_key(ttl_s=600, user="nobody")


def test_plain_pipeline_account_mints_its_own_session(omero) -> None:
    server = Server(admin=False)
    omero(server).mint_session_key(ttl_s=900)
    assert server.created == [("self", None, 900_000, 900_000)]  # idle defaults to the ttl


def test_job_user_extra_is_the_default_user_and_ca_file_is_used(omero, tmp_path) -> None:
    server = Server(admin=True)
    omero(server, job_user="pipeline", ca_file="/etc/omero/ca.pem").mint_session_key(ttl_s=60)
    assert server.created[0][1] == ("Principal", "pipeline", None)
    assert server.clients[0].ca_file == "/etc/omero/ca.pem"
    assert server.clients[0].where == ("omero.example.org", 4064)


def test_close_session_really_ends_it(omero) -> None:
    server = Server(admin=True)
    hook = omero(server)
    key = hook.mint_session_key(ttl_s=600, user="alice")
    assert hook.close_session(key) is True
    assert key not in server.sessions  # gone, not just detached
    assert hook.close_session(key) is False  # already ended: no error
    assert hook.close_session("") is False


@pytest.mark.parametrize(
    ("ttl", "idle", "match"),
    [
        (0, None, "never expires"),
        (-5, None, "ttl_s"),
        (10**9, None, "ttl_s"),
        (600, 0, "idle_s"),
        (600, 601, "idle_s"),
        (True, None, "ttl_s"),
    ],
)
def test_timeouts_are_explicit_and_bounded(ttl, idle, match) -> None:
    with pytest.raises(OmeroSessionError, match=match):
        timeouts_ms(ttl, idle)
    assert timeouts_ms(600, 60) == (600_000, 60_000)
