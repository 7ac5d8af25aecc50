"""``OmeroStore``: the :class:`ImageStore` over omero-py's BlitzGateway.

A job joins the session its orchestrator minted for it (:meth:`OmeroStore.join` with the
per-job session key; no password ever reaches the cluster). :meth:`OmeroStore.login` (user +
password) exists for the contract tests and for people at a terminal. Both build the
``omero.client`` themselves (:mod:`.omero_tls`: the server's CA can be pinned) and hand it to
``BlitzGateway(client_obj=...)``, the pattern omero-py's own CLI plugins use
(``src/omero/plugins/download.py``).

Mapping onto OMERO (each detail cites its upstream source in the module that does it):

- group context (:mod:`.omero_context`): reads in all groups (``omero.group=-1``), every
  write in the image's group;
- pixels (:mod:`.omero_pixels`): one RawPixelsStore per thread and image, numpy decoding,
  a pyramid still being built -> :class:`~.omero_pixels.PyramidNotReady` ("retry later");
  image info (size, type, group, pixels id, levels) is cached per store;
- pixel sizes (:mod:`.omero_units`): micrometres, PIXEL / REFERENCEFRAME units = unknown;
- ROIs: paged queries (ids first, then one page of ROIs with shapes and transforms);
  shapes (:mod:`.omero_shapes`): transforms applied, rectangles as polygons, shapes without
  area reported in ``Roi.notes``. OMERO ROIs have no namespace field, so **the namespace is
  kept in the ROI's description** as ``omeflow:ns=<namespace>``; ROIs without that prefix
  (people-drawn ones) have ``namespace=None``. ``replace`` saves the new ROIs, then deletes
  the old ones of that namespace (ids by query, no shapes loaded);
- deletes (:mod:`.omero_delete`): our own Delete2 commands in batches, waited for with a
  timeout that fails, response checked;
- map annotations: ``MapAnnotationWrapper`` with ``setNs`` linked to the image;
- per-object tables (:mod:`.omero_tables`): OMERO.tables under the bulk-annotations
  namespace, which OMERO.web shows;
- attachments: ``createFileAnnfromLocalFile(path, origFilePathAndName=...)`` uploads the
  original file under the attachment's name (no temporary copy).

NOT TESTED AGAINST A SERVER here (none can run on these machines): unit tests cover every
piece decidable without one (tests/unit/test_omero_*.py), ``make test-omero-lane`` runs the
conversions with real omero.model classes, and ``make test-omero-contract`` runs the store
contract suite against a site's own test OMERO (docs/omero.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from hpc_jobs.stores.base import (
    BULK_ANNOTATIONS_NS,
    Attachment,
    ImageInfo,
    ImageNotFound,
    MapAnnotation,
    NewRoi,
    Roi,
    StoreError,
    TableColumns,
    checked_attachment,
    checked_table,
)
from hpc_jobs.stores.omero_context import ALL_GROUPS, in_group, write_ctx
from hpc_jobs.stores.omero_delete import delete_objects, wait_for
from hpc_jobs.stores.omero_pixels import (
    PIXEL_TYPES,
    PyramidNotReady,
    TileReader,
    is_missing_pyramid,
    numpy_dtype,
    pyramid_not_ready,
)
from hpc_jobs.stores.omero_query import IMAGE_PAGE, existence_checks, image_ids_query
from hpc_jobs.stores.omero_shapes import (
    NS_PREFIX,
    format_points,
    namespace_of,
    parse_points,
    shape_from_omero,
    shape_to_omero,
)
from hpc_jobs.stores.omero_tables import write_omero_table
from hpc_jobs.stores.omero_tls import new_client
from hpc_jobs.stores.omero_units import pixel_size_um

INSTALL_HINT = "pip install 'omeflow[omero]' (needs Python 3.10 for zeroc-ice 3.6.5)"
SAVE_BATCH = 500
#: ROIs per query page (ids first, then these ROIs with their shapes).
ROI_PAGE = 1000
#: Ice exception names that mean "no connection to the server" (vs. "session refused").
_UNREACHABLE = {
    "ConnectionRefusedException",
    "ConnectFailedException",
    "ConnectTimeoutException",
    "DNSException",
    "SocketException",
    "TimeoutException",
    "ConnectionLostException",
}
_TLS_FAILED = {"SecurityException"}  # IceSSL: certificate verification failed

_ROI_IDS = "select r.id from Roi r where r.image.id = :iid{ns} order by r.id"
_ROIS_WITH_SHAPES = (
    "select distinct r from Roi r left outer join fetch r.shapes s "
    "left outer join fetch s.transform where r.id in (:ids) order by r.id"
)


def _require_omero() -> Any:
    try:
        from omero.gateway import BlitzGateway
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise StoreError(f"the OMERO store needs omero-py: {INSTALL_HINT}") from exc
    return BlitzGateway


def _val(x: Any) -> Any:
    """Unwrap an omero rtype (or None)."""
    return None if x is None else (x.getValue() if hasattr(x, "getValue") else x)


def _names(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


def _open_session(
    host: str, port: int, ca_file: str | Path | None, start: Any, tls_name: str | None = None
) -> Any:
    """A client with a session (``start(client)`` creates or joins it), errors named."""
    client = new_client(host, port, ca_file, tls_name)
    try:
        start(client)
    except Exception as exc:  # noqa: BLE001 - Ice raises many types; sorted below
        client.__del__()  # omero.client's own cleanup (closes the communicator)
        names = _names(exc)
        if names & _TLS_FAILED:
            raise StoreError(
                f"TLS handshake with OMERO at {host}:{port} failed ({type(exc).__name__}): the "
                f"server's certificate is not signed by the pinned CA {ca_file} or does not "
                "name this host; check store.ca_file and the server's certificate"
            ) from None
        if names & _UNREACHABLE:
            raise StoreError(
                f"could not reach OMERO at {host}:{port} ({type(exc).__name__}): check "
                "store.host / store.port in site.toml and that compute nodes can reach it "
                "(directly or through the login node's reverse tunnel)"
            ) from None
        raise SessionRefused(
            f"OMERO at {host}:{port} refused the session ({type(exc).__name__}): the key is "
            "expired or invalid (re-run the task so the orchestrator mints a fresh key), or "
            "the user name / password is wrong"
        ) from None
    return client


class SessionRefused(StoreError):
    """The server answered and refused the session (expired, ended, or wrong credentials)."""


def end_session(
    host: str,
    port: int,
    session_key: str,
    ca_file: str | Path | None = None,
    tls_name: str | None = None,
) -> bool:
    """End a job's session for good; False if it had already ended.

    Joins it and calls ``omero.client.killSession``, which closes the session until its
    reference count is 0 (omero-py ``src/omero/clients.py``, ``killSession``); a plain
    detach would leave the key valid until its time-to-live. Raises :class:`StoreError` when
    the server cannot be reached (or TLS fails): the session then ends by its time-to-live.
    """
    _require_omero()
    try:
        client = _open_session(
            host, port, ca_file, lambda c: c.joinSession(session_key), tls_name
        )
    except SessionRefused:
        return False
    try:
        client.killSession()
    finally:
        client.__del__()
    return True


@dataclass(frozen=True)
class _Image:
    """What reads and writes need to know about an image (cached per store)."""

    info: ImageInfo
    group_id: int
    pixels_id: int


class OmeroStore:
    """An :class:`~hpc_jobs.stores.base.ImageStore` over one BlitzGateway connection."""

    def __init__(self, conn: Any, close_session: bool = False) -> None:
        self.conn = conn
        self._close_session = close_session
        self._images: dict[int, _Image] = {}
        self._readers: dict[int, TileReader] = {}

    # connection ------------------------------------------------------------
    @classmethod
    def join(
        cls,
        host: str,
        port: int = 4064,
        session_key: str | None = None,
        secure: bool = True,
        ca_file: str | Path | None = None,
        tls_name: str | None = None,
    ) -> OmeroStore:
        """Join an existing session (the job's key); closing leaves the session alive.

        The join itself always runs over TLS (the session key crosses it); ``secure=False``
        then switches the data connection to the server's insecure router
        (``BlitzGateway.setSecure``), as a password login does. ``tls_name``: the name the
        server's certificate must carry when ``host`` is another address (the reverse
        tunnel's, :mod:`hpc_jobs.tunnel`).
        """
        blitz = _require_omero()
        if not host:
            raise StoreError("store.host is empty: set the OMERO host in the site config")
        if not session_key:
            raise StoreError(
                "no OMERO session key for this job: this site's store is OMERO, so the "
                "orchestrator must mint one per job: set [omeflow] omero_conn_id in "
                "airflow.cfg (or the task's omero_conn_id) to the OMERO connection "
                "(docs/omero.md)"
            )
        # detachOnDestroy: closing our connection leaves the session to its owner, as
        # BlitzGateway.connect(sUuid=...) does after joinSession (omero-py gateway)
        client = _open_session(
            host, port, ca_file, lambda c: c.joinSession(session_key).detachOnDestroy(),
            tls_name,
        )
        return cls._ready(blitz(client_obj=client), secure, close_session=False)

    @classmethod
    def login(
        cls,
        host: str,
        user: str,
        password: str,
        port: int = 4064,
        secure: bool = True,
        ca_file: str | Path | None = None,
    ) -> OmeroStore:
        """Log in with a user name and password (tests, interactive use)."""
        blitz = _require_omero()
        client = _open_session(host, port, ca_file, lambda c: c.createSession(user, password))
        return cls._ready(blitz(client_obj=client), secure, close_session=True)

    @classmethod
    def _ready(cls, conn: Any, secure: bool, close_session: bool) -> OmeroStore:
        if not secure:
            conn.setSecure(False)  # omero-py: createClient(secure=False) on the same session
        conn.SERVICE_OPTS.setOmeroGroup(ALL_GROUPS)  # reads: every group we belong to
        conn.c.enableKeepAlive(60)
        return cls(conn, close_session=close_session)

    def __enter__(self) -> OmeroStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close pixel stores and the connection; a joined session stays for its owner."""
        if self.conn is None:
            return
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
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

    def _describe(self, img: Any, levels: int | None) -> _Image:
        ptype = img.getPixelsType()
        info = ImageInfo(
            image_id=int(img.getId()),
            name=img.getName() or "",
            size_x=int(img.getSizeX()),
            size_y=int(img.getSizeY()),
            size_c=int(img.getSizeC()),
            dtype=PIXEL_TYPES.get(ptype, ptype),
            channel_names=tuple(str(n) for n in img.getChannelLabels()),
            pixel_size_um=pixel_size_um(img),
            levels=1 if levels is None else levels,
        )
        return _Image(info, int(img.getDetails().getGroup().getId()), int(img.getPixelsId()))

    def _reader(self, image: _Image) -> TileReader:
        iid = image.info.image_id
        if iid not in self._readers:
            self._readers[iid] = TileReader(
                self.conn.c.sf.createRawPixelsStore,
                image.pixels_id,
                iid,
                ctx=self.conn.SERVICE_OPTS,
            )
        return self._readers[iid]

    def _cached(self, image_id: int) -> _Image:
        """Image info, group and pixels id (asked once per store and image)."""
        if isinstance(image_id, int | np.integer) and not isinstance(image_id, bool):
            cached = self._images.get(int(image_id))
            if cached is not None:
                return cached  # no server call: region reads come here thousands of times
        img = self._image(image_id)
        described = self._describe(img, None)
        levels = self._reader(described).count_levels()
        described = replace(described, info=replace(described.info, levels=levels))
        self._images[int(image_id)] = described
        return described

    def list_images(self) -> list[ImageInfo]:
        """Every image this session can see, by id.

        Pyramid levels are asked from the server only for images larger than its max plane
        (``ImageWrapper.requiresPixelsPyramid``, omero-py; one config call for all); smaller
        images have one level. :meth:`get_image` always asks.
        """
        out = []
        for img in self.conn.getObjects("Image"):
            image = self._describe(img, None)
            if img.requiresPixelsPyramid():
                # still building: listed with levels=1; reading it says "retry later"
                with contextlib.suppress(PyramidNotReady):
                    image = self._cached(image.info.image_id)
            out.append(image.info)
        return sorted(out, key=lambda i: i.image_id)

    def list_image_ids(self, dataset: int | None = None, tag: int | str | None = None
                       ) -> list[int]:
        """Ids of the images in ``dataset`` and/or with ``tag`` (id or text), by paged
        projection queries (:mod:`.omero_query`: no image objects loaded), in all groups."""
        import omero.clients  # noqa: F401 - loads the generated omero.sys classes
        from omero.rtypes import rlong, rstring
        from omero.sys import ParametersI

        def params_of(values: dict[str, Any]) -> Any:
            params = ParametersI()
            for name, value in values.items():
                params.add(name, rstring(value) if isinstance(value, str) else rlong(value))
            return params

        query = self.conn.getQueryService()
        for what, hql, values in existence_checks(dataset, tag):
            if not query.projection(hql, params_of(values), self.conn.SERVICE_OPTS):
                raise StoreError(f"no {what} on this OMERO server that this session can see: "
                                 "check the id/text in OMERO.web and the user's groups")
        hql, values = image_ids_query(dataset, tag)
        ids: list[int] = []
        while True:
            rows = query.projection(hql, params_of(values).page(len(ids), IMAGE_PAGE),
                                    self.conn.SERVICE_OPTS)
            ids.extend(int(_val(row[0])) for row in rows)
            if len(rows) < IMAGE_PAGE:
                return ids

    def get_image(self, image_id: int) -> ImageInfo:
        """Metadata of one image."""
        return self._cached(image_id).info

    def read_region(
        self, image_id: int, channel: int, y0: int, y1: int, x0: int, x1: int, level: int = 0
    ) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of one channel at ``level``, clipped to the image."""
        image = self._cached(image_id)
        info = image.info
        info.check_channel(channel)
        if not 0 <= level < info.levels:
            raise StoreError(
                f"image {image_id} has {info.levels} resolution levels; level={level} is out "
                f"of range (use 0..{info.levels - 1})"
            )
        reader = self._reader(image)
        try:
            sy, sx = (info.size_y, info.size_x) if level == 0 else reader.level_size(level)
            y0, y1 = max(0, int(y0)), min(sy, int(y1))
            x0, x1 = max(0, int(x0)), min(sx, int(x1))
            return reader.read(channel, y0, y1, x0, x1, level, numpy_dtype_of(info.dtype))
        except Exception as exc:  # noqa: BLE001 - the pyramid may be missing on any call
            if is_missing_pyramid(exc):
                raise pyramid_not_ready(int(image_id), exc) from None
            raise

    # ROIs ------------------------------------------------------------------
    def _roi_ids(self, image_id: int, namespace: str | None) -> list[int]:
        """Ids of the image's ROIs (of one namespace), by query: no shapes are loaded."""
        import omero.clients  # noqa: F401 - loads the generated omero.sys classes
        from omero.rtypes import rstring
        from omero.sys import ParametersI

        query = self.conn.getQueryService()
        ids: list[int] = []
        while True:
            params = ParametersI().add("iid", _rlong(image_id)).page(len(ids), ROI_PAGE)
            ns = ""
            if namespace is not None:
                params.add("desc", rstring(NS_PREFIX + namespace))
                ns = " and r.description = :desc"
            rows = query.projection(_ROI_IDS.format(ns=ns), params, self.conn.SERVICE_OPTS)
            ids.extend(int(_val(row[0])) for row in rows)
            if len(rows) < ROI_PAGE:
                return ids

    def _rois_page(self, ids: Sequence[int]) -> Iterator[Any]:
        import omero.clients  # noqa: F401 - loads the generated omero.sys classes
        from omero.sys import ParametersI

        params = ParametersI().addIds([int(i) for i in ids])
        yield from self.conn.getQueryService().findAllByQuery(
            _ROIS_WITH_SHAPES, params, self.conn.SERVICE_OPTS
        )

    def get_rois(self, image_id: int, namespace: str | None = None) -> list[Roi]:
        """ROIs of the image by id, a page at a time; with ``namespace``, only those."""
        self._cached(image_id)
        out = []
        ids = self._roi_ids(image_id, namespace)
        for start in range(0, len(ids), ROI_PAGE):
            for r in self._rois_page(ids[start : start + ROI_PAGE]):
                shapes, notes = [], []
                for s in r.copyShapes():
                    shape, note = shape_from_omero(s)
                    if shape is not None:
                        shapes.append(shape)
                    elif note:
                        notes.append(note)
                out.append(
                    Roi(
                        int(_val(r.getId())),
                        tuple(shapes),
                        _val(r.getName()) or "",
                        namespace_of(_val(r.getDescription())),
                        tuple(notes),
                    )
                )
        return sorted(out, key=lambda r: r.roi_id)

    def write_rois(
        self, image_id: int, rois: Sequence[NewRoi], namespace: str, replace: bool = True
    ) -> list[int]:
        """Save ROIs tagged with ``namespace`` (in the image's group); ``replace`` then
        deletes the namespace's older ones."""
        from omero.model import ImageI, RoiI
        from omero.rtypes import rstring

        if not namespace:
            raise StoreError("write_rois needs a namespace, e.g. 'omeflow/nuclei'")
        image = self._cached(image_id)
        objs = []
        for roi in rois:
            if not roi.shapes:
                raise StoreError("an ROI needs at least one shape")
            r = RoiI()
            r.setImage(ImageI(int(image_id), False))
            r.setName(rstring(roi.name))
            r.setDescription(rstring(NS_PREFIX + namespace))
            for shape in roi.shapes:
                r.addShape(shape_to_omero(shape))
            objs.append(r)
        old = self._roi_ids(image_id, namespace) if replace else []
        ctx = write_ctx(self.conn.SERVICE_OPTS, image.group_id)
        update = self.conn.getUpdateService()
        ids: list[int] = []
        for i in range(0, len(objs), SAVE_BATCH):
            saved = update.saveAndReturnArray(objs[i : i + SAVE_BATCH], ctx)
            ids.extend(int(_val(r.getId())) for r in saved)
        self._delete("Roi", old, image.group_id)
        return ids

    def _delete(self, kind: str, ids: Sequence[int], group_id: int) -> None:
        if ids:
            ctx = write_ctx(self.conn.SERVICE_OPTS, group_id)
            delete_objects(lambda req: self.conn.c.sf.submit(req, ctx), kind, ids)

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
        image = self._cached(image_id)
        img = self._image(image_id)
        old = (
            [a.getId() for a in self._annotations(image_id, namespace, MapAnnotationWrapper)]
            if replace
            else []
        )
        ann = MapAnnotationWrapper(self.conn)
        ann.setNs(namespace)
        ann.setValue([[str(k), str(v)] for k, v in values.items()])
        with in_group(self.conn, image.group_id):
            ann.save()
            img.linkAnnotation(ann)
        self._delete("Annotation", old, image.group_id)

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
        image = self._cached(image_id)
        img = self._image(image_id)
        old = (
            [
                a.getId()
                for a in self._annotations(image_id, namespace, FileAnnotationWrapper)
                if a.getFile().getName() == fname
            ]
            if replace
            else []
        )
        with in_group(self.conn, image.group_id):
            # origFilePathAndName names the OriginalFile; the bytes come from src itself
            # (omero-py createOriginalFileFromLocalFile: os.path.split(origFilePathAndName))
            ann = self.conn.createFileAnnfromLocalFile(
                str(src),
                origFilePathAndName=str(src.with_name(fname)),
                mimetype=mimetype,
                ns=namespace,
            )
            img.linkAnnotation(ann)
        self._delete("Annotation", old, image.group_id)
        return int(ann.getId())

    def write_table(
        self, image_id: int, columns: TableColumns, name: str, replace: bool = True
    ) -> int:
        """An OMERO.table (:mod:`.omero_tables`) linked under :data:`BULK_ANNOTATIONS_NS`;
        ``replace`` then deletes older tables of that name on the image."""
        from omero.gateway import FileAnnotationWrapper
        from omero.model import FileAnnotationI, OriginalFileI
        from omero.rtypes import rstring

        checked_table(columns, name)
        image = self._cached(image_id)
        img = self._image(image_id)
        old = (
            [
                a.getId()
                for a in self._annotations(image_id, BULK_ANNOTATIONS_NS, FileAnnotationWrapper)
                if a.getFile().getName() == name
            ]
            if replace
            else []
        )
        ctx = write_ctx(self.conn.SERVICE_OPTS, image.group_id)
        file_id = write_omero_table(self.conn.c.sf, ctx, name, columns)
        with in_group(self.conn, image.group_id):
            obj = FileAnnotationI()
            obj.setNs(rstring(BULK_ANNOTATIONS_NS))
            obj.setFile(OriginalFileI(file_id, False))
            ann = FileAnnotationWrapper(self.conn, obj)
            ann.save()
            img.linkAnnotation(ann)
        self._delete("Annotation", old, image.group_id)
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
        group_id: int | None = None,
    ) -> int:
        """Create a small image from a ``(c, y, x)`` array (createImageFromNumpySeq), in
        ``group_id`` (default: the session's current group)."""
        from omero.model import LengthI
        from omero.model.enums import UnitsLength
        from omero.rtypes import rstring

        gid = int(self.conn.getEventContext().groupId) if group_id is None else int(group_id)
        arr = np.asarray(pixels)
        planes = (arr[c] for c in range(arr.shape[0]))
        with in_group(self.conn, gid):
            img = self.conn.createImageFromNumpySeq(
                planes, name, sizeZ=1, sizeC=arr.shape[0], sizeT=1
            )
        ctx = write_ctx(self.conn.SERVICE_OPTS, gid)
        update = self.conn.getUpdateService()
        for ch, label in zip(img.getChannels(), channel_names, strict=False):
            lc = ch.getLogicalChannel()._obj
            lc.setName(rstring(label))
            update.saveObject(lc, ctx)
        if pixel_size_um:
            px = self.conn.getQueryService().get("Pixels", img.getPixelsId(), ctx)
            px.setPhysicalSizeX(LengthI(float(pixel_size_um[0]), UnitsLength.MICROMETER))
            px.setPhysicalSizeY(LengthI(float(pixel_size_um[1]), UnitsLength.MICROMETER))
            update.saveObject(px, ctx)
        return int(img.getId())

    def delete_image(self, image_id: int) -> None:
        """Delete an image with its ROIs and annotations (tests clean up after themselves)."""
        image = self._cached(image_id)
        reader = self._readers.pop(int(image_id), None)
        if reader is not None:
            reader.close()
        with in_group(self.conn, image.group_id):
            handle = self.conn.deleteObjects(
                "Image", [int(image_id)], deleteAnns=True, deleteChildren=True
            )
        rsp = wait_for(handle, f"the delete of image {image_id}")  # timeout: handle stays open
        handle.close()
        if any(c.__name__ == "ERR" for c in type(rsp).__mro__):
            raise StoreError(f"OMERO refused to delete image {image_id}: {rsp}")
        self._images.pop(int(image_id), None)


def numpy_dtype_of(name: str) -> np.dtype:
    """numpy dtype for an :class:`ImageInfo` dtype name (OMERO names are mapped already)."""
    return np.dtype(name) if name in PIXEL_TYPES.values() else numpy_dtype(name)


def _rlong(value: int) -> Any:
    from omero.rtypes import rlong

    return rlong(int(value))


__all__ = [
    "INSTALL_HINT",
    "OmeroStore",
    "PyramidNotReady",
    "format_points",
    "namespace_of",
    "parse_points",
]
