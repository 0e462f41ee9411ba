"""Tests for vfiod.core.validation: property tests over arbitrary input plus every documented boundary."""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfiod.core import validation as v
from vfiod.core.errors import VfiodError
from vfiod.core.validation import (
    InvalidInstanceIdInput,
    InvalidNameInput,
    InvalidPciAddressInput,
    InvalidTagsInput,
)
from vfiod.host.pciaddr import PciAddress

ID_RE = re.compile(r"[a-z][a-z0-9]{23}")
CANONICAL_PCI_RE = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
TAG_CHARS = string.ascii_letters + string.digits + " _.:/=+@-"

# Validators whose result can name a file or appear alone in a log line.
STRING_VALIDATORS: list[tuple[Callable[[object], str], type[ValueError]]] = [
    (v.pci_address, InvalidPciAddressInput),
    (v.device_name, InvalidNameInput),
    (v.instance_id, InvalidInstanceIdInput),
    (v.id_or_name, InvalidNameInput),
]

# Text that is biased towards the interesting alphabet but still includes every kind of character.
interesting_text = st.one_of(
    st.text(),
    st.text(alphabet=string.ascii_letters + string.digits + "_.-:/\n\x00 ", max_size=140),
    st.text(alphabet=string.ascii_lowercase + string.digits, min_size=23, max_size=25),
    st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{1,130}", fullmatch=True),
)
# A PCI-address-like string in any case, with function digits that include the invalid 8 and 9.
pci_like = st.from_regex(r"[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-9]", fullmatch=True)
any_object: st.SearchStrategy[object] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.binary(max_size=10),
    st.lists(st.text(max_size=3), max_size=3),
    st.tuples(st.text(max_size=3)),
)


def assert_path_safe(value: str) -> None:
    assert "\n" not in value
    assert "\x00" not in value
    assert "/" not in value
    assert value not in ("", ".", "..")


# --- (a) + (c): arbitrary text is either accepted and safe, or refused with the named error -------------


@pytest.mark.parametrize(("validate", "error"), STRING_VALIDATORS)
@given(text=interesting_text)
def test_arbitrary_text_is_safe_or_refused(
    validate: Callable[[object], str], error: type[ValueError], text: str
) -> None:
    try:
        out = validate(text)
    except error as e:
        # The message must name the value in repr() form (truncated for long input).
        assert repr(text)[:40] in str(e)
        return
    assert_path_safe(out)
    assert "\r" not in out
    assert all(c.isascii() and c.isprintable() for c in out)


@pytest.mark.parametrize(("validate", "error"), STRING_VALIDATORS)
@given(value=any_object)
def test_non_strings_are_refused_with_the_named_error(
    validate: Callable[[object], str], error: type[ValueError], value: object
) -> None:
    with pytest.raises(error):
        validate(value)


@given(text=interesting_text)
def test_device_name_rules(text: str) -> None:
    try:
        out = v.device_name(text)
    except InvalidNameInput:
        return
    assert out == text
    assert 2 <= len(out) <= 128
    assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+", out)
    assert not ID_RE.fullmatch(out)


@given(text=st.one_of(interesting_text, st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,130}", fullmatch=True)))
def test_instance_id_rules(text: str) -> None:
    try:
        out = v.instance_id(text)
    except InvalidInstanceIdInput:
        return
    assert out == text
    assert 1 <= len(out) <= 128
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}", out)


@given(text=interesting_text)
def test_id_or_name_is_exactly_one_of_the_two(text: str) -> None:
    try:
        out = v.id_or_name(text)
    except InvalidNameInput:
        assert not v.is_device_id(text)
        return
    assert out == text
    is_id = v.is_device_id(out)
    is_name = True
    try:
        v.device_name(out)
    except InvalidNameInput:
        is_name = False
    assert is_id != is_name


tag_text = st.one_of(st.text(max_size=300), st.text(alphabet=TAG_CHARS + "\n\x00\t", max_size=300))


@given(value=st.dictionaries(tag_text, tag_text, max_size=55))
def test_arbitrary_tags_are_valid_or_refused(value: dict[str, str]) -> None:
    try:
        out = v.tags(value)
    except InvalidTagsInput:
        return
    assert out == value
    assert len(out) <= 50
    for k, val in out.items():
        assert 1 <= len(k) <= 128
        assert len(val) <= 256
        for s in (k, val):
            assert set(s) <= set(TAG_CHARS)
            assert "\n" not in s
            assert "\x00" not in s


@given(value=st.one_of(any_object, st.dictionaries(st.one_of(st.integers(), st.text()), any_object)))
def test_tags_of_the_wrong_shape_are_refused_with_the_named_error(value: object) -> None:
    try:
        v.tags(value)
    except InvalidTagsInput:
        return
    # Only a dict of str->str can get here (an empty dict, or a dict of text to text).
    assert isinstance(value, dict)
    assert all(isinstance(k, str) and isinstance(x, str) for k, x in value.items())


# --- (b): PCI addresses --------------------------------------------------------------------------------


@given(text=st.one_of(pci_like, st.text()))
def test_pci_addresses_round_trip_to_canonical_form(text: str) -> None:
    try:
        addr = v.pci_address(text)
    except InvalidPciAddressInput:
        # Refused only when not of the form, or the function is 8/9.
        assert CANONICAL_PCI_RE.fullmatch(text.lower()) is None
        return
    assert isinstance(addr, PciAddress)
    assert addr == text.lower()
    assert CANONICAL_PCI_RE.fullmatch(addr)
    assert 0 <= addr.function <= 7
    assert v.pci_address(str(addr)) == addr  # idempotent
    assert_path_safe(addr)


# --- (d): device ids -----------------------------------------------------------------------------------


@given(st.data())
def test_new_device_ids_have_the_format_and_are_never_names(data: st.DataObject) -> None:
    del data  # only here so hypothesis runs the body many times
    new = v.new_device_id()
    assert ID_RE.fullmatch(new)
    assert len(new) == 24
    assert v.is_device_id(new)
    assert v.looks_like_device_id(new)
    with pytest.raises(InvalidNameInput):
        v.device_name(new)
    assert v.id_or_name(new) == new


def test_new_device_ids_differ() -> None:
    ids = {v.new_device_id() for _ in range(2000)}
    assert len(ids) == 2000
    # Every base36 character shows up in the 23-character tail, and every letter first.
    assert {c for i in ids for c in i[1:]} == set(string.ascii_lowercase + string.digits)
    assert {i[0] for i in ids} == set(string.ascii_lowercase)


@given(text=st.from_regex(r"[a-z][a-z0-9]{23}", fullmatch=True))
def test_id_shaped_strings_are_never_names(text: str) -> None:
    assert v.is_device_id(text)
    with pytest.raises(InvalidNameInput, match="form of a device id"):
        v.device_name(text)


# --- examples and boundaries ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("0000:a2:00.0", "0000:a2:00.0"),
        ("0000:A2:00.1", "0000:a2:00.1"),
        ("ABCD:EF:1F.7", "abcd:ef:1f.7"),
        # domains above ffff, as the kernel names them (Intel VMD puts its devices from 10000 on)
        ("10000:E1:00.0", "10000:e1:00.0"),
        ("ffffffff:00:1f.7", "ffffffff:00:1f.7"),
    ],
)
def test_pci_address_accepted(text: str, canonical: str) -> None:
    assert v.pci_address(text) == canonical


def test_the_parts_of_an_address_with_a_wide_domain() -> None:
    vmd, plain = v.pci_address("10000:e1:02.3"), v.pci_address("0000:e1:02.3")
    assert (vmd.domain, vmd.bus, vmd.slot, vmd.function) == (0x10000, 0xE1, 2, 3)
    assert (plain.domain, plain.bus, plain.slot, plain.function) == (0, 0xE1, 2, 3)
    assert vmd.slot_prefix == "10000:e1:02" and not vmd.same_slot(plain)
    assert vmd.same_slot(v.pci_address("10000:e1:02.0"))
    assert vmd.default_device_name() == "pci-10000-e1-02-3"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("0000:a2:00.8", "function number must be 0-7"),
        ("0000:a2:00.f", "function number must be 0-7"),
        ("a2:00.0", "the domain is required (did you mean '0000:a2:00.0'?)"),
        ("A2:00.0", "did you mean '0000:a2:00.0'?"),
        ("0000:a2:00.0\n", "'0000:a2:00.0\\n'"),
        (" 0000:a2:00.0", "' 0000:a2:00.0'"),
        ("0000:a2:00", "is not a PCI address"),
        ("0000:a2:000.0", "is not a PCI address"),
        ("00000:a2:00.0", "is not a PCI address"),  # the kernel writes no leading zero beyond four digits
        ("000:a2:00.0", "is not a PCI address"),
        ("100000000:a2:00.0", "is not a PCI address"),  # a domain is 32 bits
        ("0000:a2:00.0/../..", "is not a PCI address"),
        ("0000:a2:00.\u0660", "is not a PCI address"),  # Arabic-Indic zero is a \d, not a [0-7]
        ("", "is not a PCI address"),
    ],
)
def test_pci_address_refused(text: str, fragment: str) -> None:
    with pytest.raises(InvalidPciAddressInput) as e:
        v.pci_address(text)
    assert fragment in str(e.value)


def test_pci_address_not_a_string() -> None:
    with pytest.raises(InvalidPciAddressInput, match="must be a string, not bytes"):
        v.pci_address(b"0000:a2:00.0")


def test_device_name_length_boundaries() -> None:
    with pytest.raises(InvalidNameInput, match="2 to 128 characters"):
        v.device_name("a")
    assert v.device_name("ab") == "ab"
    assert v.device_name("a" * 128) == "a" * 128
    with pytest.raises(InvalidNameInput, match="not 129"):
        v.device_name("a" * 129)
    with pytest.raises(InvalidNameInput):
        v.device_name("")


@pytest.mark.parametrize("name", ["l4-gpu", "pci-0000-a2-00-0", "GPU_0", "0a", "a.b", "x-", "a_b.c-d"])
def test_device_name_accepted(name: str) -> None:
    assert v.device_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "l4-gpu\n",
        "\nl4-gpu",
        "l4\x00gpu",
        "l4/gpu",
        "..",
        ".hidden",
        "-flag",
        "_x",
        "l4 gpu",
        "gpü",
        "gpu\u0661",  # a Unicode digit
        "g\u0131",  # dotless i
        "a" * 129,
    ],
)
def test_device_name_refused(name: str) -> None:
    with pytest.raises(InvalidNameInput) as e:
        v.device_name(name)
    assert repr(name)[:40] in str(e.value)


def test_device_name_refuses_id_shaped_but_not_near_misses() -> None:
    idlike = "a" + "0" * 23
    with pytest.raises(InvalidNameInput, match="form of a device id"):
        v.device_name(idlike)
    # One character off the id format in each direction is a fine name.
    for near in ("a" + "0" * 22, "a" + "0" * 24, "A" + "0" * 23, "0" + "a" * 23, "a" + "0" * 22 + "-"):
        assert v.device_name(near) == near
        assert not v.is_device_id(near)


def test_is_device_id() -> None:
    assert v.is_device_id("c" + "k" * 23)
    assert not v.is_device_id("c" + "k" * 23 + "\n")
    assert not v.is_device_id("C" + "k" * 23)
    assert not v.is_device_id("1" + "k" * 23)
    assert not v.is_device_id(None)
    assert not v.is_device_id(42)
    assert not v.looks_like_device_id(b"c" + b"k" * 23)


def test_instance_id_boundaries() -> None:
    assert v.instance_id("a") == "a"
    assert v.instance_id("ml-training") == "ml-training"
    assert v.instance_id("vm:01.a_b-c") == "vm:01.a_b-c"
    assert v.instance_id("a" * 128) == "a" * 128
    with pytest.raises(InvalidInstanceIdInput, match="at most 128"):
        v.instance_id("a" * 129)
    assert v.instance_id("a..b") == "a..b"  # the contract's pattern allows it; ids never become paths
    for bad in ("", "ml-training\n", "-x", ":x", ".x", "a/b", "a\x00", "a b", "\u00e9t\u00e9"):
        with pytest.raises(InvalidInstanceIdInput) as e:
            v.instance_id(bad)
        assert repr(bad) in str(e.value)


def test_tags_boundaries() -> None:
    assert v.tags({}) == {}
    ok = {f"k{i}": "v" for i in range(50)}
    assert v.tags(ok) == ok
    with pytest.raises(InvalidTagsInput, match="51 tags given; at most 50"):
        v.tags({f"k{i}": "v" for i in range(51)})
    assert v.tags({"k": ""}) == {"k": ""}
    assert v.tags({"k" * 128: "x"}) == {"k" * 128: "x"}
    with pytest.raises(InvalidTagsInput, match="1 to 128"):
        v.tags({"k" * 129: "x"})
    with pytest.raises(InvalidTagsInput, match="1 to 128"):
        v.tags({"": "x"})
    assert v.tags({"k": "v" * 256}) == {"k": "v" * 256}
    with pytest.raises(InvalidTagsInput, match="257 characters"):
        v.tags({"k": "v" * 257})


def test_tags_charset() -> None:
    every = "aZ09 _.:/=+@-"
    assert v.tags({every: every}) == {every: every}
    assert v.tags({"team": "ml/training", "owner": "a@b", "ver": "1.2+3"}) == {
        "team": "ml/training",
        "owner": "a@b",
        "ver": "1.2+3",
    }
    for bad in ("a\n", "a\x00", "a\t", "a\r", "é", "a,b", "a;b", "a'b", "a\\b"):
        with pytest.raises(InvalidTagsInput) as e:
            v.tags({bad: "x"})
        assert repr(bad) in str(e.value)
        with pytest.raises(InvalidTagsInput) as e:
            v.tags({"k": bad})
        assert repr(bad) in str(e.value)


def test_tags_shape() -> None:
    for bad in (None, [("a", "b")], "a=b", 3):
        with pytest.raises(InvalidTagsInput, match="dictionary of strings"):
            v.tags(bad)
    with pytest.raises(InvalidTagsInput, match="must be a string, not int"):
        v.tags({1: "x"})
    with pytest.raises(InvalidTagsInput, match="must be a string, not int"):
        v.tags({"k": 1})


def test_tags_returns_a_copy() -> None:
    src = {"k": "v"}
    out = v.tags(src)
    src["k"] = "bad\n"
    assert out == {"k": "v"}
    assert type(out) is dict


def test_id_or_name() -> None:
    an_id = v.new_device_id()
    assert v.id_or_name(an_id) == an_id
    assert v.id_or_name("l4-gpu") == "l4-gpu"
    for bad in ("", "a", "../etc", "l4-gpu\n", an_id + "\n", "a/b", None, 7):
        with pytest.raises(InvalidNameInput, match="neither a device id nor a valid device name"):
            v.id_or_name(bad)


@pytest.mark.parametrize(
    ("validate", "good"),
    [
        (v.pci_address, "0000:a2:00.0"),
        (v.device_name, "l4-gpu"),
        (v.instance_id, "ml-training"),
        (v.id_or_name, "l4-gpu"),
        (v.id_or_name, "c" + "k" * 23),
    ],
)
def test_trailing_newline_refused_by_every_validator(validate: Callable[[object], Any], good: str) -> None:
    assert validate(good) == good
    with pytest.raises(ValueError, match=re.escape(repr(good + "\n"))):
        validate(good + "\n")


def test_trailing_newline_refused_in_tags() -> None:
    with pytest.raises(InvalidTagsInput):
        v.tags({"k\n": "v"})
    with pytest.raises(InvalidTagsInput):
        v.tags({"k": "v\n"})


def test_huge_input_gives_a_short_message() -> None:
    with pytest.raises(InvalidNameInput) as e:
        v.device_name("\n" * 1_000_000)
    assert len(str(e.value)) < 300
    assert "(1000000 characters)" in str(e.value)
    with pytest.raises(InvalidPciAddressInput) as e2:
        v.pci_address("x" * 1_000_000)
    assert len(str(e2.value)) < 300


def test_errors_are_value_errors() -> None:
    for cls in (InvalidPciAddressInput, InvalidNameInput, InvalidInstanceIdInput, InvalidTagsInput):
        assert issubclass(cls, ValueError)


@pytest.mark.parametrize(
    ("check", "value", "contract_error"),
    [
        (v.pci_address, "a2:00.0", "InvalidPCIAddress"),
        (v.device_name, "a/b", "InvalidName"),
        (v.id_or_name, "", "InvalidName"),
        (v.instance_id, "", "InvalidArgument"),
        (v.tags, {"": "x"}, "InvalidArgument"),
    ],
)
def test_a_bad_value_is_the_contract_error_and_a_value_error(
    check: Callable[[Any], object], value: object, contract_error: str
) -> None:
    # The one place a bad value becomes the named error a D-Bus caller gets; file parsers catch ValueError.
    with pytest.raises(VfiodError) as err:
        check(value)
    assert err.value.name == contract_error
    assert isinstance(err.value, ValueError)
    assert err.value.message == str(err.value)
