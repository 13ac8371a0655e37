"""A seccomp filter for the local sandbox: no nested user namespaces, no kernel keyrings.

Inside bubblewrap the command could still create a user namespace of its own (``unshare -U``,
then ``mount`` inside it: a larger attack surface of the kernel than the sandbox needs), and it
shares the kernel's keyrings with every later process of its uid (``add_key``, ``keyctl``: data
that outlives the run). Neither is needed to train a model. The filter below, given to bubblewrap
with ``--seccomp FD`` and applied just before the command starts, answers:

- ``unshare`` and ``clone`` with ``CLONE_NEWUSER`` set: ``EPERM``;
- ``clone3`` (its flags sit in memory a filter cannot read): ``ENOSYS``, so that the C library
  falls back to ``clone``, which the filter can check;
- ``keyctl``, ``add_key``, ``request_key``: ``EPERM``;
- on x86-64, any call through the x32 ABI: ``EPERM`` (it would bypass the numbers above).

Docker's default seccomp profile already refuses all of these. The program is classic BPF, as
the kernel's ``struct sock_filter`` array (``linux/filter.h``, ``linux/seccomp.h``); the numbers
are the kernel's, per architecture (x86-64 and aarch64; elsewhere no filter is made).
"""

from __future__ import annotations

import errno
import platform
import struct

# BPF instruction classes and fields (linux/bpf_common.h)
_LD, _W, _ABS = 0x00, 0x00, 0x20
_JMP, _JEQ, _JSET, _JGE, _K = 0x05, 0x10, 0x40, 0x30, 0x00
_RET = 0x06
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
_CLONE_NEWUSER = 0x10000000
_X32_BIT = 0x40000000

#: seccomp_data offsets: nr (int), arch (u32), instruction pointer (u64), args[6] (u64, little-endian low word first).
_NR, _ARCH, _ARG0 = 0, 4, 16

#: machine -> (AUDIT_ARCH value, syscall numbers), from the kernel's syscall tables.
_ARCHES = {
    "x86_64": (0xC000003E, {"keyctl": 250, "add_key": 248, "request_key": 249, "unshare": 272, "clone": 56, "clone3": 435}),
    "aarch64": (0xC00000B7, {"keyctl": 219, "add_key": 217, "request_key": 218, "unshare": 97, "clone": 220, "clone3": 435}),
}


def _ins(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def filter_program(machine: str | None = None) -> bytes | None:
    """The filter as bytes for ``bwrap --seccomp FD``; ``None`` on an architecture it does not know.

    Parameters
    ----------
    machine
        ``platform.machine()`` by default.
    """
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        return None
    arch, nr = _ARCHES[machine]
    eperm, enosys = _SECCOMP_RET_ERRNO | errno.EPERM, _SECCOMP_RET_ERRNO | errno.ENOSYS
    # Laid out with labels resolved by hand: each jump counts the instructions it skips.
    prog = [
        _ins(_LD | _W | _ABS, 0, 0, _ARCH),
        _ins(_JMP | _JEQ | _K, 1, 0, arch),  # our architecture: go on; another (a 32-bit ABI on a 64-bit kernel): refuse
        _ins(_RET, 0, 0, eperm),
        _ins(_LD | _W | _ABS, 0, 0, _NR),
    ]
    if machine == "x86_64":
        prog.append(_ins(_JMP | _JGE | _K, 0, 1, _X32_BIT))  # x32 ABI numbers: refuse
        prog.append(_ins(_RET, 0, 0, eperm))
    for name in ("keyctl", "add_key", "request_key"):
        prog.append(_ins(_JMP | _JEQ | _K, 0, 1, nr[name]))
        prog.append(_ins(_RET, 0, 0, eperm))
    prog.append(_ins(_JMP | _JEQ | _K, 0, 1, nr["clone3"]))
    prog.append(_ins(_RET, 0, 0, enosys))
    # unshare(flags) and clone(flags, ...): the flags are the first argument
    prog.append(_ins(_JMP | _JEQ | _K, 1, 0, nr["unshare"]))
    prog.append(_ins(_JMP | _JEQ | _K, 0, 4, nr["clone"]))
    prog.append(_ins(_LD | _W | _ABS, 0, 0, _ARG0))
    prog.append(_ins(_JMP | _JSET | _K, 0, 1, _CLONE_NEWUSER))
    prog.append(_ins(_RET, 0, 0, eperm))
    prog.append(_ins(_RET, 0, 0, _SECCOMP_RET_ALLOW))
    prog.append(_ins(_RET, 0, 0, _SECCOMP_RET_ALLOW))
    return b"".join(prog)
