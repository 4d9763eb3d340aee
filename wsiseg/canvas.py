"""A uint8 label canvas kept in a file, written and read with positioned I/O.

A whole-slide map at 1 µm/px can hold billions of pixels. Keeping it in a file, and touching it
only through ``os.pwrite``/``os.pread``, leaves its pages in the OS cache instead of this
process's memory (a memory map would count every touched page as resident), so the process
stays small however large the slide.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np

_FILL_BYTES = 8 << 20


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte is written: a write may be cut short (a signal, a file
    system near full); one that writes nothing means the disk is full."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[n:], offset + n


class DiskCanvas:
    """A 2-D uint8 array of ``shape`` stored row-major in ``path`` (context manager).

    ``canvas[r0:r1]`` reads whole rows (what the TIFF writer and the statistics need);
    ``paste(row, col, block)`` writes a 2-D block."""

    def __init__(self, path: str | Path, shape: tuple[int, int], *, fill: int = 0) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(np.uint8)
        self.ndim = 2
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            rows = max(1, _FILL_BYTES // self.shape[1])
            chunk = np.full((rows, self.shape[1]), fill, np.uint8).tobytes()
            for r in range(0, self.shape[0], rows):
                n = min(rows, self.shape[0] - r)
                _pwrite_all(self._fd, chunk[: n * self.shape[1]], r * self.shape[1])
        except BaseException:  # e.g. a full disk: no context manager will close it for us
            self.close()
            raise

    def paste(self, row: int, col: int, block: np.ndarray) -> None:
        h, w = block.shape
        if row < 0 or col < 0 or row + h > self.shape[0] or col + w > self.shape[1]:
            raise ValueError(f"block {block.shape} at ({row}, {col}) is outside {self.shape}")
        block = np.ascontiguousarray(block, np.uint8)
        width = self.shape[1]
        for i in range(h):
            _pwrite_all(self._fd, block[i].data, (row + i) * width + col)

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("DiskCanvas supports row slices canvas[r0:r1] only")
        r0, r1, _ = key.indices(self.shape[0])
        n = max(0, r1 - r0) * self.shape[1]
        out = bytearray(n)
        done = 0
        while done < n:  # a read may return fewer bytes than asked
            data = os.pread(self._fd, n - done, r0 * self.shape[1] + done)
            if not data:
                raise OSError(errno.EIO, f"label canvas {self.path} is shorter than expected")
            out[done:done + len(data)] = data
            done += len(data)
        return np.frombuffer(out, np.uint8).reshape(max(0, r1 - r0), self.shape[1])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DiskCanvas:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DiskStack:
    """C planes of a [C, H, W] uint8 array, one DiskCanvas each; ``stack[c]`` is plane c."""

    def __init__(self, folder: str | Path, shape: tuple[int, int, int], *, fill: int = 0) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self.planes: list[DiskCanvas] = []
        try:
            for c in range(self.shape[0]):
                self.planes.append(DiskCanvas(Path(folder) / f"plane-{c}.u8", self.shape[1:],
                                              fill=fill))
        except BaseException:
            self.close()
            raise

    def paste(self, row: int, col: int, block: np.ndarray) -> None:
        for plane, b in zip(self.planes, block):
            plane.paste(row, col, b)

    def __getitem__(self, c: int) -> DiskCanvas:
        return self.planes[c]

    def close(self) -> None:
        for p in self.planes:
            p.close()

    def __enter__(self) -> DiskStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
