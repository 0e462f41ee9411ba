"""How the kernel parses what is written to an attribute: kstrtoul, simple_strtoul and sscanf("%x")."""

from __future__ import annotations

import re

_HEX_RE = re.compile(r"([+-]?)(?:0[xX])?([0-9a-fA-F]+)")


def kstrtoul(data: bytes) -> int | None:
    """lib/kstrtox.c kstrtoul(buf, 0): decimal, 0x hex or 0 octal, one trailing newline allowed."""
    s = data.split(b"\0", 1)[0]
    if s.endswith(b"\n"):
        s = s[:-1]
    text = s.decode("ascii", "replace").removeprefix("+")
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
        return int(text, 16)
    if re.fullmatch(r"0[0-7]*", text):
        return int(text, 8)
    if re.fullmatch(r"[1-9][0-9]*", text):
        return int(text)
    return None


def simple_strtoul(data: bytes) -> int:
    """simple_strtoul(buf, NULL, 0): the leading number (0x hex, 0 octal, decimal), 0 if there is none."""
    m = re.match(rb"\s*(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", data)
    if m is None:
        return 0
    text = m[1].decode()
    if text[:2] in ("0x", "0X"):
        return int(text, 16)
    return int(text, 8) if text.startswith("0") else int(text)


def scan_hex(data: bytes, limit: int) -> list[int]:
    """sscanf(buf, "%x %x ...") : the fields converted before the first that does not parse."""
    text = data.split(b"\0", 1)[0].decode("ascii", "replace")
    out: list[int] = []
    i = 0
    while len(out) < limit:
        while i < len(text) and text[i].isspace():
            i += 1
        m = _HEX_RE.match(text, i)
        if m is None:
            break
        value = int(m[2], 16)
        out.append((-value if m[1] == "-" else value) & 0xFFFFFFFF)
        i = m.end()
    return out


def streq(a: bytes, b: bytes) -> bool:
    """lib/string.c sysfs_streq: equal up to the first NUL, ignoring one trailing newline on either."""
    return streq_form(a) == streq_form(b)


def streq_form(s: bytes) -> bytes:
    """What sysfs_streq compares: the bytes before the first NUL, less one trailing newline."""
    s = s.split(b"\0", 1)[0]
    return s[:-1] if s.endswith(b"\n") else s


def kstrtol10(data: bytes) -> int | None:
    """lib/kstrtox.c kstrtol(buf, 10): an optional sign and decimal digits, one trailing newline allowed;
    None for anything else (the kernel's -EINVAL) or past a long (-ERANGE)."""
    s = data.split(b"\0", 1)[0]
    if s.endswith(b"\n"):
        s = s[:-1]
    text = s.decode("ascii", "replace")
    if re.fullmatch(r"[+-]?[0-9]+", text) is None:
        return None
    value = int(text)
    return value if -(2**63) <= value < 2**63 else None
