"""The wsiseg command on the real slides in ../shared/data/slides, and its bad-input errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import openslide
import pytest
from click.testing import CliRunner
from onnx_models import colour_rule_model, contract

from wsiseg import __version__
from wsiseg.cli import main
from wsiseg.contract import to_metadata


@pytest.fixture(scope="module")
def model_1um(tmp_path_factory) -> Path:
    """The colour-rule model declared at 1 um/px with the default-like tile geometry."""
    meta = to_metadata(contract(mpp=1.0, tile_px=256, border_px=16, size_multiple=16))
    return colour_rule_model(tmp_path_factory.mktemp("m") / "colour1um.onnx", meta=meta)


def run(*args: str) -> CliRunner.invoke:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_version():
    r = run("--version")
    assert r.exit_code == 0 and __version__ in r.output


def test_info_real_slide(slides_dir):
    r = run("info", slides_dir / "CMU-1-Small-Region.svs", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["slide"]["mpp"] == pytest.approx(0.499)
    # 0.499 -> 1 um/px is within 3 % of a factor 2: 2 x 2 means, map at 0.998 um/px
    assert data["read_plan"]["out_shape"] == [2967 // 2, 2220 // 2]
    assert data["read_plan"]["box"] == 2 and data["read_plan"]["mpp"] == pytest.approx(0.998)
    assert "averaged over 2x2 px" in run("info", slides_dir / "CMU-1-Small-Region.svs").output
    r = run("info", slides_dir / "tcga-cr-7395-01a-01-ts1.svs", "--mpp", "0.5")
    assert r.exit_code == 0 and "level 1" in r.output
    # Without --mpp, info still describes the slide and says what segment will need.
    r = run("info", slides_dir / "tcga-cr-7395-01a-01-ts1.svs")
    assert r.exit_code == 0 and "unknown" in r.output and "needs --mpp" in r.output
    data = json.loads(run("info", slides_dir / "tcga-cr-7395-01a-01-ts1.svs", "--json").output)
    assert data["slide"]["mpp"] is None and data["read_plan"] is None
    assert data["slide"]["levels"] == [[4443, 3567], [2221, 1783]]


def test_segment_cmu_small_region(slides_dir, model_1um, tmp_path):
    out = tmp_path / "out.tif"
    r = run("-q", "segment", slides_dir / "CMU-1-Small-Region.svs", "-o", out,
            "--model", model_1um, "--tile-px", "512")
    assert r.exit_code == 0, r.output
    with openslide.OpenSlide(str(out)) as osr:
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.998)
        w, h = osr.dimensions
        assert (w, h) == (2220 // 2, 2967 // 2)
        assert osr.level_count >= 2
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["slide"]["mpp_source"] == "openslide.mpp-x"
    assert report["map"]["read_plan"]["method"] == "2x2 mean"
    areas = report["class_area_mm2"]
    assert areas["tumour"] > 0 and areas["stroma"] > 0  # the colour rule finds both on H&E
    assert sum(areas.values()) == pytest.approx(w * h * 0.998**2 / 1e6, rel=1e-6)


@pytest.mark.skipif(not shutil.which("vips") or not shutil.which("tiffinfo"),
                    reason="libvips-tools / libtiff-tools not installed (apt-get install them)")
def test_map_opens_in_vips_and_tiffinfo(slides_dir, model_1um, tmp_path):
    out = tmp_path / "out.tif"
    assert run("-q", "segment", slides_dir / "CMU-1-Small-Region.svs", "-o", out,
               "--model", model_1um).exit_code == 0
    with openslide.OpenSlide(str(out)) as osr:
        w, h = osr.dimensions
        levels = osr.level_count
    hdr = subprocess.run(["vipsheader", "-a", str(out)], capture_output=True, text=True, check=True)
    assert f"width: {w}" in hdr.stdout and f"height: {h}" in hdr.stdout
    info = subprocess.run(["tiffinfo", str(out)], capture_output=True, text=True, check=True)
    assert info.stdout.count("TIFF Directory") == levels
    assert "Photometric Interpretation: palette" in info.stdout


def test_tcga_without_mpp_fails_then_works_with_override(slides_dir, model_1um, tmp_path):
    slide = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    out = tmp_path / "tcga.tif"
    r = run("segment", slide, "-o", out, "--model", model_1um)
    assert r.exit_code == 1
    assert "--mpp" in r.output and "Traceback" not in r.output
    assert not out.exists()
    r = run("-q", "segment", slide, "-o", out, "--model", model_1um, "--mpp", "0.5")
    assert r.exit_code == 0, r.output
    with openslide.OpenSlide(str(out)) as osr:
        assert osr.dimensions == (2221, 1783)  # level 1 (downsample 2.0005) read as is
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(1.0, rel=1e-3)
        rgba = np.asarray(osr.read_region((0, 0), osr.level_count - 1,
                                          osr.level_dimensions[-1]))
    assert len(np.unique(rgba.reshape(-1, 4), axis=0)) >= 2


# -- bad input: one line, exit 1 (2 for usage), nothing at the output path ----------------------

def _bad(tmp_path: Path, slide: Path, model: Path, *extra: str) -> str:
    out = tmp_path / "o.tif"
    r = run("segment", slide, "-o", out, "--model", model, *extra)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and r.output.startswith("wsiseg: error:")
    assert len(r.output.strip().splitlines()) == 1
    assert not out.exists()
    return r.output


def test_missing_slide(tmp_path, model_1um):
    assert "slide not found" in _bad(tmp_path, tmp_path / "nope.svs", model_1um)


def test_not_a_slide(tmp_path, model_1um):
    p = tmp_path / "notes.svs"
    p.write_text("this is not a slide\n")
    assert "not a slide format OpenSlide reads" in _bad(tmp_path, p, model_1um)


def test_truncated_slide(tmp_path, slides_dir, model_1um):
    data = (slides_dir / "CMU-1-Small-Region.svs").read_bytes()
    p = tmp_path / "cut.svs"
    p.write_bytes(data[: len(data) // 2])
    msg = _bad(tmp_path, p, model_1um)
    assert "corrupt or truncated" in msg or "not a slide format" in msg


def test_mrxs_without_its_folder(tmp_path, model_1um):
    p = tmp_path / "case.mrxs"
    p.write_text("[GENERAL]\n")
    assert "needs its data folder 'case/'" in _bad(tmp_path, p, model_1um)


def test_model_without_contract_cli(tmp_path, slides_dir):
    bare = colour_rule_model(tmp_path / "bare.onnx", meta={})
    assert "no wsiseg contract" in _bad(tmp_path, slides_dir / "small.svs", bare)


def test_existing_output_cli(tmp_path, slides_dir, model_1um):
    out = tmp_path / "o.tif"
    out.write_bytes(b"x")
    r = run("segment", slides_dir / "small.svs", "-o", out, "--model", model_1um)
    assert r.exit_code == 1 and "--overwrite" in r.output
    assert out.read_bytes() == b"x"


def test_usage_error_exit_2(tmp_path):
    assert run("segment", tmp_path / "x.svs").exit_code == 2  # no -o
    assert run("segment", tmp_path / "x.svs", "-o", tmp_path / "o.tif",
               "--device", "tpu").exit_code == 2


def test_ctrl_c_exits_130_and_leaves_nothing(tmp_path):
    """SIGINT to a running `wsiseg segment`: exit code 130, one line, no output files and no
    temporary canvas left in the output folder."""
    import os
    import signal
    import sys
    import time

    from onnx_models import box_filter_model
    from synth import make_slide, make_tissue_rgb

    rgb, _ = make_tissue_rgb(1500, 1500, np.random.default_rng(3), n_blobs=8)
    slide = tmp_path / "s.tif"
    make_slide(slide, rgb, mpp=2.0, levels=2)
    model = box_filter_model(tmp_path / "box.onnx", depth=8)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cmd = [sys.executable, "-m", "wsiseg.cli", "segment", str(slide), "-o",
           str(out_dir / "m.tif"), "--model", str(model), "--tile-px", "32", "--no-tissue-mask"]
    # a runner started in the background by a shell without job control ignores SIGINT, and a
    # child inherits that (Python then installs no Ctrl-C handler): give the child the default
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".wsiseg-") for p in out_dir.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(out_dir.iterdir()) == []


def test_inference_never_imports_torch():
    import sys
    code = ("import sys, wsiseg.cli, wsiseg.pipeline, wsiseg.analysis, wsiseg.batch; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
