"""Errors of the kernel boundary: each names the operation, the range and the errno."""

from __future__ import annotations

import errno as _errno
import os


class UffdError(OSError):
    """A userfaultfd operation failed.

    ``done`` is the number of bytes the kernel completed before failing (>= 0, never a
    negative errno), so partial progress survives the exception.
    """

    op: str
    start: int
    length: int
    done: int

    def __init__(
        self,
        err: int,
        op: str,
        start: int = 0,
        length: int = 0,
        done: int = 0,
        detail: str = "",
    ) -> None:
        name = _errno.errorcode.get(err, str(err))
        msg = f"{op}(start={start:#x}, length={length:#x}): {name} ({os.strerror(err)})"
        if done:
            msg += f", {done} bytes done"
        if detail:
            msg += f"; {detail}"
        super().__init__(err, msg)
        self.op = op
        self.start = start
        self.length = length
        self.done = max(done, 0)

    def __str__(self) -> str:
        return str(self.strerror)


class AlreadyPopulated(UffdError):
    """EEXIST: something (data, zero page or a poison marker) is already mapped there."""


class PartialProgress(UffdError):
    """EAGAIN with bytes done: the op stopped part way; ``done`` bytes were placed."""


class EventPending(UffdError):
    """EAGAIN with the progress field at -EAGAIN: a non-cooperative event (mmap change) is
    pending; read events, then retry."""


class RangeGone(UffdError):
    """ENOENT: the range is no longer registered, or the layout changed."""


class TargetGone(UffdError):
    """ESRCH/ENOSPC: the registered mm has exited."""


class InvalidArgument(UffdError):
    """EINVAL: bad range, alignment, mode, or an op the memory kind does not offer."""


class FeatureMissing(UffdError):
    """The kernel lacks a userfaultfd feature or ioctl that was required."""

    def __init__(self, op: str, missing: str) -> None:
        super().__init__(_errno.EOPNOTSUPP, op, detail=f"missing: {missing}")
        self.missing = missing


class NotAUserfaultfd(UffdError):
    """An fd handed to ``Userfaultfd.adopt`` is not a userfaultfd."""

    def __init__(self, fd: int, what: str) -> None:
        super().__init__(_errno.EBADF, "adopt", detail=f"fd {fd} is {what}, not a userfaultfd")
        self.fd = fd


def error_for(err: int, op: str, start: int, length: int, progress: int) -> UffdError:
    """The exception for a failed range op: ``err`` > 0 is the errno, ``progress`` the
    kernel's progress field (bytes done, or -errno)."""
    done = progress if progress > 0 else 0
    cls: type[UffdError] = UffdError
    if err == _errno.EEXIST:
        cls = AlreadyPopulated
    elif err == _errno.EAGAIN:
        cls = PartialProgress if progress >= 0 else EventPending
    elif err == _errno.ENOENT:
        cls = RangeGone
    elif err in (_errno.ESRCH, _errno.ENOSPC):
        cls = TargetGone
    elif err == _errno.EINVAL:
        cls = InvalidArgument
    return cls(err, op, start, length, done)
