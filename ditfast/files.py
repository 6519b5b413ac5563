"""How ditfast writes files: atomically, under temporary names it owns, never over a user's file.

Every file is written to ``<path>.<pid>.ditfast-tmp`` in the same folder and then renamed over
``path`` (:func:`atomic_write`), so a reader never sees half a file and a killed process leaves
only names with the ``.ditfast-tmp`` suffix, which no user file is expected to carry.
:func:`remove_orphans` deletes exactly those at the start of a run (and the temporary names of
older ditfast versions, ``<one of its own artefacts>.tmp<pid>``, recognised by the artefact's
exact name pattern); nothing else in a folder is ever deleted.

:func:`check_output_file` and :func:`check_output_folder` are the checks made before any work:
an existing output is not replaced without ``overwrite``, a missing parent folder of an output file is an
error (nothing is created in a place the user did not ask for), and a file is not a folder.
"""

from __future__ import annotations

import os
import re
from typing import Callable

__all__ = ["TMP_SUFFIX", "tmp_name", "atomic_write", "remove_orphans", "check_output_file", "check_output_folder"]

TMP_SUFFIX = ".ditfast-tmp"


def tmp_name(path: str) -> str:
    """The temporary name ``path`` is written under before the rename: ``<path>.<pid>.ditfast-tmp``."""
    return f"{path}.{os.getpid()}{TMP_SUFFIX}"


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """``write(tmp)`` writes the file at the temporary name ``tmp``; it is then renamed over
    ``path``. On any failure the temporary file is removed. The folder must exist (else
    FileNotFoundError naming ``path``)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path!r}: the folder {folder!r} does not exist")
    tmp = tmp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _writer_alive(name: str) -> bool:
    """Whether the process that names ``<path>.<pid>.ditfast-tmp`` is still running (and is not
    this one): its file is being written, not orphaned. A name without a pid counts as orphaned."""
    pid = name[: -len(TMP_SUFFIX)].rpartition(".")[2]
    if not pid.isdigit() or int(pid) == os.getpid() or int(pid) <= 0:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's) or cannot tell: leave it
    return True


def remove_orphans(folder: str, legacy: str | None = None) -> list[str]:
    """Delete the temporary files that killed ditfast processes left in ``folder`` (not
    recursive): names ending in ``.ditfast-tmp`` whose writer (the pid in the name) is gone and, when ``legacy`` (a regular expression of
    the names ditfast writes there, e.g. ``r"\\d{7}\\.pt"``) is given, ``<such a name>.tmp<digits>``
    of older versions. Returns the names removed. A missing folder has no orphans."""
    if not os.path.isdir(folder):
        return []
    old = re.compile(rf"(?:{legacy})\.tmp\d*") if legacy else None
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        ours = name.endswith(TMP_SUFFIX) and not _writer_alive(name)
        if (ours or (old is not None and old.fullmatch(name))) and os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    return removed


def check_output_file(path: str, overwrite: bool = False, what: str = "output file", folder_made: bool = False) -> str:
    """Refuse (FileExistsError, IsADirectoryError, FileNotFoundError) an output ``path`` that
    exists (unless ``overwrite``), is a folder, or whose parent folder does not exist (unless
    ``folder_made``: the caller creates it, e.g. a run folder)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path!r} is a folder; expected a file name")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{what} {path!r} exists; pass --overwrite (overwrite=True) to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not folder_made and not os.path.isdir(parent):
        raise FileNotFoundError(f"{what} {path!r}: the folder {os.path.dirname(path) or '.'!r} does not exist; create it first")
    return path


def check_output_folder(path: str, what: str = "output folder") -> str:
    """Refuse (NotADirectoryError) an output folder ``path`` that names an existing file. A
    missing folder is fine: a run folder (and its parents) is created by the run."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{what} {path!r} is an existing file; expected a folder")
    return path
