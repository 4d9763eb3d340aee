"""Checkpoints are tensors and plain data: pickled code is refused, this project's files load."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from train_helpers import tiny_config_text, write_pairs  # noqa: E402
from wsiseg_train.checkpoint import FORMAT, CheckpointError, load, plain, save  # noqa: E402
from wsiseg_train.cli import main  # noqa: E402
from wsiseg_train.config import load_config  # noqa: E402
from wsiseg_train.train import train  # noqa: E402


class Payload:
    """Unpickling this runs code that makes the marker (a file with exec, a folder with os)."""

    def __init__(self, marker, via):
        self.marker, self.via = str(marker), via

    def __reduce__(self):
        if self.via == "os":
            return (os.mkdir, (self.marker,))
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


def hostile(path, marker, *, legacy=False, via="exec"):
    """A checkpoint-looking file whose pickle runs a payload (torch zip or plain pickle)."""
    payload = {"format": FORMAT, "config": {}, "state": Payload(marker, via)}
    if legacy:
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    path = folder / "tiny.toml"
    path.write_text(tiny_config_text(write_pairs(folder / "pairs", n_train=4, n_val=2)))
    return path


@pytest.fixture(scope="module")
def run(config, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(load_config(config), run)
    return run


def test_the_hostile_files_run_their_payload_when_unpickled(tmp_path):
    """The control: what the tests below refuse really is code (run here on purpose)."""
    torch.load(hostile(tmp_path / "evil.pt", tmp_path / "marker"), weights_only=False)
    assert (tmp_path / "marker").read_text() == "payload ran"
    torch.load(hostile(tmp_path / "evil.pt", tmp_path / "dir", via="os"), weights_only=False)
    assert (tmp_path / "dir").is_dir()


@pytest.mark.parametrize("legacy, via, refusal", [
    (False, "exec", "refused checkpoint .*evil.pt: it would load exec, more than tensors and "
                    "plain data; use checkpoints written by wsiseg-train"),
    (False, "os", "refused checkpoint .*evil.pt: it would load (posix|nt).mkdir, more than"),
    (True, "exec", "cannot read checkpoint .*evil.pt: not a torch file of tensors and plain")],
    ids=["exec", "os", "plain-pickle"])
def test_load_refuses_pickled_code_in_one_line(tmp_path, legacy, via, refusal):
    marker = tmp_path / "marker"
    path = hostile(tmp_path / "evil.pt", marker, legacy=legacy, via=via)
    with pytest.raises(CheckpointError, match=refusal) as e:
        load(path)
    assert "\n" not in str(e.value) and not marker.exists()


def _refused_in_one_line(result, path):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"wsiseg-train: error: refused checkpoint {path}: ")


def test_export_refuses_a_hostile_checkpoint(tmp_path):
    marker = tmp_path / "marker"
    evil = hostile(tmp_path / "EVIL.pt", marker)
    result = CliRunner().invoke(main, ["export", str(evil), "-o", str(tmp_path / "m.onnx")])
    _refused_in_one_line(result, evil)
    assert not marker.exists() and not (tmp_path / "m.onnx").exists()


def test_resume_refuses_a_hostile_last_checkpoint(config, tmp_path):
    marker = tmp_path / "marker"
    run = tmp_path / "RUN"
    run.mkdir()
    evil = hostile(run / "last.pt", marker)
    result = CliRunner().invoke(main, ["train", str(config), "-o", str(run), "--resume"])
    _refused_in_one_line(result, evil)
    assert not marker.exists() and [p.name for p in run.iterdir()] == ["last.pt"]


def test_experiment_scoring_refuses_a_hostile_checkpoint(config, tmp_path):
    from wsiseg_train.experiment import score

    marker = tmp_path / "marker"
    with pytest.raises(CheckpointError, match="refused checkpoint"):
        score(hostile(tmp_path / "best.pt", marker), load_config(config))
    assert not marker.exists()


def test_saved_checkpoints_are_plain_data(run, tmp_path):
    for name in ("best.pt", "last.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(run / name) == []
    assert plain({"a": [np.float64(0.5), (np.int64(3), "x")]}) == {"a": [0.5, (3, "x")]}
    assert type(plain({"a": np.float32(0.5)})["a"]) is float
    with pytest.raises(TypeError, match=r"checkpoint\['where'\] is a PosixPath"):
        save(tmp_path / "x.pt", {"format": FORMAT, "where": tmp_path})
    assert not (tmp_path / "x.pt").exists()


def _old_style(ckpt, path):
    """``ckpt`` as the save code before the plain-data check could write it: numpy numbers in
    the history and the loop state, torch.save without a check."""
    as_numpy = {float: np.float64, int: np.int64}
    state = dict(ckpt["state"], best_dice=np.float32(ckpt["state"]["best_dice"]))
    state["history"] = [{k: as_numpy.get(type(v), lambda x: x)(v) for k, v in h.items()}
                        for h in state["history"]]
    torch.save(dict(ckpt, state=state), path)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    assert any(g.endswith("multiarray.scalar") for g in unsafe), unsafe   # numpy really is there
    return path


def test_old_checkpoints_load_resume_and_export_to_the_same_model(config, run, tmp_path):
    new = load(run / "best.pt")
    old_path = _old_style(new, tmp_path / "old.pt")
    old = load(old_path)
    assert old["state"]["history"] == new["state"]["history"]
    assert all(type(v) in (int, float, str) for h in old["state"]["history"] for v in h.values())
    assert type(old["state"]["best_dice"]) is float
    outputs = {}
    for name, path in (("new", run / "best.pt"), ("old", old_path)):
        out = tmp_path / name / "model.onnx"
        result = CliRunner().invoke(main, ["export", str(path), "-o", str(out)])
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(main, ["evaluate", str(out), str(config), "--split", "val"])
        assert result.exit_code == 0, result.output
        outputs[name] = (json.loads(result.stdout), *_run_onnx(out))
    assert outputs["old"][0] == outputs["new"][0]                    # same Dice numbers
    assert np.array_equal(outputs["old"][1], outputs["new"][1])      # same logits
    assert outputs["old"][2] == outputs["new"][2]                    # same contract, summary
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    _old_style(load(run / "last.pt"), resumed / "last.pt")
    state = train(load_config(config, ["train.epochs=3"]), resumed, resume=True)
    assert state["epoch"] == 3


def _run_onnx(path):
    """The model's logits on a fixed random input, and its metadata."""
    import onnxruntime as ort

    x = np.random.default_rng(0).integers(0, 256, size=(2, 3, 32, 48), dtype=np.uint8)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x})[0], session.get_modelmeta().custom_metadata_map
