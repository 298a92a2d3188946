"""Safe file writing: every output is written to a temporary file and renamed into place.

A crash or Ctrl-C therefore leaves either the old file or the new one, never half of one, and an
existing file is only replaced when the caller asked for it (``force``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsemm.errors import OutputExistsError, SparseMMError


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def check_writable(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse to overwrite an existing file unless ``force``; return the path."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to overwrite it or choose another --out")
    if path.is_dir():
        raise OutputExistsError(f"{path} is a directory; --out needs a file path")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        # mkstemp creates 0600; give the file the mode a plain open() would (or keep the replaced file's)
        os.chmod(tmp_path, path.stat().st_mode & 0o777 if path.exists() else _default_mode())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON (NaN refused) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def read_json(
    path: str | os.PathLike,
    *,
    what: str = "file",
    error: type[SparseMMError] = SparseMMError,
    reject_nan: bool = False,
) -> Any:
    """Parse a JSON file, raising ``error`` (a ``SparseMMError``) for a missing file, a directory, unreadable or
    non-UTF-8 bytes, invalid JSON and, with ``reject_nan``, ``NaN``/``Infinity`` constants. ``what`` names the file
    in the message ("profile", "budget plan", ...)."""
    path = Path(path)

    def no_constants(name: str) -> float:
        raise ValueError(f"{name} is not a valid number")

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory; pass the JSON file itself") from None
    except (UnicodeDecodeError, PermissionError, OSError) as exc:
        raise error(f"cannot read {what} {path}: {exc}") from None
    try:
        return json.loads(text, parse_constant=no_constants if reject_nan else None)
    except json.JSONDecodeError as exc:
        raise error(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except ValueError as exc:
        raise error(f"{what} {path}: {exc}") from None
