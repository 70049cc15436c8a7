"""eBPF steering for a SO_REUSEPORT group: pick the new generation's listener.

One small program of type ``BPF_PROG_TYPE_SK_REUSEPORT`` and a one-slot
``BPF_MAP_TYPE_REUSEPORT_SOCKARRAY`` map do two jobs for one listener address:

* every new connection goes to the listener in slot 0 (the "active" one), even
  while the old generation's listener is still open, and
* when a listener of the group closes, the kernel (5.14+, attach type
  ``BPF_SK_REUSEPORT_SELECT_OR_MIGRATE``) runs the same program to pick where
  its queued children and half-open requests go -- slot 0 again -- instead of
  resetting them. This works with ``net.ipv4.tcp_migrate_req=0``.

Everything goes through bpf(2) with ctypes: no clang, bcc or libbpf at runtime.
The map and program fds are close-on-exec: the kernel has created every bpf fd
with ``O_CLOEXEC`` since bpf(2) first appeared (``anon_inode_getfd(...,
O_RDWR | O_CLOEXEC)`` in kernel/bpf/syscall.c); :meth:`ReuseportSteering.fds`
lets the tests check it.

The program belongs to the reuseport group, not to the socket it was attached
through: it stays in force after that socket closes, and the map holds the
group's sockets only while they are open (a closed socket's slot empties by
itself).
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import platform
import socket
import struct
from types import TracebackType
from typing import Final, NamedTuple

from nodrop.errors import BpfError

__all__ = [
    "Insn",
    "ReuseportSteering",
    "add64_imm",
    "bpf_call",
    "call",
    "encode",
    "exit_",
    "ld_map_fd",
    "load_program",
    "mov64_imm",
    "mov64_reg",
    "probe_ebpf",
    "socket_cookie",
    "st_mem",
    "steering_program",
    "stx_mem",
]

# --- kernel constants (include/uapi/linux/bpf.h, asm-generic/socket.h) -------

BPF_MAP_CREATE: Final = 0
BPF_MAP_LOOKUP_ELEM: Final = 1
BPF_MAP_UPDATE_ELEM: Final = 2
BPF_MAP_DELETE_ELEM: Final = 3
BPF_PROG_LOAD: Final = 5

BPF_MAP_TYPE_REUSEPORT_SOCKARRAY: Final = 20
BPF_PROG_TYPE_SK_REUSEPORT: Final = 21
BPF_SK_REUSEPORT_SELECT: Final = 39
BPF_SK_REUSEPORT_SELECT_OR_MIGRATE: Final = 40
BPF_FUNC_sk_select_reuseport: Final = 82
BPF_PSEUDO_MAP_FD: Final = 1
BPF_ANY: Final = 0

SK_DROP: Final = 0
SK_PASS: Final = 1

SO_ATTACH_REUSEPORT_EBPF: Final = 52
SO_COOKIE: Final = 57

#: bpf(2) syscall numbers by ``platform.machine()``.
BPF_SYSCALL_NR: Final[dict[str, int]] = {
    "x86_64": 321,
    "aarch64": 280,
    "arm64": 280,
    "riscv64": 280,  # the generic syscall table, like aarch64
}

#: Size given to the kernel for every ``union bpf_attr``; the kernel accepts a
#: larger struct as long as the bytes it does not know are zero.
ATTR_SIZE: Final = 128
#: Verifier log buffer used when a load fails and is retried with a log.
LOG_SIZE: Final = 64 * 1024
#: Names shown by ``bpftool`` (at most 15 chars, [A-Za-z0-9_.]).
MAP_NAME: Final = b"nodrop_active"
PROG_NAME: Final = b"nodrop_steer"

# --- a tiny assembler --------------------------------------------------------
# struct bpf_insn { u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm; }
# (little-endian bit-field order: dst in the low nibble).

# instruction classes, sizes, modes, ops, sources
_LD, _ST, _STX, _JMP, _ALU64 = 0x00, 0x02, 0x03, 0x05, 0x07
_W, _DW = 0x00, 0x18
_IMM, _MEM = 0x00, 0x60
_ADD, _MOV = 0x00, 0xB0
_CALL, _EXIT = 0x80, 0x90
_K, _X = 0x00, 0x08

R0, R1, R2, R3, R4, R10 = 0, 1, 2, 3, 4, 10


class Insn(NamedTuple):
    """One 8-byte eBPF instruction."""

    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0

    def pack(self) -> bytes:
        """The instruction's 8 bytes as the kernel reads them."""
        return struct.pack("<BBhi", self.code, (self.src << 4) | self.dst, self.off, self.imm)


def mov64_imm(dst: int, imm: int) -> list[Insn]:
    """``dst = imm``"""
    return [Insn(_ALU64 | _MOV | _K, dst=dst, imm=imm)]


def mov64_reg(dst: int, src: int) -> list[Insn]:
    """``dst = src``"""
    return [Insn(_ALU64 | _MOV | _X, dst=dst, src=src)]


def add64_imm(dst: int, imm: int) -> list[Insn]:
    """``dst += imm``"""
    return [Insn(_ALU64 | _ADD | _K, dst=dst, imm=imm)]


def st_mem(dst: int, off: int, imm: int) -> list[Insn]:
    """``*(u32 *)(dst + off) = imm``"""
    return [Insn(_ST | _MEM | _W, dst=dst, off=off, imm=imm)]


def stx_mem(dst: int, off: int, src: int) -> list[Insn]:
    """``*(u32 *)(dst + off) = src``"""
    return [Insn(_STX | _MEM | _W, dst=dst, src=src, off=off)]


def ld_map_fd(dst: int, map_fd: int) -> list[Insn]:
    """``dst = &map`` -- a two-slot ld_imm64 the verifier rewrites to the map."""
    return [
        Insn(_LD | _DW | _IMM, dst=dst, src=BPF_PSEUDO_MAP_FD, imm=map_fd),
        Insn(0),  # upper 32 bits of the 64-bit immediate
    ]


def call(helper: int) -> list[Insn]:
    """``r0 = helper(r1, ..., r5)``"""
    return [Insn(_JMP | _CALL, imm=helper)]


def exit_() -> list[Insn]:
    """``return r0``"""
    return [Insn(_JMP | _EXIT)]


def encode(program: list[Insn]) -> bytes:
    """The program's bytes, ready for ``BPF_PROG_LOAD``."""
    return b"".join(insn.pack() for insn in program)


def steering_program(map_fd: int) -> list[Insn]:
    """The steering program for the sockarray ``map_fd``.

    The equivalent C::

        SEC("sk_reuseport/migrate")
        int steer(struct sk_reuseport_md *ctx)
        {
            __u32 key = 0;
            bpf_sk_select_reuseport(ctx, &active, &key, 0);
            return SK_PASS;
        }

    The helper's result is ignored on purpose: if slot 0 is empty (or holds a
    socket that is closing), SK_PASS with no selection makes the kernel fall
    back to its hash -- the same choice it would make without the program.
    """
    return [
        *st_mem(R10, -4, 0),  # __u32 key = 0;      (on the stack at fp-4)
        *ld_map_fd(R2, map_fd),  # r2 = &active;
        *mov64_reg(R3, R10),  # r3 = fp;
        *add64_imm(R3, -4),  # r3 = &key;
        *mov64_imm(R4, 0),  # r4 = flags = 0;    r1 is still ctx
        *call(BPF_FUNC_sk_select_reuseport),  # bpf_sk_select_reuseport(ctx, &active, &key, 0);
        *mov64_imm(R0, SK_PASS),  # return SK_PASS;
        *exit_(),
    ]


# --- bpf(2) ------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _bpf_nr() -> int:
    machine = platform.machine()
    try:
        return BPF_SYSCALL_NR[machine]
    except KeyError:
        raise BpfError(
            errno_mod.ENOSYS, f"bpf(2) syscall number unknown for machine {machine!r}"
        ) from None


def bpf_call(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    """Call bpf(2); return its result or raise BpfError naming ``what``."""
    nr = ctypes.c_long(_bpf_nr())
    ret = int(_syscall(nr, ctypes.c_long(cmd), attr, ctypes.c_long(ATTR_SIZE)))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf({what}) failed: {os.strerror(err)}")
    return ret


def _addr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def _create_map() -> int:
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    # map_type, key_size, value_size, max_entries, map_flags, inner_map_fd, numa_node
    struct.pack_into("=IIIIIII", attr, 0, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, 1, 0, 0, 0)
    struct.pack_into("16s", attr, 28, MAP_NAME)  # map_name
    return bpf_call(BPF_MAP_CREATE, attr, "MAP_CREATE reuseport_sockarray")


def _load_prog(insns: bytes, attach_type: int, log: ctypes.Array[ctypes.c_char] | None) -> int:
    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(b"GPL")  # sk_select_reuseport is GPL-only
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf
    struct.pack_into(
        "=IIQQIIQ",
        attr,
        0,
        BPF_PROG_TYPE_SK_REUSEPORT,
        len(insns) // 8,
        _addr(code),
        _addr(license_),
        1 if log is not None else 0,
        len(log) if log is not None else 0,
        _addr(log) if log is not None else 0,
    )
    struct.pack_into("16s", attr, 48, PROG_NAME)  # prog_name
    struct.pack_into("=I", attr, 68, attach_type)  # expected_attach_type
    return bpf_call(BPF_PROG_LOAD, attr, "PROG_LOAD sk_reuseport")


def load_program(map_fd: int, attach_type: int) -> int:
    """Load :func:`steering_program` for ``map_fd``; return the program fd.

    Raises:
        BpfError: with the errno and the verifier's log when the load fails.
    """
    insns = encode(steering_program(map_fd))
    try:
        return _load_prog(insns, attach_type, None)
    except BpfError as first:
        # Load again with a log, as libbpf does: the log costs time and memory
        # on success, so it is only asked for to explain a failure.
        log = ctypes.create_string_buffer(LOG_SIZE)
        try:
            return _load_prog(insns, attach_type, log)
        except BpfError:
            text = log.value.decode(errors="replace").strip() or "(empty verifier log)"
            raise BpfError(
                first.errno,
                f"cannot load the reuseport steering program (attach type {attach_type}): "
                f"{os.strerror(first.errno or 0)}; verifier log:\n{text}",
            ) from first


def _map_elem(cmd: int, map_fd: int, value: int | None, what: str) -> int:
    key = ctypes.create_string_buffer(struct.pack("=I", 0), 4)
    val = ctypes.create_string_buffer(struct.pack("=Q", value or 0), 8)
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    # map_fd, pad, key, value, flags; DELETE takes no value: the kernel
    # rejects (EINVAL) non-zero bytes past the last field a command uses.
    value_ptr = 0 if cmd == BPF_MAP_DELETE_ELEM else _addr(val)
    struct.pack_into("=IIQQQ", attr, 0, map_fd, 0, _addr(key), value_ptr, BPF_ANY)
    bpf_call(cmd, attr, what)
    return int(struct.unpack("=Q", val.raw)[0])


def socket_cookie(sock: socket.socket) -> int:
    """The kernel's 64-bit socket cookie (``SO_COOKIE``): stable and unique
    for the socket's life, the value a sockarray reads back."""
    return int(struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])


class ReuseportSteering:
    """Steer one reuseport group (one listener address) to an active listener.

    Usage::

        with ReuseportSteering() as steering:
            steering.attach(old)      # once, through any listener of the group
            steering.steer_to(old)
            ...
            steering.steer_to(new)    # new connections now go to `new`
            old.close()               # old's queue migrates to `new`

    Args:
        migrate: load with ``BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`` so that a
            closing listener's queued connections migrate to the active one.
            ``False`` loads with plain ``SELECT`` (kernels before 5.14): new
            connections are steered but a closing listener's queue is reset
            unless ``net.ipv4.tcp_migrate_req`` is 1.

    Raises:
        BpfError: the map or program cannot be created (no CAP_BPF, kernel
            without the map type or attach type...).
    """

    def __init__(self, *, migrate: bool = True) -> None:
        self.migrate = migrate
        self._map_fd = -1
        self._prog_fd = -1
        self._map_fd = _create_map()
        try:
            attach_type = BPF_SK_REUSEPORT_SELECT_OR_MIGRATE if migrate else BPF_SK_REUSEPORT_SELECT
            self._prog_fd = load_program(self._map_fd, attach_type)
        except BaseException:
            self.close()
            raise

    @classmethod
    def adopt_fds(cls, map_fd: int, prog_fd: int, *, migrate: bool = True) -> ReuseportSteering:
        """Take ownership of an existing map and program (opened from a pin,
        or received from another process); they are closed by :meth:`close`."""
        self = cls.__new__(cls)
        self.migrate = migrate
        self._map_fd = map_fd
        self._prog_fd = prog_fd
        return self

    @property
    def fds(self) -> tuple[int, int]:
        """``(map_fd, prog_fd)``; -1 once closed."""
        return self._map_fd, self._prog_fd

    def _check_open(self) -> None:
        if self._prog_fd < 0:
            raise BpfError(errno_mod.EBADF, "reuseport steering is closed")

    def attach(self, sock: socket.socket) -> None:
        """Attach the program to ``sock``'s reuseport group.

        Call it once per group, through any bound SO_REUSEPORT socket of it;
        the program then applies to every socket of the group, including
        listeners that join later, and outlives ``sock``.

        Raises:
            BpfError: the kernel refused (socket not bound with SO_REUSEPORT...).
        """
        self._check_open()
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, self._prog_fd)
        except OSError as exc:
            raise BpfError(
                exc.errno, f"cannot attach steering to {sock.getsockname()!r}: {exc.strerror}"
            ) from exc

    def steer_to(self, sock: socket.socket) -> None:
        """Make ``sock`` the active listener: new connections, and the queued
        connections of any listener of the group that closes, go to it.

        Raises:
            BpfError: ``sock`` is not a listening TCP or bound UDP SO_REUSEPORT
                socket (EINVAL/EOPNOTSUPP), or is already in the map (EBUSY).
        """
        self._check_open()
        try:
            _map_elem(BPF_MAP_UPDATE_ELEM, self._map_fd, sock.fileno(), "MAP_UPDATE_ELEM")
        except BpfError as exc:
            hint = {
                errno_mod.EBUSY: "the socket is already the active listener",
                errno_mod.EINVAL: "need a listening TCP or a bound UDP socket with SO_REUSEPORT",
                errno_mod.EOPNOTSUPP: "need a listening TCP or a bound UDP socket with SO_REUSEPORT",
            }.get(exc.errno or 0, exc.strerror or "")
            raise BpfError(exc.errno, f"cannot steer to fd {sock.fileno()}: {hint}") from exc

    def active_cookie(self) -> int | None:
        """The :func:`socket_cookie` of the active listener, or None if the
        slot is empty (never set, or that listener has closed)."""
        self._check_open()
        try:
            return _map_elem(BPF_MAP_LOOKUP_ELEM, self._map_fd, None, "MAP_LOOKUP_ELEM")
        except BpfError as exc:
            if exc.errno == errno_mod.ENOENT:
                return None
            raise

    def clear(self) -> None:
        """Empty the slot: the kernel goes back to hashing across the group."""
        self._check_open()
        try:
            _map_elem(BPF_MAP_DELETE_ELEM, self._map_fd, None, "MAP_DELETE_ELEM")
        except BpfError as exc:
            if exc.errno != errno_mod.ENOENT:
                raise

    def close(self) -> None:
        """Close the map and program fds. An attached program stays in force
        (the group holds it) until the last socket of the group closes."""
        for fd in (self._prog_fd, self._map_fd):
            if fd >= 0:
                os.close(fd)
        self._prog_fd = self._map_fd = -1

    def __enter__(self) -> ReuseportSteering:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def probe_ebpf(*, migrate: bool = True) -> tuple[bool, str]:
    """Try, for real, to create the map and load the steering program.

    Returns:
        ``(True, description)`` or ``(False, reason)``; never raises for an
        unsupported kernel or a missing capability.
    """
    try:
        with ReuseportSteering(migrate=migrate):
            pass
    except BpfError as exc:
        first = str(exc).splitlines()[0]
        if exc.errno == errno_mod.EPERM:
            first += " (needs CAP_BPF or CAP_SYS_ADMIN)"
        return False, first
    except OSError as exc:  # pragma: no cover - ctypes/libc trouble
        return False, f"bpf(2) unavailable: {exc}"
    kind = "SELECT_OR_MIGRATE" if migrate else "SELECT"
    return True, f"reuseport sockarray and sk_reuseport program ({kind}) load"
