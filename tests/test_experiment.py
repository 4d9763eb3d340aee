"""The Table 2 miniature (training/experiment.py): patient split, table, orderings, a tiny run."""

import csv
import json
import math
from pathlib import Path

import pytest
from wsiseg_train.config import ConfigError
from wsiseg_train.experiment import (
    ExperimentSection,
    load_experiment,
    markdown_table,
    orderings,
    split_patients,
    summarise,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "training" / "configs" / "experiment.toml"
CLASSES = ["tumour", "desmoplastic stroma", "lamina propria stroma", "healthy glands",
           "background"]


def _rows():
    rows = []
    for cls, n_patients in (("Adenocarcinoma", 12), ("Normal", 4)):
        for p in range(n_patients):
            for k in range(3):
                rows.append({"image": f"{cls}/{p}-{k}.png", "label": f"{cls}/{p}-{k}.png",
                             "class": cls, "patient": f"{cls[0]}{p}", "split": "train"})
    return rows


def test_split_patients_is_by_patient_per_class_and_seeded():
    rows = _rows()
    sparse, dense = split_patients(rows, 0.25, seed=0)
    assert len(sparse) + len(dense) == len(rows)
    assert not {r["patient"] for r in sparse} & {r["patient"] for r in dense}
    dense_patients = {r["patient"] for r in dense}
    assert len([p for p in dense_patients if p.startswith("A")]) == 3   # 25 % of 12
    assert len([p for p in dense_patients if p.startswith("N")]) == 1   # 25 % of 4
    assert split_patients(rows, 0.25, seed=0) == (sparse, dense)
    others = [split_patients(rows, 0.25, seed=s)[1] for s in range(1, 6)]
    assert any({r["patient"] for r in o} != dense_patients for o in others)


def _results():
    out = []
    for seed, noise in enumerate((-0.02, 0.0, 0.02)):
        for a, base in (("sparse", 0.4), ("dense", 0.6), ("combined", 0.58)):
            for w, delta in (("none", 0.0), ("instance", 0.05), ("minibatch", 0.1)):
                d = base + delta + noise
                out.append({"annotation": a, "weighting": w, "seed": seed, "images": 5,
                            "seconds": 10.0, "overall": d,
                            "dice": {c: (d if c != "background" else math.nan)
                                     for c in CLASSES}})
    return out


def test_summary_table_and_orderings():
    cfg, exp = load_experiment(CONFIG)
    results = _results()
    cells = summarise(results, CLASSES)
    mean, sd, n = cells["sparse", "minibatch"]["overall"]
    assert n == 3 and mean == pytest.approx(0.5) and sd == pytest.approx(0.02)
    assert cells["dense", "none"]["background"][2] == 0      # NaN everywhere: no value
    table = markdown_table(results, cfg, exp)
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| class"))
    assert header.count("|") == 11                           # class + 9 settings
    assert "sparse / mini-batch" in header and "combined / none" in header
    overall = next(line for line in lines if line.startswith("| **overall**"))
    assert "0.50 ± 0.02" in overall
    background = next(line for line in lines if line.startswith("| background"))
    assert "–" in background
    assert f"width {cfg.model.width}" in table and "seeds [0, 1, 2]" in table
    checks = orderings(results, CLASSES)
    assert "holds" in checks[0] and "does not" not in checks[0]
    assert "combined + instance 0.630 vs best dense 0.700" in checks[1]
    flipped = [{**r, "overall": 1 - r["overall"]} for r in results]
    assert "does not hold" in orderings(flipped, CLASSES)[0]


def test_bad_experiment_tables(tmp_path):
    text = CONFIG.read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("[experiment]", "[experiment]\nfoo = 1"))
    with pytest.raises(ConfigError, match="experiment.foo"):
        load_experiment(bad)
    with pytest.raises(ConfigError, match="dense_fraction"):
        load_experiment(CONFIG, ["experiment.dense_fraction=1.5"])
    with pytest.raises(ConfigError, match="'focal'"):
        load_experiment(CONFIG, ['experiment.weightings=["focal"]'])
    with pytest.raises(ConfigError, match="mapping"):
        load_experiment(CONFIG, ["data.sets.mapping=threshold"])
    assert isinstance(load_experiment(CONFIG)[1], ExperimentSection)


def test_tiny_real_experiment(shared_data, tmp_path):
    """Two settings, one seed, two iterations each, on a handful of real EBHI-Seg crops."""
    pytest.importorskip("torch")
    from click.testing import CliRunner
    from wsiseg_train.cli import main

    ebhi = shared_data / "ebhi-seg"
    with (ebhi / "index.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    picked, seen = [], {}
    for r in rows:   # two patients per class and split, one image each
        key = (r["class"], r["split"])
        if r["patient"] not in seen.setdefault(key, []) and len(seen[key]) < 2:
            seen[key].append(r["patient"])
            picked.append({**r, "image": str(ebhi / r["image"]), "label": str(ebhi / r["label"])})
    index = tmp_path / "index.csv"
    with index.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(picked[0]))
        w.writeheader()
        w.writerows(picked)
    out = tmp_path / "exp"
    args = ["experiment", str(CONFIG), "-o", str(out), "--plot", str(tmp_path / "plot.png")]
    for s in ('experiment.seeds=[0]', 'experiment.annotations=["sparse", "combined"]',
              'experiment.weightings=["minibatch"]', "experiment.dense_fraction=0.5",
              f'data.sets.index="{index.as_posix()}"', "train.epochs=1",
              "train.iterations=2", "train.batch_size=2", "data.val_patches=4"):
        args += ["--set", s]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    records = json.loads((out / "results.json").read_text())
    assert [(r["annotation"], r["weighting"]) for r in records] == [("sparse", "minibatch"),
                                                                    ("combined", "minibatch")]
    for r in records:
        assert r["images"] == 4 and 0.0 <= r["overall"] <= 1.0
        assert set(r["dice"]) == set(CLASSES)
    assert (out / "sparse-minibatch-s0" / "best.pt").is_file()
    assert not (out / "sparse-minibatch-s0" / "model.onnx").exists()   # no export per run
    table = (out / "table.md").read_text()
    assert "| **overall** |" in table and "sparse / mini-batch" in table
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the dense part of the combined run holds whole patients of the training split only
    dense_train = list(csv.DictReader((out / "index" / "dense-train.csv").open()))
    sparse_rows = list(csv.DictReader((out / "index" / "sparse.csv").open()))
    assert dense_train and all(r["split"] == "train" for r in dense_train)
    assert not {r["patient"] for r in dense_train} & {r["patient"] for r in sparse_rows
                                                      if r["split"] == "train"}
    # run again: the results are reused, not recomputed
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0
    assert json.loads((out / "results.json").read_text()) == records
