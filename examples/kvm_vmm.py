#!/usr/bin/env python3
"""A minimal KVM VMM whose guest RAM arrives by postcopy through uffdpoison, poison included.

One VM, one vCPU, four I/O ports. Guest RAM is anonymous memory given to KVM as a memory slot
and to ``ThreadedPageServer``, which serves it from a source's image of guest RAM: a tiny guest
program, data and ``--poison`` poisoned pages. The guest walks its RAM, sums 16 words a page and
reports progress and the sum on I/O ports; the VMM compares the sum with the image's. A guest
access to a poisoned page comes back as ``KVM_EXIT_MMIO`` inside the RAM slot (seen on kvm_pvm,
which emulates this guest) or as SIGBUS ``BUS_MCEERR_AR`` to the vCPU thread (most hosts): the VMM
reports its guest physical address, then delivers a machine check the guest answers by skipping
the page, or stops the guest (``--on-poison``). It never reads the page.

    python examples/kvm_vmm.py                           # runs its own `uffdpoison source`
    python examples/kvm_vmm.py --write-image g.img       # or writes g.img, g.img.poison for
    uffdpoison source --listen 127.0.0.1:7000 --image g.img --poison-list g.img.poison &
    python examples/kvm_vmm.py --source 127.0.0.1:7000   # (same --memory, --poison, --seed)

Exit status: 0 the guest finished with the image's checksum (or stopped at poison, as asked)
and the poisoned pages it touched are still poisoned; 1 not so; 2 setup failed (no /dev/kvm,
KVM cannot create a VM, no userfaultfd, source unreachable), with one line saying why.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import json
import mmap
import os
import random
import signal
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from uffdpoison.console import Progress
from uffdpoison.destination.embed import ThreadedPageServer
from uffdpoison.destination.regions import Region
from uffdpoison.kernel import UffdError, memory
from uffdpoison.source.spawn import SourceStartError, source_process
from uffdpoison.units import size_arg

PAGE, MiB = 4096, 1 << 20

# ----------------------------------------------------------- KVM ABI (linux/kvm.h, x86-64)
KVM_CREATE_VM, KVM_GET_VCPU_MMAP_SIZE, KVM_CREATE_VCPU = 0xAE01, 0xAE04, 0xAE41
KVM_SET_USER_MEMORY_REGION, KVM_RUN, KVM_SET_SIGNAL_MASK = 0x4020AE46, 0xAE80, 0x4004AE8B
KVM_GET_REGS, KVM_SET_REGS = 0x8090AE81, 0x4090AE82
KVM_GET_SREGS, KVM_SET_SREGS = 0x8138AE83, 0x4138AE84
EXIT_IO, EXIT_HLT, EXIT_MMIO, EXIT_INTR = 2, 5, 6, 10  # kvm_run.exit_reason
RUN_IMMEDIATE_EXIT, RUN_EXIT_REASON, RUN_EXIT_INFO = 1, 8, 32  # offsets in struct kvm_run
REGS_RIP = 16 * 8  # struct kvm_regs: rax ... r15, rip, rflags
SEGMENT = struct.Struct("<QIH10B")  # struct kvm_segment: base, limit, selector, type, ...
SREGS_CR0 = 8 * SEGMENT.size + 2 * 16  # struct kvm_sregs: 8 segments, gdt, idt, cr0, ...

libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]


class SetupError(Exception): ...  # an expected reason not to run here (exit status 2)


class GuestError(Exception): ...  # the guest did what this VMM does not emulate (exit status 1)


# ------------------------------------------------------------------------------ the guest
# 32-bit protected mode, flat 4 GiB segments set with KVM_SET_SREGS (no GDT, no paging): one
# plain `add edx, [esi]` reaches all of RAM, where real mode stops at 1 MiB. 16 words a page,
# not all 1024: hosts that emulate this guest (kvm_pvm) spend ~250 ns an instruction.
CODE_GPA = 0x1000
MCE_ENTRY = CODE_GPA + 0x32  # the machine-check handler (see run_guest)
PORT_PROGRESS, PORT_DONE, PORT_MCE_ADDR, PORT_SKIPPED = 0x10, 0x11, 0x12, 0x13
WORDS_APART = 256  # bytes between the words the guest sums


def guest_program(ram_size: int) -> bytes:
    # fmt: off
    code = b"".join([
        b"\x31\xd2",                      # 00       xor edx, edx      ; checksum = 0
        b"\x31\xff",                      # 02       xor edi, edi      ; pages skipped = 0
        b"\x31\xf6",                      # 04       xor esi, esi      ; address = 0
        b"\xbb" + struct.pack("<I", ram_size),  # 06 mov ebx, SIZE     ; end of RAM
        b"\xb1\x10",                      # 0b page: mov cl, 16        ; words a page
        b"\x03\x16",                      # 0d word: add edx, [esi]    ; 1st one touches the page
        b"\x81\xc6\x00\x01\x00\x00",      # 0f       add esi, 256
        b"\xfe\xc9",                      # 15       dec cl
        b"\x75\xf4",                      # 17       jnz word
        b"\xf7\xc6\xff\xff\x3f\x00",      # 19 next: test esi, 4 MiB-1 ; at each 4 MiB:
        b"\x75\x04",                      # 1f       jnz more
        b"\x89\xf0",                      # 21       mov eax, esi
        b"\xe7\x10",                      # 23       out PROGRESS, eax ; bytes walked
        b"\x39\xde",                      # 25 more: cmp esi, ebx
        b"\x72\xe2",                      # 27       jb page
        b"\x89\xf8",                      # 29       mov eax, edi
        b"\xe7\x13",                      # 2b       out SKIPPED, eax
        b"\x89\xd0",                      # 2d       mov eax, edx
        b"\xe7\x11",                      # 2f       out DONE, eax     ; the checksum
        b"\xf4",                          # 31       hlt
        # Machine-check handler, entered instead of the access that met poison:
        b"\xe5\x12",                      # 32 mce:  in eax, MCE_ADDR  ; the poisoned page's GPA
        b"\x8d\xb0\x00\x10\x00\x00",      # 34       lea esi, [eax+4096] ; go on after it
        b"\x47",                          # 3a       inc edi
        b"\xeb\xdc",                      # 3b       jmp next
    ])
    # fmt: on
    assert code[MCE_ENTRY - CODE_GPA] == 0xE5
    return code


def make_image(size: int, npoison: int, seed: int) -> tuple[bytes, list[int]]:
    """Guest RAM as the source host has it, and the GPAs of its poisoned pages."""
    rng = random.Random(seed)
    image = bytearray(rng.randbytes(size))
    for gpa in range(0, size, 4 * PAGE):
        image[gpa : gpa + PAGE] = bytes(PAGE)  # some free memory: zero pages
    code = guest_program(size)
    image[CODE_GPA : CODE_GPA + len(code)] = code
    poisoned = sorted(rng.sample(range(CODE_GPA // PAGE + 1, size // PAGE), npoison))
    return bytes(image), [p * PAGE for p in poisoned]


def expected_checksum(image: bytes, poisoned: list[int]) -> int:
    """What the guest computes: the sum of 16 words a page, poisoned pages skipped."""
    words = memoryview(image).cast("I")[:: WORDS_APART // 4]  # the words the guest reads
    skip = sum(sum(words[g // WORDS_APART : (g + PAGE) // WORDS_APART]) for g in poisoned)
    return (sum(words) - skip) & 0xFFFF_FFFF


# ------------------------------------------------------------------------------- the VM
class Vm:
    """A VM with ``ram`` at GPA 0 and one vCPU in flat protected mode at CODE_GPA."""

    def __init__(self, ram: memory.Mapping) -> None:
        try:
            self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise SetupError(f"cannot open /dev/kvm: {e.strerror}") from None
        try:
            self.vm = fcntl.ioctl(self.kvm, KVM_CREATE_VM, 0)
        except OSError as e:
            os.close(self.kvm)
            raise SetupError(f"KVM cannot create a VM here: {e.strerror}") from None
        slot = struct.pack("<IIQQQ", 0, 0, 0, ram.size, ram.addr)  # slot, flags, GPA, size, HVA
        fcntl.ioctl(self.vm, KVM_SET_USER_MEMORY_REGION, slot)
        self.vcpu = fcntl.ioctl(self.vm, KVM_CREATE_VCPU, 0)
        size = fcntl.ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE)
        self.kvm_run = mmap.mmap(self.vcpu, size)  # shared with KVM: why KVM_RUN returned
        sregs = bytearray(312)
        fcntl.ioctl(self.vcpu, KVM_GET_SREGS, sregs)
        #              base  limit       sel type present dpl db s l g avl unusable pad
        code = SEGMENT.pack(0, 0xFFFF_FFFF, 8, 11, 1, 0, 1, 1, 0, 1, 0, 0, 0)  # exec/read
        data = SEGMENT.pack(0, 0xFFFF_FFFF, 16, 3, 1, 0, 1, 1, 0, 1, 0, 0, 0)  # read/write
        sregs[: 6 * SEGMENT.size] = code + data * 5  # cs, then ds es fs gs ss
        sregs[SREGS_CR0] |= 1  # CR0.PE
        fcntl.ioctl(self.vcpu, KVM_SET_SREGS, bytes(sregs))
        self.set_rip(CODE_GPA)

    def set_rip(self, rip: int) -> None:
        regs = bytearray(144)
        fcntl.ioctl(self.vcpu, KVM_GET_REGS, regs)
        struct.pack_into("<QQ", regs, REGS_RIP, rip, 0x2)  # rflags: bit 1 always set
        fcntl.ioctl(self.vcpu, KVM_SET_REGS, bytes(regs))

    def run(self) -> int:
        """KVM_RUN, without the GIL; the exit reason (EXIT_INTR: a signal interrupted it).
        fcntl.ioctl releases the GIL too, but from Python 3.14 it retries on EINTR, which is
        how a poison SIGBUS leaves KVM_RUN: ioctl(2) through ctypes (GIL released too)."""
        if libc.ioctl(self.vcpu, KVM_RUN, 0) < 0:
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise OSError(err, f"KVM_RUN: {os.strerror(err)}")
            return EXIT_INTR
        return int(struct.unpack_from("<I", self.kvm_run, RUN_EXIT_REASON)[0])

    def close(self) -> None:
        self.kvm_run.close()
        for fd in (self.vcpu, self.vm, self.kvm):
            os.close(fd)


# ----------------------------------------------------------------------- poison by SIGBUS
@contextlib.contextmanager
def sigbus_as_exit(vm: Vm) -> Iterator[None]:
    """Block SIGBUS on this (the vCPU) thread but inside KVM_RUN (KVM_SET_SIGNAL_MASK): a poison
    SIGBUS then ends KVM_RUN with EINTR and stays pending for take_sigbus(), killing nothing."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGBUS])
    in_guest = sum(1 << (s - 1) for s in before if s != signal.SIGBUS)
    fcntl.ioctl(vm.vcpu, KVM_SET_SIGNAL_MASK, struct.pack("<IQ", 8, in_guest))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def take_sigbus() -> int | None:
    """The address of this thread's pending SIGBUS, or None (signal.sigtimedwait has no si_addr).
    BUS_MCEERR_AR from KVM, BUS_ADRERR without CONFIG_MEMORY_FAILURE: both mean poison."""
    mask = (ctypes.c_ulong * 16)(1 << (signal.SIGBUS - 1))
    info = (ctypes.c_uint64 * 16)()  # siginfo_t: si_signo, si_errno, si_code, pad, si_addr
    if libc.sigtimedwait(mask, info, (ctypes.c_long * 2)()) != signal.SIGBUS:  # no wait
        return None
    return int(info[2])


# -------------------------------------------------------------------------- the vCPU loop
@dataclass
class Outcome:
    finished: bool = False
    checksum: int | None = None  # as the guest reported it
    skipped: int | None = None  # pages the guest says it skipped
    poisoned: list[int] = field(default_factory=list)  # GPAs of the poisoned pages touched
    paths: set[str] = field(default_factory=set)  # how poison came back: mmio, sigbus
    seconds: float = 0.0  # from the first instruction to done


def run_guest(
    vm: Vm,
    ram: memory.Mapping,
    on_poison: str,
    is_poisoned: Callable[[int], bool],
    progress: Callable[[int], None],
) -> Outcome:
    """Run the vCPU on this thread until the guest is done, or stopped at poison."""
    out, start, run = Outcome(), time.monotonic(), vm.kvm_run
    with sigbus_as_exit(vm):
        while True:
            reason = vm.run()
            if reason == EXIT_IO:
                is_out, size, port, _, at = struct.unpack_from("<BBHIQ", run, RUN_EXIT_INFO)
                value = int.from_bytes(run[at : at + size], "little")
                if port == PORT_MCE_ADDR and not is_out:
                    struct.pack_into("<I", run, at, out.poisoned[-1])
                elif port == PORT_PROGRESS:
                    progress(value)
                elif port == PORT_SKIPPED:
                    out.skipped = value
                elif port == PORT_DONE:
                    out.checksum = value
                else:
                    raise GuestError(f"I/O on port {port:#x}, which this VMM does not emulate")
                continue
            if reason == EXIT_HLT and out.checksum is not None:
                out.finished = True
                break
            if reason == EXIT_MMIO:
                # No device here: an MMIO exit inside the RAM slot is KVM unable to read a
                # page, which only poison does. The page server confirms it.
                gpa = struct.unpack_from("<Q", run, RUN_EXIT_INFO)[0]
                if gpa >= ram.size or not is_poisoned(ram.addr + gpa // PAGE * PAGE):
                    raise GuestError(f"MMIO at GPA {gpa:#x}, not a poisoned page of RAM")
                out.paths.add("mmio")
            elif reason == EXIT_INTR:
                hva = take_sigbus()
                if hva is None:
                    continue  # another signal (its Python handler runs now): back to the guest
                if not ram.addr <= hva < ram.addr + ram.size:
                    raise GuestError(f"SIGBUS at {hva:#x}, outside guest RAM")
                gpa = hva - ram.addr
                out.paths.add("sigbus")
            else:
                raise GuestError(f"KVM exit {reason}, which this VMM does not handle")
            out.poisoned.append(gpa // PAGE * PAGE)
            if on_poison == "stop":
                break
            # What the guest would see on real hardware: a machine check, whose handler reads
            # the address (from PORT_MCE_ADDR here, as from MCi_ADDR) and skips the page. This
            # guest has no IDT: the VMM enters the handler by setting RIP (for a real OS, a VMM
            # injects #MC with KVM_X86_SET_MCE), once KVM_RUN with immediate_exit has completed
            # the exit (an MMIO read gets zeros) without running the guest.
            run[RUN_EXIT_INFO + 8 : RUN_EXIT_INFO + 16] = bytes(8)  # kvm_run.mmio.data
            run[RUN_IMMEDIATE_EXIT] = 1
            vm.run()
            run[RUN_IMMEDIATE_EXIT] = 0
            vm.set_rip(MCE_ENTRY)
    out.seconds = time.monotonic() - start
    return out


def holds_poison_marker(addr: int) -> bool:
    """/proc/self/pagemap (root) shows a poison marker at ``addr``; never read the page."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        entry = int.from_bytes(f.read(8), "little")
    return entry >> 62 == 1 and entry & ((1 << 55) - 1) == 0x5F  # swap entry 31:2, POISONED


# ------------------------------------------------------------------------------------ main
def run_vm(args: argparse.Namespace, image: bytes, poison: list[int], source: str) -> dict:
    show = Progress(enabled=not args.json)
    with memory.anon(args.memory) as ram, contextlib.closing(Vm(ram)) as vm:
        region = Region(base=ram.addr, size=ram.size, offset=0, page_size=PAGE)
        # The page server registers RAM (MISSING) with a userfaultfd that is not user-mode
        # only: KVM reads guest RAM from kernel mode, and those faults must be served too.
        with ThreadedPageServer([region], source, background=not args.no_background) as server:
            # The GIL rule: only KVM_RUN, which runs without the GIL, touches guest RAM. This
            # VMM never reads it from Python (it checks the guest against the image).
            out = run_guest(
                vm,
                ram,
                args.on_poison,
                lambda hva: server.ensure_present(hva, PAGE) == [hva],
                lambda walked: show.show(f"guest walked {walked // MiB}/{ram.size // MiB} MiB"),
            )
            show.done()
            server.wait_complete()  # every page placed: the source is no longer needed
            stats, pages = server.stats(), server.page_counts()
        # Unregistered now; the markers stay (only a discard would remove them).
        kept = [gpa for gpa in out.poisoned if holds_poison_marker(ram.addr + gpa)]
    return {
        "outcome": "finished" if out.finished else "stopped",
        "seconds": round(out.seconds, 3),
        "served": {k: stats[k] for k in ("copied", "zeroed", "poisoned")},
        "faults": {"demand": stats["faults"], "background": stats["push_pages"]},
        "poison_path": sorted(out.paths),
        "poisoned_touched": out.poisoned,
        "still_poisoned": kept,
        "ledger_poisoned": pages["poisoned"],
        "guest_skipped": out.skipped,
        "checksum": out.checksum,
        "expected": expected_checksum(image, poison) if out.finished else None,
    }


def print_report(r: dict[str, Any]) -> None:
    s, f, gpas = r["served"], r["faults"], [f"{g:#x}" for g in r["poisoned_touched"]]
    how = " and ".join({"mmio": "KVM_EXIT_MMIO", "sigbus": "SIGBUS"}[p] for p in r["poison_path"])
    print(f"guest {r['outcome']} {r['seconds']:.3f} s after its first instruction")
    print(f"pages served: {sum(s.values())} ({s['copied']} data, {s['zeroed']} zero, ", end="")
    print(f"{s['poisoned']} poisoned); faults: {f['demand']} demand, {f['background']} pushed")
    print(f"poisoned pages touched: {len(gpas)} ({how or '-'}): GPA {', '.join(gpas) or '-'}")
    print(f"still poisoned after the run: {len(r['still_poisoned'])} (pagemap), ", end="")
    print(f"{r['ledger_poisoned']} (page ledger); the guest skipped {r['guest_skipped']}")
    if r["outcome"] == "finished":
        verdict = "match" if r["checksum"] == r["expected"] else "MISMATCH"
        print(f"checksum: guest {r['checksum']:#010x}, image {r['expected']:#010x}: {verdict}")


def write_image(path: str, image: bytes, poison: list[int]) -> None:
    """The image and its poison list (PATH.poison), as `uffdpoison source` reads them."""
    with open(path, "wb") as f:
        f.write(image)
    with open(path + ".poison", "w") as f:
        f.writelines(f"{gpa:#x}\n" for gpa in poison)


@contextlib.contextmanager
def own_source(image: bytes, poison: list[int]) -> Iterator[str]:
    """A child `uffdpoison source` serving the image, as the source host would; its address."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "guest.img")
        write_image(path, image, poison)
        with source_process(path, poison_list=path + ".poison") as address:
            yield address


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory", type=size_arg, default=64 * MiB, help="guest RAM (default 64M)")
    p.add_argument("--poison", type=int, default=4, help="poisoned pages in the image")
    p.add_argument("--on-poison", choices=("skip", "stop"), default="skip")
    p.add_argument("--source", help="HOST:PORT of a uffdpoison source (default: start one)")
    p.add_argument("--no-background", action="store_true", help="no push: every page on demand")
    p.add_argument("--seed", type=int, default=1, help="of the image's data and poison")
    p.add_argument("--write-image", metavar="PATH", help="write the image, PATH.poison; exit")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = p.parse_args()
    if args.memory % MiB or not 2 * MiB <= args.memory < 4096 * MiB:
        p.error("--memory must be whole MiB, from 2M to under 4G (a 32-bit guest)")
    if not 0 <= args.poison <= args.memory // PAGE // 2:
        p.error("--poison must be from 0 to half the pages")
    image, poison = make_image(args.memory, args.poison, args.seed)
    if args.write_image:
        write_image(args.write_image, image, poison)
        return 0
    try:
        own = contextlib.nullcontext(args.source) if args.source else own_source(image, poison)
        with own as source:
            report = run_vm(args, image, poison, source)
    except (SetupError, ConnectionError, SourceStartError, UffdError) as e:
        print(f"kvm_vmm: {e}", file=sys.stderr)
        return 2
    except GuestError as e:
        print(f"kvm_vmm: guest stopped: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report)) if args.json else print_report(report)
    ok = report["still_poisoned"] == report["poisoned_touched"]
    return 0 if ok and report["checksum"] == report["expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
