"""The examples run as documented (they are what a VMM author copies first)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from destination_helpers import ROOT, make_guest

from uffdpoison.source.spawn import source_process


def test_embedded_vmm_example(tmp_path: Path) -> None:
    guest = make_guest(512, poisoned=[0, 7, 300], zero=[1, 2, 3])
    image = tmp_path / "guest.img"
    image.write_bytes(guest.image)
    poison = tmp_path / "bad.txt"
    poison.write_text("".join(f"{i * 4096:#x}\n" for i in guest.poisoned))
    with source_process(image, poison_list=poison) as source:
        proc = subprocess.run(
            [
                sys.executable,
                str(ROOT / "examples" / "embedded_vmm.py"),
                "--source",
                source,
                "--size",
                str(len(guest.image)),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["sigbus_pages"] == guest.poisoned
    assert report["touched_ok"] == guest.npages - len(guest.poisoned)
    assert report["page0_xxh64"] is None  # page 0 is poisoned: Python never reads it
    assert report["poisoned"] >= len(guest.poisoned)
