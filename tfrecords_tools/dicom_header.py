"""Shared types of the DICOM reader and raw header access.

``ExamError`` and ``ReaderOptions`` (re-exported by `dicom_reader`), the per-image record
``Image``, the ``Seen`` counts behind the "no DCE series" reasons, the header tags the reader
parses (``READ_TAGS``) and cheap accessors of their raw values (``text``, ``us``, ``number``,
``numbers``), and DICOM date/time parsing. The lowest of the ``dicom_*`` reader modules: it
imports none of them.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime

import numpy as np
import pydicom

from tfrecords_tools import dicom_multiframe


class ExamError(Exception):
    """An exam folder cannot be turned into canonical volumes.

    Attributes:
      exam: str. The exam folder as given to ``load_exam``.
      reason: str. What is wrong, free of header text and file names (safe to log).
      file: str or None. The file (relative to the exam folder) to blame, if one is.
    """

    def __init__(self, exam: str, reason: str, file: str | None = None):
        self.exam = str(exam)
        self.reason = reason
        self.file = file
        msg = f"exam {self.exam}: {reason}"
        if file:
            msg += f" (file {file})"
        super().__init__(msg)

    def __reduce__(self):  # Keeps the attributes across process boundaries.
        return (ExamError, (self.exam, self.reason, self.file))


@dataclasses.dataclass(frozen=True)
class ReaderOptions:
    """Tolerances of the reader.

    Attributes:
      max_obliquity_deg: float. Largest angle between an image axis and the nearest patient
        axis that is still reoriented by permutation/flip; beyond it the exam is rejected.
      min_slices: int. Series with fewer images are ignored (localizers, single-slice scouts).
      spacing_tolerance: float. Relative deviation of a slice gap from the median gap that is
        still "uniform".
      require_patient_id: bool. Reject exams without a PatientID. The converter needs one
        (patient-level splits); prediction on an anonymised exam does not. Defaults to True.
    """

    max_obliquity_deg: float = 15.0
    min_slices: int = 2
    spacing_tolerance: float = 0.05
    require_patient_id: bool = True


@dataclasses.dataclass
class Image:
    """One image file: the dataset plus the header fields the reader needs, parsed once."""

    ds: pydicom.Dataset
    file: str  # Relative to the exam folder.
    iop: np.ndarray  # (6,)
    ipp: np.ndarray  # (3,)
    series_uid: str
    sop_uid: str
    temporal_position: object  # int or None
    acquisition_number: object
    trigger_time: object  # float ms or None
    acq_time: object  # datetime or None
    series_number: object
    rows: int
    cols: int
    pixel_spacing: tuple
    sequence: tuple
    slope: float
    intercept: float
    patient_id: str
    # Multi-frame objects: the frame of ``ds`` this image is, and a dict shared by the
    # object's frames that caches its decoded pixels (decoded once per file).
    frame: object = None  # int or None
    frames_cache: object = None  # dict or None


@dataclasses.dataclass
class Seen:
    """What an exam folder held, for reasons that tell the user why nothing was read."""

    series: set = dataclasses.field(default_factory=set)
    original: int = 0  # Original images (frames of multi-frame objects count one each).
    derived: int = 0
    localizer: int = 0
    other_classes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    not_dicom: int = 0

    def summary(self) -> str:
        """Counts only, never header text: safe for logs."""
        other = sum(self.other_classes.values())
        names = ", ".join(f"{n} {name}" for name, n in sorted(self.other_classes.items()))
        return (
            f"the folder holds {_plural(len(self.series), 'series', 'series')}: "
            f"{_plural(self.original, 'original image')}; "
            f"{_plural(self.derived, 'image')} skipped as DERIVED (ImageType); "
            f"{_plural(self.localizer, 'image')} skipped as localizer; "
            f"{_plural(other, 'object')} of other SOP classes"
            + (f" ({names})" if names else "")
            + f"; {_plural(self.not_dicom, 'non-DICOM or unreadable file')}"
        )


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


# ImageType values marking images that are not an original acquisition of a DCE phase.
_DERIVED_MARKERS = frozenset(
    {"DERIVED", "SUBTRACTION", "SUB", "MIP", "MPR", "PROJECTION IMAGE", "REFORMATTED", "MOCO"}
)
_LOCALIZER_MARKERS = frozenset({"LOCALIZER", "SCOUT", "SURVEY"})


# Header access goes through the raw element bytes of text VRs (DS, IS, CS, UI, DA, TM, LO):
# parsing them directly is several times cheaper than pydicom's validated value conversion,
# and the header work is most of the reader's cost beyond the file read itself.
T_IMAGE_TYPE = 0x00080008
T_SOP_CLASS_UID = 0x00080016
T_SOP_INSTANCE_UID = 0x00080018
T_ACQ_DATETIME = 0x0008002A
T_ECHO_PULSE_SEQUENCE = 0x00189008
T_SHARED_GROUPS = dicom_multiframe.T_SHARED_GROUPS
T_PER_FRAME_GROUPS = dicom_multiframe.T_PER_FRAME_GROUPS
T_DIMENSION_INDEX = dicom_multiframe.T_DIMENSION_INDEX
T_ACQ_DATE, T_ACQ_TIME = 0x00080022, 0x00080032
T_CONTENT_DATE, T_CONTENT_TIME = 0x00080023, 0x00080033
T_SERIES_DATE, T_SERIES_TIME = 0x00080021, 0x00080031
T_STUDY_DATE = 0x00080020
T_PATIENT_ID = 0x00100020
T_SCANNING_SEQUENCE = 0x00180020
T_TR, T_TE, T_FLIP = 0x00180080, 0x00180081, 0x00181314
T_TRIGGER_TIME = 0x00181060
T_SERIES_UID = 0x0020000E
T_SERIES_NUMBER, T_ACQ_NUMBER = 0x00200011, 0x00200012
T_IPP, T_IOP = 0x00200032, 0x00200037
T_TEMPORAL_POSITION = 0x00200100
T_PIXEL_SPACING = 0x00280030
T_SLOPE, T_INTERCEPT = 0x00281053, 0x00281052
T_PIXEL_DATA = 0x7FE00010
T_SAMPLES_PER_PIXEL, T_NUMBER_OF_FRAMES = 0x00280002, 0x00280008
T_ROWS, T_COLUMNS = 0x00280010, 0x00280011
T_BITS_ALLOCATED, T_BITS_STORED = 0x00280100, 0x00280101
T_PIXEL_REPRESENTATION = 0x00280103
T_PHOTOMETRIC = 0x00280004


# Only these elements are parsed from each file (the others are skipped over): the header
# fields above plus what pydicom's decoders need for compressed pixel data. A quarter less
# parsing work than reading every element.
READ_TAGS = sorted(
    {v for k, v in list(globals().items()) if k.startswith("T_") and isinstance(v, int)}
    | {
        0x00280006,  # PlanarConfiguration
        0x00280102,  # HighBit
        0x7FE00001,  # ExtendedOffsetTable
        0x7FE00002,  # ExtendedOffsetTableLengths
        0x7FE00008,  # FloatPixelData
        0x7FE00009,  # DoubleFloatPixelData
    }
)


def text(ds, tag) -> str | None:
    """Text of a string-VR element (None when absent), without pydicom's value conversion."""
    elem = ds.get_item(tag)
    if elem is None:
        return None
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1").strip(" \x00")
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def us(ds, tag, default: int = 0) -> int:
    """Value of an unsigned-short element (Rows, BitsAllocated, ...) from its raw bytes."""
    elem = ds.get_item(tag)
    if elem is None:
        return default
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        if len(value) < 2:
            return default
        little = getattr(elem, "is_little_endian", True)
        return int.from_bytes(value[:2], "little" if little else "big")
    if value is None or value == "":
        return default
    return int(value)


def numbers(ds, tag) -> list | None:
    raw = text(ds, tag)
    if raw is None or raw == "":
        return None
    return [float(v) for v in raw.split("\\")]


def number(ds, tag, default=None):
    try:
        values = numbers(ds, tag)
    except ValueError:
        return default
    return values[0] if values else default


# Multi-frame SOP classes read frame by frame (each frame like a single-frame image).
MULTIFRAME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
}


def skip_kind(image_type: str | None) -> str | None:
    """Returns "localizer" or "derived" for an ImageType / FrameType, else None."""
    values = {v.strip().upper() for v in (image_type or "").split("\\")}
    if values & _LOCALIZER_MARKERS:
        return "localizer"
    if values & _DERIVED_MARKERS:
        return "derived"
    return None


def rounded(value):
    return None if value is None else round(value, 2)


def _dicom_datetime(date, time):
    """Parses DA + TM strings into a datetime (None when the time is missing or malformed)."""
    time = (time or "").strip()
    if not time:
        return None
    date = (date or "").strip()[:8] or "19000101"
    hhmmss, _, frac = time.partition(".")
    hhmmss = hhmmss.replace(":", "")
    hhmmss = (hhmmss + "0000")[:6] if len(hhmmss) < 6 else hhmmss[:6]
    try:
        return datetime.datetime(
            int(date[:4]),
            int(date[4:6]),
            int(date[6:8]),
            int(hhmmss[:2]),
            int(hhmmss[2:4]),
            min(int(hhmmss[4:6]), 59),
            int((frac + "000000")[:6]) if frac.isdigit() else 0,
        )
    except ValueError:
        return None


def dicom_datetime_text(text):
    """Parses a DT string (``YYYYMMDDHHMMSS.FFFFFF&ZZXX``) into a datetime, or None."""
    text = (text or "").strip()
    if len(text) < 10:
        return None
    for sign in "+-":
        text = text.split(sign)[0]
    return _dicom_datetime(text[:8], text[8:])


def acquisition_time(ds):
    for date_tag, time_tag in (
        (T_ACQ_DATE, T_ACQ_TIME),
        (T_CONTENT_DATE, T_CONTENT_TIME),
        (T_SERIES_DATE, T_SERIES_TIME),
    ):
        t = _dicom_datetime(text(ds, date_tag) or text(ds, T_STUDY_DATE), text(ds, time_tag))
        if t is not None:
            return t
    return None
