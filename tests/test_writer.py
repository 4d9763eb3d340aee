"""The class-map writer, read back by OpenSlide, tifffile, libvips and libtiff's tiffinfo."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from synth import BLOB_RGB, make_labels, make_slide, make_tissue_rgb

from wsiseg import writer
from wsiseg.contract import PAPER_CLASSES
from wsiseg.writer import read_description, read_level, read_stack, write_pyramid, write_stack

COLORS = [(0, 0, 0)] + [c.color for c in PAPER_CLASSES]  # value 0 = not analysed
LEGEND = {"classes": [{"value": i + 1, "name": c.name} for i, c in enumerate(PAPER_CLASSES)],
          "model": "test", "note": "µm survives as JSON"}


@pytest.fixture(scope="module")
def odd_map(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 1001 x 777 map of all 14 values, written with 256 px tiles at 0.5 um/px."""
    labels = make_labels(1001, 777, np.random.default_rng(0), n_classes=13, block_px=7)
    path = tmp_path_factory.mktemp("map") / "map.tif"
    shapes = write_pyramid(path, labels, mpp=0.5, colormap=COLORS, description=LEGEND,
                           tile_px=256)
    assert shapes == [(1001, 777), (501, 389), (251, 195)]
    return path, labels


def test_tifffile_reads_exact_levels_and_tags(odd_map):
    path, labels = odd_map
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 3
        for k, page in enumerate(tif.pages):
            np.testing.assert_array_equal(page.asarray(), labels[::2**k, ::2**k])
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
            assert page.subfiletype == (1 if k else 0)
            assert page.photometric == tifffile.PHOTOMETRIC.PALETTE
            np.testing.assert_array_equal(page.colormap[:, :len(COLORS)],
                                          np.array(COLORS).T * 257)
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            for tag in ("XResolution", "YResolution"):
                num, den = page.tags[tag].value
                assert num / den == pytest.approx(1e4 / (0.5 * 2**k))
            assert "SubIFDs" not in page.tags
        assert tif.pages[1].description == ""
    assert read_description(path) == LEGEND
    np.testing.assert_array_equal(read_level(path, level=2), labels[::4, ::4])
    with pytest.raises(ValueError, match="has 3 levels"):
        read_level(path, level=3)


def test_openslide_sees_pyramid_mpp_and_colours(odd_map):
    path, labels = odd_map
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.level_count == 3
        assert osr.level_dimensions == ((777, 1001), (389, 501), (195, 251))
        for k, downsample in enumerate(osr.level_downsamples):
            assert downsample == pytest.approx(2**k, rel=0.01)
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.5)
        assert json.loads(osr.properties[openslide.PROPERTY_NAME_COMMENT]) == LEGEND
        palette = np.array(COLORS, np.uint8)
        for k in range(3):
            w, h = osr.level_dimensions[k]
            rgba = np.asarray(osr.read_region((0, 0), k, (w, h)))
            assert (rgba[..., 3] == 255).all()
            np.testing.assert_array_equal(rgba[..., :3], palette[labels[::2**k, ::2**k]])


def test_tiffinfo_lists_tiled_reduced_pages(odd_map):
    path, _ = odd_map
    if shutil.which("tiffinfo") is None:
        pytest.skip("tiffinfo not installed (apt-get install libtiff-tools)")
    out = subprocess.run(["tiffinfo", str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.count("TIFF Directory at offset") == 3
    assert out.stdout.count("reduced-resolution image") == 2
    assert out.stdout.count("Tile Width: 256 Tile Length: 256") == 3
    assert "Image Width: 195 Image Length: 251" in out.stdout
    assert "palette color" in out.stdout


def test_vips_reads_size_pages_and_colours(odd_map):
    path, labels = odd_map
    if shutil.which("vips") is None or shutil.which("vipsheader") is None:
        pytest.skip("libvips tools not installed (apt-get install libvips-tools)")

    def run(*args: str) -> str:
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()
    assert run("vipsheader", "-f", "width", str(path)) == "777"
    assert run("vipsheader", "-f", "height", str(path)) == "1001"
    assert run("vipsheader", "-f", "n-pages", str(path)) == "3"
    assert run("vipsheader", "-f", "width", f"{path}[page=2]") == "195"
    for page, (row, col) in ((0, (600, 400)), (1, (300, 170)), (2, (100, 60))):
        value = labels[::2**page, ::2**page][row, col]
        rgb = run("vips", "getpoint", f"{path}[page={page}]", str(col), str(row))
        assert [int(float(v)) for v in rgb.split()] == list(COLORS[value])


def test_tiny_image_is_one_level(tmp_path):
    labels = np.array([[0, 1, 2], [3, 4, 5]], np.uint8)
    path = tmp_path / "tiny.tif"
    assert write_pyramid(path, labels, mpp=2.0, colormap=COLORS) == [(2, 3)]
    np.testing.assert_array_equal(read_level(path), labels)
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.level_dimensions == ((3, 2),)
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(2.0)
        assert osr.read_region((2, 1), 0, (1, 1)).getpixel((0, 0))[:3] == COLORS[5]


@pytest.mark.parametrize("shape", [(3000, 1), (1, 3000)])
def test_one_pixel_wide_image(tmp_path, shape):
    labels = (np.arange(3000) % 5).astype(np.uint8).reshape(shape)
    path = tmp_path / "thin.tif"
    shapes = write_pyramid(path, labels, mpp=1.0, tile_px=256)
    assert len(shapes) == 5 and max(shapes[-1]) <= 256 and min(shapes[-1]) == 1
    for k, _ in enumerate(shapes):
        np.testing.assert_array_equal(read_level(path, level=k), labels[::2**k, ::2**k])
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.level_dimensions == tuple((w, h) for h, w in shapes)


def test_min_size_and_no_compression(tmp_path):
    labels = make_labels(700, 900, np.random.default_rng(1), n_classes=3)
    path = tmp_path / "raw.tif"
    shapes = write_pyramid(path, labels, mpp=1.0, tile_px=128, compression=None,
                           min_size_px=60)
    assert [max(s) for s in shapes] == [900, 450, 225, 113, 57]
    with tifffile.TiffFile(path) as tif:
        assert all(p.compression == tifffile.COMPRESSION.NONE for p in tif.pages)
        assert not tif.is_bigtiff
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.level_count == 5


def test_bigtiff_when_data_nears_4gib(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "_BIGTIFF_BYTES", 1000)
    labels = make_labels(600, 500, np.random.default_rng(2), n_classes=4)
    path = tmp_path / "big.tif"
    write_pyramid(path, labels, mpp=1.0, colormap=COLORS[:5], tile_px=256)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.level_dimensions == ((500, 600), (250, 300), (125, 150))
    np.testing.assert_array_equal(read_level(path, level=1), labels[::2, ::2])


@pytest.mark.parametrize("mode", ["r", "c"])
def test_memmap_input(tmp_path, mode):
    labels = make_labels(1500, 1300, np.random.default_rng(3), n_classes=13)
    raw = tmp_path / "labels.u8"
    labels.tofile(raw)
    mm = np.memmap(raw, dtype=np.uint8, mode=mode, shape=labels.shape)
    if mode == "c":  # private changes in RAM must be written and must survive the writer
        mm[:10, :10] = labels[:10, :10] = 99
    path = tmp_path / "map.tif"
    write_pyramid(path, mm, mpp=1.0, tile_px=256)
    for k in range(3):
        np.testing.assert_array_equal(read_level(path, level=k), labels[::2**k, ::2**k])
    np.testing.assert_array_equal(mm, labels)


# Peak RSS of this process's own memory map (VmHWM). Not getrusage's ru_maxrss: Linux carries
# that over exec from the forking parent, so a child of a big pytest process would report the
# parent's peak and hide its own growth.
RSS_SCRIPT = """
import json, sys, numpy as np
from wsiseg.writer import write_pyramid
def peak_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
write_pyramid(sys.argv[2], np.zeros((600, 600), np.uint8), mpp=1.0)  # imports and first use
n = int(sys.argv[3])
image = np.memmap(sys.argv[1], dtype=np.uint8, mode="r", shape=(n, n))
before = peak_mb()
write_pyramid(sys.argv[2], image, mpp=1.0, colormap=[(i, i, i) for i in range(14)])
print(json.dumps({"before_mb": before, "growth_mb": peak_mb() - before}))
"""


def test_large_memmap_keeps_memory_flat(tmp_path):
    """Peak RSS growth while writing a 12k x 12k (144 MiB) memmap, in a fresh process."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("peak RSS is read from /proc/self/status (Linux)")
    n = 12288
    mm = np.memmap(tmp_path / "big.u8", dtype=np.uint8, mode="w+", shape=(n, n))
    coarse = make_labels(n // 64, n // 64, np.random.default_rng(4), n_classes=13, block_px=1)
    for r0 in range(0, n, 512):
        mm[r0:r0 + 512] = np.repeat(np.repeat(coarse[r0 // 64:(r0 + 512) // 64], 64, 0), 64, 1)
    mm.flush()
    del mm
    out = tmp_path / "big.tif"
    env = {**os.environ, "PYTHONPATH": str(Path(writer.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "big.u8"),
                           str(out), str(n)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    rss = json.loads(proc.stdout)
    image_mb = n * n / 2**20
    print(f"{n} x {n} memmap: peak RSS growth {rss['growth_mb']:.1f} MB "
          f"(from {rss['before_mb']:.1f} MB) for a {image_mb:.0f} MB image")
    assert rss["growth_mb"] < image_mb / 4
    with openslide.OpenSlide(str(out)) as osr:
        assert osr.level_dimensions[0] == (n, n) and osr.level_count == 6
    np.testing.assert_array_equal(read_level(out, level=4),
                                  np.repeat(np.repeat(coarse, 4, 0), 4, 1))


class FailingRows:
    """Image-like whose row reads fail with ``error`` from row ``fail_at`` on."""

    def __init__(self, shape: tuple[int, int], fail_at: int, error: BaseException):
        self.shape, self.dtype, self.fail_at, self.error = shape, np.dtype(np.uint8), fail_at, error

    def __getitem__(self, rows: slice) -> np.ndarray:
        if rows.stop > self.fail_at:
            raise self.error
        return np.ones((min(rows.stop, self.shape[0]) - rows.start, self.shape[1]), np.uint8)


@pytest.mark.parametrize("error", [OSError("disk read failed"), KeyboardInterrupt()])
def test_failure_leaves_nothing_and_keeps_old_file(tmp_path, error):
    path = tmp_path / "map.tif"
    with pytest.raises(type(error)) as raised:
        write_pyramid(path, FailingRows((2000, 700), 1500, error), mpp=1.0, tile_px=256)
    assert raised.value is error  # not masked by an error from closing the half-written file
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"previous map")
    with pytest.raises(type(error)):
        write_pyramid(path, FailingRows((2000, 700), 1500, error), mpp=1.0, tile_px=256)
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == b"previous map"


def test_success_replaces_file_and_honours_umask(tmp_path):
    path = tmp_path / "map.tif"
    path.write_bytes(b"previous map")
    write_pyramid(path, np.ones((40, 50), np.uint8), mpp=1.0)
    assert list(tmp_path.iterdir()) == [path]
    np.testing.assert_array_equal(read_level(path), 1)
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".map.tif.tmp-{host}-{dead.pid}-0a1b2c3d"
    alive = tmp_path / f".map.tif.tmp-{host}-{os.getppid()}-0a1b2c3d"
    other_host = tmp_path / f".map.tif.tmp-elsewhere-{dead.pid}-0a1b2c3d"
    other_map = tmp_path / f".map.tif.tif.tmp-{host}-{dead.pid}-0a1b2c3d"
    for f in (stale, alive, other_host, other_map):
        f.write_bytes(b"partial")
    write_pyramid(tmp_path / "map.tif", np.zeros((10, 10), np.uint8), mpp=1.0)
    assert sorted(tmp_path.iterdir()) == sorted([tmp_path / "map.tif", alive, other_host,
                                                 other_map])


def test_output_folder_errors_name_the_folder(tmp_path):
    image = np.zeros((10, 10), np.uint8)
    with pytest.raises(FileNotFoundError, match=f"output folder {tmp_path / 'nope'} does not"):
        write_pyramid(tmp_path / "nope" / "map.tif", image, mpp=1.0)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        write_pyramid(tmp_path / "file" / "map.tif", image, mpp=1.0)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        write_pyramid(tmp_path, image, mpp=1.0)
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
    elif Path("/sys").is_dir():  # root may write anywhere on disk, but not into sysfs
        locked = Path("/sys")
    else:
        pytest.skip("no folder this user cannot write to")
    with pytest.raises(PermissionError, match=f"cannot write to output folder {locked}"):
        write_pyramid(locked / "map.tif", image, mpp=1.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(image=np.zeros((4, 4), np.uint16)), "must be uint8"),
    (dict(image=np.zeros((4, 4, 3), np.uint8)), "2-D"),
    (dict(image=np.zeros((0, 4), np.uint8)), "non-empty"),
    (dict(mpp=0.0), "mpp must be a positive"),
    (dict(mpp=float("nan")), "mpp must be a positive"),
    (dict(tile_px=100), "multiple of 16"),
    (dict(compression="jpeg"), "compression must be one of"),
    (dict(colormap=[(0, 0, 256)]), "0-255"),
    (dict(colormap=[(0, 0, 0)] * 257), "1-256 RGB"),
    (dict(colormap=[(0, 0)]), "1-256 RGB"),
    (dict(min_size_px=0), "min_size_px"),
])
def test_bad_arguments_raise_before_writing(tmp_path, kwargs, message):
    args = {"image": np.zeros((4, 4), np.uint8), "mpp": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        write_pyramid(tmp_path / "map.tif", args.pop("image"), **args)
    assert list(tmp_path.iterdir()) == []


def test_rows_of_wrong_dtype_are_refused(tmp_path):
    class Int64Rows(FailingRows):
        def __getitem__(self, rows):
            return super().__getitem__(rows).astype(np.int64)
    with pytest.raises(ValueError, match="expected uint8"):
        write_pyramid(tmp_path / "m.tif", Int64Rows((300, 30), 10**9, OSError()), mpp=1.0)
    assert list(tmp_path.iterdir()) == []


def test_stack_round_trip(tmp_path):
    probs = np.random.default_rng(5).integers(0, 256, (3, 300, 530), dtype=np.uint8)
    path = tmp_path / "map.prob.tif"
    write_stack(path, probs, mpp=0.25, names=["tumour", "stroma", "other"],
                description={"kind": "probabilities x255"}, tile_px=128)
    np.testing.assert_array_equal(read_stack(path), probs)
    assert read_description(path) == {"channels": ["tumour", "stroma", "other"],
                                      "kind": "probabilities x255"}
    with tifffile.TiffFile(path) as tif:
        assert [p.tags["PageName"].value for p in tif.pages] == ["tumour", "stroma", "other"]
        assert all(p.is_tiled and p.tags["XResolution"].value[0]
                   / p.tags["XResolution"].value[1] == pytest.approx(4e4) for p in tif.pages)
    with pytest.raises(ValueError, match="2 names given for 3 channels"):
        write_stack(path, probs, mpp=0.25, names=["a", "b"])
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        write_stack(path, probs[0], mpp=0.25)


def test_read_description_of_foreign_tiffs(tmp_path):
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((8, 8), np.uint8), metadata=None)
    assert read_description(tmp_path / "plain.tif") == {}
    tifffile.imwrite(tmp_path / "aperio.tif", np.zeros((8, 8), np.uint8),
                     description="Aperio Image Library v10", metadata=None)
    with pytest.raises(ValueError, match="not a JSON object"):
        read_description(tmp_path / "aperio.tif")


@pytest.mark.parametrize("mpp", [0.25, None])
def test_synthetic_slide_opens_in_openslide(tmp_path, mpp):
    rgb, labels = make_tissue_rgb(700, 900, np.random.default_rng(6), n_blobs=4)
    assert set(np.unique(labels)) == {0, 1, 2}
    for k, colour in enumerate(BLOB_RGB):
        assert np.abs(rgb[labels == k + 1].astype(int) - colour).mean() < 5
    path = tmp_path / "slide.tif"
    assert make_slide(path, rgb, mpp=mpp, levels=3) == [(700, 900), (350, 450), (175, 225)]
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.level_downsamples == (1.0, 2.0, 4.0)
        assert osr.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        np.testing.assert_array_equal(np.asarray(osr.read_region((0, 0), 0, (900, 700)))[..., :3],
                                      rgb)
        if mpp is None:
            assert openslide.PROPERTY_NAME_MPP_X not in osr.properties
            assert osr.properties["tiff.ResolutionUnit"] == "none"
        else:
            assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(mpp)
            assert osr.properties["tiff.ResolutionUnit"] == "centimeter"
            assert float(osr.properties["tiff.XResolution"]) == pytest.approx(1e4 / mpp)
