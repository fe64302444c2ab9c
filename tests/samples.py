"""Access to the captured Chargify bodies in ``shared/chargify/samples`` (read, never copied).

The folder is ``$CHARGIFY_SAMPLES_DIR``, by default ``<repo>/../shared/chargify/samples``.
Tests that need it skip, with a message saying where they looked, when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

_REPO = Path(__file__).resolve().parent.parent


def samples_dir() -> Path:
    """Where the samples are expected."""
    configured = os.environ.get("CHARGIFY_SAMPLES_DIR")
    return Path(configured) if configured else _REPO.parent / "shared" / "chargify" / "samples"


def _missing_message() -> str:
    return (
        f"Chargify samples not found at {samples_dir()}; "
        "set CHARGIFY_SAMPLES_DIR to the shared/chargify/samples folder"
    )


def require_samples() -> Path:
    """The samples folder, or skip the calling test when it does not exist."""
    folder = samples_dir()
    if not folder.is_dir():
        pytest.skip(_missing_message())
    return folder


def _read(path: Path) -> bytes:
    # The m0dd3r capture ends with a newline that is the text file's, not the body's:
    # Chargify bodies end with the last value.
    return path.read_bytes().rstrip(b"\r\n")


def raw_form_names() -> list[str]:
    """File names of the RAW-FORM samples (content starts with ``id=`` or ``event=``)."""
    folder = samples_dir()
    if not folder.is_dir():
        return []
    names = []
    for path in sorted(folder.glob("*.txt")):
        with path.open("rb") as handle:
            start = handle.read(6)
        if start.startswith((b"id=", b"event=")):
            names.append(path.name)
    return names


def raw_form_samples() -> dict[str, bytes]:
    """Every RAW-FORM sample body by file name; skips the calling test if the folder is absent."""
    folder = require_samples()
    return {name: _read(folder / name) for name in raw_form_names()}


def sample_body(name: str) -> bytes:
    """One sample body by file name; skips the calling test if the folder is absent."""
    return _read(require_samples() / name)


def raw_form_params() -> list[Any]:
    """``pytest.param`` per RAW-FORM sample, or one skipped param saying where it looked."""
    names = raw_form_names()
    if not names:
        return [pytest.param(None, marks=pytest.mark.skip(reason=_missing_message()), id="none")]
    return [pytest.param(name, id=name.removesuffix(".txt")) for name in names]
