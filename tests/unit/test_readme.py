"""The README stays a short user's guide: under 12 KB, no dates or test counts that go
stale with every commit, and every file it points to exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_it_is_under_12_kb() -> None:
    assert len(README.encode()) < 12 * 1024


def test_it_holds_no_dates_or_test_counts() -> None:
    prose = re.sub(r"^```.*?^```", "", README, flags=re.MULTILINE | re.DOTALL)  # not examples
    assert not re.findall(r"\b20\d\d-\d\d-\d\d\b", prose)
    assert not re.findall(r"\b\d[\d,]* (?:tests|passed)\b", prose)


def test_every_file_it_names_exists() -> None:
    named = re.findall(r"`((?:docs|bench|ops|schemas|scripts)/[\w./*-]+)`", README)
    assert named
    missing = [p for p in named if "*" not in p and not (ROOT / p).exists()]
    assert not missing
