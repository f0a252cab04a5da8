"""Writes synthetic MR series as DICOM files (one file per slice, or multi-frame objects).

Files are Part 10 files (128-byte preamble, ``DICM``, file meta group) in Explicit VR Little
Endian with 16-bit unsigned pixels. For MR Image Storage (one file per slice) the elements a
series shares are encoded once (with pydicom's element writer) and only the per-file elements
are encoded per file, which is several times faster than ``dcmwrite`` per file and gives the
same bytes. Enhanced MR / Legacy Converted Enhanced MR objects (`multiframe_dataset`) are built
as pydicom data sets with functional groups and written with ``dcmwrite``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from tfrecords_tools.synthetic_geometry import SliceStack

_PIXEL_DATA_TAG = 0x7FE00010


def format_ds(value: float) -> str:
    """Formats a number as a DICOM decimal string (at most 6 decimals, no trailing zeros)."""
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def format_time(seconds: float) -> str:
    """Seconds since midnight -> DICOM TM ``HHMMSS.ffffff``."""
    micros = int(round(seconds * 1e6))
    whole, frac = divmod(micros, 1_000_000)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:02d}{minutes:02d}{secs:02d}.{frac:06d}"


@dataclasses.dataclass(frozen=True)
class Frame:
    """One file of a series.

    Attributes:
      stack: SliceStack the pixels and geometry come from.
      index: int. Slice of the stack stored in this file.
      acquisition_time: float. Seconds since midnight.
      extra: dict of further per-file elements (keyword -> value), e.g.
        TemporalPositionIdentifier.
    """

    stack: SliceStack
    index: int
    acquisition_time: float
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _geometry_elements(stack: SliceStack) -> dict[str, Any]:
    rows, cols = stack.pixels.shape[1:]
    return {
        "Rows": int(rows),
        "Columns": int(cols),
        "PixelSpacing": [format_ds(v) for v in stack.pixel_spacing],
        "ImageOrientationPatient": [format_ds(v) for v in stack.orientation],
        "SliceThickness": format_ds(stack.slice_spacing),
        "SpacingBetweenSlices": format_ds(stack.slice_spacing),
    }


def _encode(element: DataElement) -> bytes:
    """One data element encoded as Explicit VR Little Endian."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_data_element(buffer, element)
    return buffer.getvalue()


def _element(keyword: str, value: Any) -> DataElement:
    return DataElement(tag_for_keyword(keyword), dictionary_VR(keyword), value)


@functools.lru_cache(maxsize=1)
def _file_meta_parts() -> tuple[bytes, bytes]:
    """Encoded file meta elements before and after MediaStorageSOPInstanceUID (0002,0003)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    validate_file_meta(meta, enforce_standard=True)  # adds version and implementation UID/name
    before = b"".join(_encode(e) for e in meta if e.tag < 0x00020003 and e.tag != 0x00020000)
    after = b"".join(_encode(e) for e in meta if e.tag > 0x00020003)
    return before, after


def encode_file(
    static: Mapping[int, bytes], dynamic: Mapping[str, Any], pixels: np.ndarray
) -> bytes:
    """A complete Part 10 file: preamble, file meta, then the data set in tag order.

    Byte for byte what ``pydicom.dcmwrite(..., enforce_file_format=True)`` writes for the same
    data set (tests check this), but the elements shared by a series are encoded once.

    Args:
      static: encoded elements shared by the series, tag -> bytes.
      dynamic: per-file elements, keyword -> value; must include SOPInstanceUID.
      pixels: uint16 (rows, cols) pixel array.

    Returns:
      The file's bytes.
    """
    before, after = _file_meta_parts()
    uid = _encode(DataElement(0x00020003, "UI", dynamic["SOPInstanceUID"]))
    meta = before + uid + after
    parts = dict(static)
    for keyword, value in dynamic.items():
        element = _element(keyword, value)
        parts[element.tag] = _encode(element)
    data = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    parts[_PIXEL_DATA_TAG] = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, len(data)) + data
    return b"".join(
        [b"\0" * 128, b"DICM", struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(meta)), meta]
        + [parts[tag] for tag in sorted(parts)]
    )


def static_elements(header: Mapping[str, Any], stack: SliceStack) -> dict[int, bytes]:
    """Encodes the elements shared by the files of one series with one geometry."""
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    for keyword, value in _geometry_elements(stack).items():
        setattr(ds, keyword, value)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return {int(element.tag): _encode(element) for element in ds}


def frame_elements(frame: Frame, uid: str, number: int) -> dict[str, Any]:
    """The per-file elements of one frame (position, instance number, time, UID, extras)."""
    position = frame.stack.positions[frame.index]
    acquisition_time = format_time(frame.acquisition_time)
    elements = {
        "SOPInstanceUID": uid,
        "InstanceNumber": number,
        "ImagePositionPatient": [format_ds(v) for v in position],
        "SliceLocation": format_ds(float(np.dot(position, frame.stack.normal))),
        "AcquisitionTime": acquisition_time,
        "ContentTime": acquisition_time,
    }
    elements.update(frame.extra)
    return elements


def write_series(
    directory: str,
    header: Mapping[str, Any],
    frames: Sequence[Frame],
    file_names: Iterable[str],
    sop_uids: Sequence[str],
) -> list[str]:
    """Writes one series, one file per frame.

    Args:
      directory: str. Folder the files go to (created if missing).
      header: dict keyword -> value of the elements shared by every file (patient, study,
        series, sequence, rescale, ...).
      frames: the files' pixels, geometry and per-file elements, in InstanceNumber order.
      file_names: an iterable yielding one file name per frame.
      sop_uids: SOP Instance UID per frame.

    Returns:
      The paths written.

    Raises:
      FileExistsError: if a file name is already taken.
    """
    if len(sop_uids) != len(frames):
        raise ValueError(f"Got {len(sop_uids)} UIDs for {len(frames)} frames in {directory}")
    os.makedirs(directory, exist_ok=True)
    paths = []
    static_by_stack = {}
    for number, (frame, name, uid) in enumerate(zip(frames, file_names, sop_uids), start=1):
        key = id(frame.stack)
        if key not in static_by_stack:
            static_by_stack[key] = static_elements(header, frame.stack)
        elements = frame_elements(frame, uid, number)
        data = encode_file(static_by_stack[key], elements, frame.stack.pixels[frame.index])
        path = os.path.join(directory, name)
        with open(path, "xb") as f:  # "x": never overwrite a file
            f.write(data)
        paths.append(path)
    return paths


def window(values: np.ndarray) -> tuple[str, str]:
    """WindowCenter / WindowWidth covering the 1st-99.5th percentile of (rescaled) values."""
    low, high = np.percentile(values[:: max(1, values.size // 20000)], [1.0, 99.5])
    return format_ds(round((low + high) / 2.0, 1)), format_ds(round(max(high - low, 1.0), 1))


# Elements of a classic MR header that an Enhanced MR object carries in functional groups (or
# not at all); `multiframe_dataset` moves them there.
_PER_FRAME_KEYWORDS = frozenset(
    {
        "RescaleIntercept",
        "RescaleSlope",
        "RescaleType",
        "WindowCenter",
        "WindowWidth",
        "ScanningSequence",
        "SequenceVariant",
        "ScanOptions",
        "RepetitionTime",
        "EchoTime",
        "FlipAngle",
        "AcquisitionTime",
        "AcquisitionNumber",
        "ImageType",
        "ContentTime",
    }
)


def _item(**elements) -> Dataset:
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def multiframe_dataset(
    header: Mapping[str, Any],
    frames: Sequence[Frame],
    sop_uid: str,
    order: Sequence[int],
    *,
    sop_class: str = EnhancedMRImageStorage,
    temporal: str = "index",
    rescale_per_frame: bool = False,
) -> Dataset:
    """One Enhanced MR (or Legacy Converted Enhanced MR) object holding ``frames``.

    Geometry and rescale go into functional groups as the standard places them: orientation,
    pixel spacing and MR timing shared; position, frame content (and, if asked, rescale) per
    frame. Phases are told by ``FrameContentSequence``, declared in ``DimensionIndexSequence``.

    Args:
      header: dict keyword -> value of a classic MR series header (patient, study, series,
        sequence, RescaleSlope/Intercept, ...); classic per-image elements are moved into
        functional groups.
      frames: the images; ``extra["TemporalPositionIndex"]`` gives a frame's phase (1-based).
        All frames share one orientation and pixel spacing.
      sop_uid: SOP Instance UID of the object.
      order: frame ``n`` of the object is ``frames[order[n]]`` (vendors interleave frames in
        many ways, so tests write them shuffled).
      sop_class: Enhanced MR Image Storage or Legacy Converted Enhanced MR Image Storage.
        Defaults to Enhanced MR Image Storage.
      temporal: "index" (TemporalPositionIndex, declared as a dimension) or "datetime"
        (phases told only by FrameAcquisitionDateTime, declared as a dimension). Defaults to
        "index".
      rescale_per_frame: bool. Rescale in each frame's functional groups instead of the shared
        ones. Defaults to False.

    Returns:
      The data set, with file meta (Explicit VR Little Endian, 16-bit unsigned pixels).
    """
    if temporal not in ("index", "datetime"):
        raise ValueError(f"temporal must be 'index' or 'datetime'. Received: {temporal!r}")
    stack = frames[0].stack
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword, value in header.items():
        if keyword not in _PER_FRAME_KEYWORDS:
            setattr(ds, keyword, value)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = 1
    image_type = list(header.get("ImageType", ["ORIGINAL", "PRIMARY", "M", "ND"]))
    ds.ImageType = image_type[:2] + ["VOLUME", "NONE"]
    date = str(header.get("AcquisitionDate", header.get("StudyDate", "19000101")))
    first = min(f.acquisition_time for f in frames)
    ds.AcquisitionDateTime = date + format_time(first)
    ds.ContentTime = format_time(first)
    ds.EchoPulseSequence = "GRADIENT"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "T1"
    ds.NumberOfFrames = len(frames)
    rows, cols = stack.pixels.shape[1:]
    ds.Rows, ds.Columns = int(rows), int(cols)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0

    rescale = _item(
        RescaleIntercept=header.get("RescaleIntercept", "0"),
        RescaleSlope=header.get("RescaleSlope", "1"),
        RescaleType=header.get("RescaleType", "US"),
    )
    shared = _item(
        PixelMeasuresSequence=[
            _item(
                PixelSpacing=[format_ds(v) for v in stack.pixel_spacing],
                SliceThickness=format_ds(stack.slice_spacing),
                SpacingBetweenSlices=format_ds(stack.slice_spacing),
            )
        ],
        PlaneOrientationSequence=[
            _item(ImageOrientationPatient=[format_ds(v) for v in stack.orientation])
        ],
        MRImageFrameTypeSequence=[_item(FrameType=list(ds.ImageType))],
    )
    if "RepetitionTime" in header:
        shared.MRTimingAndRelatedParametersSequence = [
            _item(
                RepetitionTime=header["RepetitionTime"],
                FlipAngle=header.get("FlipAngle", "0"),
            )
        ]
    if "EchoTime" in header:
        shared.MREchoSequence = [_item(EffectiveEchoTime=float(header["EchoTime"]))]
    if "WindowCenter" in header:
        shared.FrameVOILUTSequence = [
            _item(WindowCenter=header["WindowCenter"], WindowWidth=header["WindowWidth"])
        ]
    if not rescale_per_frame:
        shared.PixelValueTransformationSequence = [rescale]
    ds.SharedFunctionalGroupsSequence = [shared]

    organisation = generate_uid(entropy_srcs=[sop_uid, "dimensions"])
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=organisation)]
    temporal_tag = "TemporalPositionIndex" if temporal == "index" else "FrameAcquisitionDateTime"
    ds.DimensionIndexSequence = [
        _item(
            DimensionOrganizationUID=organisation,
            DimensionIndexPointer=tag_for_keyword("InStackPositionNumber"),
            FunctionalGroupPointer=tag_for_keyword("FrameContentSequence"),
            DimensionDescriptionLabel="In-Stack Position",
        ),
        _item(
            DimensionOrganizationUID=organisation,
            DimensionIndexPointer=tag_for_keyword(temporal_tag),
            FunctionalGroupPointer=tag_for_keyword("FrameContentSequence"),
            DimensionDescriptionLabel="Temporal Position",
        ),
    ]
    per_frame = []
    for n in order:
        frame = frames[n]
        phase = int(frame.extra["TemporalPositionIndex"])
        content = _item(
            StackID="1",
            InStackPositionNumber=frame.index + 1,
            FrameAcquisitionDateTime=date + format_time(frame.acquisition_time),
            FrameReferenceDateTime=date + format_time(frame.acquisition_time),
            FrameAcquisitionDuration=60000.0,
            DimensionIndexValues=[frame.index + 1, phase],
        )
        if temporal == "index":
            content.TemporalPositionIndex = phase
        groups = _item(
            FrameContentSequence=[content],
            PlanePositionSequence=[
                _item(
                    ImagePositionPatient=[format_ds(v) for v in frame.stack.positions[frame.index]]
                )
            ],
        )
        if rescale_per_frame:
            groups.PixelValueTransformationSequence = [copy.deepcopy(rescale)]
        per_frame.append(groups)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    pixels = np.stack([frames[n].stack.pixels[frames[n].index] for n in order])
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds


def write_multiframe(path: str, ds: Dataset) -> str:
    """Writes a data set from `multiframe_dataset` as a Part 10 file (never overwriting)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "xb") as f:
        ds.save_as(f, enforce_file_format=True)
    return path
