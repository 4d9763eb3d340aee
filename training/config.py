"""Run configuration: frozen dataclasses read from TOML, with ``section.key=value`` overrides.

A config has four tables, ``[model]``, ``[data]`` (with ``[[data.sets]]``), ``[augment]`` and
``[train]``; every key has a default except ``model.classes`` and ``data.sets``. Relative paths
are resolved against the config file's folder. The resolved config is saved in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .augment import AugmentConfig

TEACHER_TTA = ("none", "flips", "dihedral")   # train.teacher_tta: 1, 4 or 8 copies
TEACHER_EDGE = ("glass", "mirror")             # train.teacher_edge: beyond an image's edge


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which key and how to fix it."""


@dataclass(frozen=True)
class ModelSection:
    """``[model]``. Two keys look alike and mean different things: ``colors`` are the display
    colours of the classes in the exported contract (class -> [r, g, b]; the others get the
    paper's or a palette's), ``colour`` is what the network sees of the input (rgb or grey).
    """

    classes: tuple[str, ...]
    name: str = "wsiseg-unet"
    version: str = "0"
    colors: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)  # class -> display
    tumour_classes: tuple[str, ...] = ()
    stroma_classes: tuple[str, ...] = ()
    background: str = ""                 # class written where no tissue is found ("" = none)
    width: int = 32
    depth: int = 5
    norm: str = "none"
    colour: str = "rgb"                  # input: rgb | grey (the network sees luminance only)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)    # of RGB scaled to 0-1
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    border_px: int = 32                  # tile border for `export --no-context` (else measured)


@dataclass(frozen=True)
class SetSection:
    """One ``[[data.sets]]``. For ``kind = "pairs"``, ``mapping`` says how a mask becomes labels,
    and under ``mapping = "ebhi"`` (``training/ebhi.py``: EBHI-Seg gland masks -> tissue classes)
    four keys name other things than under ``values`` and ``threshold``:

    ==============  ================================  ===================================
    key             mapping = "values" / "threshold"  mapping = "ebhi"
    ==============  ================================  ===================================
    values          mask value -> class ("values")    image class -> its stroma class
    foreground_map  column value -> foreground        image class -> its epithelium class
    background      class below the threshold         class of near-white pixels (glass)
    threshold       mask >= threshold: foreground     mask >= threshold: gland epithelium
    ==============  ================================  ===================================

    ``foreground_column`` is the CSV column whose value is looked up in both maps (the image
    class for ``ebhi``), and ``annotation = "sparse"`` makes ``ebhi`` simulate sparse labels on
    the training rows.
    """

    kind: str                            # pairs | slide_labels | slide_annotations
    annotation: str = "dense"            # dense | sparse
    # pairs: a CSV listing image and mask files (paths relative to the CSV)
    index: str = ""
    image_column: str = "image"
    mask_column: str = "label"
    split_column: str = "split"          # rows whose value is "train" / "val"; "" = all train
    mapping: str = "values"              # pairs: values | threshold | ebhi (see above)
    threshold: int = 128                 # threshold: mask >= threshold is foreground
    foreground: str = ""                 # threshold: class of the foreground ...
    foreground_column: str = ""          # ... or the CSV column whose value picks it
    foreground_map: Mapping[str, str] = field(default_factory=dict)  # column value -> class
    background: str = ""                 # threshold: class below threshold ("" = unannotated)
    edge_ring_um: float = 3.0            # ebhi: unannotated ring on each side of a gland edge
    values: Mapping[str, str] = field(default_factory=dict)  # mask/raster value -> class (ebhi:
                                                             # image class -> stroma class)
    image_mpp: float = 0.0               # pairs: mpp of the images (0 = the model's mpp)
    limit: int = 0                       # pairs: N evenly spaced rows of each split (0 = all)
    weight: float = 1.0                  # sampling weight of this set's pixels within a class
                                         # (0.25: a quarter as likely per pixel as weight 1)
    teacher: bool = False                # whole-context patches of this set learn the outputs
                                         # of train.teacher instead of their labels
    # slides: [{slide=..., labels=... | annotations=..., split=..., slide_mpp=?, labels_mpp=?}]
    items: tuple[Mapping[str, Any], ...] = ()
    class_map: Mapping[str, str] = field(default_factory=dict)  # annotation class -> class


@dataclass(frozen=True)
class DataSection:
    sets: tuple[SetSection, ...]
    mpp: float = 1.0
    patch_px: int = 384
    sparse_dense_ratio: float = 4.0      # sparse:dense patches when both kinds are present
    class_weights: Mapping[str, float] = field(default_factory=dict)  # default: uniform
    jitter_px: int = -1                  # centre jitter; -1 = patch_px // 4
    val_patches: int = 64
    # Context levers (training/sampling.py): a share of patches made of four quadrants from four
    # places (stroma seen far from any gland, classes next to unrelated tissue), and a share cut
    # down to one small window of tissue alone on glass (as a small tile of another lab is seen).
    mosaic_p: float = 0.0
    island_p: float = 0.0
    island_px: tuple[int, int] = (48, 112)   # side of the kept window, uniform in [lo, hi]
    # A share of patches with a lymphoid aggregate pasted in, packed from the small round nuclei
    # found in the image pairs' pixels of aggregate_class and labelled with it
    # (training/aggregates.py): sheets of lymphocytes that biopsy crops lack.
    aggregate_p: float = 0.0
    aggregate_class: str = ""
    # A share of patches with fat drawn in the patch's own stain (training/adipose.py), labelled
    # model.background: adipose tissue, which resections hold and biopsy crops lack, counted as
    # neither tumour nor stroma. Drawn only into patches without a lymphoid aggregate.
    adipose_p: float = 0.0
    # The pure white (255) that a patch shows beyond an image pair's cut edge: unannotated
    # (false) or labelled model.background (true), so that the model learns that white -- as
    # scanners write unscanned glass beside the tissue -- is background, not a tissue class.
    outside_background: bool = False


@dataclass(frozen=True)
class TrainSection:
    weighting: str = "minibatch"         # none | instance | minibatch
    lr: float = 1e-5
    lr_patience: int = 10                # epochs without validation gain before halving
    lr_factor: float = 0.5
    epochs: int = 300
    iterations: int = 750                # per epoch
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"                 # auto | cpu | cuda
    amp: bool = True                     # bfloat16 autocast on CUDA (ignored on CPU)
    export: bool = True                  # export best.pt to model.onnx at the end
    threads: int = 0                     # CPU threads for torch (0 = torch's default); 1 is
                                         # fastest when other processes share the cores
    init: str = ""                       # start from these weights: an ONNX model exported by
                                         # wsiseg-train or a .pt checkpoint (training/init.py)
    freeze_norm: bool = False            # batch norms keep their running statistics
    ema: float = 0.0                     # > 0: validate, keep and export an exponential moving
                                         # average of the weights (e.g. 0.999 = about the last
                                         # 1,000 steps), not the last step's weights
    teacher: str = ""                    # a model of the same architecture (ONNX exported by
                                         # wsiseg-train or .pt) whose softmax the patches of sets
                                         # with teacher = true learn (not mosaic / island ones)
    teacher_weight: float = 1.0          # weight of that term against the labelled loss
    teacher_width: int = 0               # the teacher's model.width if not the model's (0)
    teacher_label_mix: float = 0.0       # > 0: labelled pixels of taught patches learn
                                         # (1 - mix) * teacher + mix * their label (no class
                                         # balancing): the labels correct an unsure teacher
    teacher_colour: str = "augmented"    # what the teacher is shown: the student's patch
                                         # ("augmented") or the same patch before its colour
                                         # augmentation ("original": the student learns the
                                         # teacher's in-lab calls under other labs' stains)
    teacher_tta: str = "none"            # the teacher's softmax averaged over its input
                                         # flipped ("flips": 4 copies) or flipped and
                                         # transposed ("dihedral": 8 copies): a teacher a little
                                         # better than the model itself, at that many forwards
    teacher_edge: str = "glass"          # what the teacher sees beyond an image pair's edge:
                                         # white, as the student ("glass"), or the image
                                         # mirrored ("mirror"), so that near a crop's cut edge
                                         # the student learns the teacher's calls in context
                                         # (none beyond the edge: the loss is masked there)
    teacher_label_edge_um: float = 0.0   # > 0: within this distance of an edge between two
                                         # labelled classes, taught patches learn their labels
                                         # instead of the teacher: the teacher's calls inside
                                         # regions, the annotation's line between them


@dataclass(frozen=True)
class Config:
    model: ModelSection
    data: DataSection
    train: TrainSection = TrainSection()
    augment: AugmentConfig = AugmentConfig()


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]}; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        default = fields[name].default
        if isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        if isinstance(value, Mapping) and name in ("colors",):
            value = {k: tuple(v) for k, v in value.items()}
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{where}.{name} must be true or false, got {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"{where}.{name} must be a number, got {value!r}")
            value = type(default)(value) if isinstance(default, float) else value
        if isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{where}.{name} must be a string, got {value!r}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _resolve(path: str, base: Path) -> str:
    return str((base / path).resolve()) if path else path


def from_dict(raw: Mapping[str, Any], base_dir: Path) -> Config:
    unknown = sorted(set(raw) - {"model", "data", "augment", "train"})
    if unknown:
        raise ConfigError(f"unknown table [{unknown[0]}]; valid tables: model, data, augment, "
                          "train")
    for table in ("model", "data"):
        if table not in raw:
            raise ConfigError(f"the config has no [{table}] table")
    data = dict(raw["data"])
    raw_sets = data.pop("sets", ())
    if not isinstance(raw_sets, (list, tuple)) or not all(isinstance(s, Mapping) for s in raw_sets):
        raise ConfigError("data.sets must be an array of tables: write each set as [[data.sets]]")
    sets = []
    for i, s in enumerate(raw_sets):
        s = dict(s)
        if "index" in s:
            s["index"] = _resolve(s["index"], base_dir)
        if "items" in s:
            s["items"] = [{k: _resolve(v, base_dir) if k in ("slide", "labels", "annotations")
                           else v for k, v in item.items()} for item in s["items"]]
        sets.append(_build(SetSection, s, f"data.sets[{i}]"))
    if not sets:
        raise ConfigError("the config has no [[data.sets]]; add at least one training set")
    if "classes" not in raw["model"]:
        raise ConfigError("model.classes is missing: list the class names, e.g. "
                          'classes = ["tumour", "stroma"]')
    train_raw = dict(raw.get("train", {}))
    for key in ("init", "teacher"):
        if isinstance(train_raw.get(key), str):
            train_raw[key] = _resolve(train_raw[key], base_dir)
    cfg = Config(model=_build(ModelSection, raw["model"], "model"),
                 data=_build(DataSection, {**data, "sets": tuple(sets)}, "data"),
                 train=_build(TrainSection, train_raw, "train"),
                 augment=_build(AugmentConfig, raw.get("augment", {}), "augment"))
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    names = cfg.model.classes
    used = [*cfg.model.tumour_classes, *cfg.model.stroma_classes, *cfg.data.class_weights]
    used += [cfg.model.background] if cfg.model.background else []
    used += [cfg.data.aggregate_class, *cfg.augment.class_stain_classes]
    for s in cfg.data.sets:
        used += [*s.foreground_map.values(), *s.values.values(), *s.class_map.values()]
        used += [n for n in (s.foreground, s.background) if n]
        if s.kind not in ("pairs", "slide_labels", "slide_annotations"):
            raise ConfigError(f"data.sets kind {s.kind!r} is not one of pairs, slide_labels, "
                              "slide_annotations")
        if s.annotation not in ("dense", "sparse"):
            raise ConfigError(f"data.sets annotation must be dense or sparse, got {s.annotation!r}")
        if not s.edge_ring_um >= 0:
            raise ConfigError(f"data.sets edge_ring_um must be >= 0 (0 = every pixel up to the "
                              f"gland edge is labelled), got {s.edge_ring_um}")
        if not s.weight > 0:
            raise ConfigError(f"data.sets weight must be > 0 (0.25 samples a set's pixels a "
                              f"quarter as often), got {s.weight}")
    for n in used:
        if n and n not in names:
            raise ConfigError(f"class {n!r} is used in the config but not listed in "
                              f"model.classes {list(names)}")
    if cfg.model.colour not in ("rgb", "grey"):
        raise ConfigError(f"model.colour must be rgb or grey, got {cfg.model.colour!r}")
    d = cfg.data
    for key in ("mosaic_p", "island_p", "aggregate_p", "adipose_p"):
        if not 0 <= getattr(d, key) <= 1:
            raise ConfigError(f"data.{key} must be a probability in [0, 1], got {getattr(d, key)}")
    if d.island_p and (len(d.island_px) != 2
                       or not 8 <= d.island_px[0] <= d.island_px[1] <= d.patch_px):
        raise ConfigError(f"data.island_px must be [low, high] with 8 <= low <= high <= "
                          f"data.patch_px ({d.patch_px}), got {list(d.island_px)}")
    if d.aggregate_p and not d.aggregate_class:
        raise ConfigError("data.aggregate_p needs data.aggregate_class: the stroma class whose "
                          "immune cells are packed into aggregates and which labels them "
                          "(e.g. \"lamina propria stroma\")")
    if d.adipose_p and not cfg.model.background:
        raise ConfigError("data.adipose_p needs model.background: the class that fat is labelled "
                          "with (e.g. \"background\")")
    if d.outside_background and not cfg.model.background:
        raise ConfigError("data.outside_background needs model.background: the class that the "
                          "white beyond an image's edge is labelled with (e.g. \"background\")")
    if not 0 <= cfg.train.ema < 1:
        raise ConfigError(f"train.ema must be in [0, 1) (0 = off, 0.999 averages about the last "
                          f"1,000 steps), got {cfg.train.ema}")
    _check_teacher(cfg)
    m = 2 ** (cfg.model.depth - 1)
    if cfg.data.patch_px % m:
        raise ConfigError(f"data.patch_px {cfg.data.patch_px} must be a multiple of {m} for "
                          f"model.depth {cfg.model.depth}; use {-(-cfg.data.patch_px // m) * m}")


def _check_teacher(cfg: Config) -> None:
    """The train.teacher* keys and the sets marked teacher = true."""
    if any(s.teacher for s in cfg.data.sets) != bool(cfg.train.teacher):
        raise ConfigError("a teacher needs both train.teacher = \"<model>\" and teacher = true on "
                          "the data sets whose patches learn its outputs")
    if not cfg.train.teacher_weight > 0:
        raise ConfigError(f"train.teacher_weight must be > 0, got {cfg.train.teacher_weight}")
    if not 0 <= cfg.train.teacher_label_mix < 1:
        raise ConfigError(f"train.teacher_label_mix must be in [0, 1) (0 = the teacher alone), "
                          f"got {cfg.train.teacher_label_mix}")
    if cfg.train.teacher_width < 0:
        raise ConfigError(f"train.teacher_width must be >= 0 (0 = model.width), got "
                          f"{cfg.train.teacher_width}")
    if not cfg.train.teacher_label_edge_um >= 0:
        raise ConfigError(f"train.teacher_label_edge_um must be >= 0 (0 = the teacher alone), "
                          f"got {cfg.train.teacher_label_edge_um}")
    if cfg.train.teacher_colour not in ("augmented", "original"):
        raise ConfigError(f"train.teacher_colour must be \"augmented\" or \"original\", got "
                          f"{cfg.train.teacher_colour!r}")
    if cfg.train.teacher_tta not in TEACHER_TTA:
        raise ConfigError(f"train.teacher_tta must be one of {', '.join(TEACHER_TTA)}, got "
                          f"{cfg.train.teacher_tta!r}")
    if cfg.train.teacher_edge not in TEACHER_EDGE:
        raise ConfigError(f"train.teacher_edge must be one of {', '.join(TEACHER_EDGE)}, got "
                          f"{cfg.train.teacher_edge!r}")
    for key, plain in (("teacher_tta", "none"), ("teacher_colour", "augmented"),
                       ("teacher_edge", "glass"), ("teacher_width", 0),
                       ("teacher_label_edge_um", 0)):
        value = getattr(cfg.train, key)
        if value != plain and not cfg.train.teacher:
            shown = f'"{value}"' if isinstance(value, str) else value
            raise ConfigError(f"train.{key} = {shown} needs a teacher (train.teacher and "
                              "teacher = true on a data set)")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``section.key=value`` (value in TOML syntax; bare words are strings).

    ``data.sets.key=value`` sets ``key`` in every ``[[data.sets]]``, ``data.sets.N.key=value``
    in the N-th (from 0) only.
    """
    raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        one_set = len(parts) == 4 and parts[:2] == ["data", "sets"] and parts[2].isdigit()
        if not sep or not (len(parts) == 2 or parts[:2] == ["data", "sets"] and len(parts) == 3
                           or one_set):
            raise ConfigError(f"--set {item!r}: write section.key=value, e.g. train.lr=1e-4, "
                              "data.sets.key=value for every set or data.sets.N.key=value for "
                              "the N-th (from 0)")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        section = raw.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"--set {item!r}: [{parts[0]}] is not a table")
        if one_set:
            sets, n = list(section.get("sets", [])), int(parts[2])
            if n >= len(sets):
                raise ConfigError(f"--set {item!r}: the config has {len(sets)} data sets "
                                  f"(0 to {len(sets) - 1})")
            sets[n] = {**sets[n], parts[3]: value}
            section["sets"] = sets
        elif len(parts) == 3:
            section["sets"] = [{**s, parts[2]: value} for s in section.get("sets", [])]
        else:
            section[parts[1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    return from_dict(apply_overrides(raw, list(overrides)), path.resolve().parent)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_saved(d: Mapping[str, Any]) -> Config:
    """Rebuild a Config saved with ``to_dict`` (paths are already absolute)."""
    return from_dict(d, Path("/"))
