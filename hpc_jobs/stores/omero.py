"""``OmeroStore``: the :class:`ImageStore` over omero-py's BlitzGateway.

A job joins the session its orchestrator minted for it (:meth:`OmeroStore.join` with the
per-job session key; no password ever reaches the cluster). :meth:`OmeroStore.login` (user +
password) exists for the contract tests and for people at a terminal.

Mapping onto OMERO:

- pixels: ``conn.getObject("Image", id).getPrimaryPixels().getTile(z, c, t, (x, y, w, h))``
  for level 0, cut in tiles of at most :data:`MAX_TILE` px (OMERO refuses planes larger than
  ``omero.pixeldata.max_plane_*``). Reduced levels go through a RawPixelsStore:
  ``setResolutionLevel`` counts the other way round (``levels - 1`` is full size, 0 the
  smallest), so our ``level`` (0 = full size) becomes ``levels - 1 - level``; its
  ``getTile`` returns big-endian bytes.
- ROIs: ``conn.getRoiService().findByImage``; shapes are PolygonI (``points`` "x,y x,y ..."),
  PointI, EllipseI, each with ``textValue``. OMERO ROIs have no namespace field, so **the
  namespace is kept in the ROI's description** as ``omeflow:ns=<namespace>`` (visible in
  OMERO.web, filterable without extra queries or links); ROIs whose description lacks that
  prefix (people-drawn ones) have ``namespace=None``. Writes go through
  ``getUpdateService().saveAndReturnArray`` in batches; replace = ``conn.deleteObjects("Roi",
  ids)`` of that namespace first.
- map annotations: ``MapAnnotationWrapper`` with ``setNs`` linked to the image; replace
  deletes the image's map annotations of that namespace.
- attachments: ``conn.createFileAnnfromLocalFile(path, mimetype=..., ns=...)`` +
  ``image.linkAnnotation``; ``file_id`` is the FileAnnotation id; replace deletes earlier
  FileAnnotations with the same file name and namespace.

NOT TESTED AGAINST A SERVER: no OMERO server (and no zeroc-ice 3.6.5 for Python 3.11) could
run where this was written. The code follows omero-py 5.19's documented API; it is covered by
``tests/contract/test_store_contract.py``, which runs the same tests as for LocalStore once
``OMERO_HOST``/``OMERO_USER``/``OMERO_PASSWORD`` point at a server. Until that has run, treat
the reduced-level reads and the description-based namespaces as the parts most likely to need
a fix.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hpc_jobs.stores.base import (
    Attachment,
    EllipseShape,
    ImageInfo,
    ImageNotFound,
    MapAnnotation,
    NewRoi,
    PointShape,
    PolygonShape,
    Roi,
    Shape,
    StoreError,
    checked_attachment,
)

INSTALL_HINT = "pip install 'omeflow[omero]' (needs Python 3.10 for zeroc-ice 3.6.5)"
NS_PREFIX = "omeflow:ns="
MAX_TILE = 2048
SAVE_BATCH = 500
#: OMERO pixel types -> numpy dtype names.
PIXEL_TYPES = {
    "int8": "int8",
    "uint8": "uint8",
    "int16": "int16",
    "uint16": "uint16",
    "int32": "int32",
    "uint32": "uint32",
    "float": "float32",
    "double": "float64",
}


def _require_omero() -> Any:
    try:
        from omero.gateway import BlitzGateway
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise StoreError(f"the OMERO store needs omero-py: {INSTALL_HINT}") from exc
    return BlitzGateway


def _val(x: Any) -> Any:
    """Unwrap an omero rtype (or None)."""
    return None if x is None else (x.getValue() if hasattr(x, "getValue") else x)


def format_points(points: Sequence[tuple[float, float]]) -> str:
    """OMERO's polygon ``points`` string: ``"x,y x,y ..."``."""
    return " ".join(f"{float(x)!r},{float(y)!r}" for x, y in points)


def parse_points(text: str) -> tuple[tuple[float, float], ...]:
    """Inverse of :func:`format_points` (also accepts OMERO's older ``points[...]`` form)."""
    text = text.strip()
    if text.startswith("points["):  # pre-5.3 "points[x,y x,y] points1[...] ..."
        text = text[len("points[") : text.index("]")]
    pts = []
    for pair in text.replace(", ", ",").split():
        x, y = pair.split(",")
        pts.append((float(x), float(y)))
    return tuple(pts)


def namespace_of(description: str | None) -> str | None:
    """The namespace stored in an ROI description, or None for people-drawn ROIs."""
    if description and description.startswith(NS_PREFIX):
        return description[len(NS_PREFIX) :]
    return None


class OmeroStore:
    """An :class:`~hpc_jobs.stores.base.ImageStore` over one BlitzGateway connection."""

    def __init__(self, conn: Any, close_session: bool = False) -> None:
        self.conn = conn
        self._close_session = close_session
        self._levels: dict[int, int] = {}

    # connection ------------------------------------------------------------
    @classmethod
    def join(
        cls, host: str, port: int = 4064, session_key: str | None = None, secure: bool = True
    ) -> OmeroStore:
        """Join an existing session (the job's key); closing leaves the session alive."""
        blitz = _require_omero()
        if not host:
            raise StoreError("store.host is empty: set the OMERO host in the site config")
        if not session_key:
            raise StoreError(
                "no OMERO session key for this job: the orchestrator mints one per job "
                "(hooks/omero.py) and sends it in the request's secrets"
            )
        conn = blitz(host=host, port=port, secure=secure)
        try:
            joined = conn.connect(sUuid=session_key)
        except Exception as exc:  # noqa: BLE001 - Ice raises many types; all mean "not joined"
            conn.close()
            raise StoreError(
                f"could not reach OMERO at {host}:{port} ({type(exc).__name__}): check "
                "store.host / store.port in site.toml and that compute nodes can reach it "
                "(directly or through the login node's reverse tunnel)"
            ) from None
        if not joined:
            conn.close()
            raise StoreError(
                f"could not join OMERO session at {host}:{port}: the key is expired or "
                "invalid, or the server is unreachable; re-run the task so the orchestrator "
                "mints a fresh key, and check that compute nodes can reach the server"
            )
        return cls._ready(conn, close_session=False)

    @classmethod
    def login(
        cls, host: str, user: str, password: str, port: int = 4064, secure: bool = True
    ) -> OmeroStore:
        """Log in with a user name and password (tests, interactive use)."""
        blitz = _require_omero()
        conn = blitz(user, password, host=host, port=port, secure=secure)
        if not conn.connect():
            raise StoreError(
                f"OMERO login as {user!r} at {host}:{port} failed: check OMERO_USER, "
                "OMERO_PASSWORD and that the server is reachable"
            )
        return cls._ready(conn, close_session=True)

    @classmethod
    def _ready(cls, conn: Any, close_session: bool) -> OmeroStore:
        conn.SERVICE_OPTS.setOmeroGroup("-1")  # see the images of every group we belong to
        conn.c.enableKeepAlive(60)
        return cls(conn, close_session=close_session)

    def __enter__(self) -> OmeroStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; a joined session stays alive for its owner to close."""
        if self.conn is None:
            return
        try:
            self.conn.close(hard=self._close_session)
        finally:
            self.conn = None

    # images ----------------------------------------------------------------
    def _image(self, image_id: int) -> Any:
        if isinstance(image_id, bool) or not isinstance(image_id, int | np.integer):
            raise ImageNotFound(f"image ids are integers >= 1; got {image_id!r}")
        img = self.conn.getObject("Image", int(image_id)) if image_id >= 1 else None
        if img is None:
            raise ImageNotFound(
                f"OMERO image {image_id} does not exist or this session cannot see it "
                f"(user {self.conn.getUser().getName()}); check the id in OMERO.web and "
                "that the job's user is a member of the image's group"
            )
        return img

    def _info(self, img: Any) -> ImageInfo:
        px = img.getPixelSizeX()
        py = img.getPixelSizeY()
        ptype = img.getPixelsType()
        return ImageInfo(
            image_id=int(img.getId()),
            name=img.getName() or "",
            size_x=int(img.getSizeX()),
            size_y=int(img.getSizeY()),
            size_c=int(img.getSizeC()),
            dtype=PIXEL_TYPES.get(ptype, ptype),
            channel_names=tuple(str(n) for n in img.getChannelLabels()),
            pixel_size_um=(float(px), float(py if py is not None else px)) if px else None,
            levels=self._level_count(img),
        )

    def _raw_store(self, img: Any) -> Any:
        rps = self.conn.c.sf.createRawPixelsStore()
        rps.setPixelsId(img.getPixelsId(), True, self.conn.SERVICE_OPTS)
        return rps

    def _level_count(self, img: Any) -> int:
        iid = int(img.getId())
        if iid not in self._levels:
            rps = self._raw_store(img)
            try:
                self._levels[iid] = int(rps.getResolutionLevels())
            finally:
                rps.close()
        return self._levels[iid]

    def list_images(self) -> list[ImageInfo]:
        """Every image this session can see, by id (one query plus one per image)."""
        return sorted(
            (self._info(i) for i in self.conn.getObjects("Image")), key=lambda i: i.image_id
        )

    def get_image(self, image_id: int) -> ImageInfo:
        """Metadata of one image."""
        return self._info(self._image(image_id))

    def read_region(
        self, image_id: int, channel: int, y0: int, y1: int, x0: int, x1: int, level: int = 0
    ) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of one channel at ``level``, clipped to the image."""
        img = self._image(image_id)
        info = self._info(img)
        info.check_channel(channel)
        if not 0 <= level < info.levels:
            raise StoreError(
                f"image {image_id} has {info.levels} resolution levels; level={level} is out "
                f"of range (use 0..{info.levels - 1})"
            )
        dtype = np.dtype(info.dtype)
        if level == 0:
            sy, sx = info.size_y, info.size_x
            rps = None
            pixels = img.getPrimaryPixels()
        else:
            rps = self._raw_store(img)
            rps.setResolutionLevel(info.levels - 1 - level)
            # descriptions are listed largest first: index 0 = full size
            desc = rps.getResolutionDescriptions()[level]
            sy, sx = int(desc.sizeY), int(desc.sizeX)
        try:
            y0, y1 = max(0, int(y0)), min(sy, int(y1))
            x0, x1 = max(0, int(x0)), min(sx, int(x1))
            out = np.zeros((max(0, y1 - y0), max(0, x1 - x0)), dtype=dtype)
            for ty in range(y0, y1, MAX_TILE):
                for tx in range(x0, x1, MAX_TILE):
                    h, w = min(MAX_TILE, y1 - ty), min(MAX_TILE, x1 - tx)
                    if rps is None:
                        tile = pixels.getTile(0, channel, 0, (tx, ty, w, h))
                    else:
                        raw = rps.getTile(0, channel, 0, tx, ty, w, h)
                        tile = np.frombuffer(raw, dtype=dtype.newbyteorder(">")).reshape(h, w)
                    out[ty - y0 : ty - y0 + h, tx - x0 : tx - x0 + w] = tile
            return out
        finally:
            if rps is not None:
                rps.close()

    # ROIs ------------------------------------------------------------------
    def _find_rois(self, image_id: int) -> list[Any]:
        self._image(image_id)
        result = self.conn.getRoiService().findByImage(int(image_id), None, self.conn.SERVICE_OPTS)
        return list(result.rois)

    @staticmethod
    def _shape_from_omero(s: Any) -> Shape | None:
        from omero.model import EllipseI, PointI, PolygonI

        text = _val(s.getTextValue()) or ""
        if isinstance(s, PolygonI):
            return PolygonShape(parse_points(_val(s.getPoints())), text)
        if isinstance(s, PointI):
            return PointShape(float(_val(s.getX())), float(_val(s.getY())), text)
        if isinstance(s, EllipseI):
            return EllipseShape(
                float(_val(s.getX())),
                float(_val(s.getY())),
                float(_val(s.getRadiusX())),
                float(_val(s.getRadiusY())),
                text,
            )
        return None  # lines, rectangles, masks...: not used by the workflow

    @staticmethod
    def _shape_to_omero(shape: Shape) -> Any:
        from omero.model import EllipseI, PointI, PolygonI
        from omero.rtypes import rdouble, rstring

        if isinstance(shape, PolygonShape):
            if len(shape.points) < 3:
                raise StoreError(f"a polygon needs at least 3 points, got {len(shape.points)}")
            s = PolygonI()
            s.setPoints(rstring(format_points(shape.points)))
        elif isinstance(shape, PointShape):
            s = PointI()
            s.setX(rdouble(shape.x))
            s.setY(rdouble(shape.y))
        elif isinstance(shape, EllipseShape):
            s = EllipseI()
            s.setX(rdouble(shape.x))
            s.setY(rdouble(shape.y))
            s.setRadiusX(rdouble(shape.radius_x))
            s.setRadiusY(rdouble(shape.radius_y))
        else:
            raise StoreError(
                f"unsupported shape {type(shape).__name__}; use PolygonShape, PointShape or "
                "EllipseShape"
            )
        s.setTextValue(rstring(shape.text))
        return s

    def get_rois(self, image_id: int, namespace: str | None = None) -> list[Roi]:
        """ROIs of the image by id; with ``namespace``, only those written under it."""
        out = []
        for r in self._find_rois(image_id):
            ns = namespace_of(_val(r.getDescription()))
            if namespace is not None and ns != namespace:
                continue
            shapes = tuple(
                s for s in (self._shape_from_omero(x) for x in r.copyShapes()) if s is not None
            )
            out.append(Roi(int(_val(r.getId())), shapes, _val(r.getName()) or "", ns))
        return sorted(out, key=lambda r: r.roi_id)

    def write_rois(
        self, image_id: int, rois: Sequence[NewRoi], namespace: str, replace: bool = True
    ) -> list[int]:
        """Save ROIs tagged with ``namespace``; ``replace`` deletes the namespace's old ones."""
        from omero.model import ImageI, RoiI
        from omero.rtypes import rstring

        if not namespace:
            raise StoreError("write_rois needs a namespace, e.g. 'omeflow/nuclei'")
        self._image(image_id)
        objs = []
        for roi in rois:
            if not roi.shapes:
                raise StoreError("an ROI needs at least one shape")
            r = RoiI()
            r.setImage(ImageI(int(image_id), False))
            r.setName(rstring(roi.name))
            r.setDescription(rstring(NS_PREFIX + namespace))
            for shape in roi.shapes:
                r.addShape(self._shape_to_omero(shape))
            objs.append(r)
        if replace:
            old = [
                int(_val(r.getId()))
                for r in self._find_rois(image_id)
                if namespace_of(_val(r.getDescription())) == namespace
            ]
            self._delete("Roi", old)
        update = self.conn.getUpdateService()
        ids: list[int] = []
        for i in range(0, len(objs), SAVE_BATCH):
            saved = update.saveAndReturnArray(objs[i : i + SAVE_BATCH], self.conn.SERVICE_OPTS)
            ids.extend(int(_val(r.getId())) for r in saved)
        return ids

    def _delete(self, kind: str, ids: list[int]) -> None:
        if ids:
            self.conn.deleteObjects(kind, ids, wait=True)

    # map annotations -------------------------------------------------------
    def _annotations(self, image_id: int, namespace: str | None, wrapper: type) -> Iterator[Any]:
        img = self._image(image_id)
        for ann in img.listAnnotations(ns=namespace):
            if isinstance(ann, wrapper):
                yield ann

    def get_map_annotations(
        self, image_id: int, namespace: str | None = None
    ) -> list[MapAnnotation]:
        """Map annotations on the image (optionally one namespace)."""
        from omero.gateway import MapAnnotationWrapper

        return [
            MapAnnotation(ann.getNs() or "", {str(k): str(v) for k, v in ann.getValue()})
            for ann in self._annotations(image_id, namespace, MapAnnotationWrapper)
        ]

    def write_map_annotation(
        self, image_id: int, namespace: str, values: dict[str, str], replace: bool = True
    ) -> None:
        """Link a MapAnnotation with ``setNs(namespace)``; ``replace`` deletes older ones."""
        from omero.gateway import MapAnnotationWrapper

        if not namespace:
            raise StoreError("write_map_annotation needs a namespace, e.g. 'omeflow/ecdf'")
        img = self._image(image_id)
        if replace:
            old = [a.getId() for a in self._annotations(image_id, namespace, MapAnnotationWrapper)]
            self._delete("Annotation", old)
        ann = MapAnnotationWrapper(self.conn)
        ann.setNs(namespace)
        ann.setValue([[str(k), str(v)] for k, v in values.items()])
        ann.save()
        img.linkAnnotation(ann)

    # attachments -----------------------------------------------------------
    def attach_file(
        self,
        image_id: int,
        path: Path,
        namespace: str,
        name: str | None = None,
        mimetype: str = "application/octet-stream",
        replace: bool = True,
    ) -> int:
        """Upload ``path`` as a FileAnnotation under ``namespace`` and link it to the image."""
        from omero.gateway import FileAnnotationWrapper

        src = checked_attachment(path, namespace)
        fname = name or src.name
        if "/" in fname or fname in {"", ".", ".."}:
            raise StoreError(f"attachment name {fname!r} is not a plain file name")
        img = self._image(image_id)
        if replace:
            old = [
                a.getId()
                for a in self._annotations(image_id, namespace, FileAnnotationWrapper)
                if a.getFile().getName() == fname
            ]
            self._delete("Annotation", old)
        with tempfile.TemporaryDirectory() as tmp:
            upload = src
            if fname != src.name:  # OMERO names the OriginalFile after the local file
                upload = Path(tmp) / fname
                shutil.copyfile(src, upload)
            ann = self.conn.createFileAnnfromLocalFile(str(upload), mimetype=mimetype, ns=namespace)
        img.linkAnnotation(ann)
        return int(ann.getId())

    def list_attachments(self, image_id: int, namespace: str | None = None) -> list[Attachment]:
        """FileAnnotations linked to the image."""
        from omero.gateway import FileAnnotationWrapper

        out = []
        for a in self._annotations(image_id, namespace, FileAnnotationWrapper):
            f = a.getFile()
            out.append(
                Attachment(
                    int(a.getId()),
                    f.getName(),
                    a.getNs() or "",
                    int(f.getSize() or 0),
                    f.getMimetype() or "application/octet-stream",
                )
            )
        return sorted(out, key=lambda a: a.file_id)

    def read_attachment(self, image_id: int, file_id: int) -> bytes:
        """The bytes of one attachment (must be linked to that image)."""
        from omero.gateway import FileAnnotationWrapper

        for a in self._annotations(image_id, None, FileAnnotationWrapper):
            if int(a.getId()) == int(file_id):
                return b"".join(a.getFileInChunks())
        raise StoreError(
            f"image {image_id} has no attachment {file_id} (list them with list_attachments)"
        )

    # helpers for tests / demos ---------------------------------------------
    def create_image_from_array(
        self,
        name: str,
        pixels: np.ndarray,
        channel_names: Sequence[str],
        pixel_size_um: tuple[float, float] | None = None,
    ) -> int:
        """Create a small image from a ``(c, y, x)`` array (createImageFromNumpySeq)."""
        from omero.model import LengthI
        from omero.model.enums import UnitsLength
        from omero.rtypes import rstring

        arr = np.asarray(pixels)
        planes = (arr[c] for c in range(arr.shape[0]))
        img = self.conn.createImageFromNumpySeq(planes, name, sizeZ=1, sizeC=arr.shape[0], sizeT=1)
        update = self.conn.getUpdateService()
        for ch, label in zip(img.getChannels(), channel_names, strict=False):
            lc = ch.getLogicalChannel()._obj
            lc.setName(rstring(label))
            update.saveObject(lc, self.conn.SERVICE_OPTS)
        if pixel_size_um:
            px = self.conn.getQueryService().get(
                "Pixels", img.getPixelsId(), self.conn.SERVICE_OPTS
            )
            px.setPhysicalSizeX(LengthI(float(pixel_size_um[0]), UnitsLength.MICROMETER))
            px.setPhysicalSizeY(LengthI(float(pixel_size_um[1]), UnitsLength.MICROMETER))
            update.saveObject(px, self.conn.SERVICE_OPTS)
        return int(img.getId())

    def delete_image(self, image_id: int) -> None:
        """Delete an image with its ROIs and annotations (tests clean up after themselves)."""
        self.conn.deleteObjects(
            "Image", [int(image_id)], deleteAnns=True, deleteChildren=True, wait=True
        )
        self._levels.pop(int(image_id), None)


__all__ = ["OmeroStore", "format_points", "parse_points", "namespace_of", "INSTALL_HINT"]
