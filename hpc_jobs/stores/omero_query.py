"""HQL of image listings by dataset and tag, built without omero-py (unit-testable).

The OMERO model (``omero-model``'s mappings, ``ome/model/containers/Dataset``,
``DatasetImageLink``, ``annotations/TagAnnotation``, ``ImageAnnotationLink``):

- a dataset holds images through ``DatasetImageLink`` (``parent`` = Dataset, ``child`` = Image);
- an image carries a tag through ``ImageAnnotationLink`` (``parent`` = Image, ``child`` = the
  annotation, a ``TagAnnotation`` whose text is ``textValue``).

Each query returns one column of image ids, ordered and distinct, so the store can page it
(``ParametersI.page(offset, limit)``) without loading an image object.
"""

from __future__ import annotations

from typing import Any

from hpc_jobs.stores.base import check_selection

#: Image ids per query page.
IMAGE_PAGE = 1000

#: The listing per selection: (dataset given, tag given as "id" / "text" / None). Only bound
#: parameters vary; no value is ever part of the text.
QUERIES: dict[tuple[bool, str | None], str] = {
    (True, None): "select distinct l.child.id from DatasetImageLink l "
                  "where l.parent.id = :did order by l.child.id",
    (False, "id"): "select distinct l.parent.id from ImageAnnotationLink l, TagAnnotation t "
                   "where t.id = l.child.id and t.id = :tid order by l.parent.id",
    (False, "text"): "select distinct l.parent.id from ImageAnnotationLink l, TagAnnotation t "
                     "where t.id = l.child.id and t.textValue = :text order by l.parent.id",
    (True, "id"): "select distinct i.id from Image i where i.id in (select l.child.id from "
                  "DatasetImageLink l where l.parent.id = :did) and i.id in (select a.parent.id "
                  "from ImageAnnotationLink a, TagAnnotation t where t.id = a.child.id "
                  "and t.id = :tid) order by i.id",
    (True, "text"): "select distinct i.id from Image i where i.id in (select l.child.id from "
                    "DatasetImageLink l where l.parent.id = :did) and i.id in (select "
                    "a.parent.id from ImageAnnotationLink a, TagAnnotation t where "
                    "t.id = a.child.id and t.textValue = :text) order by i.id",
}
#: Does the dataset / tag exist (for an error naming it rather than an empty batch)?
EXISTS = {
    "dataset": "select d.id from Dataset d where d.id = :did",
    "tag_id": "select t.id from TagAnnotation t where t.id = :tid",
    "tag_text": "select t.id from TagAnnotation t where t.textValue = :text",
}


def image_ids_query(dataset: int | None, tag: int | str | None) -> tuple[str, dict[str, Any]]:
    """``(hql, params)``: the ids of the images in ``dataset`` and/or with ``tag`` (a tag id,
    or its text), distinct and ordered by id. ``params`` maps each ``:name`` to a Python
    value (the store wraps them as rtypes)."""
    dataset, tag = check_selection(dataset, tag)
    params: dict[str, Any] = {}
    if dataset is not None:
        params["did"] = int(dataset)
    kind = None if tag is None else ("id" if isinstance(tag, int) else "text")
    if kind == "id":
        params["tid"] = int(tag)  # type: ignore[arg-type]
    elif kind == "text":
        params["text"] = tag
    return QUERIES[(dataset is not None, kind)], params


def existence_checks(dataset: int | None, tag: int | str | None
                     ) -> list[tuple[str, str, dict[str, Any]]]:
    """``(what, hql, params)`` per selector, to name an unknown dataset or tag."""
    out = []
    if dataset is not None:
        out.append((f"dataset {dataset}", EXISTS["dataset"], {"did": int(dataset)}))
    if isinstance(tag, int):
        out.append((f"tag {tag}", EXISTS["tag_id"], {"tid": tag}))
    elif tag is not None:
        out.append((f"tag {tag!r}", EXISTS["tag_text"], {"text": tag}))
    return out
