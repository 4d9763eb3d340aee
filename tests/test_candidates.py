"""Candidate models kept beside the default (models/candidates/, docs/ood.md): each loads with
the engine and speaks the default model's classes, so `--model` and `train.init` take it."""

import re
from pathlib import Path

import numpy as np
import pytest

from wsiseg.engine import load_model

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = sorted((ROOT / "models" / "candidates").glob("*.onnx"))


@pytest.mark.parametrize("path", CANDIDATES, ids=[p.name for p in CANDIDATES])
def test_candidate_loads_and_segments_like_the_default(path):
    default = load_model(ROOT / "models" / "wsiseg-ebhi-unet.onnx", device="cpu")
    model = load_model(path, device="cpu")
    c = model.contract
    assert c.class_names == default.contract.class_names
    assert (c.mpp, c.tumour_classes, c.stroma_classes) == (
        default.contract.mpp, default.contract.tumour_classes, default.contract.stroma_classes)
    assert re.fullmatch(r"\d+-candidate\d+", c.version)
    side = c.tile_px
    tile = np.full((1, 3, side, side), 240, np.uint8)     # glass
    logits = model.session.run(None, {model.session.get_inputs()[0].name: tile})[0]
    assert logits.shape == (1, len(c.class_names), side, side)
    assert c.class_names[int(np.bincount(logits.argmax(1).ravel()).argmax())] == "background"
