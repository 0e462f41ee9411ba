"""Keeping the grant (core/grants.py): udev may re-apply its rules to /dev/vfio/<n> after vfiod handed it
over (GROUP="kvm", MODE="0660", TAG+="uaccess", udevadm trigger). Re-checking an attached group's node puts
its owner and mode back and says what it found; a group a call is working on is checked once the call lets
go; an unattached group and a node that is not the group's (another device number) are left alone."""

from __future__ import annotations

from tests.core.support.worlds import HM, Env, MakeEnv
from tests.machines import L4
from vfiod.host.backend import NodeOwner

KVM = 36  # Debian's kvm group


def attached(env: MakeEnv) -> tuple[Env, int]:
    e = env()
    e.manager.register(HM, str(L4), "l4")
    atts, _ = e.manager.attach(HM, "vm1", ["l4"], include_group=True)
    return e, atts[0].iommu_group


def test_a_widened_grant_is_put_back(env: MakeEnv) -> None:
    e, group = attached(env)
    assert e.host.node_owner(group) == NodeOwner(uid=HM.uid, gid=0, mode=0o600)
    e.host.set_node_owner(group, NodeOwner(uid=0, gid=KVM, mode=0o660))  # what udev's GROUP=/MODE= does
    found = e.manager.refreshes.grants()
    assert len(found) == 1 and f"/dev/vfio/{group}" in found[0] and "uid 0, gid 36, mode 0660" in found[0]
    assert e.host.node_owner(group) == NodeOwner(uid=HM.uid, gid=KVM, mode=0o600)
    assert e.manager.refreshes.grants() == []  # as granted: nothing to say


def test_only_attached_groups_and_only_when_no_call_holds_them(env: MakeEnv) -> None:
    e, group = attached(env)
    e.host.set_node_owner(group, NodeOwner(uid=0, gid=0, mode=0o666))
    with e.manager.locks.hold([group]):  # a call is working on the group: not waited for...
        assert e.manager.refreshes.grants([group]) == []
        assert e.host.node_owner(group).mode == 0o666
    assert e.host.node_owner(group) == NodeOwner(uid=HM.uid, gid=0, mode=0o600)  # ...but checked after it
    e.manager.detach(HM, "vm1", keep_bound=True)
    e.host.set_node_owner(group, NodeOwner(uid=0, gid=KVM, mode=0o660))  # an admin's rule, no attachment
    assert e.manager.refreshes.grants([group]) == []
    assert e.host.node_owner(group) == NodeOwner(uid=0, gid=KVM, mode=0o660)


def test_a_node_with_another_device_number_is_left_alone(env: MakeEnv) -> None:
    e, group = attached(env)
    dev = e.root / "sys/class/vfio" / str(group) / "dev"
    dev.parent.mkdir(parents=True, exist_ok=True)
    dev.write_text("511:3\n")  # the simulator's node is no character device at all
    e.host.set_node_owner(group, NodeOwner(uid=0, gid=0, mode=0o666))
    (found,) = e.manager.refreshes.grants()
    assert "is not IOMMU group" in found and "left alone" in found
    assert e.host.node_owner(group).mode == 0o666
