"""The output files of one run, published as one unit.

Every file of a run (map, probabilities, TSR map, CSV, GeoJSON, preview, report) is written
under a temporary name inside ``.wsiseg-<host>-<pid>-<token>/`` in its final folder (so that
the last step is a rename, which never crosses a file system and needs no disk space). Only
when all of them are complete are they moved into place, the report last: its presence is the
mark that the set is complete (batch mode keys on it). A failure or an interrupt at any point
leaves either the whole set or none of it at the final paths.

What a killed process (SIGKILL, power loss) could not clean up is removed by the next run in
that folder: the pid in the staging folder's name tells whether its owner still runs.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path

from .files import FULL_ERRNOS, make_folders, owned_name, owned_prefix, remove_empty, remove_stale

log = logging.getLogger(__name__)

STAGING_TAG = ".wsiseg"
MAP_SUFFIXES = (".tif", ".tiff")


class OutputError(ValueError):
    """An output path cannot be used; the message says what to do."""


def check_output(path: Path, *, overwrite: bool) -> None:
    """Fail early (before any work) on an output path that exists or is a folder."""
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name such as {path / 'map.tif'}")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass --overwrite to replace it")
    for parent in Path(path).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"output folder {parent} is not a folder; choose another "
                                  "output path")
            break


def check_distinct(paths: dict[str, Path]) -> None:
    """The map must be a TIFF, and no two outputs may share a path (one would overwrite the
    other)."""
    if "map" in paths and paths["map"].suffix.lower() not in MAP_SUFFIXES:
        raise OutputError(f"the map {paths['map']} must be a .tif or .tiff file, "
                          f"e.g. {paths['map'].with_suffix('.tif')}")
    seen: dict[Path, str] = {}
    for key, p in paths.items():
        real = Path(os.path.normcase(os.path.abspath(p)))
        if real in seen:
            raise OutputError(f"the {seen[real]} and the {key} output would both be {p}; "
                              "give them different paths")
        seen[real] = key


class OutputSet:
    """Staged twins of the ``finals`` (key -> path; the last key is the completion mark).

    Use as a context manager: write ``staged(key)`` paths (and scratch files in ``work``), then
    call ``publish()``. Leaving the block removes the staging folders; leaving it by an error
    before ``publish()`` also removes the output folders this set created, when empty.
    """

    def __init__(self, finals: dict[str, Path]) -> None:
        check_distinct(finals)
        self.finals = {k: Path(p) for k, p in finals.items()}
        self._stages: dict[Path, Path] = {}
        self._created: list[Path] = []
        self.published = False

    def __enter__(self) -> OutputSet:
        folders = list(dict.fromkeys(p.absolute().parent for p in self.finals.values()))
        try:
            self._created = make_folders(folders)
            for folder in folders:
                remove_stale(folder, owned_prefix(STAGING_TAG))
                stage = folder / owned_name(STAGING_TAG, secrets.token_hex(4))
                stage.mkdir()
                self._stages[folder] = stage
        except OSError as e:
            self.__exit__(None, None, None)
            raise OutputError(f"cannot write to output folder {e.filename or folders[0]} "
                              f"({e.strerror}); choose another output path") from None
        return self

    def staged(self, key: str) -> Path:
        final = self.finals[key]
        return self._stages[final.absolute().parent] / final.name

    @property
    def work(self) -> Path:
        """Scratch space beside the first output, removed with the set."""
        return self._stages[next(iter(self.finals.values())).absolute().parent]

    def publish(self) -> None:
        """Move every staged file that exists into place, the completion mark last (an old
        one is removed first, so that a half-replaced set never looks complete)."""
        if self.finals:
            list(self.finals.values())[-1].unlink(missing_ok=True)
        moved: list[Path] = []
        try:
            for key, final in self.finals.items():
                if self.staged(key).exists():
                    os.replace(self.staged(key), final)
                    moved.append(final)
        except BaseException:
            for p in moved:
                p.unlink(missing_ok=True)
            raise
        self.published = True

    def __exit__(self, exc_type, exc, tb) -> None:
        for stage in self._stages.values():
            try:
                shutil.rmtree(stage)
            except FileNotFoundError:
                pass
            except OSError as e:  # never hide the run's own error behind a cleanup problem
                log.warning("could not remove temporary %s: %s", stage, e.strerror)
        if not self.published:
            remove_empty(self._created)
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            folder = next(iter(self._stages), None) or "the output folder"
            raise OutputError(f"{exc.strerror} while writing the outputs in {folder}; free "
                              "space there (or choose another output folder) and run again") \
                from exc

