"""Deleting OMERO objects in batches, waiting for each delete to really finish.

``BlitzGateway.deleteObjects(..., wait=True)`` waits ``loops=10 x ms=500`` (5 s) with
``failontimeout=False`` and then closes the handle in a ``finally`` (omero-py
``src/omero/gateway/__init__.py``, ``deleteObjects`` and ``_waitOnCmd``; ``omero.clients``
``waitOnCmd`` returns silently on ``LockTimeout`` unless ``failontimeout``). Closing an
unfinished handle *cancels* the delete on the server (OMERO
``components/blitz/src/omero/cmd/HandleI.java``, ``closeWithoutNotification`` calls
``cancel`` unless the state is FINISHED or CANCELLED). With thousands of ROIs a "replace"
then keeps the old ones and nothing is raised.

Here each batch is one ``omero.cmd.Delete2`` submitted with the caller's context; we poll the
handle until it has a response (``HandleI.getResponse`` is null until finished), fail on
timeout *without* closing the handle (the delete goes on; a re-run finds what is left), check
the response type (``omero.cmd.ERR``, e.g. ``GraphException``, is an error; a
``Delete2Response`` lists ``deletedObjects`` by model class) and close the handle only after
it finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from hpc_jobs.stores.base import DELETE_BATCH, StoreError

#: Seconds one batch may take before we give up waiting (the delete continues on the server).
DELETE_TIMEOUT_S = 600.0
POLL_S = 0.5


class DeleteNotFinished(StoreError):
    """A delete was still running when we stopped waiting; it goes on on the server."""

    retryable = True


def delete2_request(kind: str, ids: Sequence[int]) -> Any:
    """An ``omero.cmd.Delete2`` for ``kind`` objects (imported lazily: omero is optional)."""
    import omero.clients  # noqa: F401 - loads the generated omero.cmd classes
    from omero.cmd import Delete2

    return Delete2(targetObjects={kind: [int(i) for i in ids]})


def _is_error(rsp: Any) -> bool:
    return any(c.__name__ == "ERR" for c in type(rsp).__mro__)


def _deleted_ids(rsp: Any, kind: str) -> set[int]:
    """Ids of ``kind`` objects in a Delete2Response (keys are model classes, e.g.
    ``ome.model.roi.Roi``, ``ome.model.annotations.MapAnnotation``)."""
    out: set[int] = set()
    for cls, ids in (getattr(rsp, "deletedObjects", None) or {}).items():
        simple = str(cls).rsplit(".", 1)[-1]
        if simple == kind or (kind == "Annotation" and simple.endswith("Annotation")):
            out.update(int(i) for i in ids)
    return out


def wait_for(
    handle: Any,
    what: str,
    timeout_s: float = DELETE_TIMEOUT_S,
    poll_s: float = POLL_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """The handle's response once it finished; :class:`DeleteNotFinished` on timeout.

    On timeout the handle is left open: closing it would cancel the command.
    """
    deadline = clock() + timeout_s
    while True:
        rsp = handle.getResponse()
        if rsp is not None:
            return rsp
        if clock() >= deadline:
            raise DeleteNotFinished(
                f"{what} was still running on the OMERO server after {timeout_s:.0f} s; it "
                "continues there: re-run the task later (replace semantics make that safe)"
            )
        sleep(poll_s)


def delete_objects(
    submit: Callable[[Any], Any],
    kind: str,
    ids: Sequence[int],
    batch: int = DELETE_BATCH,
    make_request: Callable[[str, Sequence[int]], Any] = delete2_request,
    **wait_kw: Any,
) -> int:
    """Delete ``kind`` objects ``ids`` in batches; returns how many were deleted.

    :param submit: submits a command and returns its handle, e.g.
        ``lambda req: conn.c.sf.submit(req, ctx)`` with the write context.
    :param wait_kw: passed to :func:`wait_for` (timeout_s, poll_s, clock, sleep).
    """
    ids = [int(i) for i in ids]
    done = 0
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        span = f"{start + 1}-{start + len(chunk)} of {len(ids)}"
        what = f"the delete of {len(chunk)} {kind} objects ({span})"
        handle = submit(make_request(kind, chunk))
        rsp = wait_for(handle, what, **wait_kw)  # raises without closing: no cancel
        try:
            if _is_error(rsp):
                detail = (
                    getattr(rsp, "message", None) or getattr(rsp, "name", "") or type(rsp).__name__
                )
                params = getattr(rsp, "parameters", None)
                raise StoreError(
                    f"OMERO refused {what}: {detail}{f' {params}' if params else ''}; check "
                    "that the job's user may delete them (owner, or group owner in a "
                    "read-write group)"
                )
            missing = set(chunk) - _deleted_ids(rsp, kind)
            if missing:
                raise StoreError(
                    f"{what} finished but {len(missing)} were not deleted (e.g. id "
                    f"{min(missing)}): they may belong to another user; check permissions"
                )
        finally:
            handle.close()  # finished: closing no longer cancels anything
        done += len(chunk)
    return done
