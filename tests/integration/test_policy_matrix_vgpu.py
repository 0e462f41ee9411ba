"""Who may do what with GPU sharing, end to end: the real vfiod (`--simulate l40s-vgpu`: two NVIDIA L40S whose
SR-IOV VFs host vGPUs in NVIDIA's vendor-specific VFIO framework) on a private system bus with our shipped
bus policy, the real polkitd with our shipped actions and rules, and unprivileged callers (gdbus via
setpriv), as in test_policy_matrix:
- anyone may list profiles and vGPUs; the stranger (and nobody) may not create one, change VF counts or
  recover a GPU;
- the hypeman member may create a vGPU for itself and detach it, but not for another uid, and may not
  change VF counts or recover a GPU (admin);
- root may do all.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.support.realstack import (
    HMTEST,
    NOBODY,
    ROOT,
    STRANGER,
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

PF = "0000:a2:00.0"  # the first L40S
PROFILE = "NVIDIA L40S-4Q"
NOT_AUTHORIZED = "org.hypeman.Devices1.Error.NotAuthorized"
EVERYONE = (ROOT, HMTEST, STRANGER, NOBODY)
OUTSIDERS = (STRANGER, NOBODY)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    require_root_and_tools()
    with start_stack(vfiod_argv("l40s-vgpu")) as s:
        yield s


def admin_calls() -> list[tuple[str, tuple[str, ...]]]:
    return [
        ("SetVirtualFunctions", (gv_str(PF), "uint32 16", gv_opts())),
        ("Recover", (gv_str(PF), gv_opts(dry_run=True))),
    ]


@pytest.mark.parametrize("user", EVERYONE, ids=lambda u: u.name)
def test_anyone_may_list_profiles_and_vgpus(stack: Stack, user: User) -> None:
    r = ok(stack.call(user, "ListProfiles", gv_opts()), f"{user.name} ListProfiles")
    assert PROFILE in r.stdout
    ok(stack.call(user, "ListVGPUs", gv_opts()), f"{user.name} ListVGPUs")


@pytest.mark.parametrize("user", OUTSIDERS, ids=lambda u: u.name)
def test_outsiders_may_not_create_vgpus_or_use_admin_powers(stack: Stack, user: User) -> None:
    attempts = [("AttachVGPU", (gv_str("vm-x"), gv_str(PROFILE), gv_opts())), *admin_calls()]
    for method, args in attempts:
        refused(stack.call(user, method, *args), NOT_AUTHORIZED, f"{user.name} {method}")
    assert "vm-x" not in ok(stack.call(ROOT, "ListVGPUs", gv_opts()), "ListVGPUs").stdout


def test_hypeman_member_may_create_and_detach_its_own_vgpu_only(stack: Stack) -> None:
    try:
        r = ok(stack.call(HMTEST, "AttachVGPU", gv_str("vm-hm"), gv_str(PROFILE), gv_opts()), "AttachVGPU")
        assert "/sys/bus/pci/devices/0000:" in r.stdout, r.stdout
        listed = ok(stack.call(HMTEST, "ListVGPUs", gv_opts(instance="vm-hm")), "ListVGPUs").stdout
        assert f"'owner_uid': <uint32 {HMTEST.uid}>" in listed, listed
        refused(
            stack.call(
                HMTEST, "AttachVGPU", gv_str("vm-other"), gv_str(PROFILE), gv_opts(owner_uid=STRANGER.uid)
            ),
            NOT_AUTHORIZED,
            "hmtest AttachVGPU for another uid",
        )
        for method, args in admin_calls():
            refused(stack.call(HMTEST, method, *args), NOT_AUTHORIZED, f"hmtest {method}")
        ok(stack.call(HMTEST, "Detach", gv_str("vm-hm"), gv_strv([]), gv_opts()), "hmtest Detach")
        assert "vm-hm" not in ok(stack.call(ROOT, "ListVGPUs", gv_opts()), "ListVGPUs").stdout
    finally:
        stack.call(ROOT, "Detach", gv_str("vm-hm"), gv_strv([]), gv_opts())


def test_root_may_recover_a_gpu(stack: Stack) -> None:
    r = ok(stack.call(ROOT, "Recover", gv_str(PF), gv_opts(dry_run=True)), "root Recover")
    assert "would disable and enable its 32 VFs" in r.stdout, r.stdout
