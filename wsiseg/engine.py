"""ONNX Runtime model: the only module that calls onnxruntime.

A model is loaded together with its contract (``wsiseg.contract``), checked against it (input
and output layout, class count, tile size), and run on batches of uint8 RGB tiles.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .contract import ContractError, ModelContract, from_metadata

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _stderr_silenced(silence: bool) -> Iterator[None]:
    """Send what C code writes to stderr (fd 2) to /dev/null inside the block."""
    if not silence:
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ONNX Runtime warns on stderr while it is imported, e.g. that it cannot store a telemetry id
# under an unwritable HOME (`docker run --user N`): noise before our own one-line messages,
# shown only when our log shows INFO (-v). Import errors still raise.
with _stderr_silenced(not log.isEnabledFor(logging.INFO)):
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as _ortstate

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


# What onnxruntime raises for a bad file or a failed run (its types subclass only Exception).
ORT_ERRORS = (_ortstate.Fail, _ortstate.InvalidArgument, _ortstate.InvalidGraph,
              _ortstate.InvalidProtobuf, _ortstate.NoSuchFile, _ortstate.NoModel,
              _ortstate.RuntimeException, _ortstate.NotImplemented, _ortstate.EngineError)


class ModelError(ValueError):
    """The model file cannot be used; the message says why."""


def cuda_driver_present() -> bool:
    """Whether the NVIDIA driver library loads: onnxruntime-gpu offers the CUDA provider even on
    machines without a GPU, and then logs a loud error before falling back on its own."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def providers_for(device: str, available: list[str] | None = None) -> list[str]:
    """Execution providers to ask for, best first, always ending with the CPU.

    ``auto`` takes CUDA when present. TensorRT is only used when asked for: it builds an engine
    per input shape first (minutes), which pays off on long runs but surprises a single slide.
    A GPU device that is not available falls back to the CPU with a warning, so the same
    command works on every machine (the report records what actually ran)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if available is None:
        available = ort.get_available_providers()
        if not cuda_driver_present():
            gpu = {_PROVIDER["cuda"], _PROVIDER["tensorrt"]}
            available = [p for p in available if p not in gpu]
    wanted = {"auto": ["cuda"], "cpu": [], "cuda": ["cuda"], "tensorrt": ["tensorrt", "cuda"]}
    chosen = [_PROVIDER[d] for d in wanted[device] if _PROVIDER[d] in available]
    if device in ("cuda", "tensorrt") and _PROVIDER[device] not in available:
        log.warning("%s requested but onnxruntime here offers only %s; running on the CPU "
                    "(install onnxruntime-gpu for GPU inference)", device, ", ".join(available))
    return chosen + ["CPUExecutionProvider"]


HEADS = ("auto", "host", "graph")


class Prediction(NamedTuple):
    """What the model decides for a batch of tiles, one byte per value."""
    labels: np.ndarray        # (N, H, W) uint8 class index, 0-based
    top: np.ndarray           # (N, H, W) uint8 top class probability x 255
    scores: np.ndarray | None  # (N, C, H, W) uint8 class probability x 255, when asked


def _u8(p: np.ndarray) -> np.ndarray:
    return np.rint(255 * p).astype(np.uint8)


@dataclass
class Model:
    path: str
    contract: ModelContract
    session: ort.InferenceSession
    input_name: str
    output_name: str
    head: str = "host"  # where labels are decided: "host" (numpy) or "graph" (uint8 outputs)
    _heads: dict = field(default_factory=dict, repr=False)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def on_gpu(self) -> bool:
        return self.providers[0] != "CPUExecutionProvider"

    def _input(self, tiles: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))
        if self.contract.input == "float32":
            mean = np.asarray(self.contract.mean, np.float32).reshape(1, 3, 1, 1)
            std = np.asarray(self.contract.std, np.float32).reshape(1, 3, 1, 1)
            x = (x.astype(np.float32) / 255.0 - mean) / std
        return x

    def run(self, tiles: np.ndarray) -> np.ndarray:
        """Class scores (N, C, H, W) float32 for uint8 RGB tiles (N, H, W, 3)."""
        return self.session.run([self.output_name], {self.input_name: self._input(tiles)})[0]

    def predict(self, tiles: np.ndarray, *, probabilities: bool = False) -> Prediction:
        """Per pixel of uint8 RGB tiles (N, H, W, 3): the class index (N, H, W) uint8, the top
        class probability x 255 (N, H, W) uint8 and, with ``probabilities``, every class
        probability x 255 (N, C, H, W) uint8 (rounded half to even, as ``numpy.rint``)."""
        if self.head == "graph":
            return self._predict_graph(self._input(tiles), probabilities)
        scores = self.run(tiles)
        labels = scores.argmax(axis=1).astype(np.uint8)
        if self.contract.output == "logits":
            e = np.exp(scores - scores.max(axis=1, keepdims=True))
            total = e.sum(axis=1, keepdims=True)
            top = 1.0 / total[:, 0]  # the top class has exp(0) = 1
            prob = e / total if probabilities else None
        else:
            top = scores.max(axis=1)
            prob = scores if probabilities else None
        return Prediction(labels, _u8(top),
                          None if prob is None else _u8(prob))

    def _predict_graph(self, x: np.ndarray, probabilities: bool) -> Prediction:
        """Through the label-head twin with I/O binding: the uint8 input is copied to the
        device once and only the uint8 outputs come back."""
        session = self._heads.get(probabilities)
        if session is None:
            from .graph import add_label_head
            proto = add_label_head(self.path, probabilities=probabilities,
                                   output_kind=self.contract.output)
            session = self._heads[probabilities] = _session(Path(self.path), self.providers,
                                                            proto=proto)
        binding = session.io_binding()
        binding.bind_cpu_input(self.input_name, x)
        for out in session.get_outputs():
            binding.bind_output(out.name, "cpu")
        session.run_with_iobinding(binding)
        got = binding.copy_outputs_to_cpu()
        return Prediction(got[0], got[1], got[2] if probabilities else None)

    def to_dict(self) -> dict:
        return {"path": self.path, "providers": self.providers, "head": self.head,
                **self.contract.to_dict()}


def _session(path: Path, providers: list[str], proto: bytes | None = None
             ) -> ort.InferenceSession:
    # ONNX Runtime's own warnings (e.g. telemetry that cannot write to an unwritable HOME) are
    # noise before our one-line messages: errors only, unless our log shows INFO (-v).
    severity = 2 if log.isEnabledFor(logging.INFO) else 3
    ort.set_default_logger_severity(severity)
    opts = ort.SessionOptions()
    opts.log_severity_level = severity
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Without the CPU arena the default model's peak memory on a 1024 / 2048 px tile is 1.1 /
    # 3.7 GB instead of 2.0 / 8.7 GB (the arena keeps and grows freed blocks), at the same speed.
    opts.enable_cpu_mem_arena = False
    provider_args: list = []
    for p in providers:
        if p == "TensorrtExecutionProvider":
            cache = os.environ.get("WSISEG_TRT_CACHE", str(Path.home() / ".cache" / "wsiseg-trt"))
            provider_args.append((p, {"trt_engine_cache_enable": True,
                                      "trt_engine_cache_path": cache}))
        else:
            provider_args.append(p)
    try:
        return ort.InferenceSession(proto if proto is not None else str(path), sess_options=opts,
                                    providers=provider_args)
    except ORT_ERRORS as e:
        raise ModelError(f"{path} is not a model ONNX Runtime can load: "
                         f"{str(e).splitlines()[0][:200]}") from None


def choose_head(head: str, providers: list[str]) -> str:
    """``auto``: decide labels in the graph on a GPU (when ``onnx`` is installed to edit it),
    on the host on the CPU, where the float scores never cross a bus."""
    from . import graph

    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    if head == "graph" and not graph.available():
        raise ModelError("deciding labels in the graph needs the onnx package: "
                         "pip install 'wsiseg[gpu]' (or onnx)")
    if head == "auto":
        on_gpu = providers[0] != "CPUExecutionProvider"
        return "graph" if on_gpu and graph.available() else "host"
    return head


def load_model(path: str | Path, *, device: str = "auto", head: str = "auto") -> Model:
    """Load an ONNX model, read its contract and check that the graph agrees with it."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model not found: {path}")
    session = _session(path, providers_for(device))
    try:
        contract = from_metadata(session.get_modelmeta().custom_metadata_map)
    except ContractError as e:
        raise ModelError(f"{path.name}: {e}") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(f"{path.name}: expected one input and one output, found "
                         f"{len(inputs)} and {len(outputs)}")
    inp, out = inputs[0], outputs[0]
    want_type = {"uint8": "tensor(uint8)", "float32": "tensor(float)"}[contract.input]
    if inp.type != want_type:
        raise ModelError(f"{path.name}: contract says input {contract.input} but the graph "
                         f"takes {inp.type}")
    shape = inp.shape
    if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
        raise ModelError(f"{path.name}: input must be [N, 3, H, W] RGB, graph has {shape}")
    for dim in shape[2:]:
        if isinstance(dim, int) and dim != contract.tile_px:
            raise ModelError(f"{path.name}: graph input is fixed at {shape[2:]} but the contract "
                             f"tile is {contract.tile_px}px")
    model = Model(str(path), contract, session, inp.name, out.name,
                  head=choose_head(head, session.get_providers()))
    # One tiny run catches what static shapes cannot tell (wrong class count, size changes).
    side = contract.tile_px if any(isinstance(d, int) for d in shape[2:]) else \
        contract.size_multiple * max(1, -(-2 * contract.border_px // contract.size_multiple) + 1)
    try:
        y = model.run(np.full((1, side, side, 3), 255, np.uint8))
    except ORT_ERRORS as e:
        raise ModelError(f"{path.name}: test run on a {side}px tile failed: "
                         f"{str(e).splitlines()[0][:200]}") from None
    if y.shape != (1, contract.n_classes, side, side):
        raise ModelError(f"{path.name}: output for a {side}px tile has shape {list(y.shape)}, "
                         f"contract needs [1, {contract.n_classes}, {side}, {side}] "
                         f"({contract.n_classes} classes)")
    log.info("model %s v%s on %s", contract.name, contract.version, model.providers[0])
    return model


def fixed_tile_px(model: Model) -> int | None:
    """The input size of a model whose graph fixes it, else None (fully convolutional)."""
    fixed = [d for d in model.session.get_inputs()[0].shape[2:] if isinstance(d, int)]
    return fixed[0] if fixed else None


def check_tile_px(model: Model, tile_px: int) -> None:
    c = model.contract
    fixed = fixed_tile_px(model)
    if fixed and tile_px != fixed:
        raise ModelError(f"this model takes {fixed} px tiles only, not {tile_px}; leave the "
                         "tile size to the model")
    if tile_px % c.size_multiple or tile_px <= 2 * c.border_px:
        hint = max(c.tile_px, 1024 // c.size_multiple * c.size_multiple)
        raise ModelError(f"tile size {tile_px} px does not fit this model: it must be a multiple "
                         f"of {c.size_multiple} and larger than {2 * c.border_px}; try {hint}")


# -- low-precision twins (training/quantize.py): ONNX Runtime's quantisation tools, which need
# the onnx package; imported on first use, never by inference.
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def calibration_reader(tiles: Sequence[np.ndarray], input_name: str) -> Any:
    """ONNX Runtime calibration data reader feeding uint8 RGB tiles (H, W, 3), one per run, as
    ``[1, 3, H, W]`` to ``input_name``; rewindable."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.todo = iter(tiles)

        def get_next(self) -> dict[str, np.ndarray] | None:
            t = next(self.todo, None)
            return None if t is None else {input_name: t.transpose(2, 0, 1)[None].copy()}

        def rewind(self) -> None:
            self.todo = iter(tiles)

    return Reader()


def quantize_static_int8(src: str | Path, out: str | Path, reader: Any, *, method: str,
                         exclude: Sequence[str] = (), workdir: str | Path) -> None:
    """ONNX Runtime's static quantiser: ``src`` pre-processed (in ``workdir``), then written to
    ``out`` as QDQ with per-channel int8 weights and uint8 activations, calibrated with
    ``reader`` (:func:`calibration_reader`) by ``method``; nodes in ``exclude`` stay fp32."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = dict(zip(CALIBRATION_METHODS, (CalibrationMethod.MinMax,
                                             CalibrationMethod.Percentile,
                                             CalibrationMethod.Entropy)))
    if method not in methods:
        raise ValueError(f"calibration method must be one of {', '.join(methods)}, got {method!r}")
    pre = Path(workdir) / "pre.onnx"
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=methods[method], nodes_to_exclude=list(exclude))


def float16_model(proto: Any) -> Any:
    """ONNX Runtime's float16 converter: the ``onnx`` ModelProto with float16 weights and
    activations, its input and output types kept."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(proto, keep_io_types=True)


def versions() -> dict[str, str]:
    return {"onnxruntime": ort.__version__}
