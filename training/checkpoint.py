"""The checkpoint format: tensors and plain data, never code.

A checkpoint (``last.pt``, ``best.pt``) is a dict of tensors (weights, optimiser moments, torch's
random state) and plain data: ``None``, booleans, numbers, strings, lists, tuples and dicts (the
config as ``dataclasses.asdict`` of its frozen dataclasses, the loop state and history, numpy's
bit-generator state). :func:`save` refuses anything else, and :func:`load` reads with
``torch.load(weights_only=True)``, whose unpickler builds only those types: a file that needs
anything else (a class, a function: the way a pickle runs code) is refused before any of its
content is used.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsiseg.files import atomic_path

FORMAT = "wsiseg-train/1"
PLAIN = (type(None), bool, int, float, str)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, not plain data or does not fit the requested model."""


def plain(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` with numpy number scalars made Python numbers (containers that need no change are
    returned as they are, so a state dict keeps its type); TypeError for anything else that is
    not a tensor or plain data."""
    if isinstance(obj, (torch.Tensor, *PLAIN)):
        return obj
    if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
        return obj.item()
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, (str, int))]
        if bad:
            raise TypeError(f"{where}: key {bad[0]!r} is not a string or an integer")
        new = {k: plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
        return obj if all(new[k] is v for k, v in obj.items()) else new
    if isinstance(obj, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where} is a {type(obj).__name__}; a checkpoint holds only tensors and "
                    "plain data")


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (checked to be plain data) to ``path`` through a temporary file."""
    path = Path(path)
    data = plain(payload)
    with atomic_path(path) as tmp:  # never leave a half-written checkpoint
        torch.save(data, tmp)


def _numeric_scalar(dtype: np.dtype, data: bytes | None = None) -> int | float | bool:
    """Stands in for numpy's scalar constructor when reading older checkpoints: builds a number
    from its dtype and bytes (never an object), and returns it as a Python number."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"a numpy scalar of dtype {dtype} is not a number")
    return np.frombuffer(data, dtype=dtype, count=1)[0].item()


# save() makes numpy numbers Python numbers, but a checkpoint written without that check may hold
# some (a float64 in the history), pickled as numpy's ``scalar(dtype, bytes)`` and the dtype.
# Those globals, and only those, are allowed: building a number or a dtype runs no code, and
# _numeric_scalar turns them into Python numbers on read.
NUMPY_NUMBERS: list[Any] = [
    (_numeric_scalar, "numpy._core.multiarray.scalar"),
    (_numeric_scalar, "numpy.core.multiarray.scalar"),
    np.dtype, *sorted({type(np.dtype(c)) for c in "?bhilqBHILQefd"}, key=str)]


def _resolve(path: str | Path) -> Path:
    """The checkpoint file of ``path``: the file itself, or a run folder's best.pt / last.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").is_file() else path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; give a run folder or a .pt file")
    return path


def _first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def _unpickling_error(path: Path, e: pickle.UnpicklingError) -> CheckpointError:
    """One line for what the weights-only unpickler objected to."""
    text = str(e)
    found = (re.search(r"GLOBAL (\S+)", text) or re.search(r"but got <class '([^']+)'>", text)
             or re.search(r"unrecognized function (\S+)", text))
    if found:
        return CheckpointError(
            f"refused checkpoint {path}: it would load {found.group(1)}, more than tensors and "
            "plain data; use checkpoints written by wsiseg-train, never one from an untrusted "
            "source")
    found = re.search(r"Unsupported operand \d+", text)
    return CheckpointError(f"cannot read checkpoint {path}: not a torch file of tensors and "
                           f"plain data ({found.group(0).lower() if found else 'bad pickle'}); "
                           "give a .pt file written by wsiseg-train")


def load(path: str | Path) -> dict[str, Any]:
    """Read a wsiseg-train checkpoint (a .pt file or a run folder) as tensors and plain data."""
    path = _resolve(path)
    try:
        with torch.serialization.safe_globals(NUMPY_NUMBERS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unpickling_error(path, e) from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a wsiseg-train checkpoint")
    return ckpt
