"""The upgrade of a registry that a released vfiod wrote: `data/registry-v2.db`, schema version 2 as
commit c1cac32 left it (see data/README.md), opened by this vfiod."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from pathlib import Path

from vfiod.core.registry import NodeOwner, Registry, schema
from vfiod.host.pciaddr import PciAddress

V2 = Path(__file__).parent / "data" / "registry-v2.db"


def test_a_version_2_registry_upgrades_keeping_attachments_and_open_intents(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    shutil.copy(V2, state / "vfiod.db")
    with Registry.open(state) as r:
        boot = r.get_meta("boot_id")  # the boot the file was written in
        assert boot is not None
        devices = {d.name: d for d in r.list_devices()}
        assert sorted(devices) == ["igpu", "l4-gpu", "pci-0000-a2-00-1"]
        l4, igpu, audio = devices["l4-gpu"], devices["igpu"], devices["pci-0000-a2-00-1"]
        # `type` is derived from the class code now; every other stored fact is kept.
        assert (l4.type, igpu.type, audio.type) == ("gpu", "gpu", "pci")
        assert (l4.state, l4.bound_by_vfiod, l4.native_module, l4.settled_through) == (
            "attached",
            True,
            "nvidia",
            9,
        )
        assert l4.tags == {"pool": "a", "rack": "7"}
        assert (igpu.state, igpu.native_driver, igpu.pci_address) == (
            "missing",
            "i915",
            PciAddress.parse("0000:00:02.0"),
        )

        gpu_att, audio_att = r.attachments_of_instance("vm-1")
        assert (gpu_att.device_id, gpu_att.role, gpu_att.gpudirect_clique, gpu_att.boot_id) == (
            l4.id,
            "requested",
            3,
            boot,
        )
        assert (audio_att.device_id, audio_att.role, audio_att.node_prev) == (
            audio.id,
            "companion",
            NodeOwner(0, 0, 0o600),
        )

        # The overloaded `step` became explicit columns, by what each intent was.
        function, write, grant = r.open_intents(boot)
        assert (function.kind, function.action, function.device_id, function.native_module) == (
            "function",
            "bind",
            igpu.id,
            "i915",
        )
        assert (function.from_driver, function.to_driver, function.iommu_group) == ("i915", "vfio-pci", 2)
        assert (write.kind, write.action, write.pci_address, write.operation) == (
            "write",
            "override",
            "0000:00:02.0",
            function.operation,
        )
        assert (grant.kind, grant.iommu_group, grant.node_prev) == ("grant", 7, NodeOwner(0, 0, 0o600))
        assert [i.id for i in r.intents_of_device(igpu.id, str(igpu.pci_address))] == [function.id, write.id]

        hold = r.get_hold("nvidia-persistenced.service")
        assert hold is not None and (hold.holders, hold.was_active) == (1, True)

        # Intent ids go on from where version 2 stopped: a device's generation is an intent id, so a new
        # intent must never count as already settled.
        new = r.journal_grant(boot_id=boot, operation="op", iommu_group=2, node_prev=NodeOwner(0, 0, 0o600))
        assert new > 12

    with contextlib.closing(sqlite3.connect(state / "vfiod.db")) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(schema.MIGRATIONS)
        assert schema.problems(conn) == []
        assert schema.differences(conn, schema.MIGRATIONS) == []
    # The file as it was is kept for an administrator who has to go back.
    with contextlib.closing(sqlite3.connect(state / "vfiod.db.v2.bak")) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM intents").fetchone()[0] == 3
