"""Output folders, made and tried up front: a bad path is one line before any work, not a traceback after it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from .errors import AccordError

__all__ = ["writable_folder"]


def writable_folder(path, what: str) -> Path:
    """Create ``path`` (and its parents) and check that a file can be written in it; ``what`` names the setting
    (``train.output_dir``, ``--output``) in the error."""
    path = Path(path)
    named = f"{what} {path}" if what.startswith("-") else f"{what}={path}"
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise AccordError(f"{named}: {blocker} is a file, not a folder; choose a folder path")
    probe = path / f".accord-write-test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        os.remove(probe)
    except OSError as exc:
        raise AccordError(f"{named} is not writable ({exc.strerror or exc}); choose a folder you can write "
                          "to or fix its permissions") from None
    return path
