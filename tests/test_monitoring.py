"""deploy/prometheus and deploy/grafana agree with heed's /metrics: the alert rules load and fire
when they should (promtool's own checks and unit tests), the Prometheus Operator's copy of them
is the same, and every query names only metrics heed exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from heed.trainer_files import TrainerFiles
from serving.metrics import ServiceMetrics
from training.exporter import TrainerMetrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "heed.json"
# Grafana's macros, as a range a rule file may hold.
MACROS = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: `make test` installs Debian's prometheus package (make promtool)"
    return path


def run(promtool: str, *args: str, cwd: Path = PROMETHEUS) -> str:
    result = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def alert_rules() -> dict:
    return yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def exposed_metrics(tmp_path: Path) -> set[str]:
    """Every series name the server's /metrics and the trainer's may carry."""
    names = set()
    trainer = TrainerMetrics(TrainerFiles(tmp_path / "trainer"))
    for family in [*ServiceMetrics().registry.collect(), *trainer.registry.collect()]:
        names |= {family.name + suffix for suffix in ("", "_total", "_bucket", "_sum", "_count", "_created")}
    return names


def test_the_alert_rules_load_and_fire_when_they_should(promtool: str) -> None:
    assert "SUCCESS: 10 rules found" in run(promtool, "check", "rules", "alerts.yaml")
    run(promtool, "test", "rules", "alerts_test.yaml")  # each alert's firing and quiet cases
    alerts = {r["alert"] for group in alert_rules()["groups"] for r in group["rules"]}
    # What an operator must hear of: errors, the event log, a dead engine, a canary left undecided,
    # rounds that publish nothing.
    must = {"HeedHighErrorRate", "HeedEventLogWriteFailures", "HeedEngineDown", "HeedCanaryStuck"}
    assert must | {"HeedTrainerRoundsFailing"} <= alerts
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts_test.yaml").read_text()))
    assert tested == alerts  # every alert has its unit test


def test_the_dashboards_queries_parse(promtool: str, tmp_path: Path) -> None:
    def expand(expr: str) -> str:
        for macro, value in MACROS.items():
            expr = expr.replace(macro, value)
        return expr

    rules = [{"record": f"heed:panel:{i}", "expr": expand(e)} for i, e in enumerate(dashboard_queries())]
    (tmp_path / "panels.yaml").write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in run(promtool, "check", "rules", "panels.yaml", cwd=tmp_path)


def test_every_query_names_only_metrics_heed_exposes(tmp_path: Path) -> None:
    exposed = exposed_metrics(tmp_path)
    queries = [r["expr"] for group in alert_rules()["groups"] for r in group["rules"]] + dashboard_queries()
    named = {name for query in queries for name in re.findall(r"\bheed_[a-z_]+\b", query)}
    assert named and named <= exposed, sorted(named - exposed)
    dashboard = json.loads(DASHBOARD.read_text())
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_the_operators_copy_scrapes_heeds_service_and_holds_the_same_rules() -> None:
    monitor, pods, rule = [d for d in yaml.safe_load_all((PROMETHEUS / "operator.yaml").read_text()) if d]
    assert (monitor["kind"], pods["kind"], rule["kind"]) == ("ServiceMonitor", "PodMonitor", "PrometheusRule")
    (trainer,) = [
        d
        for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "replicated" / "trainer.yaml").read_text())
        if d and d["kind"] == "Deployment"
    ]
    template = trainer["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert pods["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (endpoint,) = pods["spec"]["podMetricsEndpoints"]
    (port,) = [p for p in container["ports"] if p["name"] == endpoint["port"]]
    args = container["args"]
    assert args[args.index("--metrics-port") + 1] == str(port["containerPort"])
    assert rule["spec"] == alert_rules()
    selector = monitor["spec"]["selector"]["matchLabels"]
    port = monitor["spec"]["endpoints"][0]["port"]
    services = [
        d
        for path in (DEPLOY / "kubernetes").rglob("*.yaml")
        for d in yaml.safe_load_all(path.read_text())
        if d and d.get("kind") == "Service" and d["metadata"]["name"] == "heed"
    ]
    assert len(services) == 2  # one node, and the replicated set-up
    for service in services:
        assert selector.items() <= service["metadata"].get("labels", {}).items()
        assert port in {p["name"] for p in service["spec"]["ports"]}
