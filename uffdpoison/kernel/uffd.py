"""Typed userfaultfd: creation or adoption, UFFDIO_API, registration and wake.

It neither places pages nor reads events: placement belongs to the page ledger alone
(``uffdpoison.kernel.ledger``), which keeps poison markers from being overwritten, and a
session's data plane is the one reader of its userfaultfd.
"""

from __future__ import annotations

import enum
import errno
import os

from uffdpoison.kernel._ffi import ffi, lib
from uffdpoison.kernel.errors import FeatureMissing, NotAUserfaultfd, UffdError, error_for
from uffdpoison.owned import Owned


class Feature(enum.IntFlag):
    PAGEFAULT_FLAG_WP = 1 << 0
    EVENT_FORK = 1 << 1
    EVENT_REMAP = 1 << 2
    EVENT_REMOVE = 1 << 3
    MISSING_HUGETLBFS = 1 << 4
    MISSING_SHMEM = 1 << 5
    EVENT_UNMAP = 1 << 6
    SIGBUS = 1 << 7
    THREAD_ID = 1 << 8
    MINOR_HUGETLBFS = 1 << 9
    MINOR_SHMEM = 1 << 10
    EXACT_ADDRESS = 1 << 11
    WP_HUGETLBFS_SHMEM = 1 << 12
    WP_UNPOPULATED = 1 << 13
    POISON = 1 << 14
    WP_ASYNC = 1 << 15
    MOVE = 1 << 16


class Ioctl(enum.IntFlag):
    """Bits of the ioctls masks returned by UFFDIO_API and UFFDIO_REGISTER (1 << _UFFDIO_X)."""

    REGISTER = 1 << 0
    UNREGISTER = 1 << 1
    WAKE = 1 << 2
    COPY = 1 << 3
    ZEROPAGE = 1 << 4
    MOVE = 1 << 5
    WRITEPROTECT = 1 << 6
    CONTINUE = 1 << 7
    POISON = 1 << 8
    API = 1 << 63


class RegisterMode(enum.IntFlag):
    MISSING = 1
    WP = 2
    MINOR = 4


# What a page server wants, minus the non-cooperative events: with EVENT_REMOVE / UNMAP /
# REMAP negotiated, madvise(DONTNEED) / munmap / mremap of a registered range BLOCK until
# someone reads the event, so request NONCOOPERATIVE only when an event reader runs.
DEFAULT_FEATURES = (
    Feature.THREAD_ID
    | Feature.MISSING_SHMEM
    | Feature.MISSING_HUGETLBFS
    | Feature.MINOR_SHMEM
    | Feature.MINOR_HUGETLBFS
    | Feature.POISON
    | Feature.MOVE
)
NO_FEATURES = Feature(0)
NONCOOPERATIVE = Feature.EVENT_REMOVE | Feature.EVENT_UNMAP | Feature.EVENT_REMAP

_INITIALIZED = 1 << 31  # fdinfo's features carry UFFD_FEATURE_INITIALIZED
_VIA = {lib.UP_VIA_SYSCALL: "syscall", lib.UP_VIA_DEVICE: "/dev/userfaultfd"}

_GAPS: list[tuple[Feature, str]] = [
    (Feature.THREAD_ID, "no thread ids (THREAD_ID not negotiated)"),
    (Feature.EVENT_REMOVE, "no REMOVE events (guest discards go unseen)"),
    (Feature.EVENT_UNMAP, "no UNMAP events"),
    (Feature.EVENT_REMAP, "no REMAP events"),
    (Feature.MISSING_SHMEM, "no MISSING faults on shmem"),
    (Feature.MISSING_HUGETLBFS, "no MISSING faults on hugetlb"),
    (Feature.MINOR_SHMEM, "no MINOR faults on shmem"),
    (Feature.MINOR_HUGETLBFS, "no MINOR faults on hugetlb"),
    (Feature.POISON, "POISON not negotiated"),
]


def probe_features(*, user_mode_only: bool = False) -> Feature:
    """Features this kernel offers (UFFDIO_API with none requested, on a throwaway fd)."""
    via = ffi.new("int *")
    fd = lib.up_uffd_open(int(user_mode_only), via)
    if fd < 0:
        raise UffdError(-fd, "userfaultfd")
    try:
        feats = ffi.new("uint64_t *")
        ioctls = ffi.new("uint64_t *")
        rc = lib.up_uffd_api(fd, 0, feats, ioctls)
        if rc < 0:
            raise UffdError(-rc, "UFFDIO_API")
        return Feature(feats[0] & ((1 << 17) - 1))
    finally:
        os.close(fd)


def open_paths() -> dict[str, str]:
    """Try every way to create a userfaultfd: {path: "ok" or the error}. Nothing is kept."""
    out: dict[str, str] = {}
    for name, fd in (
        ("syscall", lib.up_uffd_open_syscall(0)),
        ("syscall (user-mode only)", lib.up_uffd_open_syscall(1)),
        ("/dev/userfaultfd", lib.up_uffd_open_device()),
    ):
        if fd >= 0:
            os.close(fd)
            out[name] = "ok"
        else:
            out[name] = f"{errno.errorcode.get(-fd, str(-fd))} ({os.strerror(-fd)})"
    return out


class Userfaultfd(Owned):
    """An owned userfaultfd (O_NONBLOCK, O_CLOEXEC). Close exactly once."""

    __slots__ = (
        "_fd",
        "_ioctls_out",
        "api_ioctls",
        "available",
        "created_via",
        "features",
    )

    def __init__(
        self,
        fd: int,
        features: Feature,
        api_ioctls: Ioctl,
        created_via: str,
        available: Feature | None,
    ) -> None:
        self._fd = fd
        self.features = features
        self.api_ioctls = api_ioctls
        self.created_via = created_via
        self.available = available
        self._ioctls_out = ffi.new("uint64_t *")

    # -- creation ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        features: Feature = DEFAULT_FEATURES,
        *,
        user_mode_only: bool = False,
        require: Feature = NO_FEATURES,
    ) -> Userfaultfd:
        """Open a userfaultfd and run UFFDIO_API with ``features`` (limited to what the kernel
        offers, since asking for an unknown bit is EINVAL) plus ``require``. Raises FeatureMissing
        naming the bits of ``require`` the kernel does not offer."""
        features |= require
        available = probe_features(user_mode_only=user_mode_only)
        missing = Feature(require & ~(available & features))
        if missing:
            raise FeatureMissing("UFFDIO_API", str(missing.name or missing))
        via = ffi.new("int *")
        fd = lib.up_uffd_open(int(user_mode_only), via)
        if fd < 0:
            raise UffdError(-fd, "userfaultfd", detail="syscall and /dev/userfaultfd both refused")
        feats = ffi.new("uint64_t *")
        ioctls = ffi.new("uint64_t *")
        rc = lib.up_uffd_api(fd, int(features & available), feats, ioctls)
        if rc < 0:
            os.close(fd)
            raise UffdError(-rc, "UFFDIO_API", detail=f"features {features!r}")
        # The kernel writes back everything it supports, not what this fd negotiated; the
        # fd's features are the requested bits it supports (as /proc/self/fdinfo shows).
        got = Feature(int(features) & feats[0] & ((1 << 17) - 1))
        via_name = _VIA[via[0]] + (" (user-mode only)" if user_mode_only else "")
        return cls(fd, got, Ioctl(ioctls[0]), via_name, available)

    @classmethod
    def adopt(cls, fd: int) -> Userfaultfd:
        """Take ownership of a handed-off userfaultfd (its UFFDIO_API already ran, e.g. by a
        VMM): what it negotiated is read from /proc/self/fdinfo."""
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as e:
            raise NotAUserfaultfd(fd, f"unreadable ({e.strerror})") from e
        if target != "anon_inode:[userfaultfd]":
            raise NotAUserfaultfd(fd, repr(target))
        api_line = None
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("API:"):
                    api_line = line.split(":", 1)[1].strip()
        if api_line is None:
            raise NotAUserfaultfd(fd, "a userfaultfd without an API line in fdinfo")
        _api, feats, ioctls = (int(x, 16) for x in api_line.split(":"))
        if not feats & _INITIALIZED:
            raise UffdError(
                errno.EINVAL, "adopt", detail=f"fd {fd}: UFFDIO_API has not run on it yet"
            )
        rc = lib.up_fd_set_nonblock(fd)
        if rc < 0:
            raise UffdError(-rc, "adopt", detail="fcntl(O_NONBLOCK)")
        return cls(fd, Feature(feats & ((1 << 17) - 1)), Ioctl(ioctls), "adopted", None)

    # -- lifetime ---------------------------------------------------------------------------

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("userfaultfd is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        return f"<Userfaultfd fd={self._fd} via={self.created_via} features={self.features!r}>"

    @property
    def lacks(self) -> list[str]:
        """Human-readable gaps of what was negotiated."""
        return [text for bit, text in _GAPS if not self.features & bit]

    # -- registration -----------------------------------------------------------------------

    def register(self, start: int, length: int, mode: RegisterMode) -> Ioctl:
        """UFFDIO_REGISTER; returns the ioctls the kernel offers on the range."""
        rc = lib.up_uffd_register(self._fd, start, length, int(mode), self._ioctls_out)
        if rc < 0:
            raise error_for(-rc, f"UFFDIO_REGISTER[{mode!r}]", start, length, rc)
        return Ioctl(self._ioctls_out[0])

    def unregister(self, start: int, length: int) -> None:
        rc = lib.up_uffd_unregister(self._fd, start, length)
        if rc < 0:
            raise error_for(-rc, "UFFDIO_UNREGISTER", start, length, rc)

    # -- wake (placement is the ledger's, reading events the data plane's) ----------------

    def wake(self, start: int, length: int) -> None:
        rc = lib.up_uffd_wake(self._fd, start, length)
        if rc < 0:
            raise error_for(-rc, "UFFDIO_WAKE", start, length, rc)
