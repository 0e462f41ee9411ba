"""Reading many entries of one sysfs directory in one pass: the directory opened once, every attribute,
link and sub-directory reached relative to its descriptor.

A listing reads about a dozen entries of every PCI function. Through full paths each read walks the whole
path again and builds a path string; relative to one directory descriptor the kernel resolves one name,
and an attribute takes one `read` (a sysfs attribute is at most a page, and kernfs returns it whole), not
a second one to see the end of the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_CHUNK = 8192  # more than a page: a shorter read returned the whole attribute
_FLAGS = os.O_RDONLY | os.O_CLOEXEC


@dataclass(frozen=True)
class DirectoryRead:
    """What one pass found: each attribute's stripped text, each link's target's base name, and each
    sub-directory's sorted entries (None for an attribute or link that is not there, () for a missing
    sub-directory, as `Host.read_text`, `Host.link_name` and `Host.list_dir` answer)."""

    files: dict[str, str | None]
    links: dict[str, str | None]
    dirs: dict[str, tuple[str, ...]]


def read_directory(
    directory: str, files: tuple[str, ...], links: tuple[str, ...] = (), dirs: tuple[str, ...] = ()
) -> DirectoryRead | None:
    """Read `files`, `links` and `dirs` of `directory`; None if the directory itself cannot be opened."""
    try:
        dfd = os.open(directory, _FLAGS | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        return DirectoryRead(
            {name: _read(name, dfd) for name in files},
            {name: _link(name, dfd) for name in links},
            {name: _list(name, dfd) for name in dirs},
        )
    finally:
        os.close(dfd)


def _read(name: str, dfd: int) -> str | None:
    try:
        fd = os.open(name, _FLAGS, dir_fd=dfd)
    except OSError:
        return None
    try:
        data = os.read(fd, _CHUNK)
        if len(data) == _CHUNK:  # not a sysfs attribute after all: read to the end
            chunks = [data]
            while chunk := os.read(fd, _CHUNK):
                chunks.append(chunk)
            data = b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data.decode("utf-8", "replace").strip()


def _link(name: str, dfd: int) -> str | None:
    try:
        return os.path.basename(os.readlink(name, dir_fd=dfd))
    except OSError:
        return None


def _list(name: str, dfd: int) -> tuple[str, ...]:
    try:
        fd = os.open(name, _FLAGS | os.O_DIRECTORY, dir_fd=dfd)
    except OSError:
        return ()
    try:
        return tuple(sorted(os.listdir(fd)))
    except OSError:
        return ()
    finally:
        os.close(fd)
