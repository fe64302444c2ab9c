"""The import rules between the layers, read from the source (every ``import``, also those
inside functions and under ``TYPE_CHECKING``).

From the bottom up:

- **base**: the shared modules of ``chargify_stream`` listed in ``BASE`` (errors, settings,
  limits, logging, Kafka client configuration and errors, topic admin, retry, delivery).
  They import only each other.
- **contracts**: ``schemas/``. They import nothing of ours but the exception tree
  (``chargify_stream.errors``), so a reader of the topics needs no stage.
- **stages**: ``ingest/``, ``processors/``, ``sink/``. Each imports itself, the contracts and
  the base: stages meet only through topics and ``schemas/``.
- **application**: every other module of ``chargify_stream`` (the CLI, ``up`` and the local
  launchers, the operator commands: dlq, tail, trace, console, reconcile, connect,
  analytics). Only it imports stages.

A module added to ``chargify_stream`` is application until it is listed in ``BASE``.
Names are read as the folders are, with or without a ``chargify_stream.`` in front of a
stage (docs/packaging.md), so the rules hold across that move.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAGES = ("ingest", "processors", "sink")
CONTRACTS = "schemas"
PACKAGES = ("chargify_stream", CONTRACTS, *STAGES)
BASE = frozenset(
    f"chargify_stream.{name}"
    for name in (
        "errors",
        "settings",
        "limits",
        "logs",
        "kafka_config",
        "kafka_admin",
        "kafka_errors",
        "retry",
        "delivery",
    )
)
CONTRACT_BASE = frozenset({"chargify_stream.errors"})


def _modules(root: Path) -> Iterator[tuple[str, Path]]:
    """(dotted name, file) of every module of ours below ``root``; links are not followed."""
    for package in PACKAGES:
        for folder, _dirs, files in os.walk(root / package):
            for file in sorted(files):
                if file.endswith(".py"):
                    path = Path(folder) / file
                    parts = path.relative_to(root).with_suffix("").parts
                    yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _normal(name: str) -> str:
    """``chargify_stream.sink.consumer`` as ``sink.consumer`` (the planned namespace)."""
    head, _, rest = name.partition(".")
    if head == "chargify_stream" and rest.split(".")[0] in (CONTRACTS, *STAGES):
        return rest
    return name


def _imports(path: Path, known: set[str]) -> set[str]:
    """The modules of ours ``path`` imports (``from pkg import module`` names the module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [
                f"{node.module}.{alias.name}"
                if f"{_normal(node.module)}.{alias.name}" in known
                else node.module
                for alias in node.names
            ]
        else:
            continue
        found.update(_normal(n) for n in names if n.split(".")[0] in PACKAGES)
    return found


def _layer(module: str) -> str:
    top = module.split(".")[0]
    if top == CONTRACTS:
        return "contracts"
    if top in STAGES:
        return "stage"
    if module == "chargify_stream" or module in BASE:
        return "base"  # the package itself is empty
    return "application"


def _allowed(module: str, imported: str) -> bool:
    layer, target = _layer(module), _layer(imported)
    if layer == "application":
        return True
    if layer == "contracts":
        return target == "contracts" or imported in CONTRACT_BASE
    if layer == "stage":
        same_stage = imported.split(".")[0] == module.split(".")[0]
        return same_stage or target in ("contracts", "base")
    return target == "base"  # base


def violations(root: Path) -> list[str]:
    """``module -> imported (layer -> layer)`` for each import that breaks the rules."""
    modules = dict(_modules(root))
    known = set(modules)
    found = []
    for module, path in sorted(modules.items()):
        for imported in sorted(_imports(path, known)):
            if not _allowed(module, imported):
                found.append(f"{module} -> {imported} ({_layer(module)} -> {_layer(imported)})")
    return found


def test_layers_only_point_down() -> None:
    assert violations(REPO) == []


def test_every_base_module_exists() -> None:
    known = {name for name, _ in _modules(REPO)}
    assert sorted(BASE - known) == []


def test_the_check_finds_what_breaks_the_rules(tmp_path: Path) -> None:
    files = {
        "chargify_stream/__init__.py": "",
        "chargify_stream/errors.py": "",
        "chargify_stream/settings.py": "from chargify_stream import dlq\n",
        "chargify_stream/dlq.py": "from sink.consumer import Sink\n",
        "schemas/__init__.py": "",
        "schemas/codec.py": "from chargify_stream.errors import E\nimport chargify_stream.logs\n",
        "ingest/__init__.py": "",
        "ingest/app.py": "from schemas import codec\nfrom chargify_stream.settings import S\n",
        "processors/__init__.py": "",
        "processors/worker.py": "def f():\n    from chargify_stream.sink import upsert\n",
        "sink/__init__.py": "",
        "sink/consumer.py": "from chargify_stream.tail import x\n",
        "sink/upsert.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert violations(tmp_path) == [
        "chargify_stream.settings -> chargify_stream.dlq (base -> application)",
        "processors.worker -> sink.upsert (stage -> stage)",
        "schemas.codec -> chargify_stream.logs (contracts -> base)",
        "sink.consumer -> chargify_stream.tail (stage -> application)",
    ]
