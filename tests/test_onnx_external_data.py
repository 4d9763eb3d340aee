"""An ONNX model whose external data lies outside its folder is refused with the usual one line."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from onnx_models import colour_rule_model

from wsiseg.cli import main

SLIDE = Path(__file__).resolve().parents[1] / "examples" / "CMU-1-Small-Region.svs"


def with_external_weights(model: Path, out: Path, location: str, data_file: Path) -> Path:
    """``model`` with its first initializer moved to ``data_file``, referenced as ``location``."""
    proto = onnx.load(str(model))
    tensor = proto.graph.initializer[0]
    weights = numpy_helper.to_array(tensor)
    data_file.write_bytes(weights.tobytes())
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(weights.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    return out


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "models").mkdir()
    return tmp_path / "models"


def test_external_data_inside_the_folder_loads(folder, tmp_path):
    from wsiseg.engine import load_model

    model = with_external_weights(colour_rule_model(tmp_path / "plain.onnx"),
                                  folder / "m.onnx", "m.weights", folder / "m.weights")
    assert load_model(model, device="cpu").run(np.zeros((1, 16, 16, 3), np.uint8)).shape == \
        (1, 3, 16, 16)


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
@pytest.mark.parametrize("command", ["info", "segment"])
def test_external_data_outside_the_folder_is_a_one_line_model_error(folder, tmp_path, where,
                                                                     command):
    outside = tmp_path / "outside.bin"
    location = {"parent": "../outside.bin", "absolute": str(outside), "symlink": "link.bin"}
    model = with_external_weights(colour_rule_model(tmp_path / "plain.onnx"),
                                  folder / "evil.onnx", location[where], outside)
    if where == "symlink":
        (folder / "link.bin").symlink_to(outside)
    out = tmp_path / "out" / "map.tif"
    args = ["info", SLIDE] if command == "info" else ["segment", SLIDE, "-o", out]
    result = CliRunner().invoke(main, [str(a) for a in [*args, "--model", model]])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert lines[0].startswith(f"wsiseg: error: {model} is not a model ONNX Runtime can load")
    assert "external data" in lines[0].lower()
    assert not out.parent.exists() or not any(out.parent.iterdir())
