"""Failure is normal: a source killed and restarted, a daemon killed and restarted while the
guest discards pages, a cut link, any start order. Real processes, real signals, loopback (and
network namespaces for the cut link). Through it all: no guessed page, no lost poison."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from array import array
from pathlib import Path
from typing import Any

import pytest
import trio
from destination_helpers import Guest, ToyVMM, make_guest
from test_daemon import Daemon, check_touches

from uffdpoison.auth import Token
from uffdpoison.bench.netns import NetnsPair, NetnsUnavailable
from uffdpoison.destination.embed import SourceLost, serve_memory
from uffdpoison.destination.regions import Region
from uffdpoison.harness.toucher import OUTCOME_OK, OUTCOME_SIGBUS, Toucher
from uffdpoison.kernel import memory
from uffdpoison.source.spawn import SourceProcess

PS = 4096


def _files(tmp_path: Path, guest: Guest) -> tuple[Path, Path]:
    image, poison = tmp_path / "guest.img", tmp_path / "poison.txt"
    image.write_bytes(guest.image)
    poison.write_text("".join(f"{i * PS:#x}\n" for i in guest.poisoned))
    return image, poison


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _until(pred: Any, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.01)


# -- a lost source ---------------------------------------------------------------------------


async def test_source_killed_mid_migration_resumes_byte_exact(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """SIGKILL the source while pages are in flight, start it again on the same port: the
    session pauses (vCPUs wait), resumes within a second of the source listening, re-asks what
    was unanswered, and completes byte-exact with every poisoned page still SIGBUS."""
    guest = make_guest(2048, poisoned=[3, 900, 2047])
    image, poison = _files(tmp_path, guest)
    with SourceProcess(image, poison_list=poison, max_bandwidth="2M") as src:
        d = Daemon(str(tmp_path / "h.sock"), src.address)
        await nursery.start(d.daemon.serve)
        vmm = await ToyVMM.start(d.path, len(guest.image))
        try:
            check_touches(guest, await vmm.touch(list(range(0, 64))), list(range(64)))
            src.kill()  # mid-push: the 8 MiB guest takes ~4 s at 2 MB/s
            (paused,) = await d.wait_for("session-paused")
            assert "lost" in paused["reason"]
            async with trio.open_nursery() as n:  # a fault during the pause waits, then resumes
                box: list[dict[str, Any]] = []
                n.start_soon(_touch_into, vmm, [1500, 1501, 3], box)
                await trio.sleep(0.3)
                assert not box, "a vCPU was served with no source"
                t0 = time.monotonic()
                await trio.to_thread.run_sync(src.start)
            await d.wait_for("session-resumed")
            assert time.monotonic() - t0 < 1.5  # resumed within a second of listening
            check_touches(guest, box[0], [1500, 1501, 3])
            check_touches(guest, await vmm.touch("all"))
            (done,) = await d.wait_for("session-completed")
            assert done["pages"]["poisoned"] == len(guest.poisoned)
            assert done["placed"]["resent"] >= 0 and done["placed"]["refused"] == 0
        finally:
            await vmm.close()


async def _touch_into(vmm: ToyVMM, pages: list[int], box: list[dict[str, Any]]) -> None:
    box.append(await vmm.touch(pages))


async def test_source_that_never_returns_fails_after_the_deadline(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    guest = make_guest(256, poisoned=[], zero=[])
    image, _ = _files(tmp_path, guest)
    with SourceProcess(image, max_bandwidth="64K") as src:
        d = Daemon(str(tmp_path / "h.sock"), src.address, resume_deadline=1.0)
        await nursery.start(d.daemon.serve)
        vmm = await ToyVMM.start(d.path, len(guest.image), timeout=2.0)
        try:
            assert (await vmm.touch([0]))["done"]
            src.kill()
            (failed,) = await d.wait_for("session-failed")
            assert "not back within 1 s" in failed["reason"]
            # Never guessed: a page not placed stays blocked, no zero page appears.
            stuck = await vmm.touch([guest.npages - 1])
            assert not stuck["done"] and stuck["pending"] == 1
        finally:
            await vmm.close()


async def test_embedded_session_resumes_and_names_the_deadline(tmp_path: Path) -> None:
    guest = make_guest(512, poisoned=[7], zero=[])
    image, poison = _files(tmp_path, guest)
    events: list[dict[str, Any]] = []
    with SourceProcess(image, poison_list=poison, max_bandwidth="256K") as src:
        with memory.anon(len(guest.image)) as m:
            region = Region(m.addr, len(guest.image), 0)
            async with serve_memory([region], src.address, status=events.append) as server:
                await server.ensure_present(m.addr, 8 * PS)
                src.kill()
                await _until(lambda: any(e["event"] == "session-paused" for e in events))
                await trio.to_thread.run_sync(src.start)
                assert await server.ensure_present(m.addr + 7 * PS, PS) == [m.addr + 7 * PS]
                await server.wait_complete()
            addrs = array("Q", (m.addr + i * PS for i in range(guest.npages)))
            r = Toucher(addrs, digest=True).run(timeout=20)
        assert [e for e in events if e["event"] == "session-resumed"]
        digests = guest.digests()
        for i in range(guest.npages):
            want = OUTCOME_SIGBUS if i == 7 else OUTCOME_OK
            assert r.outcome[i] == want and (i == 7 or r.digest[i] == digests[i]), i
        # A source that does not come back: the named exception, after the deadline.
        with memory.anon(len(guest.image)) as m, pytest.raises(SourceLost, match=r"within 0\.5 s"):
            region = Region(m.addr, len(guest.image), 0)
            async with serve_memory([region], src.address, resume_deadline=0.5) as server:
                src.kill()
                await server.ensure_present(m.addr + 100 * PS, PS)


# -- a lost link (no FIN, no RST) --------------------------------------------------------------


async def test_cut_link_is_noticed_by_keepalive_then_resumed(tmp_path: Path) -> None:
    try:
        pair = NetnsPair().__enter__()
    except NetnsUnavailable as e:
        pytest.skip(f"no network namespaces here: {e}")
    try:
        guest = make_guest(4096, poisoned=[10], zero=[])
        image, poison = _files(tmp_path, guest)
        prefix = ["ip", "netns", "exec", pair.src]
        listen = f"{pair.src_addr}:{_free_port()}"
        secret = tmp_path / "token"
        secret.write_text("a secret both hosts were given")
        token = Token.from_file(secret)
        src = SourceProcess(image, poison_list=poison, max_bandwidth="1M", listen=listen,
                            prefix=prefix, options=["--token-file", str(secret)])  # fmt: skip
        with src, memory.anon(len(guest.image)) as m:
            events: list[dict[str, Any]] = []
            with pair.enter_dst():  # this thread's sockets live in the destination namespace
                region = Region(m.addr, len(guest.image), 0)
                serving = serve_memory([region], src.address, status=events.append, token=token)
                async with serving as server:
                    await server.ensure_present(m.addr, PS)
                    pair.set_source_link(False)  # the push stalls; nothing is in flight
                    t0 = time.monotonic()
                    await _until(lambda: any(e["event"] == "session-paused" for e in events), 15)
                    noticed = time.monotonic() - t0
                    pair.set_source_link(True)
                    await _until(lambda: any(e["event"] == "session-resumed" for e in events), 15)
                    await server.wait_complete()
        assert noticed < 8.0, f"a cut link took {noticed:.1f} s to notice"
    finally:
        pair.close()


# -- any start order -----------------------------------------------------------------------------


async def test_daemon_started_before_its_source_waits_for_it(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    guest = make_guest(128)
    image, poison = _files(tmp_path, guest)
    listen = f"127.0.0.1:{_free_port()}"
    d = Daemon(str(tmp_path / "h.sock"), listen)
    await nursery.start(d.daemon.serve)
    await d.wait_for("source-waiting")
    vmm = await ToyVMM.start(d.path, len(guest.image))  # hands over before the source is up
    try:
        with SourceProcess(image, poison_list=poison, listen=listen):
            await d.wait_for("source-ready")
            check_touches(guest, await vmm.touch("all"))
            await d.wait_for("session-completed")
    finally:
        await vmm.close()


async def test_dest_cli_bad_start_is_one_line(tmp_path: Path) -> None:
    h = str(tmp_path / "h")
    cases = [
        (["--source", "nowhere", "--handoff", h], 2, "HOST:PORT"),
        (["--source", "127.0.0.1:1", "--handoff", str(tmp_path / "no" / "h")], 1, "No such file"),
        (["--source", "127.0.0.1:1", "--handoff", h, "--resume-deadline", "-1"], 2, "range"),
    ]
    for argv, code, words in cases:
        state = ["--state-dir", str(tmp_path / "state")]
        p = await trio.run_process(
            [sys.executable, "-m", "uffdpoison", "dest", *argv, *state],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        err = p.stderr.decode()
        assert p.returncode == code and words in err, (argv, p.returncode, err)
        assert "Traceback" not in err and words in err.strip().splitlines()[-1], err


# -- a lost daemon -------------------------------------------------------------------------------


class DestProcess:
    """``uffdpoison dest`` as a child process, its status lines collected."""

    def __init__(self, nursery: trio.Nursery, argv: list[str], preexec: Any = None) -> None:
        self.argv = argv
        self.preexec = preexec
        self.nursery = nursery
        self.records: list[dict[str, Any]] = []
        self.proc: trio.Process | None = None

    async def start(self) -> None:
        self.proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "uffdpoison", "dest", *self.argv],
            stdout=subprocess.PIPE,
            preexec_fn=self.preexec,
        )
        records: list[dict[str, Any]] = []
        self.records = records
        self.nursery.start_soon(self._read, self.proc, records)
        await self.wait_for("listening")

    @staticmethod
    async def _read(proc: trio.Process, records: list[dict[str, Any]]) -> None:
        assert proc.stdout is not None
        buf = b""
        async for chunk in proc.stdout:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            records += [json.loads(line) for line in lines if line]

    async def wait_for(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while not (found := [r for r in self.records if r["event"] == event]):
                await trio.sleep(0.01)
        return found[-1]

    async def stop(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        with trio.fail_after(30):
            return await self.proc.wait()


async def test_daemon_killed_three_times_while_the_guest_discards(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """SIGKILL the daemon three times mid-migration; between kills the guest reads pages and
    discards some (balloon-style, REMOVE events). The VMM hands its userfaultfd over again each
    time (the restart contract) and each new daemon resumes from the state directory: discarded
    pages read zero, data pages are byte-exact, poisoned pages SIGBUS, and the last daemon's
    ledger accounts for every poisoned page."""
    n = 1024
    guest = make_guest(n, poisoned=[5, 300, 777], zero=[])
    image, poison = _files(tmp_path, guest)
    state = tmp_path / "state"
    rng = random.Random(3)
    discarded: set[int] = set()
    with SourceProcess(image, poison_list=poison, max_bandwidth="512K") as src:
        argv, dest, vmm = await _daemon_and_vmm(nursery, tmp_path, src.address, guest, state)
        try:
            for kill in range(3):
                await dest.wait_for("session-started")
                pages = rng.sample([i for i in range(n) if i not in discarded], 40)
                reply = await vmm.touch(pages)
                check_touches(_with_zeros(guest, discarded), reply, pages)
                first = rng.randrange(0, n - 16)
                await vmm.command(f"discard {first} 16")
                discarded |= set(range(first, first + 16))
                assert await dest.stop(signal.SIGKILL) == -signal.SIGKILL
                assert os.listdir(state), "no state kept for the restarted daemon"
                dest = DestProcess(nursery, argv)
                await dest.start()
                started = await dest.wait_for("session-started")
                assert started["resumed"] and started["pages_held"] > 0, (kill, started)
            check_touches(_with_zeros(guest, discarded), await vmm.touch("all"))
            done = await dest.wait_for("session-completed")
            assert done["pages"]["poisoned"] == len(guest.poisoned)
            # None of those REMOVE events reached this daemon: it knew them from the state.
            assert done["placed"]["zero_after_remove"] == len(discarded - set(guest.poisoned))
        finally:
            await vmm.close()
            await dest.stop(signal.SIGTERM)


async def _daemon_and_vmm(
    nursery: trio.Nursery, tmp_path: Path, source: str, guest: Guest, state: Path
) -> tuple[list[str], DestProcess, ToyVMM]:
    """A daemon process serving ``source`` with its state in ``state``, and a toy VMM handed
    over to it; the daemon's argv, to start it again."""
    argv = ["--source", source, "--handoff", str(tmp_path / "h.sock"), "--state-dir", str(state)]
    dest = DestProcess(nursery, argv)
    await dest.start()
    return argv, dest, await ToyVMM.start(str(tmp_path / "h.sock"), len(guest.image))


def _with_zeros(guest: Guest, pages: set[int]) -> Guest:
    """The guest as the VMM should see it: discarded pages read zero (poison stays poison)."""
    image = bytearray(guest.image)
    for i in pages - set(guest.poisoned):
        image[i * PS : (i + 1) * PS] = bytes(PS)
    return Guest(image, PS, guest.poisoned, guest.zero)


async def test_sigterm_keeps_state_and_a_restart_resumes(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    guest = make_guest(512, poisoned=[9], zero=[])
    image, poison = _files(tmp_path, guest)
    state = tmp_path / "state"
    with SourceProcess(image, poison_list=poison, max_bandwidth="256K") as src:
        argv, dest, vmm = await _daemon_and_vmm(nursery, tmp_path, src.address, guest, state)
        try:
            await dest.wait_for("session-started")
            check_touches(guest, await vmm.touch([0, 1, 9]), [0, 1, 9])
            assert await dest.stop(signal.SIGTERM) == 0  # graceful: state kept, exit 0
            await dest.wait_for("stopped")
            assert len(os.listdir(state)) == 1
            dest = DestProcess(nursery, argv)
            await dest.start()
            assert (await dest.wait_for("session-started"))["resumed"]
            check_touches(guest, await vmm.touch("all"))
        finally:
            await vmm.close()
        await _until(lambda: not os.listdir(state))  # the VMM exited: its state is removed
        await dest.stop(signal.SIGTERM)


async def test_lost_state_is_refused_not_guessed(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A daemon killed with no state kept: the next one sees the VMM's memory already
    populated and, since discards were tracked (EVENT_REMOVE), cannot tell a discarded page from
    a missing one. It refuses the handoff (the VMM's vCPUs stay blocked), rather than serve
    stale bytes where the guest expects zeros."""
    guest = make_guest(256, poisoned=[], zero=[])
    image, _ = _files(tmp_path, guest)
    with SourceProcess(image, max_bandwidth="64K") as src:
        argv = ["--source", src.address, "--handoff", str(tmp_path / "h.sock"),
                "--state-dir", "none"]  # fmt: skip
        dest = DestProcess(nursery, argv)
        await dest.start()
        vmm = await ToyVMM.start(str(tmp_path / "h.sock"), len(guest.image), timeout=1.0)
        try:
            check_touches(guest, await vmm.touch([0, 1]), [0, 1])
            await vmm.command("discard 1 1")
            await dest.stop(signal.SIGKILL)
            dest = DestProcess(nursery, argv)
            await dest.start()
            rejected = await dest.wait_for("handoff-rejected")
            assert "refusing to guess" in rejected["reason"]
            stuck = await vmm.touch([1])  # discarded: must read zero, so it must not be served
            assert not stuck["done"]
        finally:
            await vmm.close()
            await dest.stop(signal.SIGTERM)


async def test_a_replacement_source_is_set_on_the_control_socket(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    guest = make_guest(512, poisoned=[17], zero=[])
    image, poison = _files(tmp_path, guest)
    control = str(tmp_path / "control.sock")
    with SourceProcess(image, poison_list=poison, max_bandwidth="256K") as first:
        d = Daemon(str(tmp_path / "h.sock"), first.address, control=control)
        await nursery.start(d.daemon.serve)
        vmm = await ToyVMM.start(d.path, len(guest.image))
        try:
            check_touches(guest, await vmm.touch([17]), [17])
            first.kill()
            await d.wait_for("session-paused")
            status = await _cli("status", "--control", control, "--json")
            (s,) = json.loads(status)["sessions"]
            assert s["state"] in ("paused", "recovering") and s["pid"] == vmm.proc.pid
            with SourceProcess(image, poison_list=poison) as second:
                out = await _cli("set-source", "--control", control, second.address)
                assert second.address in out
                await d.wait_for("session-resumed")
                check_touches(guest, await vmm.touch("all"))
                await d.wait_for("session-completed")
            text = await _cli("status", "--control", control)
            assert "complete" in text and "100.0%" in text
        finally:
            await vmm.close()
    err = await _cli("status", "--control", str(tmp_path / "nobody"), code=1)
    assert "cannot reach" in err


async def _cli(*argv: str, code: int = 0) -> str:
    p = await trio.run_process(
        [sys.executable, "-m", "uffdpoison", *argv], capture_stdout=True, capture_stderr=True,
        check=False,
    )  # fmt: skip
    assert p.returncode == code, p.stderr.decode()
    return (p.stdout if code == 0 else p.stderr).decode()


async def test_a_source_that_never_comes_fails_the_handoff_at_the_deadline(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    d = Daemon(str(tmp_path / "h.sock"), f"127.0.0.1:{_free_port()}", resume_deadline=1.0)
    await nursery.start(d.daemon.serve)
    vmm = await ToyVMM.start(d.path, 16 * PS, timeout=0.5)
    try:
        (failed,) = await d.wait_for("session-failed")
        assert "not reachable within 1 s" in failed["reason"]
        assert not (await vmm.touch([0]))["done"]  # blocked, never zero-filled
    finally:
        await vmm.close()


async def test_poison_learned_before_a_loss_is_told_to_the_new_source(
    nursery: trio.Nursery,
) -> None:
    """The first source learned of a poisoned page only while serving (as from an EIO); the
    replacement never read it. The resumed session's Have tells it, so it serves that page as
    POISONED to every later session too."""
    from uffdpoison.source.server import serve

    guest = make_guest(64, poisoned=[], zero=[])
    listen = f"127.0.0.1:{_free_port()}"
    first_backend = guest.backend()
    scope = trio.CancelScope()

    async def source(backend: Any, task_status: trio.TaskStatus[Any]) -> None:
        with scope:
            await serve(backend, listen, max_bandwidth=64 << 10, task_status=task_status)

    await nursery.start(source, first_backend)
    events: list[dict[str, Any]] = []
    with memory.anon(len(guest.image)) as m:
        region = Region(m.addr, len(guest.image), 0)
        async with serve_memory([region], listen, status=events.append) as server:
            first_backend.add_poison([40 * PS])  # learned after the handshake
            assert await server.ensure_present(m.addr + 40 * PS, PS) == [m.addr + 40 * PS]
            scope.cancel()
            await _until(lambda: any(e["event"] == "session-paused" for e in events))
            second_backend = guest.backend()
            assert second_backend.poisoned_count() == 0
            scope = trio.CancelScope()
            await nursery.start(source, second_backend)
            await _until(lambda: any(e["event"] == "session-resumed" for e in events))
            # The source reads the Have as the session goes on: it knows the page soon after.
            await _until(lambda: list(second_backend.poisoned_offsets()) == [40 * PS])
            await server.wait_complete()
            assert server.page_counts()["poisoned"] == 1
