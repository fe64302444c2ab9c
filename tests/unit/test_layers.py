"""The import rules between the layers, read from the source (every ``import``, also those
inside functions and under ``TYPE_CHECKING``).

From the bottom up:

- **contracts**: ``schemas/``. They import nothing of ours (their exceptions are their own,
  ``schemas/errors.py``), so a reader of the topics needs no stage and no base.
- **base**: ``chargify_stream/base/`` (errors, settings, limits, logging, Kafka client
  configuration and errors, topic admin, retry, delivery). Its modules import only each
  other.
- **stages**: ``ingest/``, ``processors/``, ``sink/``. Each imports itself, the contracts and
  the base: stages meet only through topics and ``schemas/``.
- **application**: every other module of ``chargify_stream`` (the CLI, ``up`` and the local
  launchers, the operator commands: dlq, tail, trace, console, reconcile, connect,
  analytics). Only it imports stages; it only composes.

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
BASE = "chargify_stream.base"


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
    if module == "chargify_stream" or module == BASE or module.startswith(f"{BASE}."):
        return "base"  # the package itself is empty
    return "application"


def _allowed(module: str, imported: str) -> bool:
    layer, target = _layer(module), _layer(imported)
    if layer == "application":
        return True
    if layer == "contracts":
        return target == "contracts"
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


def test_every_layer_has_modules() -> None:
    # A rename that leaves a layer empty would make the rules hold by saying nothing.
    layers = {_layer(name) for name, _ in _modules(REPO) if name != "chargify_stream"}
    assert layers == {"contracts", "base", "stage", "application"}


def test_the_check_finds_what_breaks_the_rules(tmp_path: Path) -> None:
    files = {
        "chargify_stream/__init__.py": "",
        "chargify_stream/base/errors.py": "",
        "chargify_stream/base/settings.py": "from chargify_stream import dlq\n",
        "chargify_stream/base/limits.py": "from chargify_stream.schemas import codec\n",
        "chargify_stream/dlq.py": "from sink.consumer import Sink\n",
        "schemas/__init__.py": "",
        "schemas/codec.py": "from chargify_stream.base.errors import E\n",
        "ingest/__init__.py": "",
        "ingest/app.py": "from schemas import codec\nfrom chargify_stream.base.settings import S\n",
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
        "chargify_stream.base.limits -> schemas.codec (base -> contracts)",
        "chargify_stream.base.settings -> chargify_stream.dlq (base -> application)",
        "processors.worker -> sink.upsert (stage -> stage)",
        "schemas.codec -> chargify_stream.base.errors (contracts -> base)",
        "sink.consumer -> chargify_stream.tail (stage -> application)",
    ]
