"""Reading OMERO pixels: one RawPixelsStore per thread, big-endian tiles decoded by numpy.

omero-py's ``PixelsWrapper.getTile`` opens a RawPixelsStore per call and decodes the bytes
with ``struct.unpack`` into a tuple, then ``numpy.array(tuple)`` (omero-py
``src/omero/gateway/__init__.py``, ``_PixelsWrapper.getTiles``): per 2048² uint16 tile that is
4 M Python ints, GIL-bound (``benchmarks/omero_tile_decode.py`` prints the ratio). Here:

- :class:`TileReader` keeps one RawPixelsStore per thread and image (``setPixelsId`` once,
  ``setResolutionLevel`` only when the level changes) and closes them all at the end;
- :func:`decode_tile` is ``numpy.frombuffer(raw, '>u2')`` (dtype from the pixel type), one
  copy into native byte order.

RawPixelsStore facts (OMERO ``RawPixelsStore`` slice, ``omero/api/RawPixelsStore.ice``):
``getTile(z, c, t, x, y, w, h)`` returns big-endian bytes; ``setResolutionLevel(n)`` counts
from the smallest level (0) to full size (``getResolutionLevels() - 1``);
``getResolutionDescriptions()`` lists the levels largest first. While the server is still
building a large image's pyramid, ``setPixelsId`` raises ``omero.MissingPyramidException``
(server ``components/romio/src/ome/io/nio/PixelsService.java``, ``getPixelBuffer`` ->
``BackOff.throwMissingPyramidException``); we turn that into :class:`PyramidNotReady`.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import numpy as np

from hpc_jobs.stores.base import StoreError

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
#: Largest tile edge requested in one call (OMERO refuses planes above its max plane size).
MAX_TILE = 2048


class PyramidNotReady(StoreError):
    """The server is still building the image's pyramid: retry the task later.

    ``retryable`` marks it for the job runner (``hpc_jobs.run`` exits with
    ``protocol.EXIT_RETRY_LATER``) and the operator (a retryable task failure, not a final one).
    """

    retryable = True


def numpy_dtype(pixel_type: str) -> np.dtype:
    """numpy dtype of an OMERO pixel type name; a clear error for unknown ones."""
    try:
        return np.dtype(PIXEL_TYPES[pixel_type])
    except KeyError:
        raise StoreError(
            f"OMERO pixel type {pixel_type!r} is not supported "
            f"(supported: {', '.join(sorted(PIXEL_TYPES))})"
        ) from None


def tile_view(raw: bytes, dtype: np.dtype, height: int, width: int) -> np.ndarray:
    """A zero-copy big-endian ``(height, width)`` view of ``RawPixelsStore.getTile`` bytes."""
    big = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder(">"))
    if big.size != height * width:
        raise StoreError(
            f"OMERO returned {len(raw)} bytes for a {width}x{height} {np.dtype(dtype).name} "
            f"tile (expected {height * width * np.dtype(dtype).itemsize}); retry the task"
        )
    return big.reshape(height, width)


def decode_tile(raw: bytes, dtype: np.dtype, height: int, width: int) -> np.ndarray:
    """A big-endian tile from ``RawPixelsStore.getTile`` as a native ``(height, width)`` array."""
    return tile_view(raw, dtype, height, width).astype(np.dtype(dtype).newbyteorder("="))


def is_missing_pyramid(exc: BaseException) -> bool:
    """True for ``omero.MissingPyramidException`` (matched by name: omero may be absent)."""
    return any(c.__name__ == "MissingPyramidException" for c in type(exc).__mro__)


def pyramid_not_ready(image_id: int, exc: BaseException) -> PyramidNotReady:
    """The store error for a pyramid that is still being built."""
    back_off = getattr(exc, "backOff", None)
    hint = f" (the server suggests {int(back_off) // 1000} s)" if back_off else ""
    return PyramidNotReady(
        f"OMERO is still building the pyramid of image {image_id}: retry later{hint}; "
        "large imports take minutes to hours before their pixels can be read"
    )


class TileReader:
    """Region reads of one OMERO image through one RawPixelsStore per thread.

    :param create_store: returns a new RawPixelsStore proxy (``conn.c.sf.createRawPixelsStore``).
    :param pixels_id: the image's Pixels id.
    :param image_id: for error messages.
    :param levels: resolution levels, when already known (else asked once from the server).
    :param ctx: Ice call context (the session's service options).
    """

    def __init__(
        self,
        create_store: Any,
        pixels_id: int,
        image_id: int,
        levels: int | None = None,
        ctx: Any = None,
    ) -> None:
        self._create = create_store
        self.pixels_id = int(pixels_id)
        self.image_id = int(image_id)
        self.levels = None if levels is None else int(levels)
        self._ctx = ctx
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def _open(self) -> Any:
        """This thread's RawPixelsStore, its pixels id set (once)."""
        rps = getattr(self._local, "rps", None)
        if rps is not None:
            return rps
        rps = self._create()
        with self._lock:
            self._all.append(rps)
        try:
            rps.setPixelsId(self.pixels_id, True, self._ctx)
            if self.levels is None:
                self.levels = int(rps.getResolutionLevels(self._ctx))
        except Exception as exc:  # noqa: BLE001 - Ice raises many types
            if is_missing_pyramid(exc):
                raise pyramid_not_ready(self.image_id, exc) from None
            raise
        self._local.rps = rps
        self._local.level = None
        return rps

    def count_levels(self) -> int:
        """Resolution levels the server serves for this image (opens this thread's store)."""
        self._open()
        assert self.levels is not None
        return self.levels

    def _store(self, level: int) -> Any:
        rps = self._open()
        assert self.levels is not None
        server_level = self.levels - 1 - level  # the server counts from the smallest level
        if self._local.level != server_level:
            rps.setResolutionLevel(server_level, self._ctx)
            self._local.level = server_level
        return rps

    def level_size(self, level: int) -> tuple[int, int]:
        """``(size_y, size_x)`` of ``level`` (0 = full size) as the server reports it."""
        desc = self._store(level).getResolutionDescriptions(self._ctx)[level]
        return int(desc.sizeY), int(desc.sizeX)

    def read(
        self, channel: int, y0: int, y1: int, x0: int, x1: int, level: int, dtype: np.dtype
    ) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` (already clipped) of ``channel`` at ``level``."""
        rps = self._store(level)
        out = np.zeros((max(0, y1 - y0), max(0, x1 - x0)), dtype=dtype)
        for ty in range(y0, y1, MAX_TILE):
            for tx in range(x0, x1, MAX_TILE):
                h, w = min(MAX_TILE, y1 - ty), min(MAX_TILE, x1 - tx)
                raw = rps.getTile(0, channel, 0, tx, ty, w, h, self._ctx)
                out[ty - y0 : ty - y0 + h, tx - x0 : tx - x0 + w] = tile_view(raw, dtype, h, w)
        return out

    def close(self) -> None:
        """Close every thread's RawPixelsStore."""
        with self._lock:
            stores, self._all = self._all, []
        for rps in stores:
            with contextlib.suppress(Exception):  # closing a dead proxy is not an error
                rps.close()
