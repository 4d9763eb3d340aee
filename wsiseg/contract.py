"""The model contract: what an ONNX model must say about itself to be run by wsiseg.

The contract travels inside the model as ONNX ``metadata_props`` (string key/value pairs),
written at export time and read back with
``onnxruntime.InferenceSession(...).get_modelmeta().custom_metadata_map``. This module is
the only place that knows the keys. It is pure Python (no onnx, onnxruntime or torch) so
that both the inference engine and the training module can use it.

Keys (all values are strings; structured values are JSON):

==========================  =========================================================
``wsiseg.contract``         contract version, currently ``"1"``
``wsiseg.name``             model name
``wsiseg.version``          model version
``wsiseg.mpp``              microns per pixel the model expects its input at
``wsiseg.tile_px``          recommended input tile size (square), e.g. ``"384"``
``wsiseg.border_px``        output pixels to discard on each side of a tile (set from the
                            model's measured effective context, ``wsiseg.context``)
``wsiseg.size_multiple``    input height and width must be multiples of this
``wsiseg.classes``          JSON list of ``{"name": str, "color": [r, g, b]}``;
                            output channel ``k`` is class value ``k + 1`` in maps
``wsiseg.background``       name of the class written where no tissue was found
                            (optional; without it such pixels are 0 = not analysed)
``wsiseg.tumour_classes``   JSON list of class names that count as tumour for TSR
``wsiseg.stroma_classes``   JSON list of class names that count as stroma for TSR
``wsiseg.input``            ``"uint8"`` (RGB 0-255, normalised inside the graph) or
                            ``"float32"`` (RGB scaled to 0-1, then ``(x - mean) / std``)
``wsiseg.mean``/``.std``    JSON lists of 3 floats, required when input is float32
``wsiseg.output``           ``"logits"`` or ``"probabilities"``
``wsiseg.training``         JSON object: free-form training summary (optional)
``wsiseg.precision``        ``"fp32"`` (the default when absent), ``"fp16"`` or ``"int8"``:
                            the numeric precision of a converted twin of a model
==========================  =========================================================

The graph has one input ``[N, 3, H, W]`` and one output ``[N, C, H, W]`` (same H and W),
with C = number of classes.

Label maps use the same numbering as training labels: 0 = not analysed / unannotated,
``k + 1`` = class ``k`` of the contract.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CONTRACT_VERSION = "1"
PRECISIONS = ("fp32", "fp16", "int8")
PREFIX = "wsiseg."


class ContractError(ValueError):
    """The model's contract is missing or inconsistent."""


@dataclass(frozen=True)
class TissueClass:
    name: str
    color: tuple[int, int, int]


# The 13 tissue classes of Bokhorst et al. 2019, in a fixed order (map value = index + 1).
PAPER_CLASSES: tuple[TissueClass, ...] = (
    TissueClass("tumour", (230, 25, 75)),
    TissueClass("desmoplastic stroma", (245, 130, 48)),
    TissueClass("necrosis/debris", (128, 128, 0)),
    TissueClass("lymphocytes", (0, 0, 200)),
    TissueClass("erythrocytes", (240, 50, 230)),
    TissueClass("muscle", (170, 110, 40)),
    TissueClass("healthy stroma", (255, 225, 25)),
    TissueClass("fat", (255, 250, 200)),
    TissueClass("mucus", (70, 240, 240)),
    TissueClass("nerve", (145, 30, 180)),
    TissueClass("lamina propria stroma", (250, 190, 212)),
    TissueClass("healthy glands", (60, 180, 75)),
    TissueClass("background", (255, 255, 255)),
)
PAPER_TUMOUR = ("tumour",)
PAPER_STROMA = ("desmoplastic stroma",)
PAPER_BACKGROUND = "background"


@dataclass(frozen=True)
class ModelContract:
    name: str
    version: str
    mpp: float
    tile_px: int
    border_px: int
    size_multiple: int
    classes: tuple[TissueClass, ...]
    tumour_classes: tuple[str, ...]
    stroma_classes: tuple[str, ...]
    background: str | None = None
    input: str = "uint8"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    output: str = "logits"
    training: Mapping[str, Any] = field(default_factory=dict)
    qc: Mapping[str, Any] = field(default_factory=dict)   # wsiseg.qc calibration ({} = none)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        validate(self)

    # -- derived ---------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def value_of(self, name: str) -> int:
        """Map value (1-based) of a class name."""
        return self.class_names.index(name) + 1

    @property
    def tumour_values(self) -> list[int]:
        return [self.value_of(n) for n in self.tumour_classes]

    @property
    def stroma_values(self) -> list[int]:
        return [self.value_of(n) for n in self.stroma_classes]

    @property
    def background_value(self) -> int:
        """Value written where no tissue was found (0 if the model has no background class)."""
        return self.value_of(self.background) if self.background else 0

    def legend(self) -> list[dict[str, Any]]:
        return [{"value": i + 1, "name": c.name, "color": list(c.color)}
                for i, c in enumerate(self.classes)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = [{"name": c.name, "color": list(c.color)} for c in self.classes]
        return d


def validate(c: ModelContract) -> None:
    """Raise ContractError naming the first inconsistency found."""
    if not c.name:
        raise ContractError("model contract: 'name' is empty")
    if not (isinstance(c.mpp, (int, float)) and math.isfinite(c.mpp) and c.mpp > 0):
        raise ContractError(f"model contract: mpp must be a positive number, got {c.mpp!r}")
    if c.size_multiple < 1:
        raise ContractError(f"model contract: size_multiple must be >= 1, got {c.size_multiple}")
    if c.tile_px < 1 or c.tile_px % c.size_multiple:
        raise ContractError(f"model contract: tile_px {c.tile_px} is not a positive multiple of "
                            f"size_multiple {c.size_multiple}")
    if c.border_px < 0 or 2 * c.border_px >= c.tile_px:
        raise ContractError(f"model contract: border_px {c.border_px} leaves no valid centre in "
                            f"a {c.tile_px}px tile")
    if not c.classes:
        raise ContractError("model contract: no classes")
    if len(c.classes) > 255:
        raise ContractError(f"model contract: {len(c.classes)} classes do not fit a uint8 map")
    names = [k.name for k in c.classes]
    if len(set(names)) != len(names):
        raise ContractError(f"model contract: duplicate class names in {names}")
    for k in c.classes:
        if len(k.color) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in k.color):
            raise ContractError(f"model contract: colour of class {k.name!r} must be three "
                                f"integers 0-255, got {k.color!r}")
    for role, group in (("tumour", c.tumour_classes), ("stroma", c.stroma_classes)):
        for n in group:
            if n not in names:
                raise ContractError(f"model contract: {role} class {n!r} is not one of the "
                                    f"classes {names}")
    if set(c.tumour_classes) & set(c.stroma_classes):
        raise ContractError("model contract: a class cannot count as both tumour and stroma")
    if c.background is not None and c.background not in names:
        raise ContractError(f"model contract: background class {c.background!r} is not one "
                            f"of the classes {names}")
    if c.input not in ("uint8", "float32"):
        raise ContractError(f"model contract: input must be 'uint8' or 'float32', got {c.input!r}")
    if c.input == "float32":
        for key in ("mean", "std"):
            v = getattr(c, key)
            if v is None or len(v) != 3:
                raise ContractError(f"model contract: float32 input needs '{key}' as 3 numbers")
        if any(s <= 0 for s in c.std):  # type: ignore[union-attr]
            raise ContractError("model contract: std values must be positive")
    if c.precision not in PRECISIONS:
        raise ContractError(f"model contract: precision must be one of {', '.join(PRECISIONS)}, "
                            f"got {c.precision!r}")
    if c.output not in ("logits", "probabilities"):
        raise ContractError(f"model contract: output must be 'logits' or 'probabilities', "
                            f"got {c.output!r}")


def to_metadata(c: ModelContract) -> dict[str, str]:
    """Contract as ONNX metadata_props (string to string)."""
    meta = {
        "contract": CONTRACT_VERSION,
        "name": c.name,
        "version": c.version,
        "mpp": repr(float(c.mpp)),
        "tile_px": str(c.tile_px),
        "border_px": str(c.border_px),
        "size_multiple": str(c.size_multiple),
        "classes": json.dumps([{"name": k.name, "color": list(k.color)} for k in c.classes]),
        "tumour_classes": json.dumps(list(c.tumour_classes)),
        "stroma_classes": json.dumps(list(c.stroma_classes)),
        "input": c.input,
        "output": c.output,
        "training": json.dumps(dict(c.training)),
    }
    if c.background is not None:
        meta["background"] = c.background
    if c.precision != "fp32":  # absent = fp32, so fp32 models stay as they were
        meta["precision"] = c.precision
    if c.mean is not None:
        meta["mean"] = json.dumps(list(c.mean))
    if c.std is not None:
        meta["std"] = json.dumps(list(c.std))
    if c.qc:
        meta["qc"] = json.dumps(dict(c.qc))
    return {PREFIX + k: v for k, v in meta.items()}


_REQUIRED = ("name", "version", "mpp", "tile_px", "border_px", "size_multiple", "classes",
             "tumour_classes", "stroma_classes")


def from_metadata(meta: Mapping[str, str]) -> ModelContract:
    """Parse and validate a contract from ONNX metadata_props; ContractError if not usable."""
    m = {k[len(PREFIX):]: v for k, v in meta.items() if k.startswith(PREFIX)}
    if "contract" not in m:
        raise ContractError("model has no wsiseg contract in its metadata (key 'wsiseg.contract'); "
                            "export it with wsiseg-train or add the keys listed in the README")
    if m["contract"] != CONTRACT_VERSION:
        raise ContractError(f"model contract version {m['contract']!r} is not supported "
                            f"(this wsiseg reads version {CONTRACT_VERSION})")
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise ContractError("model contract is missing " + ", ".join(PREFIX + k for k in missing))

    def parse_json(key: str) -> Any:
        try:
            return json.loads(m[key])
        except json.JSONDecodeError as e:
            raise ContractError(f"model contract: {PREFIX}{key} is not valid JSON "
                                f"({e.msg})") from None

    def parse_num(key: str, kind: type) -> Any:
        try:
            return kind(m[key])
        except ValueError:
            raise ContractError(f"model contract: {PREFIX}{key}={m[key]!r} is not "
                                f"{'an integer' if kind is int else 'a number'}") from None

    raw_classes = parse_json("classes")
    try:
        classes = tuple(TissueClass(str(k["name"]), tuple(int(v) for v in k["color"]))  # type: ignore[arg-type]
                        for k in raw_classes)
    except (TypeError, KeyError, ValueError):
        raise ContractError(f"model contract: {PREFIX}classes must be a list of "
                            '{"name": ..., "color": [r, g, b]}') from None
    mean = tuple(parse_json("mean")) if "mean" in m else None
    std = tuple(parse_json("std")) if "std" in m else None
    return ModelContract(
        name=m["name"], version=m["version"], mpp=parse_num("mpp", float),
        tile_px=parse_num("tile_px", int), border_px=parse_num("border_px", int),
        size_multiple=parse_num("size_multiple", int), classes=classes,
        tumour_classes=tuple(parse_json("tumour_classes")),
        stroma_classes=tuple(parse_json("stroma_classes")),
        background=m.get("background"), input=m.get("input", "uint8"),
        mean=mean, std=std, output=m.get("output", "logits"),  # type: ignore[arg-type]
        training=parse_json("training") if "training" in m else {},
        qc=parse_json("qc") if "qc" in m else {},
        precision=m.get("precision", "fp32"),
    )


def twin_path(model: str | Path, precision: str) -> Path:
    """Where the ``precision`` twin of ``model`` lives: ``X.onnx`` -> ``X.int8.onnx``
    (``fp32`` is the model itself)."""
    model = Path(model)
    if precision == "fp32":
        return model
    return model.with_name(model.name.removesuffix(".onnx") + f".{precision}.onnx")


def paper_contract(**overrides: Any) -> ModelContract:
    """Contract of the paper's 13-class setting at 1 um/px; fields can be overridden."""
    base: dict[str, Any] = dict(
        name="wsiseg-unet", version="0", mpp=1.0, tile_px=384, border_px=32, size_multiple=16,
        classes=PAPER_CLASSES, tumour_classes=PAPER_TUMOUR, stroma_classes=PAPER_STROMA,
        background=PAPER_BACKGROUND, input="uint8", output="logits")
    base.update(overrides)
    return ModelContract(**base)
