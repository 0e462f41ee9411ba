"""The simulated tree as data, and how it reaches the disk: an `Entry` per path (directory, file or
relative symlink), `apply_tree` turning one rendering into the next (removals deepest first, creations
shallowest first, files replaced by write-then-rename so a reader sees the old or the new value), and the
flock every mutation takes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TMP_SUFFIX = ".sim-tmp"


def oserror(code: int, detail: str = "") -> OSError:
    # OSError(ENOENT, ...) is a FileNotFoundError, OSError(EISDIR, ...) an IsADirectoryError, and so on.
    return OSError(code, os.strerror(code) + (f": {detail}" if detail else ""))


# ----- the tree: entries and how a difference is applied -----------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One path of the tree: a directory, a regular file (data = content) or a symlink (data = target)."""

    kind: str  # "d", "f" or "l"
    data: bytes = b""
    mode: int = 0o755


Tree = dict[str, Entry]  # path relative to the root ("sys/bus/pci/drivers_probe") -> entry

DIR = Entry("d")


def file_entry(content: str | bytes, mode: int = 0o444) -> Entry:
    return Entry("f", content.encode() if isinstance(content, str) else content, mode)


def _relpath(target: str, start: str) -> str:
    # posixpath.relpath for two normalised root-relative paths, without its abspath calls (hot at build)
    t = target.split("/")
    s = start.split("/") if start else []
    i = 0
    while i < len(t) and i < len(s) and t[i] == s[i]:
        i += 1
    return "/".join([".."] * (len(s) - i) + t[i:]) or "."


def put_link(tree: Tree, at: str, target: str) -> None:
    """A relative symlink at `at` to `target` (both relative to the root), so the tree can move."""
    tree[at] = Entry("l", _relpath(target, posixpath.dirname(at)).encode(), 0o777)


def _depth(path: str) -> int:
    return path.count("/")


def _remove_path(path: str, kind: str) -> None:
    try:
        if kind == "d":
            try:
                os.rmdir(path)
            except OSError as e:
                if e.errno != errno.ENOTEMPTY:
                    raise
                # A write-then-rename interrupted by a killed process can leave its temporary file here.
                # Anything else belongs to another key: keep the directory rather than lose it.
                for name in os.listdir(path):
                    if name.endswith(TMP_SUFFIX):
                        os.unlink(os.path.join(path, name))
                with contextlib.suppress(OSError):
                    os.rmdir(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _write_new(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)  # the umask must not decide an attribute's mode
    finally:
        os.close(fd)


def _replace_file(path: str, data: bytes, mode: int) -> None:
    # Write-then-rename: a reader (Host in another thread or process) sees the old or the new value.
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}{TMP_SUFFIX}")
    _write_new(tmp, data, mode)
    os.replace(tmp, path)


def _matches_disk(path: str, entry: Entry) -> bool:
    try:
        if entry.kind == "d":
            return os.path.isdir(path) and not os.path.islink(path)
        if entry.kind == "l":
            return os.readlink(path) == entry.data.decode()
        if os.path.islink(path) or not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            return f.read() == entry.data
    except OSError:
        return False


def apply_tree(root: Path, old: Tree, new: Tree, *, verify: bool = False) -> list[str]:
    """Turn the on-disk tree from `old` into `new`: removals deepest first, then creations shallowest
    first. With `verify`, every entry of `new` is checked on disk (repair after an interrupted update).
    Returns the removed paths."""
    base = str(root)
    doomed = [
        p
        for p, e in old.items()
        if (n := new.get(p)) is None or n.kind != e.kind or (n.kind == "l" and n != e)
    ]
    doomed_set = set(doomed)
    for p in sorted(doomed, key=_depth, reverse=True):
        _remove_path(f"{base}/{p}", old[p].kind)
    for p in sorted(new, key=_depth):
        e = new[p]
        o = old.get(p)
        existed = o is not None and p not in doomed_set
        if existed and o == e and not verify:
            continue
        path = f"{base}/{p}"
        if verify:
            if _matches_disk(path, e):
                continue
            if os.path.lexists(path):
                _remove_path(path, "d" if os.path.isdir(path) and not os.path.islink(path) else "f")
                existed = False
        if e.kind == "d":
            with contextlib.suppress(FileExistsError):
                os.mkdir(path)
        elif e.kind == "l":
            with contextlib.suppress(FileNotFoundError):
                if existed or verify:
                    os.unlink(path)
            os.symlink(e.data.decode(), path)
        elif existed:
            _replace_file(path, e.data, e.mode)
        else:
            _write_new(path, e.data, e.mode)
    return doomed


@contextlib.contextmanager
def flock(path: Path) -> Iterator[None]:
    """An exclusive flock for the duration of the block. Each call opens the file anew, so two threads of
    one process exclude each other as two processes do."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
