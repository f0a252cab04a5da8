"""Per-frame headers of Enhanced MR and Legacy Converted Enhanced MR objects.

A multi-frame object keeps each frame's position, orientation, spacing, rescale and temporal
identity in functional groups: ``PerFrameFunctionalGroupsSequence`` (one item per frame) and
``SharedFunctionalGroupsSequence`` (what all frames share). `frame_headers` turns them into
`Frames` (one row per frame), the frame's own group winning over the shared one.

pydicom's per-item access costs about 0.4 ms per frame (12x the pixel decode of a 128 x 128
frame), so the functional groups are read here from the element bytes pydicom leaves unparsed:
the sought headers found with numpy and checked for nesting (about 6 us per frame), else an
element-by-element walk (about 12 us per frame; also over the items pydicom did parse, for
sequences of undefined length). Only little-endian transfer syntaxes occur for these objects
(the big-endian one was retired before Enhanced MR existed); the reader refuses others.
Malformed groups raise ``ValueError`` (or ``struct.error``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
)
_U32 = struct.Struct("<I")
_TAG_LEN = struct.Struct("<HHI")

# Functional group sequences and the elements read from them.
T_SHARED_GROUPS, T_PER_FRAME_GROUPS = 0x52009229, 0x52009230
T_DIMENSION_INDEX = 0x00209222
_T_FRAME_CONTENT, _T_PLANE_POSITION, _T_PLANE_ORIENTATION = 0x00209111, 0x00209113, 0x00209116
_T_PIXEL_MEASURES, _T_PIXEL_VALUE_TRANSFORMATION = 0x00289110, 0x00289145
_T_FRAME_TYPE_SEQ, _T_FRAME_TYPE = 0x00189226, 0x00089007
_T_MR_TIMING, _T_MR_ECHO = 0x00189112, 0x00189114
_T_UNASSIGNED_SHARED = 0x00209170
_T_TEMPORAL_POSITION_INDEX, _T_FRAME_ACQ_DATETIME = 0x00209128, 0x00189074
_T_DIMENSION_INDEX_VALUES = 0x00209157
_T_DIMENSION_INDEX_POINTER = 0x00209165
_T_IPP, _T_IOP, _T_PIXEL_SPACING = 0x00200032, 0x00200037, 0x00280030
_T_SLOPE, _T_INTERCEPT = 0x00281053, 0x00281052
_T_TR, _T_FLIP, _T_EFFECTIVE_TE = 0x00180080, 0x00181314, 0x00189082
_T_SCANNING_SEQUENCE = 0x00180020

# Attributes a DimensionIndexSequence may point at that tell time points apart.
TEMPORAL_POINTERS = frozenset(
    {
        0x00209128,  # TemporalPositionIndex
        0x00189074,  # FrameAcquisitionDateTime
        0x00189151,  # FrameReferenceDateTime
        0x00181060,  # TriggerTime
        0x00209153,  # TriggerDelayTime
        0x0020930D,  # TemporalPositionTimeOffset
        0x00080033,  # ContentTime
        0x00080032,  # AcquisitionTime
        0x00200100,  # TemporalPositionIdentifier
    }
)


def _dataset(buf, pos: int, end: int, implicit: bool):
    """Elements of one item from ``buf[pos:end]``: (dict tag -> value bytes, end position).

    Stops after an item delimiter (items of undefined length).
    """
    out = {}
    unpack_from = _TAG_LEN.unpack_from
    while pos + 8 <= end:
        group, elem, length = unpack_from(buf, pos)
        tag = group << 16 | elem
        if tag == _ITEM_END:
            return out, pos + 8
        if implicit:
            pos += 8
        elif buf[pos + 4 : pos + 6] in _LONG_VRS:
            length = _U32.unpack_from(buf, pos + 8)[0]
            pos += 12
        else:
            length = buf[pos + 6] | buf[pos + 7] << 8
            pos += 8
        if length == _UNDEFINED:  # A sequence of undefined length: walk to its delimiter.
            start = pos
            pos = _skip_sequence(buf, pos, end, implicit)
            out[tag] = buf[start:pos]
        else:
            out[tag] = buf[pos : pos + length]
            pos += length
    return out, pos


def _skip_sequence(buf, pos: int, end: int, implicit: bool) -> int:
    """Position just after the sequence delimiter of a sequence of undefined length."""
    while pos + 8 <= end:
        group, elem, length = _TAG_LEN.unpack_from(buf, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise ValueError("malformed sequence")
        if length == _UNDEFINED:
            _, pos = _dataset(buf, pos, end, implicit)
        else:
            pos += length
    raise ValueError("sequence without delimiter")


def _walk_items(buf, read_item):
    """Yields ``read_item(buf, start, stop)[0]`` for each item of a sequence value's bytes.

    ``read_item`` returns ``(value, position after the item)``; the position is used for items
    of undefined length (which end at their delimiter), ignored for the others.
    """
    pos, end = 0, len(buf)
    while pos + 8 <= end:
        group, elem, length = _TAG_LEN.unpack_from(buf, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQUENCE_END:
            return
        if tag != _ITEM:
            raise ValueError("malformed sequence item")
        if length == _UNDEFINED:
            value, pos = read_item(buf, pos, end)
        else:
            value, _ = read_item(buf, pos, pos + length)
            pos += length
        yield value


def _items(value, implicit: bool) -> list[dict]:
    """Items of a sequence value: raw bytes, or a sequence pydicom already parsed."""
    if value is None:
        return []
    if not isinstance(value, (bytes, bytearray, memoryview)):  # pydicom Sequence of Datasets.
        return [{tag: ds.get_item(tag).value for tag in ds.keys()} for ds in value]
    return list(_walk_items(memoryview(value), lambda b, p, e: _dataset(b, p, e, implicit)))


def _first(items: dict, tag: int, implicit: bool) -> dict:
    """The first item of the sequence ``tag`` of ``items`` ({} when absent)."""
    value = items.get(tag)
    if value is None:
        return {}
    inner = _items(value, implicit)
    return inner[0] if inner else {}


def text(value) -> str | None:
    """A string-VR value (raw bytes or pydicom's converted value) as text; None if absent."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("latin-1").strip(" \x00")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def numbers(value) -> list | None:
    """A DS/IS value as floats; None if absent or empty."""
    s = text(value)
    if not s:
        return None
    return [float(v) for v in s.split("\\")]


def _number(value) -> float | None:
    try:
        values = numbers(value)
    except ValueError:
        return None
    return values[0] if values else None


def _uls(value) -> tuple | None:
    """An UL value (one or several) as ints; None if absent."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        return struct.unpack(f"<{len(raw) // 4}I", raw[: len(raw) // 4 * 4]) or None
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value) or None


def _double(value) -> float | None:
    """An FD value; None if absent."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        return struct.unpack_from("<d", raw)[0] if len(raw) >= 8 else None
    if isinstance(value, (list, tuple)):
        return float(value[0]) if value else None
    return float(value)


class SharedHeader(NamedTuple):
    """Shared functional groups and object-level facts of one multi-frame object."""

    iop: list | None
    pixel_spacing: list | None
    slope: float | None
    intercept: float | None
    frame_type: str | None
    sequence: tuple  # (scanning sequence, TR, TE, flip) as found (`dicom_phases._sequence_key`).
    temporal_dimension: int | None  # Index into DimensionIndexValues, or None.


def element_value(ds, tag):
    """The value of ``tag`` in ``ds`` (None when absent), as read: raw bytes for a sequence
    pydicom has not parsed. A value larger than the reader's ``defer_size`` is read from the
    file as raw bytes too, not parsed into pydicom Datasets (which the fast path cannot read
    and which costs far more)."""
    elem = ds.get_item(tag, keep_deferred=True)
    if elem is None:
        return None
    if elem.value is None and isinstance(ds.filename, str) and elem.length != 0xFFFFFFFF:
        with open(ds.filename, "rb") as f:
            f.seek(elem.value_tell)
            data = f.read(elem.length)
        if len(data) == elem.length:
            return data
    return ds.get_item(tag).value


def shared_header(ds, implicit: bool) -> SharedHeader:
    """Reads the shared functional groups and the temporal dimension of ``ds``."""
    shared = _items(element_value(ds, T_SHARED_GROUPS), implicit)
    shared = shared[0] if shared else {}
    orientation = _first(shared, _T_PLANE_ORIENTATION, implicit)
    measures = _first(shared, _T_PIXEL_MEASURES, implicit)
    rescale = _first(shared, _T_PIXEL_VALUE_TRANSFORMATION, implicit)
    timing = _first(shared, _T_MR_TIMING, implicit)
    echo = _first(shared, _T_MR_ECHO, implicit)
    unassigned = _first(shared, _T_UNASSIGNED_SHARED, implicit)
    frame_type = text(_first(shared, _T_FRAME_TYPE_SEQ, implicit).get(_T_FRAME_TYPE))
    echo_time = _double(echo.get(_T_EFFECTIVE_TE))
    sequence = (
        text(unassigned.get(_T_SCANNING_SEQUENCE)),
        _number(timing.get(_T_TR, unassigned.get(_T_TR))),
        echo_time,
        _number(timing.get(_T_FLIP, unassigned.get(_T_FLIP))),
    )
    temporal_dimension = None
    dims = _items(element_value(ds, T_DIMENSION_INDEX), implicit)
    for k, dim in enumerate(dims):
        pointer = dim.get(_T_DIMENSION_INDEX_POINTER)
        if isinstance(pointer, (bytes, bytearray, memoryview)):
            raw = bytes(pointer)
            pointer = struct.unpack_from("<HH", raw) if len(raw) >= 4 else None
            pointer = None if pointer is None else pointer[0] << 16 | pointer[1]
        elif isinstance(pointer, (list, tuple)):
            pointer = int(pointer[0]) if pointer else None
        if pointer is not None and int(pointer) in TEMPORAL_POINTERS:
            temporal_dimension = k
            break
    return SharedHeader(
        iop=numbers(orientation.get(_T_IOP)),
        pixel_spacing=numbers(measures.get(_T_PIXEL_SPACING)),
        slope=_number(rescale.get(_T_SLOPE)),
        intercept=_number(rescale.get(_T_INTERCEPT)),
        frame_type=frame_type,
        sequence=sequence,
        temporal_dimension=temporal_dimension,
    )


# Sequences entered while collecting a frame's values, and the values collected (their tags
# are distinct across these groups, so one flat dict per frame holds them).
_FRAME_SEQUENCES = frozenset(
    {
        _T_FRAME_CONTENT,
        _T_PLANE_POSITION,
        _T_PLANE_ORIENTATION,
        _T_PIXEL_MEASURES,
        _T_PIXEL_VALUE_TRANSFORMATION,
        _T_FRAME_TYPE_SEQ,
    }
)
_FRAME_VALUES = frozenset(
    {
        _T_IPP,
        _T_IOP,
        _T_PIXEL_SPACING,
        _T_SLOPE,
        _T_INTERCEPT,
        _T_TEMPORAL_POSITION_INDEX,
        _T_FRAME_ACQ_DATETIME,
        _T_DIMENSION_INDEX_VALUES,
        _T_FRAME_TYPE,
    }
)


def _collect(buf: bytes, pos: int, end: int, implicit: bool, out: dict) -> int:
    """Collects `_FRAME_VALUES` of one item into ``out``, entering `_FRAME_SEQUENCES`.

    Walks ``buf[pos:end]`` (or up to an item delimiter); returns the position after it.
    Everything else is skipped by its length, so the cost is a few element headers per frame.
    """
    unpack_from = _TAG_LEN.unpack_from
    u32 = _U32.unpack_from
    while pos < end:
        group, elem, length = unpack_from(buf, pos)
        tag = group << 16 | elem
        if tag == _ITEM_END:
            return pos + 8
        if implicit:
            pos += 8
        elif buf[pos + 4 : pos + 6] in _LONG_VRS:
            length = u32(buf, pos + 8)[0]
            pos += 12
        else:
            length = buf[pos + 6] | buf[pos + 7] << 8
            pos += 8
        if tag in _FRAME_SEQUENCES:
            stop = end if length == _UNDEFINED else pos + length
            while pos < stop:  # Its items, into the same dict: values found first win.
                g, e, item_length = unpack_from(buf, pos)
                item = g << 16 | e
                pos += 8
                if item == _SEQUENCE_END:
                    break
                if item != _ITEM:
                    raise ValueError("malformed sequence item")
                pos = _collect(
                    buf,
                    pos,
                    stop if item_length == _UNDEFINED else pos + item_length,
                    implicit,
                    out,
                )
            if length != _UNDEFINED:
                pos = stop
        elif length == _UNDEFINED:
            pos = _skip_sequence(buf, pos, end, implicit)
        else:
            if tag in _FRAME_VALUES and tag not in out:
                out[tag] = buf[pos : pos + length]
            pos += length
    return pos


def _frame_values(value, implicit: bool) -> list[dict]:
    """Per frame, the `_FRAME_VALUES` found in its functional groups (tag -> raw value)."""
    if value is None:
        return []
    if not isinstance(value, (bytes, bytearray, memoryview)):
        # pydicom parsed the sequence (undefined length): walk each item's own elements.
        out = []
        for ds in value:
            found = {}
            for tag in ds.keys():
                v = ds.get_item(tag).value
                if tag in _FRAME_SEQUENCES:
                    for item in _items(v, implicit):
                        for k, x in item.items():
                            if k in _FRAME_VALUES:
                                found.setdefault(k, x)
            out.append(found)
        return out

    def read_item(buf, start, stop):
        found = {}
        return found, _collect(buf, start, stop, implicit, found)

    return list(_walk_items(bytes(value), read_item))


# Explicit VR of each collected value, and the functional group sequence it belongs to.
_VALUE_VR = {
    _T_IPP: b"DS",
    _T_IOP: b"DS",
    _T_PIXEL_SPACING: b"DS",
    _T_SLOPE: b"DS",
    _T_INTERCEPT: b"DS",
    _T_TEMPORAL_POSITION_INDEX: b"UL",
    _T_FRAME_ACQ_DATETIME: b"DT",
    _T_DIMENSION_INDEX_VALUES: b"UL",
    _T_FRAME_TYPE: b"CS",
}
_PARENT = {
    _T_IPP: _T_PLANE_POSITION,
    _T_IOP: _T_PLANE_ORIENTATION,
    _T_PIXEL_SPACING: _T_PIXEL_MEASURES,
    _T_SLOPE: _T_PIXEL_VALUE_TRANSFORMATION,
    _T_INTERCEPT: _T_PIXEL_VALUE_TRANSFORMATION,
    _T_TEMPORAL_POSITION_INDEX: _T_FRAME_CONTENT,
    _T_FRAME_ACQ_DATETIME: _T_FRAME_CONTENT,
    _T_DIMENSION_INDEX_VALUES: _T_FRAME_CONTENT,
    _T_FRAME_TYPE: _T_FRAME_TYPE_SEQ,
}


# Tag -> explicit VR (as the little-endian uint16 of its two letters) of every header sought.
_SOUGHT = {t: vr for t, vr in _VALUE_VR.items()}
_SOUGHT.update({t: b"SQ" for t in _FRAME_SEQUENCES})
_SOUGHT_TAGS = np.asarray(sorted(_SOUGHT), np.uint32)
_SOUGHT_VRS = np.asarray([struct.unpack("<H", _SOUGHT[t])[0] for t in sorted(_SOUGHT)], np.uint16)


def _frame_columns_fast(buf: bytes) -> dict | None:
    """Per value tag, the raw value of each frame, found by header bytes; or None.

    Explicit VR little endian with defined lengths only. The headers (tag and VR) of the
    collected values and their sequences are found at once with numpy, then a value is
    accepted only inside a sequence of its functional group, inside one frame's item, once
    per frame, and present in every frame; the first and last frames must read the same
    element by element. Whatever does not fit (undefined lengths, a value in two places or
    missing in some frames, a header-like value) gives None, and `_collect` walks every item
    instead. The same values as that walk, with a fraction of its Python work per frame.
    """
    items = []  # (start, end) of each frame's item.
    pos, end = 0, len(buf)
    unpack_from = _TAG_LEN.unpack_from
    while pos + 8 <= end:
        group, elem, length = unpack_from(buf, pos)
        if (group << 16 | elem) != _ITEM or length == _UNDEFINED:
            return None
        items.append((pos + 8, pos + 8 + length))
        pos += 8 + length
    if pos != end or not items:
        return None
    if len(buf) % 2 or len(buf) < 12:
        return None
    # Element headers start at even offsets (DICOM values have even lengths): compare every
    # even position's (group, element, VR) with the sought ones, all at once.
    words = np.frombuffer(buf, "<u2")
    tag_at = words[:-3].astype(np.uint32) << 16 | words[1:-2]
    where = np.flatnonzero(np.isin(tag_at, _SOUGHT_TAGS))
    slot = np.searchsorted(_SOUGHT_TAGS, tag_at[where])
    keep = words[where + 2] == _SOUGHT_VRS[slot]
    where, slot = where[keep], slot[keep]
    if where.size and int(where[-1]) * 2 + 12 > len(buf):
        return None
    tags = _SOUGHT_TAGS[slot].tolist()
    short = words[where + 3].tolist()  # Length of a value (2 bytes after its VR).
    long = (words[where + 4].astype(np.int64) | words[where + 5].astype(np.int64) << 16).tolist()
    starts = (where * 2).tolist()
    # One pass in file order: a value belongs to the sequence whose header came last, which
    # must be its functional group and must enclose it, inside one frame's item.
    n = len(items)
    columns = {tag: [None] * n for tag in _PARENT}
    seen_groups = set()
    frame, frame_end = -1, -1
    parent, parent_end = None, -1
    for start, tag, length, value_length in zip(starts, tags, long, short):
        while start >= frame_end:
            frame += 1
            if frame >= n:
                return None
            frame_end = items[frame][1]
            parent, parent_end = None, -1
        if start < items[frame][0]:
            return None
        if tag in _FRAME_SEQUENCES:
            end = start + 12 + length
            if length == _UNDEFINED or end > frame_end or (frame, tag) in seen_groups:
                return None
            seen_groups.add((frame, tag))
            parent, parent_end = tag, end
            continue
        value_start = start + 8
        value_end = value_start + value_length
        column = columns[tag]
        if _PARENT[tag] != parent or value_end > parent_end or column[frame] is not None:
            return None
        column[frame] = buf[value_start:value_end]
    # Frames of one object carry the same groups: a value some frames lack, or a first or
    # last frame that an element-by-element walk reads otherwise, means an unusual layout.
    missing = {tag: column.count(None) for tag, column in columns.items()}
    if any(0 < k < n for k in missing.values()):
        return None
    columns = {tag: column for tag, column in columns.items() if missing[tag] == 0}
    for f in {0, len(items) - 1}:
        walked = {}
        _collect(buf, items[f][0], items[f][1], False, walked)
        if walked != {tag: column[f] for tag, column in columns.items()}:
            return None
    columns[None] = len(items)
    return columns


def _frame_columns(value, implicit: bool) -> dict:
    """Per value tag, the raw value of each frame (None where absent); ``[None]``: frames."""
    if isinstance(value, (bytes, bytearray, memoryview)) and not implicit:
        columns = _frame_columns_fast(bytes(value))
        if columns is not None:
            return columns
    frames = _frame_values(value, implicit)
    columns = {tag: [v.get(tag) for v in frames] for tag in _FRAME_VALUES}
    columns[None] = len(frames)
    return columns


def _vector(values: list, width: int) -> np.ndarray | None:
    """DS values of every frame as a ``(frames, width)`` float64 array (one parse for all).

    None if any frame lacks the value; ``ValueError`` if one is malformed.
    """
    if any(v is None for v in values):
        return None
    if values and all(isinstance(v, (bytes, bytearray, memoryview)) for v in values):
        parts = b"\\".join(bytes(v) for v in values).split(b"\\")
    else:
        parts = [x for v in values for x in text(v).split("\\")]
    if len(parts) != width * len(values):
        raise ValueError(f"expected {width} numbers per frame")
    return np.asarray(parts, dtype=np.float64).reshape(len(values), width)


class _LazyValues:
    """UL values per frame, decoded when first indexed (most objects never need them)."""

    def __init__(self, raw: list):
        self._raw = raw
        self._decoded = None

    def __len__(self):
        return len(self._raw)

    def __getitem__(self, i):
        if self._decoded is None:
            self._decoded = [_uls(v) for v in self._raw]
        return self._decoded[i]


class Frames(NamedTuple):
    """Per-frame headers of one object, one row per frame (frame order).

    ``iop``, ``pixel_spacing`` and the rescale already fall back to the shared functional
    groups (the frame's own value wins); a column is None where neither says.
    """

    ipp: np.ndarray | None  # (F, 3)
    iop: np.ndarray | None  # (F, 6)
    pixel_spacing: np.ndarray | None  # (F, 2)
    slope: np.ndarray  # (F,)
    intercept: np.ndarray  # (F,)
    temporal_index: list  # int or None per frame
    acquisition_datetime: list  # DT text or None per frame
    dimension_values: Sequence  # tuple of ints or None per frame
    frame_type: list  # ImageType-like text or None per frame

    def __len__(self):
        return len(self.slope)


def _with_shared(columns: dict, tag: int, shared, width: int):
    """Per-frame values of ``tag`` with the shared value for frames that lack their own."""
    n = columns[None]
    own = columns.get(tag) or [None] * n
    if all(v is None for v in own):
        if shared is None:
            return None
        return np.tile(np.asarray(shared, np.float64)[:width], (n, 1))
    if shared is not None:
        fill = "\\".join(str(x) for x in shared)
        own = [fill if v is None else v for v in own]
    return _vector(own, width)


def frame_headers(ds, shared: SharedHeader, implicit: bool) -> Frames:
    """The per-frame headers of ``PerFrameFunctionalGroupsSequence`` (frame order).

    Raises:
      ValueError: malformed functional groups.
    """
    columns = _frame_columns(element_value(ds, T_PER_FRAME_GROUPS), implicit)
    n = columns[None]

    def column(tag):
        return columns.get(tag) or [None] * n

    slope = _with_shared(columns, _T_SLOPE, None if shared.slope is None else [shared.slope], 1)
    intercept = _with_shared(
        columns, _T_INTERCEPT, None if shared.intercept is None else [shared.intercept], 1
    )
    raw_tpis = column(_T_TEMPORAL_POSITION_INDEX)
    if raw_tpis and all(isinstance(t, bytes) and len(t) == 4 for t in raw_tpis):
        temporal_index = np.frombuffer(b"".join(raw_tpis), "<u4").tolist()  # One call for all.
    else:
        temporal_index = [t[0] if t else None for t in map(_uls, raw_tpis)]
    return Frames(
        ipp=_vector(column(_T_IPP), 3),
        iop=_with_shared(columns, _T_IOP, shared.iop, 6),
        pixel_spacing=_with_shared(columns, _T_PIXEL_SPACING, shared.pixel_spacing, 2),
        slope=np.ones(n) if slope is None else slope[:, 0],
        intercept=np.zeros(n) if intercept is None else intercept[:, 0],
        temporal_index=temporal_index,
        acquisition_datetime=[text(v) or None for v in column(_T_FRAME_ACQ_DATETIME)],
        dimension_values=_LazyValues(column(_T_DIMENSION_INDEX_VALUES)),
        frame_type=[shared.frame_type if v is None else text(v) for v in column(_T_FRAME_TYPE)],
    )
