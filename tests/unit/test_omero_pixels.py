"""Tile reads against a fake RawPixelsStore that behaves like OMERO's: big-endian bytes,
``setResolutionLevel`` counting from the smallest level, MissingPyramidException while the
pyramid is being built."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from hpc_jobs.stores import omero_pixels
from hpc_jobs.stores.base import StoreError
from hpc_jobs.stores.omero_pixels import (
    PyramidNotReady,
    TileReader,
    decode_tile,
    numpy_dtype,
)


class Desc:
    def __init__(self, y: int, x: int) -> None:
        self.sizeY, self.sizeX = y, x  # noqa: N815 - the slice's field names


class FakeRawPixelsStore:
    """Serves a (c, y, x) pyramid (level 0 = full size) like OMERO's RawPixelsStore."""

    def __init__(self, levels: list[np.ndarray], log: list) -> None:
        self.levels, self.log = levels, log
        self.server_level: int | None = None

    def setPixelsId(self, pid, bypass, ctx=None):  # noqa: N802
        self.log.append(("setPixelsId", pid, threading.get_ident()))

    def getResolutionLevels(self, ctx=None):  # noqa: N802
        return len(self.levels)

    def getResolutionDescriptions(self, ctx=None):  # noqa: N802 - largest first
        return [Desc(a.shape[1], a.shape[2]) for a in self.levels]

    def setResolutionLevel(self, n, ctx=None):  # noqa: N802 - 0 = smallest
        self.log.append(("setResolutionLevel", n))
        self.server_level = n

    def getTile(self, z, c, t, x, y, w, h, ctx=None):  # noqa: N802
        assert self.server_level is not None, "level must be set before reading"
        arr = self.levels[len(self.levels) - 1 - self.server_level]
        tile = arr[c, y : y + h, x : x + w]
        assert tile.shape == (h, w), "asked beyond the level"
        return tile.astype(tile.dtype.newbyteorder(">")).tobytes()

    def close(self):
        self.log.append(("close",))


@pytest.fixture
def pyramid() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    full = rng.integers(0, 65535, size=(2, 300, 260), dtype=np.uint16)
    return [full, full[:, ::2, ::2].copy(), full[:, ::4, ::4].copy()]


def make_reader(pyramid, log, stores):
    def create():
        rps = FakeRawPixelsStore(pyramid, log)
        stores.append(rps)
        return rps

    return TileReader(create, pixels_id=11, image_id=5)


def test_decode_is_big_endian_and_native_out() -> None:
    ref = np.array([[1, 258], [65535, 4096]], dtype=np.uint16)
    raw = ref.astype(">u2").tobytes()
    assert raw[:4] == b"\x00\x01\x01\x02"  # what OMERO sends
    got = decode_tile(raw, np.dtype("uint16"), 2, 2)
    np.testing.assert_array_equal(got, ref)
    assert got.dtype == np.uint16 and got.dtype.isnative
    f = np.array([[1.5, -2.25]], dtype=np.float32)
    np.testing.assert_array_equal(
        decode_tile(f.astype(">f4").tobytes(), numpy_dtype("float"), 1, 2), f
    )


def test_short_tile_is_an_error() -> None:
    with pytest.raises(StoreError, match="expected 8"):
        decode_tile(b"\x00" * 6, np.dtype("uint16"), 2, 2)


def test_one_store_per_thread_pixels_id_once_levels_switched(pyramid, monkeypatch) -> None:
    monkeypatch.setattr(omero_pixels, "MAX_TILE", 64)  # regions span many tiles
    log: list = []
    stores: list = []
    reader = make_reader(pyramid, log, stores)
    assert reader.count_levels() == 3
    u16 = np.dtype("uint16")
    np.testing.assert_array_equal(
        reader.read(1, 10, 290, 5, 250, 0, u16), pyramid[0][1, 10:290, 5:250]
    )
    np.testing.assert_array_equal(reader.read(0, 0, 150, 0, 130, 1, u16), pyramid[1][0])
    np.testing.assert_array_equal(reader.read(0, 3, 70, 2, 60, 2, u16), pyramid[2][0, 3:70, 2:60])
    np.testing.assert_array_equal(reader.read(0, 0, 300, 0, 260, 0, u16), pyramid[0][0])
    assert reader.level_size(2) == (75, 65)
    assert len(stores) == 1
    assert [e for e in log if e[0] == "setPixelsId"][0][1] == 11
    assert sum(e[0] == "setPixelsId" for e in log) == 1
    # server levels: full size = 2, then 1, 0, back to 2; level_size(2) needs 0 again
    assert [e[1] for e in log if e[0] == "setResolutionLevel"] == [2, 1, 0, 2, 0]

    def other_thread():
        np.testing.assert_array_equal(reader.read(1, 0, 20, 0, 20, 0, u16), pyramid[0][1, :20, :20])

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert len(stores) == 2  # a second thread gets its own store
    reader.close()
    assert sum(e[0] == "close" for e in log) == 2


def test_missing_pyramid_says_retry_later(pyramid) -> None:
    class MissingPyramidException(Exception):  # omero.MissingPyramidException's name
        backOff = 60000

    class Building(FakeRawPixelsStore):
        def setPixelsId(self, pid, bypass, ctx=None):  # noqa: N802
            raise MissingPyramidException()

    reader = TileReader(lambda: Building(pyramid, []), pixels_id=11, image_id=5)
    with pytest.raises(PyramidNotReady, match="image 5.*retry later.*60 s") as info:
        reader.read(0, 0, 10, 0, 10, 0, np.dtype("uint16"))
    assert info.value.retryable is True and isinstance(info.value, StoreError)
    assert StoreError("x").retryable is False


def test_unknown_pixel_type_names_the_supported_ones() -> None:
    with pytest.raises(StoreError, match="bit.*not supported.*uint16"):
        numpy_dtype("bit")
