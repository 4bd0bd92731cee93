"""What a destination daemon keeps for a restarted daemon: each session's ledgers, in files.

The kernel cannot tell a new daemon which pages the guest discarded (REMOVED: they must read
as zeros, not as the source's stale bytes), nor, without CAP_SYS_ADMIN, which hold poison
markers. So each session's ledgers live in files under ``--state-dir`` (tmpfs: /run), mapped
shared, written as the data plane places (no write-back step to miss). When the same VMM (same
pid and start time, same regions) hands its userfaultfd over again, the new daemon adopts them
and resumes; state that does not match is never adopted (docs/RELIABILITY.md).

    <state-dir>/vmm-<pid>-<start time>/session.json      the VMM and its regions
    <state-dir>/vmm-<pid>-<start time>/region-<k>.ledger one byte a page (csrc/ledger.c)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from uffdpoison.destination.regions import RegionMap
from uffdpoison.owned import Owned

log = logging.getLogger(__name__)

STATE_DIR = "/run/uffdpoison"
_VERSION = 1


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot, /proc/PID/stat field 22), or None if
    it is gone: with the pid, it names one process for the life of the machine."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def _manifest(pid: int, start: int, regions: RegionMap) -> dict[str, object]:
    return {
        "version": _VERSION,
        "pid": pid,
        "start": start,
        "regions": [[r.base, r.size, r.offset, r.page_size] for r in regions],
    }


class SessionState(Owned):
    """One session's state files, open. ``adopted``: left by an earlier daemon for this very
    VMM and these regions (resume); else fresh (every page MISSING)."""

    def __init__(self, root: str | os.PathLike[str], pid: int, regions: RegionMap) -> None:
        start = start_time(pid)
        if start is None:
            raise OSError(f"process {pid} is gone")
        self.path = Path(root) / f"vmm-{pid}-{start}"
        want = _manifest(pid, start, regions)
        self.adopted = _read_manifest(self.path) == want
        if not self.adopted:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True, mode=0o700)
            (self.path / "session.json").write_text(json.dumps(want) + "\n")
        self.fds: list[int] = []
        try:
            for k in range(len(regions)):
                flags = os.O_RDWR | os.O_CLOEXEC | (0 if self.adopted else os.O_CREAT | os.O_EXCL)
                self.fds.append(os.open(self.path / f"region-{k}.ledger", flags, 0o600))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the files (the ledgers keep their mappings); they stay for a restart."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def remove(self) -> None:
        """The session is over for good (its VMM is gone): nothing to resume."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)


def _read_manifest(path: Path) -> object:
    try:
        return json.loads((path / "session.json").read_text())
    except (OSError, ValueError):
        return None


def sweep(root: str | os.PathLike[str]) -> int:
    """Remove the state of VMMs that are gone (a pid reused since is another process); returns
    how many sessions' state was removed."""
    removed = 0
    for d in Path(root).glob("vmm-*-*"):
        try:
            _, pid, start = d.name.split("-")
            gone = start_time(int(pid)) != int(start)
        except ValueError:
            continue  # not ours
        if gone:
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
    if removed:
        log.info("removed the state of %d session(s) whose VMM is gone", removed)
    return removed
