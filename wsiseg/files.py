"""Small file helpers for both packages: atomic writes, temporary names that say whose they are,
the removal of what killed runs left behind, and whether a process still runs."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# errno values that mean "the output medium is full or closed", whatever file was written.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the body succeeds, so
    the file appears complete or not at all (the temporary file is removed on any error,
    KeyboardInterrupt included). Temporary files of killed writers of the same file are
    removed first (:func:`remove_stale`)."""
    final = Path(path).absolute()
    folder = final.parent
    if not folder.is_dir():
        if folder.exists():
            raise NotADirectoryError(f"output folder {folder} is not a folder")
        raise FileNotFoundError(f"output folder {folder} does not exist")
    if final.is_dir():
        raise IsADirectoryError(f"output path {final} is a folder")
    tag = f".{final.name}.tmp"
    remove_stale(folder, owned_prefix(tag))
    # Not mkstemp: its 0600 mode would end up on the final file; os.open honours the umask.
    tmp = folder / owned_name(tag, secrets.token_hex(4))
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        raise OSError(e.errno, f"cannot write to output folder {folder} ({e.strerror})") from None
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:  # including KeyboardInterrupt: never leave the temporary file
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`."""
    write_bytes_atomic(path, text.encode("utf-8"))


def owned_prefix(tag: str) -> str:
    """The start of a temporary name owned by this host; the owner's pid follows it, then ``-``,
    so that :func:`remove_stale` can tell whether the owner still runs."""
    return f"{tag}-{socket.gethostname()}-"


def owned_name(tag: str, token: str) -> str:
    return f"{owned_prefix(tag)}{os.getpid()}-{token}"


def remove_stale(folder: str | os.PathLike, prefix: str) -> None:
    """Delete the files and folders in ``folder`` named ``PREFIX<pid>-...`` whose process (on
    this host) is gone: what a killed run (SIGKILL, power loss) could not clean up."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return  # a folder that cannot be listed holds nothing we can clean
    for entry in entries:
        pid = entry.name[len(prefix):].split("-")[0]
        if (not entry.name.startswith(prefix) or not pid.isdigit() or int(pid) == os.getpid()
                or pid_running(int(pid))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            log.info("removed %s, left by a run that was killed", entry.path)
        except OSError as e:  # e.g. another user's file in a shared folder: do not fail for it
            log.warning("could not remove stale temporary %s: %s", entry.path, e.strerror)


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (also when another user owns it)."""
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def make_folders(folders: list[Path]) -> list[Path]:
    """Create the missing ``folders`` (with their parents); return those created, deepest first,
    so that :func:`remove_empty` can undo exactly this."""
    created: list[Path] = []
    for folder in folders:
        missing = []
        f = Path(folder).absolute()
        while not f.exists() and f != f.parent:
            missing.append(f)
            f = f.parent
        for m in reversed(missing):
            m.mkdir()
            created.insert(0, m)
    return created


def remove_empty(folders: list[Path]) -> None:
    """Remove those of ``folders`` (deepest first) that are empty; keep any that are not."""
    for f in folders:
        try:
            f.rmdir()
        except OSError:
            continue  # not empty (someone else's files), or already gone
