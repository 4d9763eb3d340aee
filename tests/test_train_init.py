"""Fine-tuning from an exported model (train.init): the torch net starts as the ONNX model."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from train_helpers import tiny_config_text, write_pairs  # noqa: E402
from wsiseg_train.config import load_config  # noqa: E402
from wsiseg_train.export import export_onnx  # noqa: E402
from wsiseg_train.init import freeze_norm_statistics, load_onnx_weights  # noqa: E402
from wsiseg_train.train import CheckpointError, make_model, train  # noqa: E402


@pytest.fixture(scope="module", params=["batch", "none"])
def exported(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"init-{request.param}")
    index = write_pairs(folder / "pairs", n_train=4, n_val=2)
    path = folder / "tiny.toml"
    path.write_text(tiny_config_text(index) + "")
    overrides = [f'model.norm="{request.param}"']
    cfg = load_config(path, overrides)
    train(cfg, folder / "run")
    onnx_path = export_onnx(folder / "run" / "best.pt", folder / "model.onnx")["path"]
    return path, overrides, onnx_path


def _ort(path, x):
    import onnxruntime as ort
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_loaded_weights_reproduce_the_onnx_model(exported):
    config, overrides, onnx_path = exported
    model = make_model(load_config(config, overrides))
    load_onnx_weights(model, onnx_path)
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32)).astype(np.uint8)
    want = _ort(onnx_path, x)
    model.eval()
    got = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    model.train()
    freeze_norm_statistics(model)   # training mode with frozen statistics: still the same
    got = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_other_architecture_is_refused(exported):
    config, overrides, onnx_path = exported
    wider = make_model(load_config(config, [*overrides, "model.width=8"]))
    with pytest.raises(ValueError, match="convolution"):
        load_onnx_weights(wider, onnx_path)


def test_run_starts_from_init_and_checks_the_path(exported, tmp_path):
    config, overrides, onnx_path = exported
    cfg = load_config(config, [*overrides, f'train.init="{onnx_path}"', "train.freeze_norm=true",
                               "train.epochs=1"])
    state = train(cfg, tmp_path / "ft")
    assert state["epoch"] == 1
    missing = load_config(config, [*overrides, 'train.init="nowhere.onnx"'])
    with pytest.raises(CheckpointError, match="train.init"):
        train(missing, tmp_path / "ft2")
