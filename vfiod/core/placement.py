"""Where vGPUs fit: what each physical GPU can still take of a type, and which parent a new vGPU goes to.

Parents are grouped by physical GPU (an SR-IOV VF's PF, a PCI parent itself, a virtual parent alone). A
type's capacity on a GPU is what its parents say (`available_instances`: NVIDIA's VFs show 1 or 0 each; a
vendor-VFIO VF 1 while it lists the type) capped by the framebuffer the GPU has left (its size from
`max_instance` times a type's framebuffer in NVIDIA's mdev descriptions, or the largest vendor-VFIO type),
else by the type's `max_instance` less its vGPUs: summing VFs alone would count every free VF although the
GPU's framebuffer runs out first. Placement takes the GPU with the most free framebuffer, GPUs with a
quarantined parent last, then a clean parent before one whose last create or verify failed, then the
parent with the most instances left; ties by name, so it is stable. Quarantined parents are never chosen
and count for nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vfiod.host.mdev import Mdev, MdevParent, MdevType
from vfiod.host.vgpus import VENDOR

_MAX_INSTANCE = re.compile(r"max_instance=(\d+)")
_FRAMEBUFFER = re.compile(r"framebuffer=(\d+)M")  # NVIDIA's mdev description
_MB = re.compile(r"(\d+) ?MB\b")  # e.g. mbochs: "virtual display, 64 MB video memory"
_NVIDIA_SIZE = re.compile(r"-(\d+)[A-Z]+$")  # NVIDIA L40S-4Q: 4 GB of framebuffer


def framebuffer_mb(name: str, description: str) -> int:
    """The framebuffer a type gives, from its description or its name's size suffix; 0 when unknown."""
    for pattern, text, scale in (
        (_FRAMEBUFFER, description, 1),
        (_NVIDIA_SIZE, name, 1024),
        (_MB, description, 1),
    ):
        found = pattern.search(text)
        if found:
            return int(found[1]) * scale
    return 0


def max_instance(t: MdevType) -> int:
    """How many of the type one physical GPU holds (NVIDIA's `max_instance=`); 0 when not said."""
    found = _MAX_INSTANCE.search(t.description)
    return int(found[1]) if found else 0


def physical_gpu(parent: MdevParent | None) -> str:
    """A PCI parent's physical GPU (a VF's PF, or the parent itself); "" for a parent that is not PCI."""
    if parent is None or parent.pci_address is None:
        return ""
    return str(parent.physfn or parent.pci_address)


def gpu_of(parent: MdevParent) -> str:
    """What placement groups a parent by: its physical GPU, or a virtual parent on its own."""
    return physical_gpu(parent) or parent.name


@dataclass(frozen=True)
class Gpu:
    name: str
    parents: tuple[MdevParent, ...]
    mdevs: tuple[Mdev, ...]  # the mdevs on its parents, vfiod's or not

    def types(self, type_id: str) -> list[MdevType]:
        return [t for p in self.parents for t in p.types if t.id == type_id]

    def sizes(self) -> dict[str, int]:
        return {t.id: framebuffer_mb(t.name, t.description) for p in self.parents for t in p.types}

    def framebuffer_total(self) -> int:
        """The GPU's framebuffer: the largest max_instance times size any type states (NVIDIA's mdev
        descriptions); for NVIDIA's vendor-VFIO types, which state none, the largest type's (NVIDIA's
        largest profile is the whole GPU); 0 when unknown."""
        sizes = self.sizes()
        stated = [sizes[t.id] * max_instance(t) for p in self.parents for t in p.types if max_instance(t)]
        if stated:
            return max(stated)
        if any(p.framework == VENDOR for p in self.parents):
            return max(sizes.values(), default=0)
        return 0

    def framebuffer_free(self) -> int:
        """The GPU's framebuffer less its vGPUs'."""
        sizes = self.sizes()
        return self.framebuffer_total() - sum(sizes.get(m.type_id, 0) for m in self.mdevs)

    def available(self, type_id: str, skip: Iterable[str] = ()) -> int:
        """Instances of the type the GPU can take now on parents not in `skip`: what they say, capped by
        the framebuffer left when the GPU's is known, else by the type's max_instance."""
        skipped = set(skip)
        offers = [t for t in self.types(type_id) if t.parent not in skipped]
        total = sum(t.available for t in offers)
        size = self.sizes().get(type_id, 0)
        if size and self.framebuffer_total():
            return min(total, max(0, self.framebuffer_free()) // size)
        cap = max((max_instance(t) for t in offers), default=0)
        if cap:
            total = min(total, max(0, cap - sum(1 for m in self.mdevs if m.type_id == type_id)))
        return total


def gpus(parents: Sequence[MdevParent], mdevs: Sequence[Mdev]) -> list[Gpu]:
    by_gpu: dict[str, list[MdevParent]] = {}
    for p in parents:
        by_gpu.setdefault(gpu_of(p), []).append(p)
    out = []
    for name, members in sorted(by_gpu.items()):
        names = {p.name for p in members}
        out.append(Gpu(name, tuple(members), tuple(m for m in mdevs if m.parent in names)))
    return out


def choose(
    candidates: Sequence[tuple[MdevParent, MdevType]],
    parents: Sequence[MdevParent],
    mdevs: Sequence[Mdev],
    skip: Iterable[str],
    suspect: Iterable[str] = (),
) -> tuple[MdevParent, MdevType] | None:
    """Of the (parent, type) candidates, the one on the GPU with the most free framebuffer that can still
    take the type, then a clean parent before a `suspect` one (its last create or verify failed: it may
    need a reset), then the one with the most instances left; None when none can."""
    skipped = set(skip)
    suspects = set(suspect)
    by_name = {g.name: g for g in gpus(parents, mdevs)}
    usable = [
        (p, t)
        for p, t in candidates
        if p.name not in skipped and t.available > 0 and by_name[gpu_of(p)].available(t.id, skipped) > 0
    ]
    if not usable:
        return None

    def tainted(gpu: Gpu) -> bool:  # a quarantined VF may mean a GPU that needs an SR-IOV cycle
        return any(p.name in skipped for p in gpu.parents)

    def key(pt: tuple[MdevParent, MdevType]) -> tuple[bool, int, str, bool, int, str]:
        gpu = by_name[gpu_of(pt[0])]
        return (
            tainted(gpu),
            -gpu.framebuffer_free(),
            gpu.name,
            pt[0].name in suspects,
            -pt[1].available,
            pt[0].name,
        )

    return min(usable, key=key)
