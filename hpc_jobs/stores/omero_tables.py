"""Per-object result tables on OMERO: OMERO.tables linked under the bulk-annotations namespace.

OMERO.web shows a table linked to an image as a FileAnnotation whose namespace is
``openmicroscopy.org/omero/bulk_annotations`` (``omero.constants.namespaces.NSBULKANNOTATIONS``).
The recipe is omero-py's own (``omero.grid`` columns; the OMERO "Tables" developer docs and
``omero_metadata.populate``): ``sharedResources().newTable(repository id, name, ctx)``,
``initialize`` with empty columns, ``addData`` in row chunks, ``close``; then a
FileAnnotation pointing at the table's OriginalFile is linked to the image.

:func:`column_specs` (which OMERO column each of our columns becomes) needs no omero-py and is
unit tested; :func:`write_omero_table` runs against a server only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hpc_jobs.stores.base import StoreError, TableColumns

#: Rows per ``addData`` call (keeps each Ice message well below the 64 MiB default limit).
ROWS_PER_CALL = 10_000


@dataclass(frozen=True)
class ColumnSpec:
    """One OMERO.tables column: ``kind`` is ``Long``, ``Double`` or ``String``."""

    name: str
    kind: str
    #: String columns are fixed width (bytes of the longest UTF-8 value, at least 1).
    size: int = 0


def column_specs(columns: TableColumns) -> list[ColumnSpec]:
    """The OMERO column for each of ours: integers -> Long, other numbers -> Double, text ->
    String; anything else is refused naming the column."""
    out = []
    for name, values in columns.items():
        arr = np.asarray(values)
        if arr.dtype.kind in "iub":
            out.append(ColumnSpec(name, "Long"))
        elif arr.dtype.kind == "f":
            out.append(ColumnSpec(name, "Double"))
        elif arr.dtype.kind in "UO" and all(isinstance(v, str) for v in values):
            width = max((len(v.encode("utf-8")) for v in values), default=1)
            out.append(ColumnSpec(name, "String", max(1, width)))
        else:
            raise StoreError(f"table column {name!r} has values of type {arr.dtype}; use "
                             "integers, floats or strings")
    return out


def _omero_column(spec: ColumnSpec, values: Sequence[Any] | None) -> Any:
    from omero import grid

    data = [] if values is None else values
    if spec.kind == "Long":
        return grid.LongColumn(spec.name, "", [int(v) for v in data])
    if spec.kind == "Double":
        return grid.DoubleColumn(spec.name, "", [float(v) for v in data])
    return grid.StringColumn(spec.name, "", spec.size, [str(v) for v in data])


def write_omero_table(sf: Any, ctx: Any, name: str, columns: TableColumns) -> int:
    """Create the table ``name`` from ``columns`` with the session's shared resources (in the
    group of ``ctx``); returns the id of its OriginalFile."""
    specs = column_specs(columns)
    resources = sf.sharedResources()
    repos = resources.repositories()
    if not repos.descriptions:
        raise StoreError("the OMERO server has no table repository (OMERO.tables disabled?)")
    repo_id = repos.descriptions[0].getId().getValue()
    table = resources.newTable(repo_id, name, ctx)
    if table is None:
        raise StoreError("OMERO.tables is not available on this server; ask its admin to "
                         "enable the Tables service")
    try:
        table.initialize([_omero_column(s, None) for s in specs])
        n = len(next(iter(columns.values())))
        for i in range(0, n, ROWS_PER_CALL):
            table.addData([_omero_column(s, list(columns[s.name])[i : i + ROWS_PER_CALL])
                           for s in specs])
        return int(table.getOriginalFile().getId().getValue())
    finally:
        table.close()
