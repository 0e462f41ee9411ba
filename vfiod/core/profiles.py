"""What the host offers for sharing, as the contract's records: the vGPU profiles (ListProfiles: each mdev
or NVIDIA vendor-VFIO type, summed over the parents offering it) and the vGPUs (ListVGPUs: every vGPU on
the host, vfiod's own and the ones it did not create, plus the ones it created that the kernel no longer
has).

Read live from the kernel every time; the registry adds only what the kernel cannot tell (which vGPUs vfiod
made, for which instance and uid, and the parents it has seen fail).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vfiod.core import placement
from vfiod.core.deps import CoreDeps
from vfiod.core.placement import framebuffer_mb
from vfiod.core.records import NO_OWNER, vfio_group_path
from vfiod.core.registry import VgpuRow, format_timestamp
from vfiod.host import vgpus
from vfiod.host.host import Host
from vfiod.host.mdev import Mdev, MdevParent, MdevType

QUARANTINE_FAILURES = 2  # create or verify failed this many times in a row on a parent


@dataclass(frozen=True)
class Profile:
    name: str
    type_id: str
    framework: str
    framebuffer_mb: int
    description: str
    device_api: str
    available: int
    parents: tuple[str, ...]

    def to_record(self) -> dict[str, object]:
        return {
            "name": self.name,
            "type_id": self.type_id,
            "framework": self.framework,
            "framebuffer_mb": self.framebuffer_mb,
            "description": self.description,
            "device_api": self.device_api,
            "available": self.available,
            "parents": list(self.parents),
        }


@dataclass(frozen=True)
class Vgpu:
    id: str
    uuid: str
    framework: str
    profile: str
    type_id: str
    parent: str
    physical_gpu: str
    instance_id: str
    owner_uid: int
    sysfs_path: str
    vfio_group_path: str
    state: str
    managed: bool
    created_at: str

    def to_record(self) -> dict[str, object]:
        return dict(self.__dict__)


def quarantined(deps: CoreDeps) -> dict[str, str]:
    """Parent -> why placement skips it (its create or verify failed QUARANTINE_FAILURES times in a row)."""
    return {
        h.parent: f"{h.failures} failures in a row since {format_timestamp(h.since)}: {h.last_failure}"
        for h in deps.registry.all_parent_health()
        if h.failures >= QUARANTINE_FAILURES
    }


def parents(deps: CoreDeps, only: str | None = None) -> list[MdevParent]:
    found = vgpus.read_parents(deps.host)
    return [p for p in found if only is None or p.name == only]


def list_profiles(deps: CoreDeps, parent: str | None = None) -> list[Profile]:
    """Every type offered (only `parent`'s when given), by type id, with what can be created now on the
    parents that are not quarantined (per physical GPU, capped by what its framebuffer still holds)."""
    skip = quarantined(deps)
    shown = parents(deps, parent)
    on_gpu = placement.gpus(shown, vgpus.read_vgpus(deps.host))
    by_type: dict[str, list[MdevType]] = {}
    framework = {p.name: p.framework for p in shown}
    for p in shown:
        for t in p.types:
            by_type.setdefault(t.id, []).append(t)
    out = []
    for type_id, offers in sorted(by_type.items()):
        first = offers[0]
        out.append(
            Profile(
                name=first.name,
                type_id=type_id,
                framework=framework[first.parent],
                framebuffer_mb=framebuffer_mb(first.name, first.description),
                description=first.description,
                device_api=first.device_api,
                available=sum(g.available(type_id, skip) for g in on_gpu),
                parents=tuple(sorted(t.parent for t in offers)),
            )
        )
    return out


def vgpu_status(host: Host, skip: Mapping[str, str]) -> dict[str, object]:
    """GetHostStatus's vGPU keys (`skip`: the quarantined parents and why). A parent's slots are its vGPUs
    plus the most of any one type it could still create (an NVIDIA VF: 1); allocatable is what can be
    created now, per physical GPU the most of any one type on parents not in `skip` (a GPU holding one size
    offers only that size)."""
    found = vgpus.read_parents(host)
    live = vgpus.read_vgpus(host)
    used = {p.name: sum(1 for m in live if m.parent == p.name) for p in found}
    total = sum(used[p.name] + max((t.available for t in p.types), default=0) for p in found)
    allocatable = 0
    for gpu in placement.gpus(found, live):
        type_ids = {t.id for p in gpu.parents for t in p.types}
        allocatable += max((gpu.available(t, skip) for t in type_ids), default=0)
    return {
        "vgpu_parents": len(found),
        "vgpu_slots_total": total,
        "vgpu_slots_used": sum(used.values()),
        "vgpu_slots_allocatable": allocatable,
        "quarantined": [f"{name}: {why}" for name, why in sorted(skip.items())],
    }


def list_vgpus(deps: CoreDeps, instance: str | None = None) -> list[Vgpu]:
    """Every vGPU on the host and every vGPU vfiod made (only `instance`'s when given)."""
    host = deps.host
    rows = deps.registry.list_vgpus()
    by_name = {p.name: p for p in vgpus.read_parents(host)}
    out: list[Vgpu] = []
    matched: set[str] = set()
    for m in vgpus.read_vgpus(host):
        row = next((r for r in rows if vgpus.same(r.framework, r.uuid, r.parent, r.type_id, m)), None)
        if row is not None:
            matched.add(row.id)
        types = {t.id: t for t in by_name[m.parent].types} if m.parent in by_name else {}
        profile = types[m.type_id].name if m.type_id in types else m.type_id
        group = m.iommu_group if m.iommu_group is not None else -1
        out.append(_vgpu(deps, row, m, profile, by_name, group, "vfio"))
    for row in rows:
        if row.id not in matched:
            gone = Mdev(row.uuid, row.parent, row.type_id, None, None, row.framework)
            out.append(_vgpu(deps, row, gone, row.profile, by_name, -1, "missing"))
    return [v for v in out if instance is None or v.instance_id == instance]


def _vgpu(
    deps: CoreDeps,
    row: VgpuRow | None,
    live: Mdev,
    profile: str,
    by_name: dict[str, MdevParent],
    group: int,
    unmanaged_state: str,
) -> Vgpu:
    att = deps.registry.attachment_of_device(row.id) if row is not None else None
    parent = live.parent
    return Vgpu(
        id=row.id if row is not None else "",
        uuid=row.uuid if row is not None else live.uuid,
        framework=live.framework,
        profile=profile,
        type_id=live.type_id,
        parent=parent,
        physical_gpu=row.physical_gpu if row is not None else placement.physical_gpu(by_name.get(parent)),
        instance_id=att.instance_id if att is not None else "",
        owner_uid=att.owner_uid if att is not None else NO_OWNER,
        sysfs_path=live.sysfs_path,
        vfio_group_path=vfio_group_path(deps.host, group),
        state=row.state if row is not None and unmanaged_state != "missing" else unmanaged_state,
        managed=row is not None and row.managed,
        created_at=format_timestamp(row.created_at) if row is not None else "",
    )
