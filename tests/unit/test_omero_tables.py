"""Which OMERO.tables column each result column becomes (decidable without a server)."""

from __future__ import annotations

import numpy as np
import pytest

from hpc_jobs.stores.base import StoreError
from hpc_jobs.stores.omero_tables import ColumnSpec, column_specs


def test_writeback_table_columns_map_to_omero_types() -> None:
    cols = {"id": np.arange(3, dtype=np.int64), "x": [1.5, 2.0, 3.25],
            "class": ["negative", "positive", "négatif"], "roi_id": [-1, 7, -1]}
    assert column_specs(cols) == [
        ColumnSpec("id", "Long"), ColumnSpec("x", "Double"),
        ColumnSpec("class", "String", len("négatif".encode())), ColumnSpec("roi_id", "Long"),
    ]


def test_unsupported_column_names_it() -> None:
    with pytest.raises(StoreError, match="'when'.*integers, floats or strings"):
        column_specs({"when": [None, 1.0, "x"]})
