"""The deploy/ manifests agree with the code: flags exist, ports and probe paths are served."""

from __future__ import annotations

from pathlib import Path

import yaml

from heed.cli import build_parser
from serving.config import ServeConfig

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys (a silent override in plain YAML)."""


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    duplicated = {k for k in keys if keys.count(k) > 1}
    assert not duplicated, f"duplicate keys {duplicated} at line {node.start_mark.line + 1}"
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=_StrictLoader) if doc]


def test_the_serving_deployment_runs_heed_serve_with_real_flags_ports_and_probes() -> None:
    docs = {doc["kind"]: doc for doc in load_all(DEPLOY / "kubernetes" / "serving.yaml")}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]

    args = build_parser().parse_args(container["args"])  # exits (fails the test) on an unknown flag
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    assert args.command == "serve" and args.host == "0.0.0.0"
    assert ports == {"http": ServeConfig().http_port, "grpc": ServeConfig().grpc_port}
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert docs["Deployment"]["spec"]["replicas"] == 1  # SQLite: one writer
    assert {"HEED_API_KEYS", "HEED_ADMIN_KEYS"} <= set(docs["Secret"]["stringData"])
    assert args.with_trainer is True
    service_ports = {p["name"]: p["targetPort"] for p in docs["Service"]["spec"]["ports"]}
    assert service_ports == {"http": "http", "grpc": "grpc"}


def test_prometheus_scrapes_the_metrics_path() -> None:
    (config,) = load_all(DEPLOY / "prometheus" / "scrape.yaml")
    (job,) = config["scrape_configs"]
    pod = load_all(DEPLOY / "kubernetes" / "serving.yaml")[2]["spec"]["template"]["metadata"]["annotations"]

    assert job["metrics_path"] == pod["prometheus.io/path"] == "/metrics"
    assert pod["prometheus.io/port"] == str(ServeConfig().http_port)
