"""Batch runs over many slides into one folder: resumable, lock-safe, not stopped by a bad slide.

The engine is passed in as ``process(slide, outputs)``, so this module knows nothing about models
or OpenSlide and is tested with fake processors. The contract with ``process``:

- it writes the files named in ``outputs`` and writes ``outputs["report"]`` **last** (the engine
  moves every file into place only when complete), so a report that parses means "done";
- it replaces leftovers of an earlier, interrupted run (call the engine with ``overwrite=True``):
  ``run_batch`` only calls it for a slide that is not complete, or when asked to overwrite;
- it raises a ``ValueError`` or ``OSError`` subclass for a slide that cannot be processed (the
  project's own errors all are); the slide is marked failed and the batch goes on. Anything else
  (a bug, ``KeyboardInterrupt``) stops the batch, after its lock is released.

Locks: ``OUT/.<name>.lock`` is created with O_CREAT|O_EXCL and holds host, pid and start time. A
lock left by a dead process on this host is taken over; a live one (or one from another host,
whose process cannot be checked) makes the slide "skipped". Delete a lock by hand only when
its worker is certainly gone.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .files import pid_running, write_text_atomic

try:
    import fcntl
except ImportError:  # Windows: the status table is then not guarded against a parallel worker
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

SLIDE_EXTENSIONS = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms",
                              ".vmu", ".svslide"})
STATUS_COLUMNS = ("slide", "name", "status", "reason", "seconds")
OK, SKIPPED, FAILED = "ok", "skipped", "failed"
_GLOB_CHARS = re.compile(r"[*?\[]")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME_CHARS = 100


class BatchInputError(ValueError):
    """A batch input (path, folder, pattern or list file) cannot be used; the message says why."""


@dataclass(frozen=True)
class SlideStatus:
    slide: Path
    name: str
    status: str  # ok / skipped / failed
    reason: str  # one line; empty when ok
    seconds: float

    def row(self) -> dict[str, str]:
        return {"slide": str(self.slide), "name": self.name, "status": self.status,
                "reason": self.reason, "seconds": f"{self.seconds:.1f}"}


# ---------------------------------------------------------------------------- inputs

def is_slide_file(path: Path) -> bool:
    return path.suffix.lower() in SLIDE_EXTENSIONS and path.is_file()


def _slides_in_folder(folder: Path) -> list[Path]:
    """Slide files directly inside ``folder`` (not below: MRXS data folders hold no slides;
    use a pattern such as ``DIR/**/*.svs`` to search below)."""
    return [p for p in folder.iterdir() if is_slide_file(p)]


def read_list_file(list_file: Path) -> list[Path]:
    """Paths from a text file, one per line; blank lines and lines starting with ``#`` are ignored.
    Relative paths are relative to the list file's folder."""
    try:
        text = Path(list_file).read_text()
    except OSError as e:
        raise BatchInputError(f"cannot read slide list {list_file}: {e.strerror}") from None
    paths = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):  # whole-line comments: '#' may be in a path
            p = Path(line).expanduser()
            paths.append(p if p.is_absolute() else Path(list_file).parent / p)
    return paths


def _expand_one(item: Path, source: str) -> list[Path]:
    text = str(item)
    if item.is_dir():
        found = _slides_in_folder(item)
        if not found:
            raise BatchInputError(
                f"folder {item} ({source}) holds no slide files "
                f"({', '.join(sorted(SLIDE_EXTENSIONS))}); give the slides' own folder, "
                f"or a pattern such as '{item / '**' / '*.svs'}' to search below it")
        return found
    if item.is_file():
        return [item]  # named explicitly: used whatever its extension
    if _GLOB_CHARS.search(text):
        matched = [Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True)]
        found = [p for p in matched if is_slide_file(p)]
        if not found:
            extra = f" ({len(matched)} non-slide entries)" if matched else ""
            raise BatchInputError(f"pattern '{text}' ({source}) matches no slide files{extra}; "
                                  "check it, and quote it so that the shell does not expand it")
        return found
    raise BatchInputError(f"{item} ({source}) does not exist; check the path "
                          "(relative paths in a list file are relative to the list file)")


def expand_slides(inputs: Sequence[Path], *, list_file: Path | None = None) -> list[Path]:
    """Slide paths from files, folders, glob patterns and a list file: resolved, deduplicated,
    sorted. Raises :class:`BatchInputError` naming every input that matches nothing."""
    items = [(Path(p), "argument") for p in inputs]
    if list_file is not None:
        items += [(p, f"listed in {list_file}") for p in read_list_file(Path(list_file))]
    if not items:
        raise BatchInputError("no slides given: name slide files, folders or patterns, "
                              "or pass a list file")
    slides: set[Path] = set()
    errors = []
    for item, source in items:
        try:
            slides.update(p.resolve() for p in _expand_one(item, source))
        except BatchInputError as e:
            errors.append(str(e))
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise BatchInputError("; ".join(errors[:5]) + more)
    return sorted(slides, key=str)


# ---------------------------------------------------------------------------- names

def safe_name(slide: Path) -> str:
    """The slide's stem reduced to letters, digits, ``.``, ``_`` and ``-``; never hidden, never
    starting with ``-`` (no option look-alikes), at most 100 characters."""
    name = _UNSAFE.sub("_", Path(slide).stem).lstrip(".-_")[:MAX_NAME_CHARS].rstrip(".")
    return name or "slide"


def path_hash(slide: Path) -> str:
    return hashlib.sha1(str(Path(slide).resolve()).encode()).hexdigest()[:8]


def output_names(slides: Sequence[Path]) -> dict[Path, str]:
    """A unique output name per slide: its safe stem, plus ``-<hash of the resolved path>`` for
    every slide whose stem is shared by another slide of the batch (compared ignoring case, for
    case-insensitive file systems). Names depend only on the set of slides, so every worker of a
    batch computes the same ones."""
    by_name: dict[str, list[Path]] = {}
    for s in slides:
        by_name.setdefault(safe_name(s).lower(), []).append(Path(s))
    names = {}
    for group in by_name.values():
        for s in group:
            names[s] = safe_name(s) if len(group) == 1 else f"{safe_name(s)}-{path_hash(s)}"
    return names


def outputs_for(slide: Path, out_dir: Path, *, name: str | None = None) -> dict[str, Path]:
    """Output paths of one slide: ``map`` (``NAME.tif``), ``report`` (``NAME.json``, written
    last), ``csv``, ``geojson``, ``tsr`` (``NAME.tsr.tif``) and ``preview`` (``NAME.preview.png``).
    ``name`` defaults to :func:`safe_name`; a batch passes the one from :func:`output_names`."""
    from .analysis import outputs_beside  # the one place that names the analysis files
    map_path = Path(out_dir) / f"{name or safe_name(slide)}.tif"
    return {"map": map_path, "report": map_path.with_suffix(".json"),
            **outputs_beside(map_path)}


def is_complete(outputs: dict[str, Path]) -> bool:
    """True when the report (written last) parses as a JSON object and the map exists."""
    try:
        report = json.loads(outputs["report"].read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and outputs["map"].is_file()


# ---------------------------------------------------------------------------- locks

def _read_lock(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or damaged: treated as held
    return data if isinstance(data, dict) else {}


def describe_lock(holder: dict) -> str:
    if not holder:
        return "another worker (lock file unreadable)"
    return (f"{holder.get('host', '?')} pid {holder.get('pid', '?')} since "
            f"{holder.get('started', '?')}")


def _is_stale(holder: dict) -> bool:
    return (bool(holder) and holder.get("host") == socket.gethostname()
            and isinstance(holder.get("pid"), int) and not pid_running(holder["pid"]))


def try_lock(path: Path) -> str | None:
    """Take the lock file ``path`` atomically. Returns None when taken, else who holds it.

    A lock of a dead process on this host is stale: it is moved aside (atomic rename, so only
    one worker wins) and taken over."""
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None:
                continue  # released meanwhile: try again
            if not _is_stale(holder):
                return describe_lock(holder)
            aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue  # another worker moved it first
            if _read_lock(aside) != holder:  # moved a fresh lock taken meanwhile: put it back
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                aside.unlink(missing_ok=True)
                return describe_lock(_read_lock(path) or {})
            aside.unlink(missing_ok=True)
            log.warning("%s: took over the stale lock of %s", path.name, describe_lock(holder))
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return None
    return describe_lock(_read_lock(path) or {})


# ---------------------------------------------------------------------------- status table

@contextmanager
def _guarded(path: Path) -> Iterator[None]:
    """An advisory lock beside ``path`` for a read-modify-write (released if the process dies)."""
    if fcntl is None:
        yield
        return
    with open(path.with_name(f".{path.name}.guard"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_status(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f, delimiter="\t"))
    except FileNotFoundError:
        return []


def update_status(path: Path, status: SlideStatus) -> None:
    """Merge ``status`` into the table at ``path`` (one row per output name) and replace the file
    atomically. A "skipped" row never hides an earlier "ok" or "failed" row of the same slide."""
    with _guarded(path):
        rows = {r["name"]: r for r in read_status(path)}
        old = rows.get(status.name)
        if not (status.status == SKIPPED and old and old["status"] in (OK, FAILED)):
            rows[status.name] = status.row()
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=STATUS_COLUMNS, delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(rows[k] for k in sorted(rows))
        write_text_atomic(path, buf.getvalue())


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------------------- the batch

def run_slide(slide: Path, name: str, out_dir: Path, *,
              process: Callable[[Path, dict[str, Path]], None], overwrite: bool) -> SlideStatus:
    """One slide: skip when complete, else lock, process, unlock."""
    t0 = time.perf_counter()
    outputs = outputs_for(slide, out_dir, name=name)

    def status(state: str, reason: str = "") -> SlideStatus:
        return SlideStatus(slide, name, state, reason, time.perf_counter() - t0)

    if not overwrite and is_complete(outputs):
        return status(SKIPPED, "complete")
    lock = out_dir / f".{name}.lock"
    holder = try_lock(lock)
    if holder is not None:
        return status(SKIPPED, f"locked by {holder}")
    try:
        if not overwrite and is_complete(outputs):  # finished by another worker meanwhile
            return status(SKIPPED, "complete")
        try:
            process(slide, outputs)
        except (ValueError, OSError) as e:
            log.warning("%s failed: %s", slide.name, one_line(e))  # the caller reports it
            return status(FAILED, one_line(e))
        if not is_complete(outputs):
            return status(FAILED, f"processing ended without a readable report "
                                  f"{outputs['report'].name}")
        return status(OK)
    finally:
        lock.unlink(missing_ok=True)


def run_batch(slides: Sequence[Path], out_dir: Path, *,
              process: Callable[[Path, dict[str, Path]], None], overwrite: bool = False,
              status_path: Path | None = None) -> list[SlideStatus]:
    """Process every slide into ``out_dir`` (see the module notes); returns one status per slide.

    The status table (default ``out_dir/status.tsv``) is updated after every slide. A
    ``KeyboardInterrupt`` or an unexpected error stops the batch (the slide's lock is released
    and the table keeps the slides done so far). The caller exits non-zero if any failed."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise BatchInputError(f"output folder {out_dir} does not exist; create it first "
                              f"(mkdir -p {out_dir})")
    status_path = Path(status_path) if status_path else out_dir / "status.tsv"
    names = output_names(slides)
    statuses = []
    for i, slide in enumerate(slides, 1):
        s = run_slide(Path(slide), names[Path(slide)], out_dir, process=process,
                      overwrite=overwrite)
        log.info("[%d/%d] %s: %s%s (%.1f s)", i, len(slides), s.name, s.status,
                 f" ({s.reason})" if s.reason else "", s.seconds)
        update_status(status_path, s)
        statuses.append(s)
    return statuses
