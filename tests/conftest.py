"""Shared fixtures for tests against the real kernel (no mocks)."""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Callable, Iterator

import kernel_raw as _raw
import pytest

from uffdpoison.kernel import (
    HugePagesUnavailable,
    Userfaultfd,
    reserve_hugepages,
)

BUS_ADRERR = 2
BUS_MCEERR_AR = 4
SIGBUS_CODES = (BUS_ADRERR, BUS_MCEERR_AR)  # without / with CONFIG_MEMORY_FAILURE


@pytest.fixture
def uffd() -> Iterator[Userfaultfd]:
    u = Userfaultfd.create()
    try:
        yield u
    finally:
        u.close()


@pytest.fixture
def hugepages() -> Iterator[Callable[[int], int]]:
    """``hugepages(n)`` reserves n more 2 MiB pages for the test (vm.nr_hugepages), restores the
    previous count afterwards even on failure; skips with the reason when it cannot."""
    with contextlib.ExitStack() as stack:

        def reserve(n: int) -> int:
            if os.geteuid() != 0:
                pytest.skip("reserving huge pages needs root (vm.nr_hugepages)")
            try:
                return stack.enter_context(reserve_hugepages(n))
            except HugePagesUnavailable as e:
                pytest.skip(f"cannot reserve {n} huge pages: {e}")

        yield reserve


def wait_events(u: Userfaultfd, batch: _raw.EventBatch, timeout: float = 5.0) -> int:
    """Block (in select, GIL released) until messages are pending, then read them."""
    r, _, _ = select.select([u.fileno()], [], [], timeout)
    if not r:
        return 0
    return _raw.read_events(u, batch)
