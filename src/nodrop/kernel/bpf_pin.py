"""Pinning eBPF steering on a bpf filesystem, so other processes can reach it.

``BPF_OBJ_PIN`` puts a map or program under a path on a bpffs mount
(``mount -t bpf bpf /sys/fs/bpf``); ``BPF_OBJ_GET`` opens it again from
another process. :class:`SharedSteering` is a
:class:`~nodrop.kernel.bpf.ReuseportSteering` that can be pinned, opened from
its pins, or rebuilt from passed fds.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
from pathlib import Path
from typing import Final

from nodrop.errors import BpfError
from nodrop.kernel.bpf import ATTR_SIZE, ReuseportSteering, bpf_call

BPF_OBJ_PIN: Final = 6
BPF_OBJ_GET: Final = 7
#: File names of the pinned objects inside a pin directory.
MAP_FILE: Final = "map"
PROG_FILE: Final = "prog"


# --- pure ------------------------------------------------------------------------


def bpffs_mount_points(mounts: str) -> list[str]:
    """Mount points of bpf filesystems, from the text of /proc/self/mounts."""
    out = []
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "bpf":
            # /proc/mounts escapes spaces and the like as octal (\040)
            out.append(fields[1].encode().decode("unicode_escape"))
    return out


def _under(path: str, mount_point: str) -> bool:
    return path == mount_point or path.startswith(mount_point.rstrip("/") + "/")


# --- bpffs -----------------------------------------------------------------------


def is_on_bpffs(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` lies under a mounted bpf filesystem."""
    try:
        with open("/proc/self/mounts") as f:
            points = bpffs_mount_points(f.read())
    except OSError:
        return False
    real = os.path.realpath(path)
    return any(_under(real, p) for p in points)


def _obj(cmd: int, path: Path, fd: int, what: str) -> int:
    name = ctypes.create_string_buffer(os.fsencode(path))
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    # pathname, bpf_fd, file_flags
    struct.pack_into("=QII", attr, 0, ctypes.addressof(name), fd, 0)
    return bpf_call(cmd, attr, f"{what} {path}")


class SharedSteering(ReuseportSteering):
    """A :class:`~nodrop.kernel.bpf.ReuseportSteering` that other processes can reach:
    pinned on a bpf filesystem, or rebuilt from passed fds."""

    @classmethod
    def from_fds(cls, map_fd: int, prog_fd: int) -> SharedSteering:
        """Adopt copies of a steering's ``(map_fd, prog_fd)`` (the originals
        stay the caller's)."""
        own_map = os.dup(map_fd)
        try:
            own_prog = os.dup(prog_fd)
        except BaseException:
            os.close(own_map)
            raise
        steering = cls.adopt_fds(own_map, own_prog)
        assert isinstance(steering, SharedSteering)
        return steering

    @classmethod
    def open_pinned(cls, pin_dir: str | os.PathLike[str]) -> SharedSteering:
        """Open the map and program pinned in ``pin_dir`` (BPF_OBJ_GET).

        Raises:
            BpfError: ENOENT if nothing is pinned there.
        """
        where = Path(pin_dir)
        self = cls.adopt_fds(-1, -1)
        assert isinstance(self, SharedSteering)
        try:
            self._map_fd = _obj(BPF_OBJ_GET, where / MAP_FILE, 0, "OBJ_GET")
            self._prog_fd = _obj(BPF_OBJ_GET, where / PROG_FILE, 0, "OBJ_GET")
        except BaseException:
            self.close()
            raise
        return self

    def pin(self, pin_dir: str | os.PathLike[str]) -> None:
        """Pin the map and program in ``pin_dir`` (created if missing).

        Raises:
            BpfError: ``pin_dir`` is not on a bpf filesystem, or EEXIST when
                another steering is pinned there already.
        """
        where = Path(pin_dir)
        if not is_on_bpffs(where):
            raise BpfError(
                errno.EOPNOTSUPP,
                f"{where} is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf), "
                "or pass the steering fds to the next process instead",
            )
        where.mkdir(parents=True, exist_ok=True)
        map_fd, prog_fd = self.fds
        _obj(BPF_OBJ_PIN, where / MAP_FILE, map_fd, "OBJ_PIN")
        try:
            _obj(BPF_OBJ_PIN, where / PROG_FILE, prog_fd, "OBJ_PIN")
        except BpfError:
            with contextlib.suppress(OSError):
                os.unlink(where / MAP_FILE)
            raise

    @staticmethod
    def unpin(pin_dir: str | os.PathLike[str]) -> None:
        """Remove what is pinned in ``pin_dir`` (the objects live on while
        open or attached)."""
        where = Path(pin_dir)
        for name in (PROG_FILE, MAP_FILE):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(where / name)
        with contextlib.suppress(OSError):
            where.rmdir()
