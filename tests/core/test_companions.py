"""Companions go with their device: an Attach with include_group registers the GPU's other same-slot
functions (its HDMI audio) on its own, tagged with the GPU's id; Unregister of the GPU unregisters them
too (before, the audio stayed registered, tagged with a dead id). One registered explicitly stays; none
goes while any of them is attached."""

from __future__ import annotations

import pytest

from tests.core.support.worlds import HM, MakeEnv
from tests.machines import L4, L4_AUDIO
from vfiod.core.errors import InUse
from vfiod.core.registration import COMPANION_TAG


def test_unregister_takes_the_companions_along(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4")
    m.attach(HM, "vm1", ["l4"], include_group=True)
    audio = m.registry.by_pci_address(str(L4_AUDIO))
    gpu = m.registry.by_pci_address(str(L4))
    assert audio is not None and gpu is not None and audio.tags == {COMPANION_TAG: gpu.id}
    with pytest.raises(InUse, match="attached"):
        m.unregister(HM, "l4")
    assert m.registry.by_pci_address(str(L4_AUDIO)) is not None
    m.detach(HM, "vm1", keep_bound=True)
    m.unregister(HM, "l4")
    assert m.registry.list_devices() == []
    assert e.host.driver(L4) == "nvidia" and e.host.driver(L4_AUDIO) == "snd_hda_intel"


def test_an_explicitly_registered_function_stays(env: MakeEnv) -> None:
    e = env()
    m = e.manager
    m.register(HM, str(L4), "l4")
    m.register(HM, str(L4_AUDIO), "l4-audio")
    m.attach(HM, "vm1", ["l4", "l4-audio"])
    m.detach(HM, "vm1")
    m.unregister(HM, "l4")
    assert [r.name for r in m.registry.list_devices()] == ["l4-audio"]
