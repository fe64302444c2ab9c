"""The guard on ``processors.seam``: the versions and the Faust source it relies on.

When one of these fails, a dependency changed under the processor. Do not just update the
pinned value: read ``processors/seam.py``'s docstring, check each touchpoint against the
new release (its changelog, and the source of ``faust.app.base.BootStrategy``), run
``tests/integration/test_seam.py`` (the contract against a real worker and broker), and
only then pin the new version or source hash here and in ``pyproject.toml``.
"""

from __future__ import annotations

import hashlib
import inspect
from importlib.metadata import version

import pytest
from faust.app.base import BootStrategy

from chargify_stream.processors import seam

PINNED = {"faust-streaming": "0.15.3", "mode-streaming": "0.7.1", "aiokafka": "0.14.0"}
# sha256 of inspect.getsource(faust.app.base.BootStrategy) in faust-streaming 0.15.3.
BOOT_STRATEGY_SHA256 = "ecc05db10abceee91f80590e998c682ab27ffe1f486517ee528eb4bfa14a8f4e"

INSTRUCTIONS = (
    "{what} changed under processors/seam.py. Check every touchpoint listed in its "
    "docstring against the new release, run tests/integration/test_seam.py, then update "
    "the pin in tests/unit/test_seam.py (and pyproject.toml)."
)


@pytest.mark.parametrize("package", sorted(PINNED))
def test_the_versions_are_the_pinned_ones(package: str) -> None:
    installed = version(package)
    assert installed == PINNED[package], INSTRUCTIONS.format(
        what=f"{package} {installed} (pinned {PINNED[package]})"
    )


def test_the_boot_strategy_source_is_the_pinned_one() -> None:
    digest = hashlib.sha256(inspect.getsource(BootStrategy).encode()).hexdigest()
    assert digest == BOOT_STRATEGY_SHA256, INSTRUCTIONS.format(
        what="The source of faust.app.base.BootStrategy"
    )


def test_the_processor_app_starts_no_kafka_service() -> None:
    """What the switch does, read from the strategy Faust builds for the app."""
    app = seam.ProcessorApp("seam-guard", web_enabled=True)
    boot = app.boot_strategy
    assert isinstance(boot, seam.NoKafka)
    assert list(boot.kafka_consumer()) == []
    assert list(boot.kafka_producer()) == []
    assert list(boot.kafka_conductor()) == []
    assert list(boot.tables()) == []
    assert app.web in list(boot.web_server())
