"""Tests for vfiod.core.pciids: parsing synthetic pci.ids files, search order, laziness, and the real file."""

from __future__ import annotations

import gzip
import logging
import threading
from pathlib import Path

import pytest

from vfiod.core import pciids
from vfiod.core.pciids import DEFAULT_SEARCH_PATHS, PciIds, default_pci_ids

SAMPLE = """\
#
#\tList of PCI ID's (synthetic)
#

# Syntax:
# vendor  vendor_name
#\tdevice  device_name\t\t\t\t<-- single tab
#\t\tsubvendor subdevice  subsystem_name\t<-- two tabs

0010  Allied Telesis, Inc (Wrong ID)
# A comment between a vendor and its device must not lose the vendor.
\t8139  AT-2500TX V3 Ethernet
10de  NVIDIA Corporation
\t1eb8  TU104GL [Tesla T4]
\t\t10de 12a2  Tesla T4
# and between a device and its subsystems
\t\t1028 0001  Dell T4
\t27b8  AD104GL [L4]
\t\t10de 16ca  L4 (24 GB)
\t2330  GH100 [H100 SXM5 80GB]\t
8086  Intel Corporation
\t1234  Some Bridge

C 03  Display controller
\t00  VGA compatible controller
\t\t00  VGA controller
\t\t01  8514 controller
\t02  3D controller
\t80  Display controller
C 04  Multimedia controller
\t01  Multimedia audio controller
\t03  Audio device
C 0c  Serial bus controller
\t03  USB controller
\t\t30  XHCI
"""


def write(tmp_path: Path, text: str, name: str = "pci.ids") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def db(path: Path) -> PciIds:
    """A database that never falls back to the system file, so tests see only their own data."""
    return PciIds(path, search_paths=())


@pytest.fixture
def sample(tmp_path: Path) -> PciIds:
    return db(write(tmp_path, SAMPLE))


# --- lookups -----------------------------------------------------------------------------------------


def test_vendor_and_device(sample: PciIds) -> None:
    assert sample.vendor_name("10de") == "NVIDIA Corporation"
    assert sample.vendor_name("0010") == "Allied Telesis, Inc (Wrong ID)"
    assert sample.device_name("10de", "1eb8") == "TU104GL [Tesla T4]"
    assert sample.device_name("10de", "27b8") == "AD104GL [L4]"
    assert sample.device_name("8086", "1234") == "Some Bridge"


def test_comments_do_not_break_context(sample: PciIds) -> None:
    assert sample.device_name("0010", "8139") == "AT-2500TX V3 Ethernet"


def test_trailing_whitespace_is_not_part_of_the_name(sample: PciIds) -> None:
    assert sample.device_name("10de", "2330") == "GH100 [H100 SXM5 80GB]"


def test_ids_are_case_insensitive_and_accept_sysfs_0x(sample: PciIds) -> None:
    assert sample.vendor_name("10DE") == "NVIDIA Corporation"
    assert sample.vendor_name("0x10de") == "NVIDIA Corporation"
    assert sample.device_name("10De", "27B8") == "AD104GL [L4]"


def test_unknown_and_malformed_ids_give_none(sample: PciIds) -> None:
    assert sample.vendor_name("ffff") is None
    assert sample.device_name("10de", "ffff") is None
    assert sample.device_name("8086", "27b8") is None  # a device of another vendor
    for bad in ("", "10d", "10de0", "10de\n", "xyz1", " 10de", "0x", "0x10de0"):
        assert sample.vendor_name(bad) is None, bad


# --- malformed input -----------------------------------------------------------------------------------


def test_malformed_lines_are_skipped(tmp_path: Path) -> None:
    text = (
        "1111  Good Vendor\n"
        "\t0001  Good Device\n"
        "\t000x  Bad Device Id\n"
        "\t0002\n"  # no name
        "\t\t\t0003  Three Tabs\n"
        "\t\t1111 0001\n"  # subsystem without a name
        "\t\t1111  Short Subsystem\n"
        "\t0004  Second Good Device\n"
        "\t\t2222 0001  Good Subsystem\n"
        "zzzz  Bad Vendor Id\n"
        "\t0005  Orphan Of A Bad Vendor\n"
        "2222  Other Vendor\n"
        "  2223  Leading spaces\n"
        "2224No Separator\n"
        "C zz  Bad Class\n"
        "\t01  Orphan Of A Bad Class\n"
        "C 05  Memory controller\n"
        "\t0  Short Subclass\n"
        "\t00  RAM memory\n"
        "\t\t0  Short Prog-if\n"
        "\t\t01  Some Prog-if\n"
    )
    ids = db(write(tmp_path, text))
    assert ids.vendor_name("1111") == "Good Vendor"
    assert ids.device_name("1111", "0001") == "Good Device"
    assert ids.device_name("1111", "0002") is None
    assert ids.device_name("1111", "0003") is None
    assert ids.device_name("1111", "0004") == "Second Good Device"
    # The orphan must not be filed under the vendor before the malformed one.
    assert ids.device_name("1111", "0005") is None
    assert ids.vendor_name("2222") == "Other Vendor"
    assert ids.device_name("2222", "0005") is None
    assert ids.vendor_name("2223") is None
    assert ids.vendor_name("2224") is None


def test_class_sections_are_not_devices(tmp_path: Path) -> None:
    text = "1111  V\n\t0001  Good\nC 03  Display controller\n\t02  3D controller\n\t0300  Not A Device\n"
    ids = db(write(tmp_path, text))
    assert ids.device_name("1111", "0001") == "Good"
    assert ids.device_name("1111", "0300") is None  # under the class section, not the vendor before it


def test_crlf_tabs_as_separator_and_first_entry_wins(tmp_path: Path) -> None:
    text = "1111\tTab Separated\r\n\t0001\t\tDevice\r\n1111  Duplicate\r\n"
    ids = db(write(tmp_path, text))
    assert ids.vendor_name("1111") == "Tab Separated"
    assert ids.device_name("1111", "0001") == "Device"


def test_bad_bytes_and_control_characters_do_not_break_the_file(tmp_path: Path) -> None:
    p = tmp_path / "pci.ids"
    p.write_bytes(
        b"1111  Caf\xe9 Bad UTF-8\n"
        b"2222  Esc\x1b[31mape\n"
        b"3333  Nul\x00Name\n"
        b"4444  Caf\xc3\xa9 Good UTF-8\n"
        b"5555  Line\xc2\x85Separator Stays\n"
        b"6666  Lone\rCarriage Return\r\n"
    )
    ids = db(p)
    assert ids.vendor_name("1111") == "Caf\ufffd Bad UTF-8"
    assert ids.vendor_name("2222") == "Esc?[31mape"
    assert ids.vendor_name("3333") == "Nul?Name"
    assert ids.vendor_name("4444") == "Caf\u00e9 Good UTF-8"
    assert ids.vendor_name("5555") == "Line\x85Separator Stays"
    assert ids.vendor_name("6666") == "Lone?Carriage Return"


def test_empty_file_is_available_but_knows_nothing(tmp_path: Path) -> None:
    ids = db(write(tmp_path, ""))
    assert ids.available
    assert ids.vendor_name("10de") is None


# --- finding the file ----------------------------------------------------------------------------------


def test_gzip_by_name(tmp_path: Path) -> None:
    p = tmp_path / "pci.ids.gz"
    p.write_bytes(gzip.compress(SAMPLE.encode()))
    ids = db(p)
    assert ids.vendor_name("10de") == "NVIDIA Corporation"
    assert ids.source == p


def test_gzip_is_detected_by_content_not_name(tmp_path: Path) -> None:
    p = tmp_path / "pci.ids"
    p.write_bytes(gzip.compress(SAMPLE.encode()))
    assert db(p).device_name("10de", "27b8") == "AD104GL [L4]"


def test_corrupt_gzip_falls_through(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "bad.ids.gz"
    bad.write_bytes(gzip.compress(SAMPLE.encode())[:40])
    good = write(tmp_path, "1111  Fallback\n")
    ids = PciIds(bad, search_paths=(good,))
    with caplog.at_level(logging.WARNING, logger="vfiod.core.pciids"):
        assert ids.vendor_name("1111") == "Fallback"
    assert ids.source == good
    assert str(bad) in caplog.text


def test_missing_database(tmp_path: Path) -> None:
    ids = PciIds(tmp_path / "nope", search_paths=(tmp_path / "also-nope", tmp_path / "nope.gz"))
    assert ids.vendor_name("10de") is None
    assert ids.device_name("10de", "27b8") is None
    assert not ids.available
    assert ids.source is None


def test_unreadable_candidate_is_skipped(tmp_path: Path) -> None:
    a_dir = tmp_path / "pci.ids"
    a_dir.mkdir()  # reading a directory is an OSError other than FileNotFoundError
    good = write(tmp_path, "1111  Second\n", name="second.ids")
    ids = PciIds(search_paths=(a_dir, good))
    assert ids.vendor_name("1111") == "Second"
    assert ids.source == good


def test_search_order(tmp_path: Path) -> None:
    first = write(tmp_path, "1111  First\n", name="first.ids")
    second = write(tmp_path, "1111  Second\n", name="second.ids")
    assert PciIds(search_paths=(first, second)).vendor_name("1111") == "First"
    assert PciIds(second, search_paths=(first,)).vendor_name("1111") == "Second"  # explicit path first
    missing = tmp_path / "missing.ids"
    assert PciIds(missing, search_paths=(second,)).vendor_name("1111") == "Second"  # then the search


def test_default_search_paths_cover_debian_fedora_and_gzip() -> None:
    names = [str(p) for p in DEFAULT_SEARCH_PATHS]
    assert names[0] == "/usr/share/misc/pci.ids"
    for expected in (
        "/usr/share/misc/pci.ids.gz",
        "/usr/share/hwdata/pci.ids",
        "/usr/share/pci.ids",
    ):
        assert expected in names
    assert names.index("/usr/share/misc/pci.ids") < names.index("/usr/share/hwdata/pci.ids")
    assert names.index("/usr/share/hwdata/pci.ids") < names.index("/usr/share/pci.ids")


# --- laziness ------------------------------------------------------------------------------------------


def test_parsed_lazily_and_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_parse = pciids._parse

    def counting_parse(text: str) -> pciids._Tables:
        calls.append(len(text))
        return real_parse(text)

    monkeypatch.setattr(pciids, "_parse", counting_parse)
    p = write(tmp_path, SAMPLE)
    ids = db(p)
    assert calls == []  # constructing reads nothing
    assert ids.vendor_name("10de") == "NVIDIA Corporation"
    p.unlink()  # later lookups must not go back to the file
    assert ids.device_name("10de", "27b8") == "AD104GL [L4]"
    assert ids.available
    assert len(calls) == 1


def test_missing_database_is_searched_once(tmp_path: Path) -> None:
    ids = PciIds(tmp_path / "nope", search_paths=())
    assert ids.vendor_name("10de") is None
    write(tmp_path, "10de  Appeared Later\n", name="nope")
    assert ids.vendor_name("10de") is None  # the answer is fixed for the life of the instance


def test_concurrent_first_lookups_parse_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_parse = pciids._parse

    def counting_parse(text: str) -> pciids._Tables:
        calls.append(1)
        return real_parse(text)

    monkeypatch.setattr(pciids, "_parse", counting_parse)
    ids = db(write(tmp_path, SAMPLE))
    barrier = threading.Barrier(8)
    results: list[str | None] = []

    def worker() -> None:
        barrier.wait()
        results.append(ids.vendor_name("10de"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["NVIDIA Corporation"] * 8
    assert len(calls) == 1


def test_default_instance_is_shared() -> None:
    assert default_pci_ids() is default_pci_ids()


# --- the real database ---------------------------------------------------------------------------------

SYSTEM_FILES = [p for p in DEFAULT_SEARCH_PATHS if p.exists()]


@pytest.mark.skipif(not SYSTEM_FILES, reason="no system pci.ids installed (Debian package `pci.ids`)")
def test_system_database() -> None:
    ids = PciIds()
    assert ids.available
    assert ids.source == SYSTEM_FILES[0]
    assert ids.vendor_name("10de") == "NVIDIA Corporation"
    assert ids.device_name("10de", "27b8") == "AD104GL [L4]"
    # Debian 12's pci.ids (2023.04.10) spells it without the space; later releases add it.
    assert ids.device_name("10de", "2330") in {"GH100[H100 SXM5 80GB]", "GH100 [H100 SXM5 80GB]"}
    assert ids.vendor_name("8086") == "Intel Corporation"
