"""Files that outlive a process: written atomically, read back as data only.

Run directories and export folders are copied between machines, so what ``predict``, ``test``, ``export``
and ``fit --resume`` read must never run code, and what a killed process leaves behind must be either the
old file or the new one, never half of it:

- :func:`atomic_writer` / :func:`write_text` write a temporary file in the target's folder, ``fsync`` it
  and ``os.replace`` it over the target (atomic on POSIX and Windows for files on one file system).
- :func:`read_checkpoint` loads a Lightning checkpoint with ``torch.load(weights_only=True)``: tensors,
  numbers, strings and containers only. A pickle that would build any other object (``os.system``, a
  class) is refused with one line; so is a truncated or otherwise unreadable file.
- :func:`check_program_archive` vets a ``torch.export`` ``.pt2`` archive before ``torch.export.load``
  sees it, because that loader unpickles without restriction: payloads flagged ``use_pickle``, custom and
  opaque objects, any embedded ``.pt`` file that does not load under ``weights_only=True``, and archives that
  are not PT2 archives at all (a ``torch.save`` file is a zip of pickles too).
- :func:`file_inside` keeps a file name read from a ``metadata.json`` inside its folder.

Lightning writes its own checkpoints through fsspec transactions (a temporary file renamed on commit),
which is atomic for local paths, so checkpoints need no wrapper here.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import secrets
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from distillad.errors import DistilladError

# What a torch zip archive or a pickle stream raises when it is cut short or is not one.
_UNREADABLE = (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError)


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "w", newline: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path``, on an error it is removed."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    # os.open with 0o666 leaves the permissions to the umask, as a plain open() would (mkstemp makes 0o600).
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, mode, newline=newline) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """``Path.write_text``, atomically."""
    with atomic_writer(path) as handle:
        handle.write(text)


def write_json(path: str | Path, content: Any, indent: int | None = 2) -> None:
    """``content`` as JSON, atomically."""
    write_text(path, json.dumps(content, indent=indent))


def read_checkpoint(path: str | Path, fix: str) -> dict:
    """A checkpoint's contents, loaded as data only (``weights_only=True``).

    Args:
        path: The ``.ckpt`` file.
        fix: What the user should do when the file cannot be used (ends the error message).

    Raises:
        DistilladError: the file holds objects other than tensors and plain data, or is truncated or corrupt.
    """
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()
        found = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason else "")
        msg = (f"{path} holds code or objects that are not plain data ({found.strip()[:160]}); it was not loaded "
               f"because loading it could run that code; {fix}")
        raise DistilladError(msg) from error
    except _UNREADABLE as error:
        msg = f"{path} is truncated or corrupt ({str(error).splitlines()[0][:120]}); {fix}"
        raise DistilladError(msg) from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        msg = f"{path} is not a Lightning checkpoint (no state_dict); {fix}"
        raise DistilladError(msg)
    return checkpoint


_PICKLED_CONSTANT_PREFIXES = ("custom_obj", "opaque_obj")


def check_program_archive(path: str | Path) -> None:
    """Refuse a ``.pt2`` archive whose loading would unpickle anything but tensors and plain data."""
    import torch

    refusal = (f"{path} is not a plain torch.export program: it carries pickled objects, which loading could run as "
               "code; export the run again with 'distillad export --format torch'")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any(name.endswith("archive_format") for name in names) or any(name.endswith(".pkl") for name in names):
                raise DistilladError(refusal)
            for name in names:
                if name.endswith(".pt"):
                    try:
                        torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                    except pickle.UnpicklingError as error:
                        raise DistilladError(refusal) from error
                elif name.endswith("_config.json") and "/data/" in name:
                    entries = json.loads(archive.read(name)).get("config", {}).values()
                    if any(entry.get("use_pickle") or str(entry.get("path_name", "")).startswith(_PICKLED_CONSTANT_PREFIXES)
                           for entry in entries):
                        raise DistilladError(refusal)
    except (*_UNREADABLE, KeyError) as error:
        msg = f"{path} is truncated or corrupt ({str(error).splitlines()[0][:120]}); export the run again"
        raise DistilladError(msg) from error


def file_inside(folder: Path, name: str, what: str) -> Path:
    """``folder / name``, refused when ``name`` leaves ``folder`` (``..``, an absolute path, a link out)."""
    candidate = (folder / name).resolve()
    if not candidate.is_relative_to(folder.resolve()):
        msg = f"{what} names '{name}', which is outside {folder}; a file it names must lie in the folder itself"
        raise DistilladError(msg)
    return candidate
