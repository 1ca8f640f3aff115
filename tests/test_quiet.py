"""The CLI's filter for TensorFlow's start-up notices: notices go, everything else stays."""

from __future__ import annotations

import os

from automammo import _quiet

NOTICES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    "I0000 00:00:1795312487.284048    9099 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results.\n",
    "I0000 00:00:1795312487.284569    9099 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
    "GPU will not be used.\n",
]
CPU_NOTICE = ("To enable the following instructions: AVX2 AVX512F FMA, in other operations,\n"
              "rebuild TensorFlow with the appropriate compiler flags.\n")
KEPT = [
    "W0000 00:00:1795312487.284569    9099 gpu_device.cc:2342] Cannot dlopen some GPU libraries.\n",
    "E0000 00:00:1795310963.904056   15879 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n",
    "Traceback (most recent call last):\n",
    "UserWarning: something a user should see\n",
]


def test_notices_are_recognised_and_nothing_else():
    assert all(_quiet.is_notice(line) for line in NOTICES)
    assert not any(_quiet.is_notice(line) for line in KEPT)


def test_filtered_stderr_drops_notices_written_at_the_file_descriptor(capfd):
    with _quiet.filtered_stderr():
        for line in NOTICES[:1] + KEPT[:2] + NOTICES[1:] + [CPU_NOTICE] + KEPT[2:]:
            os.write(2, line.encode())
    err = capfd.readouterr().err
    assert err == "".join(KEPT)


def test_filtered_stderr_writes_back_even_when_the_block_raises(capfd):
    try:
        with _quiet.filtered_stderr():
            os.write(2, b"import failed: libfoo.so not found\n")
            raise ImportError("libfoo")
    except ImportError:
        pass
    assert capfd.readouterr().err == "import failed: libfoo.so not found\n"
