"""Reading (and, for fixtures and exports, writing) grayscale DICOM images with pydicom.

What the importers need from a DICOM file is its pixels as acquired, nothing more:

- stored values are kept (a 16-bit CBIS-DDSM film stays uint16 with its own values; no
  modality or VOI LUT is applied, because those turn integers into display floats and a
  classifier does better with the raw scale, which is the same for every film of a scanner);
- MONOCHROME1 (0 = white) is inverted to MONOCHROME2 (0 = black) within the stored bit
  depth, so that tissue is bright in every patch whatever the scanner wrote;
- signed pixels are shifted by half the range into unsigned, which is exact;
- any problem (not DICOM, truncated, compressed with a codec that is not installed, colour,
  multi-frame) is a ``DataError`` that names the file.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from automammo.errors import DataError


@dataclass(frozen=True)
class DicomImage:
    """Pixels and the few header fields the importers use.

    Attributes:
        pixels: (rows, cols) uint8 or uint16, MONOCHROME2 (bright = dense).
        path: the file read.
        photometric: the file's PhotometricInterpretation (before inversion).
        bits_stored: significant bits per pixel.
        patient_id: PatientID; in CBIS-DDSM this is the series folder name, e.g.
            ``Mass-Training_P_00001_LEFT_CC`` or ``..._CC_1`` for an ROI series.
        series_description: e.g. ``full mammogram images``, ``cropped images``,
            ``ROI mask images`` in CBIS-DDSM.
        laterality: ``L`` / ``R`` or empty.
        view: PatientOrientation / ViewPosition, e.g. ``CC``, ``MLO``, or empty.
        pixel_spacing: (row, col) millimetres per pixel, or None when not recorded.
    """

    pixels: np.ndarray
    path: str
    photometric: str = "MONOCHROME2"
    bits_stored: int = 16
    patient_id: str = ""
    series_description: str = ""
    laterality: str = ""
    view: str = ""
    pixel_spacing: tuple[float, float] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.pixels.shape)


@dataclass(frozen=True)
class DicomHeader:
    """Header-only view of a file: enough to index a tree without decoding pixels."""

    path: str
    rows: int
    columns: int
    patient_id: str
    series_description: str


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return str(value).strip()


def _open(path: str | os.PathLike, header_only: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a DICOM file")
    try:
        with warnings.catch_warnings():
            # pydicom only warns when a file ends inside its pixel data, then returns what it
            # read: that is a truncated file, said as such instead of "no pixel data".
            warnings.filterwarnings("error", message=r"End of file reached", category=UserWarning)
            return pydicom.dcmread(str(path), stop_before_pixels=header_only)
    except UserWarning as exc:
        raise DataError(f"{path}: truncated DICOM ({exc})") from None
    except InvalidDicomError:
        raise DataError(f"{path}: not a DICOM file (no DICM preamble)") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged files
        raise DataError(f"{path}: unreadable DICOM ({type(exc).__name__}: {exc})") from None


def read_header(path: str | os.PathLike) -> DicomHeader:
    """Read only the header (fast: no pixel decoding). Raises ``DataError`` naming the file."""
    ds = _open(path, header_only=True)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise DataError(f"{path}: DICOM without image dimensions (Rows/Columns)") from None
    return DicomHeader(str(path), rows, cols, _text(ds, "PatientID"), _text(ds, "SeriesDescription"))


def read_dicom(path: str | os.PathLike) -> DicomImage:
    """Read one grayscale DICOM image.

    Args:
        path: the file.

    Returns:
        A ``DicomImage`` whose pixels are uint8 (8 bits or fewer stored) or uint16,
        MONOCHROME2.

    Raises:
        DataError: the file is missing, not DICOM, truncated, has no or undecodable pixel
            data, or is colour / multi-frame; the message names the file.
    """
    ds = _open(path, header_only=False)
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file holds no pixel data")
    photometric = _text(ds, "PhotometricInterpretation").upper() or "MONOCHROME2"
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(f"{path}: {photometric} image; only grayscale (MONOCHROME1/2) is supported")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DataError(f"{path}: {frames} frames (tomosynthesis?); only single-frame images are supported")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - truncation, missing codec, bad group 0028 ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise DataError(
            f"{path}: cannot decode pixel data (transfer syntax {name}): {type(exc).__name__}: {exc}"
        ) from None
    if pixels.ndim != 2:
        raise DataError(f"{path}: pixel data of shape {pixels.shape}; expected one 2-D grayscale image")
    bits_stored = int(ds.get("BitsStored", 8 * pixels.dtype.itemsize) or 8 * pixels.dtype.itemsize)
    bits_stored = min(max(bits_stored, 1), 16)
    if np.issubdtype(pixels.dtype, np.signedinteger):
        # Shift by half the stored range: exact, and keeps the order of the values.
        pixels = pixels.astype(np.int32) + (1 << (bits_stored - 1))
    elif not np.issubdtype(pixels.dtype, np.unsignedinteger):
        raise DataError(f"{path}: pixel dtype {pixels.dtype}; expected integer grayscale")
    top = (1 << bits_stored) - 1
    if photometric == "MONOCHROME1":
        # Invert within the stored bit depth (not the observed maximum), so that the same
        # value means the same density in every file of a scanner.
        pixels = top - np.minimum(pixels.astype(np.int64), top)
    pixels = pixels.astype(np.uint8 if bits_stored <= 8 else np.uint16)
    spacing = None
    raw_spacing = ds.get("PixelSpacing", None) or ds.get("ImagerPixelSpacing", None)
    if raw_spacing is not None:
        try:
            spacing = (float(raw_spacing[0]), float(raw_spacing[1]))
        except (TypeError, ValueError, IndexError):
            spacing = None
    view = _text(ds, "ViewPosition") or _text(ds, "PatientOrientation")
    return DicomImage(
        pixels=pixels,
        path=str(path),
        photometric=photometric,
        bits_stored=bits_stored,
        patient_id=_text(ds, "PatientID"),
        series_description=_text(ds, "SeriesDescription"),
        laterality=_text(ds, "ImageLaterality") or _text(ds, "Laterality"),
        view=view,
        pixel_spacing=spacing,
    )


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file starts with the DICOM preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def write_dicom(
    path: str | os.PathLike,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    patient_id: str = "",
    series_description: str = "",
    laterality: str = "",
    view: str = "",
    bits_stored: int | None = None,
) -> Path:
    """Write a single-frame grayscale DICOM (explicit VR little endian, uncompressed).

    Used to build test fixtures in the real format and to export patches for other tools.
    For MONOCHROME1 the given pixels are written as stored values unchanged: pass the
    already-inverted values to describe a MONOCHROME1 acquisition.

    Args:
        path: the file to write.
        pixels: (rows, cols) uint8 or uint16.
        photometric: ``MONOCHROME2`` or ``MONOCHROME1``.
        patient_id, series_description, laterality, view: header fields.
        bits_stored: defaults to the dtype's width.

    Returns:
        The path written.
    """
    import pydicom  # noqa: F401 - make the import error obvious before building the dataset
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected 2-D uint8/uint16 pixels, got {pixels.dtype} {pixels.shape}")
    bits = 8 * pixels.dtype.itemsize
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MG"
    ds.PatientID = patient_id
    ds.PatientName = patient_id
    ds.SeriesDescription = series_description
    if laterality:
        ds.Laterality = laterality
    if view:
        ds.PatientOrientation = view
    ds.Rows, ds.Columns = (int(s) for s in pixels.shape)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits
    ds.BitsStored = bits if bits_stored is None else int(bits_stored)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels.astype(pixels.dtype.newbyteorder("<"))).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(str(path), enforce_file_format=True)
    except TypeError:  # pydicom < 3 spells it differently and wants the encoding on ds
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(path), write_like_original=False)
    return path
