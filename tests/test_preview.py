import numpy as np
import pytest
from PIL import Image

from wsiseg.labels import resize_nearest
from wsiseg.preview import (
    GAP_PX,
    HEAT_ALPHA,
    hotspot_circle_px,
    make_preview,
)
from wsiseg.report import tsr_text_lines
from wsiseg.tsr import NO_DATA, TSRConfig, measure_tsr, tsr_lut

NAMES = ["tumour", "stroma", "background"]
COLORS = [(230, 25, 75), (245, 130, 48), (255, 255, 255)]


def inputs():
    thumb = np.full((200, 300, 3), 100, np.uint8)
    labels = np.full((50, 75), 3, np.uint8)     # 4 thumbnail px per map px
    labels[10:20, 20:40] = 1                    # thumbnail rows 40-79, cols 80-159
    return thumb, labels


def has_color(img, color):
    return bool((img == np.asarray(color, np.uint8)).all(axis=2).any())


def test_preview_file_size_overlay_and_legend(tmp_path):
    thumb, labels = inputs()
    path = tmp_path / "preview.png"
    img = make_preview(thumb, labels, colors=COLORS, names=NAMES, path=path, alpha=0.4,
                       skip_values=[3], text_lines=["TSR hot spot: 70%"])
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (2 * 300 + 2 * GAP_PX + 280, 200)
        assert (np.asarray(png.convert("RGB")) == img).all()
    expected = np.rint(0.6 * 100 + 0.4 * np.array(COLORS[0])).astype(np.uint8)
    assert img[60, 120].tolist() == expected.tolist()
    assert img[40, 80].tolist() == expected.tolist() and img[39, 80].tolist() == [100] * 3
    assert img[150, 250].tolist() == [100, 100, 100]  # background class is not coloured
    classes = img[:, 300 + GAP_PX:600 + GAP_PX]        # the classes alone, full colour on white
    assert classes[60, 120].tolist() == list(COLORS[0]) and classes[39, 80].tolist() == [255] * 3
    assert classes[150, 250].tolist() == [255] * 3
    legend = img[:, 600 + 2 * GAP_PX:]
    assert has_color(legend, COLORS[0])         # box of the class present
    assert not has_color(legend, COLORS[1])     # stroma is absent: not listed


def test_hotspot_circle_and_heat_map_panel(tmp_path):
    thumb, labels = inputs()
    tsr_map = np.full((25, 38), NO_DATA, np.uint8)  # coarser than the labels
    tsr_map[5:10, 10:20] = 70                        # thumbnail rows 40-79, cols 79-157
    lut = tsr_lut()
    img = make_preview(thumb, labels, colors=COLORS, names=NAMES, path=tmp_path / "p.png",
                       hotspot_px=(120.0, 200.0, 30.0), tsr_map=tsr_map, lut=lut)
    assert img.shape == (200, 3 * 300 + 3 * GAP_PX + 280, 3)
    heat = img[:, 600 + 2 * GAP_PX:900 + 2 * GAP_PX]
    base = 127 + 100 / 2  # grey of the lightened thumbnail
    expected = np.rint((1 - HEAT_ALPHA) * base + HEAT_ALPHA * lut[70].astype(float))
    assert heat[60, 120].tolist() == expected.astype(np.uint8).tolist()
    assert heat[150, 20].tolist() == [177, 177, 177]  # no data: grey only
    for panel in (img[:, :300], heat):
        ring = panel[120, 200 + 26:200 + 31]            # right edge of the circle
        assert has_color(ring[None], (0, 0, 0)) and has_color(ring[None], (255, 255, 255))
        assert panel[120, 200].tolist() != [0, 0, 0]   # outline only
    assert has_color(img[:, 900 + 3 * GAP_PX:], lut[100])  # colour bar in the legend


def test_legend_taller_than_thumbnail_grows_the_image():
    thumb = np.full((20, 30, 3), 200, np.uint8)
    labels = np.arange(1, 4, dtype=np.uint8).repeat(10)[None].repeat(20, 0)
    img = make_preview(thumb, labels, colors=COLORS, names=NAMES,
                       text_lines=["a long line of text that has to wrap"] * 3)
    assert img.shape[0] > 20 and img.shape[1] == 2 * 30 + 2 * GAP_PX + 280
    assert (img[20:, :60 + GAP_PX] == 255).all()


def test_helpers_and_text():
    assert resize_nearest(np.array([[1, 2], [3, 4]]), (4, 4)).tolist()[1] == [1, 1, 2, 2]
    labels = np.zeros((40, 60), np.uint8)
    labels[10:30, 10:50] = 1
    labels[15:25, 20:40] = 2
    cfg = TSRConfig(grid_um=10, field_diameter_um=100, bulk_closing_um=0, bulk_margin_um=50)
    res = measure_tsr(labels, mpp=10.0, tumour_values=[1], stroma_values=[2],
                      class_names=NAMES, config=cfg)
    lines = tsr_text_lines(res)
    assert lines[0].startswith(f"TSR hot spot: {res.hotspot.tsr_pct:.0f}%")
    assert "stroma = stroma" in lines[-1]
    row, col, r = hotspot_circle_px(res.hotspot, image_mpp=5.0)
    assert (row, col, r) == (res.hotspot.centre_row_um / 5, res.hotspot.centre_col_um / 5, 10.0)
    none = measure_tsr(labels, mpp=10.0, tumour_values=[], stroma_values=[2], config=cfg)
    assert tsr_text_lines(none)[0] == "TSR hot spot: none - the model names no tumour class"


def test_bad_input_is_refused():
    thumb, labels = inputs()
    with pytest.raises(ValueError, match="uint8 RGB"):
        make_preview(thumb.astype(float), labels, colors=COLORS, names=NAMES)
    with pytest.raises(ValueError, match="colours"):
        make_preview(thumb, labels, colors=COLORS[:2], names=NAMES)
    with pytest.raises(ValueError, match="both"):
        make_preview(thumb, labels, colors=COLORS, names=NAMES, tsr_map=labels)


def test_heat_map_keeps_white_light():
    """A white thumbnail must stay light grey under the heat-map (no uint8 wrap-around)."""
    from wsiseg.preview import heat_map
    white = np.full((4, 4, 3), 255, np.uint8)
    out = heat_map(white, np.full((2, 2), NO_DATA, np.uint8), tsr_lut())
    assert out.min() >= 250
