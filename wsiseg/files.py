"""Small file helpers: atomic text files, temporary names that say whose they are, and the
removal of what killed runs left behind."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
from pathlib import Path

log = logging.getLogger(__name__)

# errno values that mean "the output medium is full or closed", whatever file was written.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary name beside ``path`` and move it into place, so the file
    appears complete or not at all (also on KeyboardInterrupt)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
