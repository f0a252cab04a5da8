"""Files of an exam folder -> candidate images (``dicom_header.Image``), each read once.

Lists the folder (``list_files``), recognises DICOM files written without a preamble, reads
each file's header (large values deferred), drops non-images, derived images, localizers and
exact copies (counting them in ``Seen``) and parses the header fields the reader needs;
multi-frame objects are parsed frame by frame by `dicom_frames`.
"""

from __future__ import annotations

import os

import numpy as np
import pydicom
import pydicom.errors

from tfrecords_tools.dicom_frames import parse_frames
from tfrecords_tools.dicom_header import (
    MULTIFRAME_SOP_CLASSES,
    READ_TAGS,
    T_ACQ_NUMBER,
    T_COLUMNS,
    T_FLIP,
    T_IMAGE_TYPE,
    T_INTERCEPT,
    T_IOP,
    T_IPP,
    T_NUMBER_OF_FRAMES,
    T_PATIENT_ID,
    T_PER_FRAME_GROUPS,
    T_PIXEL_DATA,
    T_PIXEL_SPACING,
    T_ROWS,
    T_SCANNING_SEQUENCE,
    T_SERIES_NUMBER,
    T_SERIES_UID,
    T_SLOPE,
    T_SOP_CLASS_UID,
    T_SOP_INSTANCE_UID,
    T_TE,
    T_TEMPORAL_POSITION,
    T_TR,
    T_TRIGGER_TIME,
    ExamError,
    Image,
    Seen,
    acquisition_time,
    number,
    numbers,
    rounded,
    skip_kind,
    text,
    us,
)

# Values larger than this (the pixel data of multi-frame objects; single frames up to
# 512 x 512 x 16 bits stay below it) are not read with the header: pixels are read only for
# the series chosen as the exam's phases, uncompressed ones mapped from the file rather than
# copied (`dicom_pixels._pixel_bytes`). A header element this large (the functional groups of
# thousands of frames) is read raw when needed (`dicom_multiframe.element_value`).
_DEFER_BYTES = 1 << 20


def list_files(exam_dir: str) -> list:
    """All files below ``exam_dir``, relative paths in sorted order (deterministic).

    Symbolic links to folders are followed (archives link series in from elsewhere); a folder
    reached twice (a link loop or two links to one folder) is listed once.
    """
    out = []
    seen = set()
    for root, dirs, files in os.walk(exam_dir, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in sorted(files):
            out.append(os.path.relpath(os.path.join(root, name), exam_dir))
    return out


def looks_like_bare_dicom(path: str) -> bool:
    """A DICOM data set written without the 128-byte preamble and "DICM" (older exports).

    Such files start with an element of group 0002 (file meta) or 0008 (identification), in
    little-endian, with an explicit VR of two capital letters or an implicit 4-byte length.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return head_is_bare_dicom(head)


def head_is_bare_dicom(head: bytes) -> bool:
    """``looks_like_bare_dicom`` of a file's first 8 (or more) bytes."""
    if len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    return head[4:6].isalpha() and head[4:6].isupper() or head[6:8] == b"\x00\x00"


def _sop_class_name(ds) -> str:
    """Name of the object's SOP class (a standard name, never header text), for `Seen`."""
    uid = pydicom.uid.UID(text(ds, T_SOP_CLASS_UID) or "")
    if not uid:
        return "no SOP class"
    name = uid.name
    return name if name != str(uid) else "unknown SOP class"


def read_images(exam_dir: str, seen: Seen | None = None) -> list:
    """Reads every file once; returns the candidate images (and counts all in ``seen``)."""
    seen = Seen() if seen is None else seen
    images = []
    sop_uids = set()
    for rel in list_files(exam_dir):
        path = os.path.join(exam_dir, rel)
        if not os.path.isfile(path):
            continue  # A dangling link, a socket, ...: not an image.
        try:
            ds = pydicom.dcmread(path, specific_tags=READ_TAGS, defer_size=_DEFER_BYTES)
        except pydicom.errors.InvalidDicomError:
            if not looks_like_bare_dicom(path):
                seen.not_dicom += 1
                continue  # Not DICOM (notes, DICOMDIR without preamble, ...).
            try:
                ds = pydicom.dcmread(
                    path, specific_tags=READ_TAGS, defer_size=_DEFER_BYTES, force=True
                )
            except Exception as e:  # noqa: BLE001
                raise ExamError(
                    exam_dir, f"unreadable DICOM header ({type(e).__name__})", rel
                ) from None
        except Exception as e:  # noqa: BLE001 - a DICOM file whose header cannot be parsed.
            raise ExamError(
                exam_dir, f"unreadable DICOM header ({type(e).__name__})", rel
            ) from None
        seen.series.add(text(ds, T_SERIES_UID) or "")
        tags = ds.keys()  # Membership by int tag: cheaper than ``tag in ds``.
        if (
            T_PER_FRAME_GROUPS in tags
            and T_PIXEL_DATA in tags
            and (text(ds, T_SOP_CLASS_UID) or "") in MULTIFRAME_SOP_CLASSES
        ):
            parsed = parse_frames(exam_dir, rel, ds, seen)
            # A copy of a multi-frame object (same UID, frames, positions and phases) counts
            # once; decided once for the object rather than per frame.
            sop_uid = text(ds, T_SOP_INSTANCE_UID) or ""
            key = (
                sop_uid,
                text(ds, T_SERIES_UID),
                len(parsed),
                np.round(np.asarray([im.ipp for im in parsed]), 2).tobytes(),
                tuple(im.temporal_position for im in parsed),
            )
            if sop_uid and key in sop_uids:
                continue
            sop_uids.add(key)
            images.extend(parsed)
            continue
        elif (
            T_PIXEL_DATA not in tags
            or T_IPP not in tags
            or (T_NUMBER_OF_FRAMES in tags and int(number(ds, T_NUMBER_OF_FRAMES, 1) or 1) > 1)
        ):  # Reports, presentation states, DICOMDIR, secondary captures, other multi-frames.
            seen.other_classes[_sop_class_name(ds)] += 1
            continue
        else:
            kind = skip_kind(text(ds, T_IMAGE_TYPE))
            if kind:
                setattr(seen, kind, getattr(seen, kind) + 1)
                continue
            parsed = [_parse_image(exam_dir, rel, ds, checked=True)]
            seen.original += 1
        image = parsed[0]
        # The same image twice (a file copied into the folder, a series exported twice): one
        # SOPInstanceUID at one position and time of one series is one image, so later copies
        # are dropped (file order is sorted). Position and time keep apart the images of
        # anonymisers that reuse one UID for several images.
        if image.sop_uid:
            key = (
                image.sop_uid,
                image.series_uid,
                image.temporal_position,
                tuple(np.round(image.ipp, 2)),
                image.acquisition_number,
                image.trigger_time,
                image.acq_time,
            )
            if key in sop_uids:
                continue
            sop_uids.add(key)
        images.append(image)
    return images


def _parse_image(exam_dir: str, rel: str, ds, checked: bool = False) -> Image | None:
    """Parses the header fields of one dataset; None for files that are not DCE candidates.

    ``checked``: the caller already made sure it is an original image with a position.
    """
    if not checked and (
        T_PIXEL_DATA not in ds or T_IPP not in ds or skip_kind(text(ds, T_IMAGE_TYPE))
    ):
        return None  # Structured reports, presentation states, DICOMDIR, derived, ...
    try:
        iop = np.asarray(numbers(ds, T_IOP), np.float64)
        ipp = np.asarray(numbers(ds, T_IPP), np.float64)
        pixel_spacing = tuple(numbers(ds, T_PIXEL_SPACING) or ())
    except (TypeError, ValueError):
        raise ExamError(exam_dir, "image without valid position/orientation/spacing", rel) from None
    if iop.shape != (6,) or ipp.shape != (3,) or len(pixel_spacing) != 2:
        raise ExamError(exam_dir, "malformed ImageOrientation/ImagePosition/PixelSpacing", rel)
    tpi = number(ds, T_TEMPORAL_POSITION)
    series_number = number(ds, T_SERIES_NUMBER)
    return Image(
        ds=ds,
        file=rel,
        iop=iop,
        ipp=ipp,
        series_uid=text(ds, T_SERIES_UID) or "",
        sop_uid=text(ds, T_SOP_INSTANCE_UID) or "",
        temporal_position=None if tpi is None else int(tpi),
        acquisition_number=number(ds, T_ACQ_NUMBER),
        trigger_time=number(ds, T_TRIGGER_TIME),
        acq_time=acquisition_time(ds),
        series_number=None if series_number is None else int(series_number),
        rows=us(ds, T_ROWS),
        cols=us(ds, T_COLUMNS),
        pixel_spacing=pixel_spacing,
        sequence=(
            text(ds, T_SCANNING_SEQUENCE) or "",
            rounded(number(ds, T_TR)),
            rounded(number(ds, T_TE)),
            rounded(number(ds, T_FLIP)),
        ),
        slope=number(ds, T_SLOPE, 1.0) or 1.0,
        intercept=number(ds, T_INTERCEPT, 0.0) or 0.0,
        patient_id=(text(ds, T_PATIENT_ID) or "").strip(),
    )
