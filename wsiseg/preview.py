"""Preview PNG: slide thumbnail with the class overlay, legend, hot-spot circle and TSR text.

Layout, left to right: the thumbnail with class colours blended in (``alpha``); the classes
alone in their full colours on white; optionally the TSR map as a heat-map over a grey copy of
the thumbnail; a legend column with the TSR numbers, a colour box and name per class present,
and the heat-map's colour bar. The thumbnail, the label map and the TSR map must cover the same
area of the slide; the maps are resized to the thumbnail with nearest-neighbour sampling.
Pillow draws in (x, y) = (column, row); the arguments here are in numpy (row, col) order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .labels import count_values, resize_nearest

GAP_PX = 8
HEAT_ALPHA = 0.75  # TSR colours over the grey thumbnail
_WHITE, _BLACK = (255, 255, 255), (0, 0, 0)


def blend_classes(rgb: np.ndarray, labels: np.ndarray, colors: Sequence[Sequence[int]], *,
                  alpha: float, skip_values: Sequence[int] = ()) -> np.ndarray:
    """``(1 - alpha) * rgb + alpha * colour`` where a pixel has a class not in skip_values."""
    lut = np.zeros((256, 3), np.float32)
    lut[1:len(colors) + 1] = np.asarray(colors, np.float32)
    show = (labels > 0) & (labels <= len(colors)) & ~np.isin(labels, list(skip_values))
    out = rgb.astype(np.float32)
    out[show] = (1 - alpha) * out[show] + alpha * lut[labels[show]]
    return np.rint(out).astype(np.uint8)


def class_panel(labels: np.ndarray, colors: Sequence[Sequence[int]], *,
                skip_values: Sequence[int] = ()) -> np.ndarray:
    """The classes in their full colours on white (unanalysed and skipped values stay white):
    easier to read than the overlay when checking what a model does."""
    lut = np.full((256, 3), 255, np.uint8)
    lut[1:len(colors) + 1] = np.asarray(colors, np.uint8)
    for v in skip_values:
        lut[v] = 255
    return lut[labels]


def heat_map(rgb: np.ndarray, tsr_map: np.ndarray, lut: np.ndarray, *,
             no_data: int = 255) -> np.ndarray:
    """TSR colours over a grey, lightened copy of the thumbnail; no-data pixels stay grey."""
    grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    base = np.repeat((127 + grey / 2)[..., None], 3, axis=2)  # at most 254.5: no wrap-around
    tsr = resize_nearest(tsr_map, rgb.shape[:2])
    data = tsr != no_data
    base[data] = (1 - HEAT_ALPHA) * base[data] + HEAT_ALPHA * lut[tsr[data]].astype(np.float32)
    return np.rint(base).astype(np.uint8)


def hotspot_circle_px(hotspot: Any, *, image_mpp: float) -> tuple[float, float, float]:
    """(row, col, radius) in pixels of an image at ``image_mpp`` whose corner is the map's."""
    return (hotspot.centre_row_um / image_mpp, hotspot.centre_col_um / image_mpp,
            hotspot.diameter_um / 2 / image_mpp)


def _font(size_px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size_px)
    except ImportError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font: Any, width_px: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width_px:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def _legend(draw: ImageDraw.ImageDraw | None, x0: int, *, width_px: int, font: Any,
            text_lines: Sequence[str], entries: Sequence[tuple[str, Sequence[int]]],
            lut: np.ndarray | None) -> int:
    """Draw the legend column at x0 (or only measure it when draw is None); return its height."""
    line_px = int(font.getbbox("Ag")[3]) + 4
    box = line_px - 4
    y = GAP_PX
    for text in text_lines:
        for line in _wrap(text, font, width_px - 2 * GAP_PX):
            if draw:
                draw.text((x0 + GAP_PX, y), line, fill=_BLACK, font=font)
            y += line_px
    y += line_px // 2
    for name, color in entries:
        if draw:
            draw.rectangle([x0 + GAP_PX, y + 2, x0 + GAP_PX + box, y + 2 + box],
                           fill=tuple(int(c) for c in color), outline=_BLACK)
            draw.text((x0 + 2 * GAP_PX + box, y), name, fill=_BLACK, font=font)
        y += line_px
    if lut is not None:
        y += line_px // 2
        if draw:
            draw.text((x0 + GAP_PX, y), "local TSR (stroma %)", fill=_BLACK, font=font)
        y += line_px
        bar_w = width_px - 2 * GAP_PX
        if draw:
            for i in range(bar_w):
                c = lut[int(round(100 * i / max(1, bar_w - 1)))]
                draw.line([(x0 + GAP_PX + i, y), (x0 + GAP_PX + i, y + box)],
                          fill=tuple(int(v) for v in c))
            for pct, anchor in ((0, "la"), (50, "ma"), (100, "ra")):
                draw.text((x0 + GAP_PX + pct * (bar_w - 1) / 100, y + box + 2), f"{pct}",
                          fill=_BLACK, font=font, anchor=anchor)
        y += box + 2 + line_px
    return y + GAP_PX


def _circle(draw: ImageDraw.ImageDraw, circle: tuple[float, float, float]) -> None:
    row, col, r = circle
    for width, color, grow in ((5, _WHITE, 0), (2, _BLACK, -1.5)):  # white halo, black ring
        draw.ellipse([col - r - grow, row - r - grow, col + r + grow, row + r + grow],
                     outline=color, width=width)


def make_preview(thumbnail_rgb: np.ndarray, labels: np.ndarray, *,
                 colors: Sequence[Sequence[int]], names: Sequence[str],
                 path: str | os.PathLike[str] | None = None, alpha: float = 0.4,
                 skip_values: Sequence[int] = (),
                 hotspot_px: tuple[float, float, float] | None = None,
                 text_lines: Sequence[str] = (), tsr_map: np.ndarray | None = None,
                 lut: np.ndarray | None = None, legend_width_px: int = 280,
                 font_size_px: int = 14) -> np.ndarray:
    """Compose the preview, write it as PNG to ``path`` (if given) and return it (h, w, 3).

    ``labels`` holds class values (k+1 = ``names[k]``); 0 and ``skip_values`` (e.g. the
    background class) are not coloured and not listed. ``hotspot_px`` is (row, col, radius)
    in thumbnail pixels (see :func:`hotspot_circle_px`). The heat-map panel is drawn when
    ``tsr_map`` and its ``lut`` (256 x 3) are given.
    """
    rgb = np.asarray(thumbnail_rgb)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.dtype != np.uint8:
        raise ValueError(f"thumbnail must be uint8 RGB (h, w, 3), got {rgb.dtype} {rgb.shape}")
    rgb = rgb[..., :3]
    if len(colors) != len(names):
        raise ValueError(f"{len(names)} class names but {len(colors)} colours")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be within 0..1, got {alpha}")
    if (tsr_map is None) != (lut is None):
        raise ValueError("the heat-map needs both tsr_map and lut")
    h, w = rgb.shape[:2]
    lab = resize_nearest(np.asarray(labels), (h, w))
    panels = [blend_classes(rgb, lab, colors, alpha=alpha, skip_values=skip_values),
              class_panel(lab, colors, skip_values=skip_values)]
    if tsr_map is not None:
        panels.append(heat_map(rgb, np.asarray(tsr_map), np.asarray(lut)))
    present = np.flatnonzero(count_values(lab, len(names) + 1))
    entries = [(names[v - 1], colors[v - 1]) for v in present
               if 0 < v <= len(names) and v not in skip_values]

    font = _font(font_size_px)
    kw = dict(width_px=legend_width_px, font=font, text_lines=text_lines, entries=entries,
              lut=lut)
    panels_w = len(panels) * w + (len(panels) - 1) * GAP_PX
    height = max(h, _legend(None, 0, **kw))
    canvas = Image.new("RGB", (panels_w + GAP_PX + legend_width_px, height), _WHITE)
    draw = ImageDraw.Draw(canvas)
    captions = ["slide with classes", "tissue classes", "local TSR per field"]
    for i, panel in enumerate(panels):
        image = Image.fromarray(panel)
        panel_draw = ImageDraw.Draw(image)  # drawn on the panel so that it is clipped to it
        if hotspot_px is not None:
            _circle(panel_draw, hotspot_px)
        box = panel_draw.textbbox((4, 4), captions[i], font=font)
        panel_draw.rectangle([box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2], fill=_WHITE)
        panel_draw.text((4, 4), captions[i], fill=_BLACK, font=font)
        canvas.paste(image, (i * (w + GAP_PX), 0))
    _legend(draw, panels_w + GAP_PX, **kw)
    if path is not None:
        canvas.save(os.fspath(path), format="PNG")
    return np.asarray(canvas)
