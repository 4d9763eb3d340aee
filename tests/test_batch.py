"""Batch runs: input expansion, output names, resume after a kill, locks, parallel workers, and the
CLI's batch mode on real slides."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from wsiseg.batch import (
    BatchInputError,
    SlideStatus,
    expand_slides,
    is_complete,
    output_names,
    outputs_for,
    read_status,
    run_batch,
    safe_name,
    try_lock,
)

REPO = Path(__file__).resolve().parents[1]


def touch(path: Path, data: bytes = b"slide") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def fake_process(marker: Path | None = None, *, fail: set[str] = frozenset(),
                 interrupt: str | None = None):
    """A processor that writes the map, then the report last; logs each call to ``marker``.
    Slides whose file name is in ``fail`` raise ValueError, as a corrupt slide does; the slide
    named ``interrupt`` raises KeyboardInterrupt."""
    def process(slide: Path, outputs: dict[str, Path]) -> None:
        if marker is not None:
            with open(marker, "a") as f:
                f.write(f"{slide.name}\n")
        if slide.name == interrupt:
            raise KeyboardInterrupt
        if slide.name in fail:
            raise ValueError(f"{slide.name} is corrupt or truncated;\nre-export it")
        if not slide.is_file():
            raise FileNotFoundError(2, "No such file or directory", str(slide))
        outputs["map"].write_bytes(b"map of " + slide.read_bytes())
        outputs["report"].write_text(json.dumps({"slide": {"path": str(slide)}}))
    return process


# ---------------------------------------------------------------------------- expand_slides

def test_expand_files_folders_patterns_and_list(tmp_path):
    a = touch(tmp_path / "in" / "a.svs")
    b = touch(tmp_path / "in" / "B.NDPI")
    touch(tmp_path / "in" / "notes.txt")
    c = touch(tmp_path / "deep" / "x" / "c.mrxs")
    touch(tmp_path / "deep" / "x" / "c" / "Slidedat.ini")
    d = touch(tmp_path / "other" / "d.tiff")
    lst = tmp_path / "lists" / "slides.txt"
    lst.parent.mkdir()
    lst.write_text(f"# cohort 1\n\n../other/d.tiff\n{a}\n  # indented comment\n")
    got = expand_slides([tmp_path / "in", Path(f"{tmp_path}/deep/**/*.mrxs"), a], list_file=lst)
    assert got == sorted({p.resolve() for p in (a, b, c, d)}, key=str)
    notes = tmp_path / "in" / "notes.txt"
    assert expand_slides([notes]) == [notes.resolve()]  # named explicitly: taken as is


def test_expand_errors_name_every_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    touch(tmp_path / "t" / "x.txt")
    with pytest.raises(BatchInputError) as e:
        expand_slides([tmp_path / "missing.svs", tmp_path / "empty", Path(f"{tmp_path}/t/*")])
    msg = str(e.value)
    assert "missing.svs" in msg and "does not exist" in msg
    assert "holds no slide files" in msg and "**" in msg
    assert "matches no slide files (1 non-slide entries)" in msg
    with pytest.raises(BatchInputError, match="cannot read slide list"):
        expand_slides([], list_file=tmp_path / "nolist.txt")
    with pytest.raises(BatchInputError, match="no slides given"):
        expand_slides([])
    lst = tmp_path / "l.txt"
    lst.write_text("gone.svs\n")
    with pytest.raises(BatchInputError, match=r"gone.svs \(listed in .*l.txt\) does not exist"):
        expand_slides([], list_file=lst)


# ---------------------------------------------------------------------------- names

def test_safe_names():
    assert safe_name(Path("/x/TCGA-AA 01;rm -rf.svs")) == "TCGA-AA_01_rm_-rf"
    assert safe_name(Path("/x/..hidden.svs")) == "hidden"
    assert safe_name(Path("/x/-rf.svs")) == "rf"
    assert safe_name(Path("/x/äöü.svs")) == "slide"
    assert len(safe_name(Path("/x/" + "a" * 300 + ".svs"))) == 100


def test_outputs_for_names_every_output(tmp_path):
    o = outputs_for(Path("/s/case 1.svs"), tmp_path)
    assert {k: v.name for k, v in o.items()} == {
        "map": "case_1.tif", "report": "case_1.json", "csv": "case_1.csv",
        "geojson": "case_1.geojson", "tsr": "case_1.tsr.tif", "preview": "case_1.preview.png"}
    assert all(v.parent == tmp_path for v in o.values())


def test_same_stem_in_two_folders_does_not_collide(tmp_path):
    s1 = touch(tmp_path / "a" / "case.svs", b"one")
    s2 = touch(tmp_path / "b" / "case.svs", b"two")
    s3 = touch(tmp_path / "b" / "CASE.ndpi", b"three")  # same name on a case-insensitive disk
    s4 = touch(tmp_path / "b" / "solo.svs", b"four")
    names = output_names([s1, s2, s3, s4])
    assert names[s4] == "solo"
    assert len({names[s1], names[s2], names[s3]}) == 3
    assert all(names[s].lower().startswith("case-") for s in (s1, s2, s3))
    assert output_names([s2, s1, s3, s4]) == names  # order-independent: workers agree
    out = tmp_path / "out"
    out.mkdir()
    st = run_batch([s1, s2, s3, s4], out, process=fake_process())
    assert [s.status for s in st] == ["ok"] * 4
    assert (out / f"{names[s1]}.tif").read_bytes() == b"map of one"
    assert (out / f"{names[s2]}.tif").read_bytes() == b"map of two"


# ---------------------------------------------------------------------------- run_batch

def test_mix_of_good_corrupt_and_missing_slides(tmp_path):
    good = [touch(tmp_path / f"g{i}.svs") for i in range(3)]
    corrupt = touch(tmp_path / "corrupt.svs", b"\0")
    missing = tmp_path / "missing.svs"  # deleted after the list was made
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "calls.txt"
    slides = [good[0], corrupt, good[1], missing, good[2]]
    st = run_batch(slides, out, process=fake_process(marker, fail={"corrupt.svs"}))
    by = {s.slide.name: s for s in st}
    assert [s.status for s in st] == ["ok", "failed", "ok", "failed", "ok"]
    assert by["corrupt.svs"].reason == "corrupt.svs is corrupt or truncated; re-export it"
    assert "No such file or directory" in by["missing.svs"].reason
    assert all(isinstance(s, SlideStatus) and s.seconds >= 0 for s in st)
    table = read_status(out / "status.tsv")
    assert [(r["name"], r["status"]) for r in table] == [
        ("corrupt", "failed"), ("g0", "ok"), ("g1", "ok"), ("g2", "ok"), ("missing", "failed")]
    assert "\n" not in "".join(r["reason"] for r in table)
    assert not list(out.glob(".*.lock"))
    # Rerun: complete slides are skipped, failed ones retried; the table keeps the "ok" rows.
    marker.unlink()
    st2 = run_batch(slides, out, process=fake_process(marker, fail={"corrupt.svs"}))
    assert [s.status for s in st2] == ["skipped", "failed", "skipped", "failed", "skipped"]
    assert {s.reason for s in st2 if s.status == "skipped"} == {"complete"}
    assert sorted(marker.read_text().split()) == ["corrupt.svs", "missing.svs"]
    assert [r["status"] for r in read_status(out / "status.tsv")] == [
        "failed", "ok", "ok", "ok", "failed"]
    # overwrite: everything is processed again
    marker.unlink()
    run_batch(good, out, process=fake_process(marker), overwrite=True)
    assert sorted(marker.read_text().split()) == ["g0.svs", "g1.svs", "g2.svs"]


def test_incomplete_outputs_are_redone(tmp_path):
    s = touch(tmp_path / "s.svs")
    out = tmp_path / "out"
    out.mkdir()
    o = outputs_for(s, out)
    o["map"].write_bytes(b"half")  # a map without its report: killed before the report
    assert not is_complete(o)
    o["report"].write_text("{trunc")
    assert not is_complete(o)
    assert [x.status for x in run_batch([s], out, process=fake_process())] == ["ok"]
    assert o["map"].read_bytes() == b"map of slide" and is_complete(o)


def test_processor_without_report_fails(tmp_path):
    s = touch(tmp_path / "s.svs")
    out = tmp_path / "out"
    out.mkdir()
    st = run_batch([s], out, process=lambda slide, outputs: outputs["map"].write_bytes(b"m"))
    assert st[0].status == "failed" and "without a readable report s.json" in st[0].reason


def test_unexpected_error_stops_the_batch_and_releases_the_lock(tmp_path):
    slides = [touch(tmp_path / f"s{i}.svs") for i in range(2)]
    out = tmp_path / "out"
    out.mkdir()

    def buggy(slide, outputs):
        raise TypeError("a bug, not a bad slide")
    with pytest.raises(TypeError):
        run_batch(slides, out, process=buggy)
    assert not list(out.glob(".*.lock"))


def test_keyboard_interrupt_stops_and_releases_the_lock(tmp_path):
    slides = [touch(tmp_path / f"s{i}.svs") for i in range(4)]
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "calls.txt"
    with pytest.raises(KeyboardInterrupt):
        run_batch(slides, out, process=fake_process(marker, interrupt="s1.svs"))
    assert marker.read_text().split() == ["s0.svs", "s1.svs"]  # s2, s3 never started
    assert not list(out.glob(".*.lock"))
    assert [(r["name"], r["status"]) for r in read_status(out / "status.tsv")] == [("s0", "ok")]
    st = run_batch(slides, out, process=fake_process(marker))
    assert [s.status for s in st] == ["skipped", "ok", "ok", "ok"]


def test_output_folder_must_exist(tmp_path):
    with pytest.raises(BatchInputError, match="mkdir -p"):
        run_batch([touch(tmp_path / "s.svs")], tmp_path / "nope", process=fake_process())


# ---------------------------------------------------------------------------- locks

def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: the pid is free (reuse within the test is vanishingly unlikely)
    return p.pid


def test_live_lock_skips_and_stale_lock_is_taken_over(tmp_path):
    s = [touch(tmp_path / f"s{i}.svs") for i in range(3)]
    out = tmp_path / "out"
    out.mkdir()
    host = socket.gethostname()
    (out / ".s0.lock").write_text(json.dumps({"host": host, "pid": os.getpid(), "started": "t0"}))
    (out / ".s1.lock").write_text(json.dumps({"host": host, "pid": dead_pid(), "started": "t1"}))
    (out / ".s2.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "t2"}))
    st = run_batch(s, out, process=fake_process())
    assert [x.status for x in st] == ["skipped", "ok", "skipped"]
    assert st[0].reason == f"locked by {host} pid {os.getpid()} since t0"
    assert st[2].reason == "locked by elsewhere pid 1 since t2"  # other host: cannot check
    assert not (out / ".s1.lock").exists() and (out / ".s0.lock").exists()
    assert [r["status"] for r in read_status(out / "status.tsv")] == ["skipped", "ok", "skipped"]


def test_try_lock_is_exclusive(tmp_path):
    lock = tmp_path / ".x.lock"
    assert try_lock(lock) is None
    holder = json.loads(lock.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert try_lock(lock) == f"{holder['host']} pid {os.getpid()} since {holder['started']}"
    lock.write_text("{half-writ")
    assert try_lock(lock) == "another worker (lock file unreadable)"


# ---------------------------------------------------------------------------- real processes

WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from wsiseg.batch import run_batch

    out, marker, delay = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    slides = [Path(p) for p in sys.argv[4:]]

    def process(slide, outputs):
        with open(marker, "a") as f:
            f.write(f"start {slide.name} {os.getpid()}\\n")
        outputs["map"].write_bytes(b"map")
        time.sleep(delay)
        outputs["report"].write_text(json.dumps({"slide": slide.name}))
        with open(marker, "a") as f:
            f.write(f"done {slide.name} {os.getpid()}\\n")

    st = run_batch(slides, out, process=process, status_path=out / f"status-{os.getpid()}.tsv")
    sys.exit(any(s.status == "failed" for s in st))
""")


def start_worker(tmp_path: Path, out: Path, marker: Path, delay: float, slides: list[Path]):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen([sys.executable, str(script), str(out), str(marker), str(delay),
                             *map(str, slides)], cwd=REPO)


def events(marker: Path) -> list[tuple[str, str]]:
    return [tuple(line.split()[:2]) for line in marker.read_text().splitlines()]


def test_resume_after_kill_loses_nothing_and_repeats_nothing(tmp_path):
    slides = [touch(tmp_path / "in" / f"s{i}.svs") for i in range(5)]
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "calls.txt"
    w = start_worker(tmp_path, out, marker, 0.4, slides)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill it while slide 3 (s2) is being processed
        if marker.exists() and ("start", "s2.svs") in events(marker):
            break
        time.sleep(0.02)
    else:
        w.kill()
        pytest.fail("the worker did not reach the third slide in 60 s")
    w.send_signal(signal.SIGKILL)
    w.wait()
    done_before = {s for e, s in events(marker) if e == "done"}
    assert done_before == {"s0.svs", "s1.svs"}
    assert (out / ".s2.lock").exists()  # left behind by the killed worker: stale now
    assert not is_complete(outputs_for(slides[2], out))
    w2 = start_worker(tmp_path, out, marker, 0.0, slides)
    assert w2.wait(timeout=60) == 0
    ev = events(marker)
    starts = [s for e, s in ev if e == "start"]
    assert all(starts.count(s) == 1 for s in done_before)  # nothing done twice
    assert starts.count("s2.svs") == 2  # the interrupted slide was redone
    assert all(is_complete(outputs_for(s, out)) for s in slides)  # nothing lost
    assert not list(out.glob(".*.lock"))


def test_two_parallel_workers_process_each_slide_once(tmp_path):
    slides = [touch(tmp_path / "in" / f"s{i}.svs") for i in range(8)]
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "calls.txt"
    workers = [start_worker(tmp_path, out, marker, 0.3, slides) for _ in range(2)]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    ev = [line.split() for line in marker.read_text().splitlines()]
    starts = [s for e, s, _ in ev if e == "start"]
    assert sorted(starts) == sorted(s.name for s in slides)  # each exactly once
    assert all(is_complete(outputs_for(s, out)) for s in slides)
    by_pid = {pid for e, _, pid in ev if e == "done"}
    assert len(by_pid) == 2  # both workers did some of the work
    tables = [read_status(p) for p in out.glob("status-*.tsv")]
    oks = [r["name"] for t in tables for r in t if r["status"] == "ok"]
    assert sorted(oks) == sorted(s.stem for s in slides)


# ---------------------------------------------------------------------------- the CLI

def _cli_has_batch() -> bool:
    from click.testing import CliRunner

    from wsiseg.cli import main
    return "--list" in CliRunner().invoke(main, ["segment", "--help"]).output


@pytest.fixture(scope="module")
def model_1um(tmp_path_factory) -> Path:
    from onnx_models import colour_rule_model, contract

    from wsiseg.contract import to_metadata
    meta = to_metadata(contract(mpp=1.0, tile_px=256, border_px=16, size_multiple=16))
    return colour_rule_model(tmp_path_factory.mktemp("m") / "colour1um.onnx", meta=meta)


@pytest.mark.slow
def test_cli_batch_mode_on_real_slides(slides_dir, model_1um, tmp_path):
    if not _cli_has_batch():
        pytest.skip("batch CLI not wired (wsiseg segment --help has no --list)")
    from click.testing import CliRunner

    from wsiseg.cli import main

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "small.svs").symlink_to(slides_dir / "small.svs")
    touch(folder / "corrupt.svs", b"II*\0 not a slide")
    lst = tmp_path / "list.txt"
    lst.write_text(f"# one more\n{slides_dir / 'CMU-1-Small-Region.svs'}\n")
    out = tmp_path / "out"
    out.mkdir()

    def run(*args):
        return CliRunner().invoke(main, ["-q", "segment", *map(str, args)],
                                  catch_exceptions=False)
    r = run(slides_dir / "small.svs", folder, "-o", out, "--model", model_1um, "--list", lst)
    assert r.exit_code == 1, r.output  # one slide failed
    table = {x["name"]: x for x in read_status(out / "status.tsv")}
    assert {k: v["status"] for k, v in table.items()} == {
        "CMU-1-Small-Region": "ok", "corrupt": "failed", "small": "ok"}
    assert table["corrupt"]["reason"]
    report = json.loads((out / "CMU-1-Small-Region.json").read_text())
    assert report["map"]["mpp"] == pytest.approx(1.0, rel=0.01)
    mtime = (out / "small.json").stat().st_mtime_ns
    (folder / "corrupt.svs").unlink()
    r = run(folder, "--list", lst, "-o", out, "--model", model_1um)
    assert r.exit_code == 0, r.output
    assert (out / "small.json").stat().st_mtime_ns == mtime  # complete: skipped, not redone
