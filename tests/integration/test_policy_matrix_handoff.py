"""Who may open devices for a VMM (OpenDevices), end to end: the real vfiod (`--simulate qemu-q35-iommufd`:
a kernel with VFIO device cdevs and iommufd) on a private system bus with our shipped bus policy, the real
polkitd with our shipped actions and rules, and unprivileged callers (gdbus via setpriv, which accepts
descriptors):
- the stranger and nobody may not (NotAuthorized), whoever owns the attachment;
- the hypeman member may not open another uid's attachment (NotOwner: that needs the admin), and may open
  its own: the reply carries the descriptors (gdbus prints them as handles);
- root may open any.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.support.realstack import (
    HMTEST,
    NOBODY,
    ROOT,
    STRANGER,
    Result,
    Stack,
    User,
    gv_opts,
    gv_str,
    gv_strv,
    ok,
    refused,
    require_root_and_tools,
    start_stack,
    vfiod_argv,
)

EDU = "0000:00:07.0"
NOT_AUTHORIZED = "org.hypeman.Devices1.Error.NotAuthorized"
NOT_OWNER = "org.hypeman.Devices1.Error.NotOwner"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    require_root_and_tools()
    with start_stack(vfiod_argv("qemu-q35-iommufd")) as s:
        ok(s.call(ROOT, "RegisterDevice", gv_str(EDU), gv_str("edu"), gv_opts()), "RegisterDevice")
        yield s


def open_devices(stack: Stack, user: User, instance: str) -> Result:
    return stack.call(user, "OpenDevices", gv_str(instance), gv_strv([]), gv_opts())


def test_open_devices_is_for_the_attachment_owner(stack: Stack) -> None:
    attach = ("Attach", gv_strv(["edu"]), gv_opts(handoff="fd"))
    try:
        ok(stack.call(ROOT, attach[0], gv_str("vm-root"), *attach[1:]), "root Attach handoff fd")
        refused(open_devices(stack, HMTEST, "vm-root"), NOT_OWNER, "hmtest OpenDevices of root's")
        for user in (STRANGER, NOBODY):
            refused(open_devices(stack, user, "vm-root"), NOT_AUTHORIZED, f"{user.name} OpenDevices")
        r = ok(open_devices(stack, ROOT, "vm-root"), "root OpenDevices")
        assert (
            r.stdout.startswith("(handle 0, [(") and f"/sys/bus/pci/devices/{EDU}/', handle 1)]" in r.stdout
        )
        ok(stack.call(ROOT, "Detach", gv_str("vm-root"), gv_strv([]), gv_opts()), "root Detach")

        ok(stack.call(HMTEST, attach[0], gv_str("vm-hm"), *attach[1:]), "hmtest Attach handoff fd")
        for user in (STRANGER, NOBODY):
            refused(open_devices(stack, user, "vm-hm"), NOT_AUTHORIZED, f"{user.name} OpenDevices")
        r = ok(open_devices(stack, HMTEST, "vm-hm"), "hmtest OpenDevices of its own")
        assert r.stdout.startswith("(handle 0, [(") and "handle 1)]" in r.stdout, r.stdout
        ok(stack.call(HMTEST, "Detach", gv_str("vm-hm"), gv_strv([]), gv_opts()), "hmtest Detach")
    finally:
        for instance in ("vm-root", "vm-hm"):
            stack.call(ROOT, "Detach", gv_str(instance), gv_strv([]), gv_opts())
