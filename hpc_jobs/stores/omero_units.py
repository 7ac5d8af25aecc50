"""Physical pixel sizes from OMERO, always in micrometres.

OMERO stores a pixel size as a ``Length`` with its own unit (``omero.model.LengthI``); the
BlitzGateway's ``ImageWrapper.getPixelSizeX()`` returns the bare number in *whatever unit it
was stored in* (omero-py ``src/omero/gateway/__init__.py``, ``_unwrapunits``: the value is
only converted when ``units=`` names a unit). We ask for the Length (``units=True``) and
convert with omero-py's own table (``omero_model_LengthI.LengthI(length, "MICROMETER")``, the
copy constructor that applies ``CONVERSIONS``). ``PIXEL`` and ``REFERENCEFRAME`` are not
physical: such a size is unknown (None), as is a missing or non-positive one.
"""

from __future__ import annotations

from typing import Any

#: Length units that are not physical lengths (``UnitsLength`` enum names).
NON_PHYSICAL_UNITS = frozenset({"PIXEL", "REFERENCEFRAME"})


def length_um(length: Any) -> float | None:
    """``length`` (an ``omero.model.LengthI`` or None) in micrometres; None when unknown."""
    if length is None or length.getUnit() is None:
        return None
    unit = str(length.getUnit())  # Ice enums print their name, e.g. "NANOMETER"
    if unit in NON_PHYSICAL_UNITS:
        return None
    if unit != "MICROMETER":
        length = type(length)(length, "MICROMETER")  # omero-py converts (CONVERSIONS table)
    value = float(length.getValue())
    return value if value > 0 else None


def pixel_size_um(img: Any) -> tuple[float, float] | None:
    """``(x, y)`` pixel size of an ``ImageWrapper`` in micrometres, or None when unknown.

    A missing y size takes the x size (square pixels); an unknown x size makes both unknown.
    """
    px = length_um(img.getPixelSizeX(units=True))
    if px is None:
        return None
    py = length_um(img.getPixelSizeY(units=True))
    return (px, py if py is not None else px)
