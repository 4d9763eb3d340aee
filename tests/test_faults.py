"""Bad input and faults: one line, the right exit code, nothing partial, nothing left behind.

Bad option values and output paths are usage errors (exit 2); a full disk, a missing slide
and other failures exit 1; SIGINT 130 and SIGTERM 143. In every case the output folder holds
either the complete set of outputs or nothing, and what a killed run left is cleaned by the
next one.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from onnx_models import box_filter_model, colour_rule_model
from synth import make_slide, make_tissue_rgb

from wsiseg.canvas import DiskCanvas
from wsiseg.cli import main
from wsiseg.outputs import OutputError, OutputSet
from wsiseg.pipeline import SegmentOptions, segment_slide

FULL_SET = {"m.tif", "m.json", "m.csv", "m.geojson", "m.tsr.tif", "m.preview.png"}


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    rgb, _ = make_tissue_rgb(200, 260, np.random.default_rng(5), n_blobs=4)
    path = tmp_path_factory.mktemp("slide") / "s.tif"
    make_slide(path, rgb, mpp=2.0, levels=2, tile_px=128)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return colour_rule_model(tmp_path_factory.mktemp("m") / "colour.onnx")


def run(*args) -> CliRunner.invoke:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(r, code: int) -> str:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and r.output.startswith("wsiseg: error:"), r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    return r.output


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


# -- option values: usage errors, checked before any work -----------------------------------

@pytest.mark.parametrize("args, says", [
    (["--tsr-field-um", "0"], "--tsr-field-um"),
    (["--tsr-field-um", "nan"], "--tsr-field-um"),
    (["--tsr-margin-um", "-1"], "--tsr-margin-um"),
    (["--tsr-margin-um", "inf"], "--tsr-margin-um"),
    (["--min-tissue-um2", "-5"], "--min-tissue-um2"),
    (["--tile-px", "0"], "--tile-px"),
    (["--tile-px", "100000"], "8192"),
    (["--tile-px", "7"], "multiple of 8"),  # fits no model: checked once the model is known
    (["--mpp", "0"], "--mpp"),
    (["--mpp", "1e-9"], "0.05 to 100"),
    (["--mpp", "0.00025"], "millimetres: 0.25 um/px"),
    (["--mpp", "abc"], "--mpp"),
    (["--mpp", "nan"], "--mpp"),
    (["--workers", "0"], "--workers"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_bad_option_values_are_usage_errors(slide, model, tmp_path, args, says):
    r = run("segment", slide, "-o", tmp_path / "new" / "m.tif", "--model", model, *args)
    assert says in one_line_error(r, 2)
    assert listing(tmp_path) == set()  # not even the output folder


def test_report_checks_tsr_sizes_too(tmp_path):
    r = run("report", tmp_path / "m.tif", "--tsr-margin-um", "-1")
    assert "--tsr-margin-um" in one_line_error(r, 2)


@pytest.mark.parametrize("args, says", [
    (["-o", "{d}/m.json"], ".tif or .tiff"),
    (["-o", "{d}/m.csv"], ".tif or .tiff"),
    (["-o", "{d}/m.tif", "--report", "{d}/m.tif"], "would both be"),
    (["-o", "{d}/m.tif", "--report", "{d}/m.csv"], "would both be"),
    (["-o", "{d}/folder.tif"], "is a folder"),
])
def test_bad_output_paths_are_usage_errors(slide, model, tmp_path, args, says):
    (tmp_path / "folder.tif").mkdir()
    args = [a.format(d=tmp_path) for a in args]
    r = run("segment", slide, *args, "--model", model)
    assert says in one_line_error(r, 2)
    assert listing(tmp_path) == {"folder.tif"} and listing(tmp_path / "folder.tif") == set()


def test_batch_output_that_is_a_file(slide, model, tmp_path):
    out = tmp_path / "out"
    out.write_text("keep")
    r = run("segment", slide, slide.parent, "-o", out, "--model", model)
    assert "is a file" in one_line_error(r, 2)
    assert out.read_text() == "keep"


def test_defaults_come_from_the_options_dataclasses():
    from wsiseg.tissue import TissueParams
    from wsiseg.tsr import TSRConfig
    text = " ".join(run("segment", "--help").output.split())
    from wsiseg.pipeline import default_workers
    assert f"[default: {default_workers()}; x>=1]" in text
    assert f"[default: {TissueParams().min_tissue_um2}]" in text
    assert f"[default: {TSRConfig().field_diameter_um}]" in text


def test_options_are_checked_in_the_python_api_too():
    with pytest.raises(ValueError, match="tile size"):
        SegmentOptions(tile_px=0)
    with pytest.raises(ValueError, match="millimetres"):
        SegmentOptions(mpp=0.00025)
    with pytest.raises(ValueError, match="workers"):
        SegmentOptions(workers=0)


def test_quiet_and_verbose_after_the_subcommand(slide, model, tmp_path):
    r = run("segment", slide, "-o", tmp_path / "m.tif", "--model", model, "-q")
    assert r.exit_code == 0 and r.output == "", r.output
    assert listing(tmp_path) == FULL_SET
    r = run("info", slide, "-v")
    assert r.exit_code == 0, r.output


# -- early failures leave no folder; the map is published with the rest ------------------------

def test_early_failure_removes_the_folder_it_created(model, tmp_path):
    r = run("segment", tmp_path / "missing.svs", "-o", tmp_path / "a" / "b" / "m.tif",
            "--model", model)
    assert "slide not found" in one_line_error(r, 1)
    assert listing(tmp_path) == set()
    r = run("segment", tmp_path / "missing.svs", tmp_path / "other.svs", "-o", tmp_path / "out",
            "--model", model)
    assert r.exit_code == 1 and listing(tmp_path) == set()


@pytest.mark.parametrize("target", [
    "wsiseg.canvas.os.pwrite",  # the label canvas
    "wsiseg.pipeline.write_pyramid",  # the map
    "wsiseg.analysis.write_pyramid",  # the TSR map, after the map is written
    "wsiseg.analysis.write_geojson",
    "wsiseg.analysis.make_preview",
    "wsiseg.pipeline.write_text_atomic",  # the report, the very last file
])
def test_full_disk_leaves_nothing(slide, model, tmp_path, monkeypatch, target):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(target, full)
    out = tmp_path / "out"
    r = run("segment", slide, "-o", out / "m.tif", "--model", model, "-q")
    assert "No space left on device" in one_line_error(r, 1)
    assert listing(tmp_path) == set()  # no output, no staging folder, no output folder


def test_full_disk_on_a_real_small_file_system(slide, model, tmp_path):
    """Whatever the point at which the disk fills, the folder holds all or nothing."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    outcomes = set()
    for size_k in (16, 64, 128, 192, 256, 1024):
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_k}k", "tmpfs", str(mnt)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        try:
            r = run("segment", slide, "-o", mnt / "m.tif", "--model", model, "-q")
            assert "Traceback" not in r.output
            if r.exit_code == 0:
                assert listing(mnt) == FULL_SET
            else:
                one_line_error(r, 1)
                assert listing(mnt) == set()
            outcomes.add(r.exit_code)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    assert outcomes == {0, 1}


def test_publish_failure_removes_what_was_moved(tmp_path, monkeypatch):
    finals = {k: tmp_path / f"m.{k}" for k in ("tif", "csv", "json")}
    real_replace, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        real_replace(src, dst)
    monkeypatch.setattr("wsiseg.outputs.os.replace", flaky)
    with pytest.raises(OSError, match="I/O"), OutputSet(finals) as out:
        for k in finals:
            out.staged(k).write_text(k)
        out.publish()
    assert listing(tmp_path) == set()


def test_overwrite_removes_the_old_report_first(tmp_path, monkeypatch):
    finals = {k: tmp_path / f"m.{k}" for k in ("tif", "json")}
    for p in finals.values():
        p.write_text("old")
    monkeypatch.setattr("wsiseg.outputs.os.replace",
                        lambda s, d: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError), OutputSet(finals) as out:
        out.staged("tif").write_text("new")
        out.publish()
    assert listing(tmp_path) == {"m.tif"}  # an incomplete set: batch mode redoes it


def test_outputs_must_be_distinct(tmp_path):
    with pytest.raises(OutputError, match="would both be"):
        OutputSet({"map": tmp_path / "m.tif", "report": tmp_path / "m.tif"})
    with pytest.raises(OutputError, match=".tif or .tiff"):
        segment_slide("s.svs", tmp_path / "m.json", model="x.onnx")


# -- the label canvas ---------------------------------------------------------------------

def test_canvas_survives_short_writes_and_reads(tmp_path, monkeypatch):
    real_pwrite, real_pread = os.pwrite, os.pread
    monkeypatch.setattr("wsiseg.canvas.os.pwrite", lambda fd, b, off: real_pwrite(fd, b[:3], off))
    monkeypatch.setattr("wsiseg.canvas.os.pread", lambda fd, n, off: real_pread(fd, min(n, 5), off))
    block = np.arange(7 * 11, dtype=np.uint8).reshape(7, 11)
    with DiskCanvas(tmp_path / "c.u8", (20, 30), fill=9) as canvas:
        canvas.paste(3, 4, block)
        got = canvas[0:20]
    expected = np.full((20, 30), 9, np.uint8)
    expected[3:10, 4:15] = block
    np.testing.assert_array_equal(got, expected)


def test_canvas_write_of_nothing_is_a_full_disk(tmp_path, monkeypatch):
    with DiskCanvas(tmp_path / "c.u8", (4, 4)) as canvas:
        monkeypatch.setattr("wsiseg.canvas.os.pwrite", lambda fd, b, off: 0)
        with pytest.raises(OSError) as e:
            canvas.paste(0, 0, np.ones((2, 2), np.uint8))
    assert e.value.errno == errno.ENOSPC


# -- signals and killed runs ----------------------------------------------------------------

@pytest.fixture(scope="module")
def slow_run(tmp_path_factory) -> list[str]:
    """A `wsiseg segment` command line that takes several seconds (small tiles, every tile)."""
    d = tmp_path_factory.mktemp("slow")
    rgb, _ = make_tissue_rgb(1500, 1500, np.random.default_rng(3), n_blobs=8)
    make_slide(d / "s.tif", rgb, mpp=2.0, levels=2)
    m = box_filter_model(d / "box.onnx", depth=8)
    return [sys.executable, "-m", "wsiseg.cli", "segment", str(d / "s.tif"), "--model", str(m),
            "--tile-px", "32", "--no-tissue-mask"]


def _start_and_wait_for_staging(cmd: list[str], out_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any((p / "labels.u8").exists() for p in listing_paths(out_dir)
                  if p.name.startswith(".wsiseg-")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    time.sleep(0.3)
    return proc


def listing_paths(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.exists() else []


def test_sigterm_exits_143_and_leaves_nothing(slow_run, tmp_path):
    out_dir = tmp_path / "out"
    proc = _start_and_wait_for_staging([*slow_run, "-o", str(out_dir / "m.tif"), "-q"],
                                       out_dir)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip() == "wsiseg: terminated; no unfinished output was left behind", err
    assert listing(tmp_path) == set()  # the output folder this run created is gone too


def test_what_a_killed_run_left_is_removed_by_the_next(slow_run, slide, model, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _start_and_wait_for_staging([*slow_run, "-o", str(out_dir / "m.tif")], out_dir)
    proc.kill()
    proc.communicate(timeout=60)
    left = [p for p in out_dir.iterdir() if p.name.startswith(".wsiseg-")]
    assert left and (left[0] / "labels.u8").exists()  # SIGKILL: nothing could be cleaned
    alive = out_dir / f".wsiseg-{socket.gethostname()}-{os.getpid()}-live"
    alive.mkdir()  # a run that still works (this process): left alone
    r = run("segment", slide, "-o", out_dir / "m.tif", "--model", model, "-q")
    assert r.exit_code == 0, r.output
    assert listing(out_dir) == FULL_SET | {alive.name}
    alive.rmdir()


def test_batch_rerun_removes_what_a_killed_run_left(slide, model, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out_dir / f".wsiseg-{socket.gethostname()}-{dead.pid}-dead"
    stale.mkdir()
    (stale / "labels.u8").write_bytes(b"\0" * 64)
    r = run("segment", slide.parent, "-o", out_dir, "--model", model, "-q")
    assert r.exit_code == 0, r.output
    assert not stale.exists()
    assert json.loads((out_dir / "s.json").read_text())["map"]["path"] == str(out_dir / "s.tif")


def test_onnxruntime_stays_quiet_under_an_unwritable_home(tmp_path):
    """`docker run --user N` leaves HOME unwritable; ONNX Runtime's warning about it must not
    come before our one-line error (it does with -v)."""
    import shutil
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run as another user")
    wsiseg = Path(sys.executable).with_name("wsiseg")
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(wsiseg),
           "segment", "/nonexistent/s.svs", "-o", f"/tmp/wsiseg-test-{os.getpid()}/m.tif"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HOME": "/"})
    if "Permission denied" in r.stderr and "wsiseg: error" not in r.stderr:
        pytest.skip("the other user cannot read this checkout")
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "wsiseg: error: slide not found: /nonexistent/s.svs"], r.stderr
    assert not Path(f"/tmp/wsiseg-test-{os.getpid()}").exists()


def test_report_on_a_full_disk_keeps_the_old_files(slide, model, tmp_path, monkeypatch):
    assert run("segment", slide, "-o", tmp_path / "m.tif", "--model", model, "-q").exit_code == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr("wsiseg.analysis.write_geojson", full)
    r = run("report", tmp_path / "m.tif", "--overwrite", "--tsr-field-um", "1000")
    assert "No space left on device" in one_line_error(r, 1)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
