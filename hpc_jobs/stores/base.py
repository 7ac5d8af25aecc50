"""The ``ImageStore`` interface: what the workflow needs from an image server.

Two implementations: :class:`hpc_jobs.stores.local.LocalStore` (a directory; the embedded
default and the test double that really works) and :class:`hpc_jobs.stores.omero.OmeroStore`
(omero-py, joined with a per-job session key).

Conventions (the same as OMERO's):
- image ids are positive integers;
- pixel coordinates are level-0 ``x`` (column) and ``y`` (row), origin top-left;
- shapes' ``text`` carries their meaning: tissue regions start with ``tissue_``, holes with
  ``hole_`` (the lab's existing CellDetector data).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # numpy only in annotations: the gateway imports this module on every call
    import numpy as np

TISSUE_PREFIX = "tissue_"
HOLE_PREFIX = "hole_"
#: Namespace of per-object result tables (OMERO.web shows these tables; OMERO's own constant
#: ``omero.constants.namespaces.NSBULKANNOTATIONS``).
BULK_ANNOTATIONS_NS = "openmicroscopy.org/omero/bulk_annotations"
#: Objects per delete when a replace removes a namespace's older ROIs.
DELETE_BATCH = 500
#: A table to write: column name -> values (ints, floats or strings; all of one length).
TableColumns = Mapping[str, Sequence[Any]]


class StoreError(Exception):
    """A store refused a request. The message names the fix.

    ``retryable`` is True for conditions that pass by themselves (e.g. an OMERO pyramid still
    being built): the job may exit with a distinct status so the task is retried.
    """

    retryable: bool = False


class ImageNotFound(StoreError):
    """No image with that id (or the session may not see it)."""


def check_selection(dataset: object, tag: object) -> tuple[int | None, int | str | None]:
    """``(dataset, tag)`` of an image listing after the checks every store makes: a dataset
    is an id >= 1, a tag an id >= 1 or a non-empty text; at least one of them is given."""
    if dataset is None and tag is None:
        raise StoreError("list_image_ids needs a dataset id or a tag (id or text); "
                         "use list_images() for every image")
    if dataset is not None and (isinstance(dataset, bool) or not isinstance(dataset, int)
                                or dataset < 1):
        raise StoreError(f"dataset={dataset!r}: give a dataset id (an integer >= 1)")
    if tag is not None:
        if isinstance(tag, bool) or not isinstance(tag, int | str):
            raise StoreError(f"tag={tag!r}: give a tag id (integer >= 1) or the tag's text")
        if isinstance(tag, int) and tag < 1:
            raise StoreError(f"tag={tag!r}: tag ids are integers >= 1")
        if isinstance(tag, str) and not tag.strip():
            raise StoreError("tag='': give the tag's text, e.g. 'nightly', or its id")
    return dataset, tag


def checked_table(columns: TableColumns, name: str) -> int:
    """Rows of a table to write, after the checks every store makes; errors name the fix."""
    if not name or "/" in name:
        raise StoreError(f"table name {name!r} must be a plain file name, e.g. 'cells.parquet'")
    if not columns:
        raise StoreError(f"table {name!r} has no columns")
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) != 1:
        raise StoreError(f"table {name!r}: columns differ in length {lengths}")
    return next(iter(lengths.values()))


def checked_attachment(path: Path, namespace: str) -> Path:
    """The file to attach, after the checks every store makes (a file, a namespace)."""
    src = Path(path)
    if not src.is_file():
        raise StoreError(f"cannot attach {src}: not a file")
    if not namespace:
        raise StoreError("attach_file needs a namespace, e.g. 'omeflow/ecdf'")
    return src


@dataclass(frozen=True)
class ImageInfo:
    """Metadata of one image (a single timepoint and z-plane: c, y, x)."""

    image_id: int
    name: str
    size_x: int
    size_y: int
    size_c: int
    dtype: str  # numpy dtype name, e.g. "uint16"
    channel_names: tuple[str, ...]
    #: Physical pixel size in micrometres (x, y), or None when unknown.
    pixel_size_um: tuple[float, float] | None = None
    #: Resolution levels the store can serve (level 0 = full size).
    levels: int = 1

    def check_channel(self, channel: int, what: str = "channel") -> None:
        """Raise a :class:`StoreError` naming the valid range if ``channel`` is out of it."""
        if not 0 <= channel < self.size_c:
            raise StoreError(
                f"image {self.image_id} has {self.size_c} channels "
                f"({', '.join(self.channel_names)}); {what}={channel} is out of range "
                f"(use 0..{self.size_c - 1})"
            )


@dataclass(frozen=True)
class PolygonShape:
    """A closed polygon in level-0 pixel coordinates: ``points`` = [(x, y), ...]."""

    points: tuple[tuple[float, float], ...]
    text: str = ""


@dataclass(frozen=True)
class PointShape:
    """A point in level-0 pixel coordinates."""

    x: float
    y: float
    text: str = ""


@dataclass(frozen=True)
class EllipseShape:
    """An axis-aligned ellipse (OMERO's Ellipse): centre and radii in level-0 pixels."""

    x: float
    y: float
    radius_x: float
    radius_y: float
    text: str = ""


Shape = PolygonShape | PointShape | EllipseShape


@dataclass(frozen=True)
class Roi:
    """One ROI: a group of shapes. ``namespace`` is None for ROIs people drew.

    ``notes`` says which of the ROI's shapes the store could not represent (e.g. an OMERO
    Line or Mask): they are left out of ``shapes`` and reported, never dropped silently.
    """

    roi_id: int
    shapes: tuple[Shape, ...]
    name: str = ""
    namespace: str | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class NewRoi:
    """An ROI to write (ids are assigned by the store)."""

    shapes: tuple[Shape, ...]
    name: str = ""


@dataclass(frozen=True)
class Attachment:
    """A file attached to an image."""

    file_id: int
    name: str
    namespace: str
    size: int
    mimetype: str = "application/octet-stream"


@dataclass
class MapAnnotation:
    """Key/value pairs attached to an image under a namespace."""

    namespace: str
    values: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class ImageStore(Protocol):
    """What the workflow needs from an image server. Implementations are context managers."""

    def list_images(self) -> list[ImageInfo]:
        """Every image this session can see (for nightly batches), by id."""

    def list_image_ids(self, dataset: int | None = None, tag: int | str | None = None
                       ) -> list[int]:
        """Ids of the images in ``dataset`` (a dataset id) and/or carrying ``tag`` (a tag
        annotation's id, or its text: every tag with that text), sorted; both given: images
        in both. An unknown dataset or tag raises :class:`StoreError` naming the fix."""

    def get_image(self, image_id: int) -> ImageInfo:
        """Metadata of one image; :class:`ImageNotFound` names the id if it does not exist."""

    def read_region(
        self, image_id: int, channel: int, y0: int, y1: int, x0: int, x1: int, level: int = 0
    ) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of one channel at ``level`` as a 2-D array (image dtype).

        Coordinates are in that level's pixels and are clipped to the image.
        """

    def get_rois(self, image_id: int, namespace: str | None = None) -> list[Roi]:
        """ROIs of the image; with ``namespace``, only those written under it."""

    def write_rois(
        self, image_id: int, rois: Sequence[NewRoi], namespace: str, replace: bool = True
    ) -> list[int]:
        """Write ROIs under ``namespace``; with ``replace`` the namespace's older ROIs are
        deleted *after* the new ones are saved, in batches of :data:`DELETE_BATCH` (an
        interrupted replace leaves old + new, never an image without results; re-running
        cleans up). ROIs outside the namespace (people's) are never touched."""

    def get_map_annotations(
        self, image_id: int, namespace: str | None = None
    ) -> list[MapAnnotation]:
        """Map annotations on the image (optionally one namespace)."""

    def write_map_annotation(
        self, image_id: int, namespace: str, values: dict[str, str], replace: bool = True
    ) -> None:
        """Attach key/values under ``namespace``; ``replace`` drops the namespace's old ones."""

    def attach_file(
        self,
        image_id: int,
        path: Path,
        namespace: str,
        name: str | None = None,
        mimetype: str = "application/octet-stream",
        replace: bool = True,
    ) -> int:
        """Attach a file; ``replace`` drops earlier attachments of the same name + namespace."""

    def write_table(
        self, image_id: int, columns: TableColumns, name: str, replace: bool = True
    ) -> int:
        """Attach a per-object table under :data:`BULK_ANNOTATIONS_NS` (OMERO.tables on
        OMERO, a Parquet file in the local store); ``replace`` drops older tables of the same
        ``name``. Returns the attachment's id."""

    def list_attachments(self, image_id: int, namespace: str | None = None) -> list[Attachment]:
        """Files attached to the image."""

    def read_attachment(self, image_id: int, file_id: int) -> bytes:
        """The bytes of one attachment."""

    def close(self) -> None:
        """Release the session / files."""
