"""The destination daemon end to end on loopback: a real source, the daemon, and toy VMM
processes handing over their userfaultfd in Firecracker's format."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
from destination_helpers import Guest, ToyVMM, make_guest, poisoned_process, start_source

from uffdpoison.destination.daemon import HandoffDaemon
from uffdpoison.source.backends import ProcessBackend

HUGE = 2 << 20


class Daemon:
    def __init__(self, path: str, source: str, **kw: Any) -> None:
        self.records: list[dict[str, Any]] = []
        self.daemon = HandoffDaemon(path, source, status=self.records.append, **kw)
        self.path = path

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["event"] == name]

    async def wait_for(self, name: str, count: int = 1, timeout: float = 30.0) -> list[dict]:
        with trio.fail_after(timeout):
            while len(self.events(name)) < count:
                await trio.sleep(0.01)
        return self.events(name)


async def expect_rejected(d: Daemon, proc: trio.Process, words: str) -> None:
    """The handoff ``proc`` made is refused with ``words`` in the reason, and nothing failed;
    ``proc`` is killed either way."""
    try:
        (rejected,) = await d.wait_for("handoff-rejected")
        assert words in rejected["reason"], rejected
        assert not d.events("session-failed")
    finally:
        proc.kill()
        await proc.wait()


async def start_daemon(nursery: trio.Nursery, tmp_path: Path, source: str) -> Daemon:
    d = Daemon(str(tmp_path / "handoff.sock"), source)
    await nursery.start(d.daemon.serve)
    return d


def check_touches(guest: Guest, reply: dict[str, Any], pages: list[int] | None = None) -> None:
    """Every non-poisoned page byte-exact; every poisoned page SIGBUS (BUS_ADRERR/MCEERR_AR)."""
    pages = list(range(guest.npages)) if pages is None else pages
    digests = guest.digests()
    assert reply["done"], f"touches still blocked: {reply['pending']}"
    poisoned = set(guest.poisoned)
    for k, page in enumerate(pages):
        if page in poisoned:
            assert reply["outcome"][k] == 1, f"poisoned page {page} was readable"
            assert reply["si_code"][k] in (2, 4)
        else:
            assert reply["outcome"][k] == 0, f"page {page} raised SIGBUS"
            assert reply["digest"][k] == digests[page], f"page {page} bytes differ"


@pytest.mark.parametrize("memory_kind", ["anon", "shmem"])
async def test_handoff_serves_every_page(
    nursery: trio.Nursery, tmp_path: Path, memory_kind: str
) -> None:
    guest = make_guest(96)
    source = await start_source(nursery, guest.backend())
    d = await start_daemon(nursery, tmp_path, source)
    vmm = await ToyVMM.start(d.path, len(guest.image), memory=memory_kind)
    try:
        check_touches(guest, await vmm.touch("all"))
        (done,) = await d.wait_for("session-completed")
        assert done["pages"]["poisoned"] == len(guest.poisoned)
        assert done["pages"]["present"] == guest.npages - len(guest.poisoned)
        assert done["placed"]["refused"] == 0
        # After completion (background stream finished), poison still bites and data holds.
        check_touches(guest, await vmm.touch("all"))
    finally:
        assert await vmm.close() == 0
    (ended,) = await d.wait_for("session-ended")
    assert ended["reason"] == "VMM exited"


async def test_hugetlb_handoff(nursery: trio.Nursery, tmp_path: Path, hugepages: Any) -> None:
    hugepages(4)
    guest = make_guest(4, HUGE, poisoned=[2], zero=[1])
    source = await start_source(nursery, guest.backend())
    d = await start_daemon(nursery, tmp_path, source)
    vmm = await ToyVMM.start(d.path, len(guest.image), memory="hugetlb")
    try:
        check_touches(guest, await vmm.touch("all"))
        (done,) = await d.wait_for("session-completed")
        assert done["pages"]["poisoned"] == 1 and done["pages"]["present"] == 3
    finally:
        await vmm.close()


async def test_poison_discovered_while_reading(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The source is a live process whose poison it does not know up front (no pagemap scan,
    no list): it learns each poisoned page from EIO while reading, and the destination must
    poison exactly those pages and serve the rest byte-exact."""
    poison = [0, 9, 10, 47]
    with poisoned_process(48, poison) as (pid, addr, guest):
        backend = ProcessBackend(pid, [(addr, 48 * 4096)], scan_pagemap=False)
        assert backend.poisoned_count() == 0
        source = await start_source(nursery, backend)
        d = await start_daemon(nursery, tmp_path, source)
        vmm = await ToyVMM.start(d.path, len(guest.image))
        try:
            check_touches(guest, await vmm.touch("all"))
            (done,) = await d.wait_for("session-completed")
            assert done["pages"]["poisoned"] == len(poison)
        finally:
            await vmm.close()


async def test_remove_keeps_poison_and_zeroes_data(nursery: trio.Nursery, tmp_path: Path) -> None:
    guest = make_guest(16, poisoned=[3], zero=[])
    source = await start_source(nursery, guest.backend())
    d = await start_daemon(nursery, tmp_path, source)
    vmm = await ToyVMM.start(d.path, len(guest.image))
    try:
        check_touches(guest, await vmm.touch("all"))
        await d.wait_for("session-completed")
        # The guest discards a poisoned page and a data page (balloon / MADV_DONTNEED).
        await vmm.command("discard 3 1")
        await vmm.command("discard 5 1")
        again = await vmm.touch([3, 5, 6])
        assert again["done"]
        assert again["outcome"][0] == 1, "a discarded poisoned page must stay poisoned"
        zero_digest = make_guest(1, zero=[0], poisoned=[]).digests()[0]
        assert again["outcome"][1] == 0 and again["digest"][1] == zero_digest
        assert again["digest"][2] == guest.digests()[6]
        assert d.daemon.sessions["vmm-1"].stats["repoisoned"] == 1
        assert d.daemon.sessions["vmm-1"].stats["zero_after_remove"] == 1
    finally:
        await vmm.close()


async def test_two_vmms_and_malformed_handoffs(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Bad handoffs are rejected with a reason and do not disturb a good VMM being served."""
    guest = make_guest(64)
    source = await start_source(nursery, guest.backend())
    d = await start_daemon(nursery, tmp_path, source)
    good = await ToyVMM.start(d.path, len(guest.image))

    def raw_handoff(body: bytes, fds: list[int] | None) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(d.path)
            if fds is None:
                s.sendall(body)
            else:
                socket.send_fds(s, [body], fds)

    region = {"base_host_virt_addr": 1 << 30, "size": 4096, "offset": 0, "page_size": 4096}
    r, w = os.pipe()
    try:
        cases = [
            (json.dumps([region]).encode(), None, "no file descriptor"),
            (json.dumps([region]).encode(), [r], "not a userfaultfd"),
        ]
        for body, fds, reason in cases:
            seen = len(d.events("handoff-rejected"))
            await trio.to_thread.run_sync(raw_handoff, body, fds)
            rejected = await d.wait_for("handoff-rejected", seen + 1)
            assert reason in rejected[-1]["reason"]
    finally:
        os.close(r)
        os.close(w)
    # Bodies that parse but describe bad regions come with a real userfaultfd (from a child).
    for regions, reason in [
        ("not json at all]", "not a JSON array"),
        ('[{"size": }]', "not valid JSON"),
        (json.dumps([{**region, "base_host_virt_addr": (1 << 30) + 1}]), "not aligned"),
        (json.dumps([region, {**region, "offset": 8192}]), "overlap"),
        (json.dumps([{**region, "offset": len(guest.image)}]), "source's memory is only"),
    ]:
        seen = len(d.events("handoff-rejected"))
        await trio.to_thread.run_sync(_handoff_from_child, d.path, regions)
        rejected = await d.wait_for("handoff-rejected", seen + 1)
        assert reason in rejected[-1]["reason"], rejected[-1]
    second = await ToyVMM.start(d.path, len(guest.image))
    try:
        check_touches(guest, await good.touch("all"))
        check_touches(guest, await second.touch("all"))
    finally:
        await good.close()
        await second.close()


def _our_userfaultfds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    return n


async def test_rejected_handoff_keeps_the_userfaultfd_until_the_vmm_exits(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A handoff refused after its fd was adopted (bad regions) still must not zero-fill the
    VMM's memory: the daemon closes the connection (the VMM's signal) but holds the
    userfaultfd until the VMM process is gone."""
    guest = make_guest(4)
    source = await start_source(nursery, guest.backend())
    d = await start_daemon(nursery, tmp_path, source)
    before = _our_userfaultfds()
    region = {"base_host_virt_addr": (1 << 30) + 1, "size": 4096, "offset": 0}
    child = subprocess.Popen(
        [sys.executable, "-c", HANDOFF_CHILD, d.path, json.dumps([region]), "stay"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = await trio.to_thread.run_sync(child.stdout.readline)
        assert line.strip() == "closed"
        rejected = await d.wait_for("handoff-rejected", 1)
        assert "not aligned" in rejected[-1]["reason"]
        assert _our_userfaultfds() == before + 1  # the VMM lives: its fd is held
    finally:
        assert child.stdin is not None
        child.stdin.close()
        await trio.to_thread.run_sync(child.wait)
    with trio.fail_after(5):
        while _our_userfaultfds() != before:  # the VMM is gone: now it is closed
            await trio.sleep(0.01)


# A VMM stand-in: hands a real userfaultfd to the daemon at argv[1] with the body argv[2], and
# waits until the daemon closes its end; with "stay", says so and lives until stdin closes.
HANDOFF_CHILD = """
import socket, sys
from uffdpoison.kernel import Feature, Userfaultfd
u = Userfaultfd.create(Feature.EVENT_REMOVE)
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
socket.send_fds(s, [sys.argv[2].encode()], [u.fileno()])
s.recv(1)
if sys.argv[3:] == ["stay"]:
    print("closed", flush=True)
    sys.stdin.read()
"""


def _handoff_from_child(path: str, body: str) -> None:
    subprocess.run([sys.executable, "-c", HANDOFF_CHILD, path, body], check=True, timeout=30)


async def test_disallowed_uid_is_rejected(
    nursery: trio.Nursery, request: pytest.FixtureRequest
) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another uid")
    guest = make_guest(4)
    source = await start_source(nursery, guest.backend())
    # A directory another uid can traverse (pytest's tmp_path parents are 0700).
    shared = Path(tempfile.mkdtemp(prefix="uffdpoison-uid-"))
    request.addfinalizer(lambda: shutil.rmtree(shared, ignore_errors=True))
    shared.chmod(0o755)
    d = await start_daemon(nursery, shared, source)
    os.chmod(d.path, 0o777)
    code = (
        "import os, socket, sys\nos.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.recv(1)\n"
    )
    await trio.to_thread.run_sync(
        lambda: subprocess.run([sys.executable, "-c", code, d.path], check=True, timeout=30)
    )
    (rejected,) = await d.wait_for("handoff-rejected")
    assert "uid 65534 is not allowed" in rejected["reason"]


async def test_dest_cli_serves_and_stops_on_sigterm(nursery: trio.Nursery, tmp_path: Path) -> None:
    guest = make_guest(8)
    source = await start_source(nursery, guest.backend())
    path = str(tmp_path / "h.sock")
    (tmp_path / "h.sock").write_bytes(b"")  # not a socket: must be refused, not replaced
    proc = await trio.run_process(
        [sys.executable, "-m", "uffdpoison", "dest", "--source", source, "--handoff", path],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert proc.returncode == 1 and b"not a socket" in proc.stderr
    os.unlink(path)
    # A stale socket file (nobody listening) is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    argv = ["dest", "--source", source, "--handoff", path, "--handoff-mode", "0660"]
    daemon = await trio.lowlevel.open_process(
        [sys.executable, "-m", "uffdpoison", *argv], stdout=subprocess.PIPE
    )
    try:
        assert daemon.stdout is not None
        with trio.fail_after(30):
            first = await daemon.stdout.receive_some(4096)
        status = json.loads(first.split(b"\n")[0])
        assert status["event"] == "listening" and status["path"] == path
        assert os.stat(path).st_mode & 0o777 == 0o660
        vmm = await ToyVMM.start(path, len(guest.image))
        check_touches(guest, await vmm.touch("all"))
        await vmm.close()
    finally:
        daemon.terminate()
        with trio.fail_after(30):
            assert await daemon.wait() == 0
    assert not os.path.exists(path)
