"""Installed, the project adds one top-level import name: ``chargify_stream``."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("ingest", "processors", "schemas", "sink")
TOP_LEVEL_IMPORT = re.compile(rf"^\s*(from|import) ({'|'.join(STAGES)})\b", re.MULTILINE)


def test_the_stage_folders_are_linked_into_the_package() -> None:
    for name in STAGES:
        link = ROOT / "chargify_stream" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), link


def test_only_chargify_stream_is_installed() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["packages"]["find"]["include"] == ["chargify_stream*"]


def test_nothing_imports_a_stage_by_its_top_level_name() -> None:
    offenders = []
    for folder, dirs, files in os.walk(ROOT):  # does not follow the links
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = Path(folder) / name
            if name.endswith(".py") and TOP_LEVEL_IMPORT.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"import chargify_stream.<stage> instead: {offenders}"
