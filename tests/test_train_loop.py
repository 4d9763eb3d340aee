"""The training loop on tiny synthetic pairs: outputs, resume, checkpoints and CLI errors."""

import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from train_helpers import tiny_config_text, write_pairs  # noqa: E402
from wsiseg_train.cli import main  # noqa: E402
from wsiseg_train.config import config_from_saved, load_config  # noqa: E402
from wsiseg_train.train import (  # noqa: E402
    CheckpointError,
    load_checkpoint,
    load_weights,
    make_model,
    train,
)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loop")
    index = write_pairs(folder / "pairs", n_train=4, n_val=2)
    path = folder / "tiny.toml"
    path.write_text(tiny_config_text(index))
    return path


@pytest.fixture(scope="module")
def full_run(config, tmp_path_factory):
    run = tmp_path_factory.mktemp("full")
    state = train(load_config(config), run)
    return run, state


def test_run_writes_checkpoints_metrics_and_plot(full_run):
    run, state = full_run
    assert state["epoch"] == 2 and len(state["history"]) == 2
    for name in ("best.pt", "last.pt", "metrics.csv", "metrics.json", "plot.png"):
        assert (run / name).is_file(), name
    rows = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["iterations"] == 6
    assert {"train_loss", "val_loss", "val_dice", "dice_disc", "dice_other", "lr"} <= set(rows[0])
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("epoch,iterations,lr,train_loss,val_loss,val_dice,dice_disc")
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["config"]["model"]["width"] == 4 and ckpt["state"]["epoch"] == 2
    assert (run / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_gives_the_same_state_as_not_stopping(config, full_run, tmp_path):
    run, _ = full_run
    train(load_config(config, ["train.epochs=1"]), tmp_path)
    train(load_config(config), tmp_path, resume=True)
    a, b = load_checkpoint(run / "last.pt"), load_checkpoint(tmp_path / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["state"]["history"][-1]["train_loss"] == b["state"]["history"][-1]["train_loss"]
    assert a["rng"]["numpy"] == b["rng"]["numpy"]


def test_seeded_runs_are_identical_and_seeds_matter(config, full_run, tmp_path):
    run, _ = full_run
    train(load_config(config, ["train.epochs=1"]), tmp_path / "a")
    train(load_config(config, ["train.epochs=1", "train.seed=8"]), tmp_path / "b")
    ref = load_checkpoint(run / "last.pt")["state"]["history"][0]["train_loss"]
    same = load_checkpoint(tmp_path / "a" / "last.pt")["state"]["history"][0]["train_loss"]
    other = load_checkpoint(tmp_path / "b" / "last.pt")["state"]["history"][0]["train_loss"]
    assert same == ref and other != ref


def test_resume_with_a_different_architecture_is_refused(config, full_run):
    run, _ = full_run
    with pytest.raises(CheckpointError, match="different architecture.*model.width"):
        train(load_config(config, ["model.width=8", "train.epochs=3"]), run, resume=True)


def test_starting_over_an_existing_run_is_refused(config, full_run):
    with pytest.raises(CheckpointError, match="already holds a run; use --resume"):
        train(load_config(config), full_run[0])


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_cli_errors_are_one_line(config, full_run, tmp_path):
    run, _ = full_run
    code, out = _cli("train", tmp_path / "nope.toml")
    assert code == 2 and "error: config file" in out and "Traceback" not in out
    (tmp_path / "corrupt.toml").write_text("[model]\nclasses = [")
    code, out = _cli("train", tmp_path / "corrupt.toml")
    assert code == 2 and "not valid TOML" in out
    code, out = _cli("export", tmp_path / "no-run", "-o", tmp_path / "m.onnx")
    assert code == 2 and "checkpoint" in out and "not found" in out
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    code, out = _cli("export", tmp_path / "junk.pt", "-o", tmp_path / "m.onnx")
    assert code == 2 and "cannot read checkpoint" in out
    code, out = _cli("train", config, "-o", run, "--resume", "--set", "model.depth=4",
                     "--set", "data.patch_px=32")
    assert code == 2 and "different architecture" in out and len(out.strip().splitlines()) == 1
    code, out = _cli("evaluate", tmp_path / "missing.onnx", config)
    assert code == 2 and "not found" in out
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    code, out = _cli("evaluate", tmp_path / "bad.onnx", config)
    assert code == 2 and "cannot load ONNX model" in out and "Traceback" not in out


def test_checkpoint_of_a_different_architecture(full_run):
    ckpt = load_checkpoint(full_run[0] / "best.pt")
    saved = config_from_saved(ckpt["config"])
    wider = dataclasses.replace(saved, model=dataclasses.replace(saved.model, width=6))
    with pytest.raises(CheckpointError, match="do not fit a U-Net of width 6"):
        load_weights(make_model(wider), ckpt["model"], wider)


def test_grey_model_trains_exports_and_ignores_hue(config, tmp_path):
    """model.colour = grey: the ONNX graph still takes RGB uint8 and sees only luminance."""
    import numpy as np
    import onnxruntime as ort

    from wsiseg.contract import from_metadata

    train(load_config(config, ["train.epochs=1", "model.colour=grey", "train.export=true"]),
          tmp_path)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    contract = from_metadata(session.get_modelmeta().custom_metadata_map)
    assert contract.training["model"]["colour"] == "grey"
    red = np.zeros((1, 3, 16, 16), np.uint8)
    red[:, 0] = 200
    grey = np.full((1, 3, 16, 16), round(200 * 0.299), np.uint8)   # same luma, no hue
    a, b = (session.run(None, {"image": x})[0] for x in (red, grey))
    assert a.shape[1] == len(contract.classes)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_bad_colour_is_a_config_error(config):
    from wsiseg_train.config import ConfigError

    with pytest.raises(ConfigError, match="model.colour must be rgb or grey"):
        load_config(config, ["model.colour=hsv"])


def test_update_ema_moves_floats_by_one_minus_decay_and_copies_counters():
    from wsiseg_train.train import update_ema
    a, b = torch.nn.BatchNorm2d(2), torch.nn.BatchNorm2d(2)
    with torch.no_grad():
        a.weight.fill_(0.0), b.weight.fill_(1.0)
    b.num_batches_tracked.fill_(7)
    update_ema(a, b, decay=0.75, step=10_000)
    assert torch.allclose(a.weight, torch.full((2,), 0.25))
    assert int(a.num_batches_tracked) == 7
    update_ema(a, b, decay=0.99, step=0)        # warm-up: the first steps follow the model closely
    assert torch.allclose(a.weight, torch.full((2,), 0.25 * 0.1 + 0.9))


def test_ema_run_validates_keeps_and_resumes_the_average(config, full_run, tmp_path):
    run, plain = full_run
    cfg = load_config(config, ["train.ema=0.9"])
    state = train(cfg, tmp_path / "ema")
    last = load_checkpoint(tmp_path / "ema" / "last.pt")
    best = load_checkpoint(tmp_path / "ema" / "best.pt")
    ref = load_checkpoint(run / "last.pt")
    # same steps as the plain run (the average does not touch the trained weights) ...
    for k in ref["model"]:
        assert torch.equal(last["model"][k], ref["model"][k]), k
    # ... but the average differs from them, is what best.pt keeps and what was validated
    assert any(not torch.equal(last["ema"][k], last["model"][k]) for k in last["ema"]
               if last["ema"][k].dtype.is_floating_point)
    if state["best_epoch"] == state["epoch"]:
        for k in last["ema"]:
            assert torch.equal(best["model"][k], last["ema"][k]), k
    assert state["history"][-1]["val_dice"] != plain["history"][-1]["val_dice"] or \
        state["history"][-1]["val_loss"] != plain["history"][-1]["val_loss"]
    # resume restores the average too: stopping after one epoch changes nothing
    train(load_config(config, ["train.ema=0.9", "train.epochs=1"]), tmp_path / "r")
    train(cfg, tmp_path / "r", resume=True)
    again = load_checkpoint(tmp_path / "r" / "last.pt")
    for k in last["ema"]:
        assert torch.equal(again["ema"][k], last["ema"][k]), k


def test_ema_out_of_range_is_a_config_error(config):
    from wsiseg_train.config import ConfigError
    with pytest.raises(ConfigError, match="train.ema must be in"):
        load_config(config, ["train.ema=1.0"])


def test_teacher_loss_is_the_soft_cross_entropy_with_no_pull_at_agreement():
    from wsiseg_train.teacher import teacher_loss
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = teacher_loss(logits, logits.detach())
    p = logits.detach().softmax(1)
    assert float(loss.detach()) == pytest.approx(float(-(p * p.log()).sum(1).mean()), rel=1e-5)
    loss.backward()
    assert float(logits.grad.abs().max()) < 1e-6     # the student already says what it is told
    other = torch.zeros(2, 3, 4, 4)
    other[:, 0] = 10.0                               # the teacher: class 0 everywhere
    logits.grad = None
    teacher_loss(logits, other).backward()
    assert float(logits.grad[:, 0].max()) < 0        # pushes class 0 up everywhere
    # masked: the mean over the pixels kept, and no pull at all on the others
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :, :2] = True
    logits.grad = None
    masked = teacher_loss(logits, other, mask=mask)
    per_pixel = -(other.softmax(1) * logits.detach().log_softmax(1)).sum(1)
    assert float(masked.detach()) == pytest.approx(float(per_pixel[mask].mean()), rel=1e-5)
    masked.backward()
    assert float(logits.grad[:, 0, :, :2].max()) < 0 and not logits.grad[:, :, :, 2:].any()
    assert float(teacher_loss(logits.detach(), other, mask=torch.zeros_like(mask))) == 0.0


def test_teacher_label_mix_moves_labelled_targets_towards_the_label_only():
    from wsiseg_train.teacher import teacher_loss
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 2)
    teacher = torch.zeros(1, 3, 2, 2)
    teacher[:, 0] = 1.0                              # the teacher leans to class 1 (value 1)
    labels = torch.tensor([[[0, 1], [2, 3]]])        # one unannotated pixel, three labelled
    p_t = teacher.softmax(1)
    logp = logits.log_softmax(1)
    onehot = torch.zeros(1, 3, 2, 2)
    for v in (1, 2, 3):
        onehot[0, v - 1][labels[0] == v] = 1.0
    target = torch.where(labels[:, None] > 0, 0.75 * p_t + 0.25 * onehot, p_t)
    want = float(-(target * logp).sum(1).mean())
    assert float(teacher_loss(logits, teacher, labels, 0.25)) == pytest.approx(want, rel=1e-6)
    # mix 0 or no labels: the teacher alone
    alone = float(teacher_loss(logits, teacher))
    assert float(teacher_loss(logits, teacher, labels, 0.0)) == pytest.approx(alone, rel=1e-6)
    assert alone != pytest.approx(want, rel=1e-3)
    # nothing labelled: the mix changes nothing
    assert float(teacher_loss(logits, teacher, torch.zeros_like(labels), 0.5)) == \
        pytest.approx(alone, rel=1e-6)


def test_label_edges_mark_labelled_pixels_near_another_class_only():
    import numpy as np
    from wsiseg_train.teacher import label_edges
    lab = np.zeros((3, 12, 12), np.uint8)
    lab[0, :, :5] = 1                               # class 1 | one unannotated column | class 2
    lab[0, :, 6:] = 2
    lab[1] = 3                                      # one class only: no edge
    lab[2, :, :5] = 1                               # class 1 beside unannotated pixels only
    band = label_edges(lab, 2.0)
    cols = np.flatnonzero(band[0, 0])
    assert cols.tolist() == [4, 6]                  # within 2 px of the other class
    assert (band[0] == band[0, :1]).all()           # the same on every row
    assert not band[0, :, 5].any()                  # unannotated pixels are never in the band
    assert not band[1].any() and not band[2].any()
    assert np.flatnonzero(label_edges(lab, 4.0)[0, 0]).tolist() == [2, 3, 4, 6, 7, 8]


def test_teacher_label_edges_replace_the_teachers_target_by_the_label_there():
    from wsiseg_train.teacher import teacher_loss
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 2)
    teacher = torch.zeros(1, 3, 2, 2)
    teacher[:, 0] = 1.0
    labels = torch.tensor([[[0, 2], [2, 3]]])
    where = torch.tensor([[[True, True], [False, False]]])
    target = teacher.softmax(1).clone()
    target[0, :, 0, 1] = torch.tensor([0.0, 1.0, 0.0])   # labelled and in the band: the label
    want = float(-(target * logits.log_softmax(1)).sum(1).mean())
    got = float(teacher_loss(logits, teacher, labels, 0.0, label_only=where))
    assert got == pytest.approx(want, rel=1e-6)
    assert got != pytest.approx(float(teacher_loss(logits, teacher)), rel=1e-3)
    # with a mix as well: the band takes the label alone, the other labelled pixels the mix
    mixed = 0.75 * teacher.softmax(1) + 0.25 * torch.nn.functional.one_hot(
        (labels[0] - 1).clamp(min=0), 3).permute(2, 0, 1)[None].float()
    target2 = torch.where(labels[:, None] > 0, mixed, teacher.softmax(1))
    target2[0, :, 0, 1] = torch.tensor([0.0, 1.0, 0.0])
    want2 = float(-(target2 * logits.log_softmax(1)).sum(1).mean())
    assert float(teacher_loss(logits, teacher, labels, 0.25, label_only=where)) == \
        pytest.approx(want2, rel=1e-6)


def test_teacher_outputs_average_the_softmax_over_flipped_and_transposed_copies():
    from wsiseg_train.teacher import teacher_outputs
    torch.manual_seed(0)
    teacher = torch.nn.Conv2d(3, 4, 3, padding=1)     # no symmetry of its own
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(teacher_outputs(teacher, x), teacher(x))
        # by hand: the four flips' softmax, each flipped back, averaged
        want = sum(teacher(x.flip(d) if d else x).softmax(1).flip(d) if d
                   else teacher(x).softmax(1) for d in ((), (-1,), (-2,), (-2, -1))) / 4
        got = teacher_outputs(teacher, x, "flips")
        assert torch.allclose(got.softmax(1), want, atol=1e-6)
        assert not torch.allclose(got.softmax(1), teacher(x).softmax(1), atol=1e-3)
        # the averaged teacher has the symmetry its copies give it, the plain one does not
        assert torch.allclose(teacher_outputs(teacher, x.flip(-1), "flips"), got.flip(-1),
                              atol=1e-5)
        d4 = teacher_outputs(teacher, x, "dihedral")
        assert torch.allclose(teacher_outputs(teacher, x.transpose(-1, -2), "dihedral"),
                              d4.transpose(-1, -2), atol=1e-5)
        assert not torch.allclose(teacher_outputs(teacher, x.transpose(-1, -2), "flips"),
                                  got.transpose(-1, -2), atol=1e-3)
        assert torch.allclose(d4.exp().sum(1), torch.ones(2, 6, 6), atol=1e-5)


def test_teacher_sets_learn_the_teachers_outputs(config, full_run, tmp_path):
    from wsiseg_train.config import ConfigError
    run, _ = full_run
    text = config.read_text().replace('kind = "pairs"', 'kind = "pairs"\nteacher = true')
    taught = tmp_path / "taught.toml"
    taught.write_text(text.replace("[train]", f'[train]\nteacher = "{run / "best.pt"}"'))
    def run_with(overrides, name):
        state = train(load_config(taught, overrides), tmp_path / name)
        assert state["epoch"] == 2
        return load_checkpoint(tmp_path / name / "last.pt")["model"]

    def differ(a, b):
        return any(not torch.equal(a[k], b[k]) for k in b if b[k].dtype.is_floating_point)

    got = run_with([], "t")
    # same batches, other targets: the weights differ from the labelled run's
    assert differ(got, load_checkpoint(run / "last.pt")["model"])
    # the teacher shown the patches before their colour augmentation: other targets again
    assert differ(run_with(["train.teacher_colour=original"], "o"), got)
    with pytest.raises(ConfigError, match="teacher_colour must be"):
        load_config(taught, ["train.teacher_colour=raw"])
    # the labels mixed into the teacher's targets: other targets again
    assert differ(run_with(["train.teacher_label_mix=0.25"], "m"), got)
    # the labels alone along the lines between labelled classes: other targets again
    assert differ(run_with(["train.teacher_label_edge_um=3"], "b"), got)
    with pytest.raises(ConfigError, match="teacher_label_edge_um must be >= 0"):
        load_config(taught, ["train.teacher_label_edge_um=-1"])
    # the teacher's softmax averaged over flipped copies: other targets again
    assert differ(run_with(["train.teacher_tta=flips"], "f"), got)
    with pytest.raises(ConfigError, match="teacher_tta must be one of none, flips, dihedral"):
        load_config(taught, ["train.teacher_tta=d4"])
    # the teacher shown the crops mirrored beyond their edges: other targets again
    assert differ(run_with(["train.teacher_edge=mirror"], "e"), got)
    with pytest.raises(ConfigError, match="teacher_edge must be one of glass, mirror"):
        load_config(taught, ["train.teacher_edge=reflect"])
    # the stroma's stain changed in the student's copy only: other patches, other weights
    assert differ(run_with(["augment.class_stain_p=1.0", 'augment.class_stain_classes=["other"]',
                            "augment.class_stain_e=[2.0,3.0]"], "s"), got)
    for bad in ("1.0", "-0.1"):
        with pytest.raises(ConfigError, match="teacher_label_mix must be in"):
            load_config(taught, [f"train.teacher_label_mix={bad}"])
    with pytest.raises(ConfigError, match="needs a teacher"):
        load_config(config, ["train.teacher_colour=original"])
    with pytest.raises(ConfigError, match="teacher_tta = \"dihedral\" needs a teacher"):
        load_config(config, ["train.teacher_tta=dihedral"])
    with pytest.raises(ConfigError, match="teacher_edge = \"mirror\" needs a teacher"):
        load_config(config, ["train.teacher_edge=mirror"])
    with pytest.raises(ConfigError, match="teacher_label_edge_um = 3.0 needs a teacher"):
        load_config(config, ["train.teacher_label_edge_um=3"])
    # a wider student of the narrower teacher: its width named, or the teacher does not load
    wide = run_with(["model.width=6", "train.teacher_width=4"], "w")
    assert wide["net.down.0.convs.0.0.weight"].shape[0] == 6
    with pytest.raises(CheckpointError, match="width 6"):
        train(load_config(taught, ["model.width=6"]), tmp_path / "w2")
    with pytest.raises(ConfigError, match="teacher_width must be >= 0"):
        load_config(taught, ["train.teacher_width=-4"])
    with pytest.raises(ConfigError, match="teacher_width = 4 needs a teacher"):
        load_config(config, ["train.teacher_width=4"])
    # half a teacher is refused: the sets without train.teacher, and train.teacher alone
    (tmp_path / "a.toml").write_text(text)
    with pytest.raises(ConfigError, match="a teacher needs both"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text(
        config.read_text().replace("[train]", f'[train]\nteacher = "{run / "best.pt"}"'))
    with pytest.raises(ConfigError, match="a teacher needs both"):
        load_config(tmp_path / "b.toml")
    (tmp_path / "c.toml").write_text(text.replace("[train]", '[train]\nteacher = "none.pt"'))
    with pytest.raises(CheckpointError, match="train.teacher: .*none.pt not found"):
        train(load_config(tmp_path / "c.toml"), tmp_path / "c")


def test_last_checkpoint_of_an_averaged_run_exports_and_starts_from_the_average(config, tmp_path):
    from wsiseg_train.model import model_from_checkpoint, weights_of
    from wsiseg_train.train import start_from
    train(load_config(config, ["train.ema=0.9", "train.epochs=1"]), tmp_path / "r")
    last = load_checkpoint(tmp_path / "r" / "last.pt")
    assert weights_of(last) is last["ema"]
    _, model = model_from_checkpoint(last)
    for k, v in model.state_dict().items():
        assert torch.equal(v, last["ema"][k]), k
    cfg = load_config(config, [f'train.init="{tmp_path / "r" / "last.pt"}"'])
    fresh = make_model(cfg)
    start_from(fresh, cfg)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, last["ema"][k]), k
    plain = {"model": last["model"], "config": last["config"]}
    assert weights_of(plain) is last["model"]
