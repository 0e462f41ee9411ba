"""The shipped bus policy and polkit files, enforced by the real dbus-daemon and polkitd (no vfiod needed).

- polkit: the four actions load with the contract's defaults, and the decision matrix for root, a member
  of group `hypeman`, a stranger and `nobody` is what the contract says (pkcheck, each user asking about
  its own process);
- bus: nobody but root may own org.hypeman.Devices1.
The same rules seen through vfiod's own methods are in test_policy_matrix.py.
"""

from __future__ import annotations

import re

import pytest

from tests.integration.support.realstack import (
    HMTEST,
    NOBODY,
    ROOT,
    STRANGER,
    UNPRIVILEGED,
    Stack,
    User,
    gv_str,
)

ACTIONS = {
    # action: (allow_any, allow_inactive, allow_active) -- the contract (AUTHORIZATION in vfiod(8))
    "org.hypeman.devices.inspect": ("yes", "yes", "yes"),
    "org.hypeman.devices.register": ("auth_admin_keep",) * 3,
    "org.hypeman.devices.attach": ("auth_admin_keep",) * 3,
    "org.hypeman.devices.admin": ("auth_admin",) * 3,
}
# Who is authorized without a password (no agent runs: auth_* means "not authorized" here).
ALLOWED = {
    "org.hypeman.devices.inspect": {ROOT, HMTEST, STRANGER, NOBODY},
    "org.hypeman.devices.register": {ROOT, HMTEST},
    "org.hypeman.devices.attach": {ROOT, HMTEST},
    "org.hypeman.devices.admin": {ROOT},
}


def pkcheck_self(stack: Stack, user: User, action: str) -> int:
    """pkcheck run by `user` about its own process: 0 authorized, 1 not, 2 needs authentication."""
    # `exec` keeps the pid, so $$ is the pkcheck process itself, owned by `user`.
    r = stack.run(user, ["sh", "-c", 'exec pkcheck --action-id "$1" --process $$', "sh", action], timeout=30)
    assert r.returncode in (0, 1, 2), f"pkcheck {action} as {user.name}: {r.describe()}"
    return r.returncode


def test_actions_load_with_the_contract_defaults(policy_stack: Stack) -> None:
    r = policy_stack.run(ROOT, ["pkaction", "--verbose"], timeout=30)
    assert r.ok, r.describe()
    blocks = {
        m.group(1): m.group(0)
        for m in re.finditer(r"(?ms)^(org\.hypeman\.[a-z.-]+):$.*?(?=^\S|\Z)", r.stdout)
    }
    assert set(blocks) == set(ACTIONS), f"actions polkitd loaded: {sorted(blocks)}"
    for action, (any_, inactive, active) in ACTIONS.items():
        text = blocks[action]
        assert re.search(rf"implicit any:\s+{any_}\n", text), text
        assert re.search(rf"implicit inactive:\s+{inactive}\n", text), text
        assert re.search(rf"implicit active:\s+{active}\n", text), text
        description = re.search(r"description:\s+(.+)", text)
        message = re.search(r"message:\s+(.+)", text)
        assert description and len(description.group(1)) > 20, text
        assert message and message.group(1).startswith("Authentication is required to"), text


@pytest.mark.parametrize("action", sorted(ALLOWED))
@pytest.mark.parametrize("user", [ROOT, *UNPRIVILEGED], ids=lambda u: u.name)
def test_polkit_decision_matrix(policy_stack: Stack, user: User, action: str) -> None:
    rc = pkcheck_self(policy_stack, user, action)
    if user in ALLOWED[action]:
        assert rc == 0, f"{user.name} should be authorized for {action}"
    else:
        assert rc != 0, f"{user.name} must not be authorized for {action}"


def test_group_membership_comes_from_the_group_database(policy_stack: Stack) -> None:
    """polkit reads groups from /etc/group, not the process: a stranger with gid 4243 is still a stranger."""
    impostor = User(STRANGER.name, STRANGER.uid, STRANGER.gid, (4243,))
    assert pkcheck_self(policy_stack, impostor, "org.hypeman.devices.attach") != 0


@pytest.mark.parametrize("user", UNPRIVILEGED, ids=lambda u: u.name)
def test_only_root_may_own_the_name(policy_stack: Stack, user: User) -> None:
    r = policy_stack.gdbus(
        user,
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus.RequestName",
        gv_str("org.hypeman.Devices1"),
        "uint32 4",
    )
    assert not r.ok and r.error == "org.freedesktop.DBus.Error.AccessDenied", r.describe()


def test_root_may_own_the_name(policy_stack: Stack) -> None:
    r = policy_stack.gdbus(
        ROOT,
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus.RequestName",
        gv_str("org.hypeman.Devices1"),
        "uint32 4",
    )
    # 1: primary owner (released again when gdbus disconnects); 3: vfiod already owns it.
    assert r.ok and r.stdout.strip() in ("(uint32 1,)", "(uint32 3,)"), r.describe()
