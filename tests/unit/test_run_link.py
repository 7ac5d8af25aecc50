"""The run link's query → conf (``plugins/run_link.py``): what OMERO.web's "Open with" and a
person's hand-written link send becomes exactly the conf the trigger form would have sent."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins"))

from run_link import LinkError, link_conf  # noqa: E402

PARAMS = {"image_ids": [], "dataset": None, "tag": None, "block_size": 2048,
          "steps": ["export_zarr", "segment_nuclei", "ecdf"], "overwrite": False}


def test_omero_web_open_with_query_picks_the_selected_images() -> None:
    # OMERO.web's open-with appends one image=<id> per selected image
    assert link_conf([("image", "102"), ("image", "101")], PARAMS) == {"image_ids": [101, 102]}
    assert link_conf([("image_ids", "7,5, 9")], PARAMS) == {"image_ids": [5, 7, 9]}


def test_dataset_tag_and_form_values_keep_their_types() -> None:
    conf = link_conf([("dataset", "12"), ("tag", "to-score"), ("block_size", "1024"),
                      ("steps", '["export_zarr"]'), ("overwrite", "true")], PARAMS)
    assert conf == {"dataset": 12, "tag": "to-score", "block_size": 1024,
                    "steps": ["export_zarr"], "overwrite": True}
    assert link_conf([("tag", "42")], PARAMS) == {"tag": 42}  # a tag by annotation id


@pytest.mark.parametrize(("query", "message"), [
    ([], "the link picks nothing"),
    ([("image", "abc")], "image='abc' is not an id"),
    ([("image", "0")], "image='0' is not an id"),
    ([("dataset", "-3")], "dataset='-3' is not an id"),
    ([("dataset", "1"), ("dataset", "2")], "dataset is given 2 times"),
    ([("imag", "1")], "unknown parameter 'imag' in the link; this Dag's parameters: block_size"),
])
def test_a_bad_link_is_refused_naming_the_fix(query, message) -> None:
    with pytest.raises(LinkError, match=message.replace("(", r"\(").replace("[", r"\[")):
        link_conf(query, PARAMS)
