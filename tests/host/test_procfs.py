"""vfiod.host.procfs: the modprobe.d search path in modprobe's order, and the claims vfiod reports from it;
the process table and mounts are exercised through the busy and host-critical tests."""

from __future__ import annotations

import os
from pathlib import Path

from tests.core.support.fake_sys import FakeSys, workstation
from vfiod.core.hoststatus import find_claims
from vfiod.host import procfs
from vfiod.host.host import Host, HostRoots


def _conf(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_modprobe_reads_every_directory_in_order_and_a_name_hides_later_ones(tmp_path: Path) -> None:
    _conf(tmp_path / "usr/lib/modprobe.d/a.conf", "options a packaged=1\n")
    _conf(tmp_path / "etc/modprobe.d/a.conf", "options a admin=1\n")  # hides the packaged one
    _conf(tmp_path / "run/modprobe.d/b.conf", "options b run=1\n")
    _conf(tmp_path / "usr/local/lib/modprobe.d/c.conf", "options c local=1\n")
    _conf(tmp_path / "usr/lib/modprobe.d/d.conf", "options d lib=1\n")
    _conf(tmp_path / "usr/lib/modprobe.d/README", "not a .conf: modprobe ignores it\n")
    os.symlink("usr/lib", tmp_path / "lib")  # merged /usr: /lib/modprobe.d is the same directory
    files = procfs.modprobe_files(Host(HostRoots.under(tmp_path)))
    assert [(f.path, f.text) for f in files] == [
        ("/etc/modprobe.d/a.conf", "options a admin=1"),
        ("/run/modprobe.d/b.conf", "options b run=1"),
        ("/usr/local/lib/modprobe.d/c.conf", "options c local=1"),
        ("/lib/modprobe.d/d.conf", "options d lib=1"),  # read once, under the first name modprobe uses
    ]


def test_a_packaged_vfio_claim_is_reported_with_its_file(tmp_path: Path) -> None:
    fs = FakeSys(tmp_path)
    workstation(fs)
    _conf(tmp_path / "usr/lib/modprobe.d/vfio.conf", "softdep i915 pre: vfio-pci\n")
    claims = find_claims(fs.host(), {})
    assert [(c.kind, c.source, c.driver) for c in claims] == [
        ("softdep", "/usr/lib/modprobe.d/vfio.conf:1", "i915")
    ]
    assert claims[0].devices == ("0000:00:02.0",)
    # an empty file of the same name in /etc disables it, as it does for modprobe
    _conf(tmp_path / "etc/modprobe.d/vfio.conf", "")
    assert find_claims(fs.host(), {}) == []
