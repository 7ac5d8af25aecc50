"""Write context: reads may run in all groups (-1), every write in the image's group."""

from __future__ import annotations

import pytest

from hpc_jobs.stores.omero_context import ALL_GROUPS, in_group, write_ctx


class ServiceOptsDict(dict):
    """omero.gateway.utils.ServiceOptsDict's surface (a dict with group helpers)."""

    def setOmeroGroup(self, value):  # noqa: N802
        self["omero.group"] = str(value)

    def getOmeroGroup(self):  # noqa: N802
        return self.get("omero.group")

    def copy(self):
        return ServiceOptsDict(self)


class Conn:
    def __init__(self) -> None:
        self.SERVICE_OPTS = ServiceOptsDict()  # noqa: N815
        self.SERVICE_OPTS.setOmeroGroup(ALL_GROUPS)
        self.seen: list[str | None] = []

    def createFileAnnfromLocalFile(self, *a, **k):  # noqa: N802 - reads SERVICE_OPTS itself
        self.seen.append(self.SERVICE_OPTS.getOmeroGroup())


def test_write_ctx_is_a_copy_in_the_image_group() -> None:
    conn = Conn()
    ctx = write_ctx(conn.SERVICE_OPTS, 53)
    assert ctx.getOmeroGroup() == "53"
    assert conn.SERVICE_OPTS.getOmeroGroup() == "-1"  # reads keep seeing all groups


def test_in_group_switches_around_gateway_helpers_and_restores() -> None:
    conn = Conn()
    with in_group(conn, 7):
        conn.createFileAnnfromLocalFile("/x")
    assert conn.seen == ["7"]
    assert conn.SERVICE_OPTS.getOmeroGroup() == "-1"
    with pytest.raises(RuntimeError), in_group(conn, 8):
        raise RuntimeError("upload failed")
    assert conn.SERVICE_OPTS.getOmeroGroup() == "-1"  # restored after an error too


@pytest.mark.parametrize("bad", [-1, "-1"])
def test_writes_never_go_to_all_groups(bad) -> None:
    with pytest.raises(ValueError, match="concrete OMERO group"):
        write_ctx(Conn().SERVICE_OPTS, bad)
    with pytest.raises(ValueError, match="concrete OMERO group"), in_group(Conn(), bad):
        pass
