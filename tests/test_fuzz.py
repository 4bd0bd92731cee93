"""The fuzzer (uffdpoison.bench.fuzz): a short deterministic sample of every target (no crash,
hang or violation, memory in bound), and proof that it sees a crash, a hang and a broken
invariant when there is one. The long runs are in docs/RELIABILITY.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uffdpoison.bench import fuzz, fuzztargets
from uffdpoison.bench.fuzzgen import (
    PS,
    REGION_FIRST,
    TARGETS,
    Case,
    frame,
    make_case,
)
from uffdpoison.protocol import PUSH_ID, Channel, PageKind, Pages, Request

SAMPLE = {"protocol": 3000, "dest": 500, "source": 500}


@pytest.mark.parametrize("target", TARGETS)
def test_a_sample_of_every_target_passes(target: str, tmp_path: Path) -> None:
    saver = fuzz._Saver(str(tmp_path))
    rep = fuzz.fuzz_target(target, SAMPLE[target], 7, saver=saver, deadline=10)
    assert rep.inputs == SAMPLE[target]
    assert rep.findings == [], [f.detail for f in rep.findings]
    assert rep.peak_rss_kib < fuzz.DEFAULT_MAX_RSS * 1024
    assert sum(rep.outcomes.values()) == rep.inputs
    assert len(rep.outcomes) > 10, "the inputs reach few outcomes: the generator is broken"
    assert not list(tmp_path.iterdir())


def test_inputs_are_made_again_from_their_number() -> None:
    for target in TARGETS:
        a, b = make_case(target, 3, 1234), make_case(target, 3, 1234)
        assert a == b and a != make_case(target, 4, 1234)
        assert Case.from_json(json.loads(a.dumps())) == a


@pytest.mark.parametrize(
    ("inject", "kind", "detail"),
    [
        ("crash@40", "crash", "killed by SIGSEGV"),
        ("hang@40", "hang", "no answer within"),
        ("violation@40", "violation", "injected"),
        ("raise@40", "crash", "RuntimeError: injected"),
    ],
)
def test_a_crash_a_hang_and_a_violation_are_found_and_saved(
    tmp_path: Path, inject: str, kind: str, detail: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"
    argv = ["--target", "protocol", "--inputs", "200", "--jobs", "2", "--deadline", "1",
            "--save", str(tmp_path / "saved"), "--json", str(out), "--inject", inject]  # fmt: skip
    assert fuzz.main(argv) == 1
    rep = json.loads(out.read_text())["targets"]["protocol"]
    assert rep["inputs"] == 200
    assert rep[{"crash": "crashes", "hang": "hangs", "violation": "violations"}[kind]] == 1
    (f,) = rep["findings"]
    assert f["kind"] == kind and f["index"] == 40 and detail in f["detail"]
    saved = json.loads(Path(f["saved"]).read_text())
    assert saved["index"] == 40 and Case.from_json(saved["case"]) == make_case("protocol", 1, 40)
    assert kind.upper() in capsys.readouterr().out
    # the saved input replays (without the injection: the input itself is fine)
    assert fuzz.main(["--replay", f["saved"]]) == 0


def _push_case() -> Case:
    """A valid push of one DATA page into the destination's region."""
    data = memoryview(b"\x5a" * PS)
    stream = frame(Pages(PUSH_ID, PageKind.DATA, (REGION_FIRST + 2) * PS, 1, data))
    return Case("dest", "destination", int(Channel.BULK), stream, [len(stream)])


def test_the_destination_target_sees_a_placement_the_protocol_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The placement check has teeth: the same valid push, judged by a reference that refuses
    everything, is a violation (the page was placed from a frame 'the protocol refused')."""
    t = fuzztargets.DestTarget()
    try:
        assert t.run(_push_case()) == "eof"
        monkeypatch.setattr(fuzztargets, "_reference", lambda *a: ([], "truncated"))
        with pytest.raises(fuzztargets.Violation, match="no accepted frame made it so"):
            t.run(_push_case())
    finally:
        t.close()


def test_the_source_target_sees_an_answer_the_protocol_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = frame(Request(5, 2 * PS, 3))
    case = Case("source", "source", int(Channel.URGENT), stream, [len(stream)])
    t = fuzztargets.SourceTarget()
    try:
        assert t.run(case) == "eof"
        monkeypatch.setattr(fuzztargets, "_reference", lambda *a: ([], "truncated"))
        with pytest.raises(fuzztargets.Violation, match="no accepted request"):
            t.run(case)
    finally:
        t.close()


def test_a_refused_frame_that_changes_the_connection_is_a_violation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = iter(range(10**6))
    monkeypatch.setattr(fuzztargets, "_snapshot", lambda conn: next(calls))
    t = fuzztargets.ProtocolTarget()
    case = Case("protocol", "destination", int(Channel.URGENT), b"GET / HTTP/1.1", [14])
    with pytest.raises(fuzztargets.Violation, match="changed the connection"):
        t.run(case)
