"""Conventions operators rely on: metric names by stage, shipped alert rules, dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from chargify_stream.ingest.metrics import GatewayMetrics
from chargify_stream.processors.metrics import ProcessorMetrics
from chargify_stream.sink.consumer import SinkMetrics
from chargify_stream.sink.recorder import RecorderMetrics
from chargify_stream.sink.redrive import RedriveMetrics

OPS = Path(__file__).parents[2] / "ops"


def names(registry: CollectorRegistry) -> set[str]:
    return {metric.name for metric in registry.collect()}


def sink_registry() -> CollectorRegistry:
    """Everything a sink process serves: the sink's, the re-driver's and the recorder's."""
    metrics = SinkMetrics()
    RedriveMetrics(metrics.registry)
    RecorderMetrics(metrics.registry)
    return metrics.registry


@pytest.mark.parametrize(
    ("stage", "registry"),
    [
        ("gateway", lambda: GatewayMetrics().registry),
        ("processor", lambda: ProcessorMetrics().registry),
        ("sink", sink_registry),
    ],
)
def test_every_metric_name_starts_with_its_stage(stage: str, registry: object) -> None:
    found = names(registry())  # type: ignore[operator]
    assert found
    assert {n for n in found if not n.startswith(f"{stage}_")} == set()


def promtool_check(promtool: str, kind: str, path: Path) -> subprocess.CompletedProcess[str]:
    """``promtool check <kind> <path>``, its output captured."""
    return subprocess.run(
        [promtool, "check", kind, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: run scripts/install"
    done = promtool_check(promtool, "rules", OPS / "prometheus" / "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
    config = promtool_check(promtool, "config", OPS / "prometheus" / "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def exported() -> set[str]:
    """Every series name the stages export (counters with _total, histograms' parts)."""
    out = set()
    for registry in (GatewayMetrics().registry, ProcessorMetrics().registry, sink_registry()):
        for metric in registry.collect():
            out.add(metric.name)
            out.update(sample.name for sample in metric.samples)
            if metric.type == "counter":
                out.add(f"{metric.name}_total")
            if metric.type == "histogram":
                out.update(f"{metric.name}_{part}" for part in ("bucket", "sum", "count"))
    return out


def referenced(expressions: list[str]) -> set[str]:
    words = set()
    for expr in expressions:
        words.update(re.findall(r"\b((?:gateway|processor|sink)_[a-z_]+)\b", expr))
    return words


def test_alerts_and_dashboard_only_name_metrics_the_stages_export() -> None:
    rules = (OPS / "prometheus" / "alerts.yml").read_text()
    dashboard = json.loads((OPS / "grafana" / "chargify-stream.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = referenced([rules, *exprs])
    assert used
    assert used - exported() == set()
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Dead letters by reason", "Parked events waiting", "Consumer lag"} <= titles
