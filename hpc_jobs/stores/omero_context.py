"""Which OMERO group a call runs in: reads in all groups, writes in the image's group.

``omero.group = -1`` lets a session read the images of every group it belongs to, but the
server refuses to create objects in that context (an ``ApiUsageException``, which issue 7
reports OMERO's permission integration tests expect; a new object needs one
group). So every write gets a context whose group is the target image's group:

- calls that take a context (``saveAndReturnArray``, ``submit``): :func:`write_ctx`;
- BlitzGateway helpers that read ``conn.SERVICE_OPTS`` themselves
  (``createFileAnnfromLocalFile``, ``createImageFromNumpySeq``; omero-py
  ``src/omero/gateway/__init__.py`` passes ``self.SERVICE_OPTS``): :func:`in_group` switches
  it around the call and restores it.

``BlitzObjectWrapper.save`` of a *new* object also uses ``SERVICE_OPTS`` (it only pins the
group of objects that already have one), so map annotations are saved inside
:func:`in_group` too; ``linkAnnotation`` saves the link in the image's group already.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: ``omero.group`` value that reads across all of a session's groups.
ALL_GROUPS = "-1"


def write_ctx(service_opts: Any, group_id: int) -> Any:
    """A copy of the session's options with ``omero.group`` = ``group_id`` (for one write)."""
    if int(group_id) < 0:
        raise ValueError(f"writes need a concrete OMERO group id, got {group_id}")
    ctx = service_opts.copy()
    ctx.setOmeroGroup(str(int(group_id)))
    return ctx


@contextmanager
def in_group(conn: Any, group_id: int) -> Iterator[Any]:
    """Run gateway helpers that read ``conn.SERVICE_OPTS`` in ``group_id``; then restore."""
    if int(group_id) < 0:
        raise ValueError(f"writes need a concrete OMERO group id, got {group_id}")
    before = conn.SERVICE_OPTS.getOmeroGroup()
    conn.SERVICE_OPTS.setOmeroGroup(str(int(group_id)))
    try:
        yield conn.SERVICE_OPTS
    finally:
        conn.SERVICE_OPTS.setOmeroGroup(before)
