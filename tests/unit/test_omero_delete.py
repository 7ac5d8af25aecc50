"""Batched deletes against a fake of OMERO's command handle (``omero.cmd.HandlePrx``).

The fake follows the server's ``HandleI``: ``getResponse`` is None until the command ran,
and ``close`` on an unfinished handle cancels it (``closeWithoutNotification``).
"""

from __future__ import annotations

import pytest

from hpc_jobs.stores.base import StoreError
from hpc_jobs.stores.omero_delete import DeleteNotFinished, delete_objects, wait_for


class Delete2Response:
    def __init__(self, deleted: dict[str, list[int]]) -> None:
        self.deletedObjects = deleted  # noqa: N815


class ERR:
    def __init__(self, name: str) -> None:
        self.name, self.message, self.parameters = name, None, {"why": "not yours"}


class GraphException(ERR):
    pass


class FakeHandle:
    """Finishes after ``polls`` calls of getResponse; close before that cancels."""

    def __init__(self, request, polls: int, response) -> None:
        self.request, self.polls, self.response = request, polls, response
        self.closed = self.cancelled = False

    def getResponse(self):  # noqa: N802
        if self.closed:
            raise RuntimeError("handle closed")
        self.polls -= 1
        return self.response if self.polls <= 0 else None

    def close(self):
        self.cancelled = self.polls > 0  # HandleI: close before FINISHED cancels
        self.closed = True


class Server:
    def __init__(self, polls: int = 3, refuse: bool = False, skip: int = 0) -> None:
        self.polls, self.refuse, self.skip = polls, refuse, skip
        self.handles: list[FakeHandle] = []

    def submit(self, request):
        kind, ids = request
        if self.refuse:
            rsp = GraphException("graph")
        else:
            rsp = Delete2Response(
                {f"ome.model.roi.{kind}": ids[self.skip :], "ome.model.roi.Polygon": [1, 2]}
            )
        h = FakeHandle(request, self.polls, rsp)
        self.handles.append(h)
        return h


class Clock:
    """A fake clock: sleeping advances it (no real waiting in tests)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def run(server: Server, ids, **kw):
    clock = Clock()
    return delete_objects(
        server.submit,
        "Roi",
        ids,
        make_request=lambda kind, chunk: (kind, list(chunk)),
        clock=clock,
        sleep=clock.sleep,
        **kw,
    )


def test_5000_rois_go_in_batches_each_waited_for_and_closed_after() -> None:
    server = Server(polls=4)
    ids = list(range(1, 5001))
    assert run(server, ids, batch=500, poll_s=1.0) == 5000
    assert len(server.handles) == 10
    assert [h.request[1] for h in server.handles] == [ids[i : i + 500] for i in range(0, 5000, 500)]
    assert all(h.closed and not h.cancelled for h in server.handles)


def test_timeout_raises_and_leaves_the_delete_running() -> None:
    """The old path (wait 5 s, then close) cancelled the delete and raised nothing."""
    server = Server(polls=10_000)
    with pytest.raises(DeleteNotFinished, match="still running.*re-run the task later") as info:
        run(server, list(range(1, 1201)), batch=500, timeout_s=30, poll_s=1.0)
    assert info.value.retryable
    (handle,) = server.handles  # stopped at the first batch
    assert not handle.closed and not handle.cancelled


def test_error_response_is_raised_and_handle_closed() -> None:
    server = Server(refuse=True)
    with pytest.raises(StoreError, match="OMERO refused the delete of 3 Roi.*not yours"):
        run(server, [1, 2, 3])
    assert server.handles[0].closed and not server.handles[0].cancelled


def test_response_missing_ids_is_an_error() -> None:
    server = Server(skip=1)
    with pytest.raises(StoreError, match="1 were not deleted.*id 1"):
        run(server, [1, 2, 3])


def test_wait_for_returns_the_response() -> None:
    clock = Clock()
    h = FakeHandle(None, 3, Delete2Response({}))
    assert isinstance(
        wait_for(h, "x", timeout_s=10, poll_s=1, clock=clock, sleep=clock.sleep), Delete2Response
    )
    assert clock.t == 2.0  # polled three times, slept twice


def test_nothing_to_delete_submits_nothing() -> None:
    server = Server()
    assert run(server, []) == 0 and server.handles == []
