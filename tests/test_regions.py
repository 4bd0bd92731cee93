"""Region tables: Firecracker's handoff JSON, validation, and address/offset lookups."""

from __future__ import annotations

import json

import pytest

from uffdpoison.destination.regions import (
    MAX_HANDOFF_BYTES,
    Region,
    RegionError,
    RegionMap,
    parse_firecracker_regions,
    regions_to_json,
)
from uffdpoison.transport import parse_address

MiB = 1 << 20


def test_firecracker_json_round_trip() -> None:
    regions = [Region(0x7F0000000000, 4 * MiB, 0), Region(0x7F0001000000, 8 * MiB, 4 * MiB)]
    assert parse_firecracker_regions(regions_to_json(regions)) == regions


@pytest.mark.parametrize(
    ("entry", "page_size"),
    [
        ({"page_size": 2 * MiB}, 2 * MiB),
        ({"page_size_kib": 4}, 4096),  # what the name says
        ({"page_size_kib": 4096}, 4096),  # older Firecracker filled it with bytes
        ({"page_size_kib": 2 * MiB}, 2 * MiB),
        ({}, 4096),
        ({"page_size": 4096, "page_size_kib": 999}, 4096),  # page_size wins
    ],
)
def test_page_size_sources(entry: dict, page_size: int) -> None:
    doc = [{"base_host_virt_addr": 2 * MiB, "size": 2 * MiB, "offset": 0, **entry}]
    (r,) = parse_firecracker_regions(json.dumps(doc))
    assert r.page_size == page_size


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{not json", "not a JSON array"),
        (b"[{not json]", "not valid JSON"),
        (b'{"a": 1}', "JSON array"),
        (b"[]", "no regions"),
        (b"[1]", "region 0 must be a JSON object"),
        (b'[{"size": 4096, "offset": 0}]', "missing field 'base_host_virt_addr'"),
        (b'[{"base_host_virt_addr": "x", "size": 4096, "offset": 0}]', "must be an integer"),
        (b'[{"base_host_virt_addr": true, "size": 4096, "offset": 0}]', "must be an integer"),
        (b'[{"base_host_virt_addr": 4096, "size": -1, "offset": 0}]', "must not be negative"),
        (b"[" + b" " * MAX_HANDOFF_BYTES + b"]", "over the"),
    ],
)
def test_bad_handoff_json(payload: bytes, message: str) -> None:
    with pytest.raises(RegionError, match=message):
        parse_firecracker_regions(payload)


@pytest.mark.parametrize(
    ("regions", "message"),
    [
        ([Region(4096 + 1, 4096, 0)], "base_host_virt_addr .* not aligned"),
        ([Region(4096, 4096 + 512, 0)], "size .* not aligned"),
        ([Region(2 * MiB, 2 * MiB, 4096, 2 * MiB)], "offset .* not aligned"),
        ([Region(4096, 4096, 0, 8192)], "page size 8192"),
        ([Region(4096, 0, 0)], "must be positive"),
        ([Region(0x10000, 0x4000, 0), Region(0x12000, 0x4000, 0x8000)], "overlap in this address"),
        ([Region(0x10000, 0x4000, 0), Region(0x20000, 0x4000, 0x2000)], "overlap in the guest"),
        ([Region(0x10000, 0x4000, 0), Region(2 * MiB, 2 * MiB, 2 * MiB, 2 * MiB)], "mix page"),
        ([], "no regions"),
    ],
)
def test_region_map_rejects(regions: list[Region], message: str) -> None:
    with pytest.raises(RegionError, match=message):
        RegionMap(regions)


def test_lookups_and_split() -> None:
    a = Region(0x100000, 0x4000, 0x8000)
    b = Region(0x200000, 0x2000, 0x0)
    m = RegionMap([b, a])
    assert m.regions == (a, b)  # sorted by host address
    assert m.total_pages == 6
    with pytest.raises(RegionError, match="source's memory is only"):
        m.check_within(0xA000)
    m.check_within(0xC000)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:0", ("::1", 0)), ("host:65535", ("host", 65535))],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nohost", "HOST:PORT"),
        ("::1:80", "brackets"),
        ("h:x", "not a number"),
        ("h:70000", "out of range"),
        ("[::1]80", r"\[IPv6\]:PORT"),
    ],
)
def test_parse_address_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_address(text)


def test_split_pages_covers_every_page_a_range_touches() -> None:
    m = RegionMap([Region(0x10000, 0x4000, 0), Region(0x20000, 0x2000, 0x4000)])
    assert list(m.split_pages(0x10001, 0x20001)) == [(0, 0, 4), (1, 0, 1)]
    assert list(m.split_pages(0x13FFF, 0x14001)) == [(0, 3, 4)]
    assert list(m.split_pages(0x14000, 0x20000)) == []  # the gap between them
