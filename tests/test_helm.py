"""deploy/helm/heed: Helm's own engine (helm-python-sdk binds Helm's Go SDK; no cluster, no
binary) lints the chart and renders it in each layout; every manifest is checked against the
Kubernetes schemas offline, and what the pods run is checked against heed's CLI and settings."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from heed import config
from heed.cli import build_parser
from heed.eventlog import is_database_url
from heed.gpu import check_gpu_shares
from serving.auth import ApiKeys
from serving.config import ServeConfig
from serving.service import gpu_shares
from tests.test_deploy import (
    KUBERNETES_VERSIONS,
    _StrictLoader,
    check_heed_variables,
    containers,
    database_urls,
    env_of,
    secret_ref,
)
from training.config import TrainerFlags


def helm() -> Any:
    """helm_python, imported when a test here first runs: importing it loads Helm's Go library,
    whose runtime starts threads of its own in the test process; the tests before these (some
    timed to half a second on 2 cores) run without them."""
    import helm_python

    return helm_python


CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "heed"
# The Prometheus Operator's kinds: custom resources, whose schemas are not Kubernetes' own.
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
MONITORING = {"monitoring": {k: {"enabled": True} for k in ("serviceMonitor", "prometheusRule", "grafanaDashboard")}}
SQLITE = {"postgresql": {"enabled": False}}
GPUS = {"serving": {"replicas": 3, "gpus": 2, "tensorParallelSize": 2}, "trainer": {"gpus": 1}}
LAYOUTS: dict[str, dict[str, Any]] = {
    "postgresql": {},
    "sqlite": SQLITE,
    "external database": {"postgresql": {"enabled": False}, "database": {"url": "postgresql://heed:pw@db:5432/heed"}},
    "gpus and monitoring": {**GPUS, **MONITORING},
    "sqlite, gpus and monitoring": {**SQLITE, "serving": {"gpus": 1}, **MONITORING},
}


def render(values: dict[str, Any] | None = None) -> list[dict]:
    """The chart's objects for ``values`` (a release called heed)."""
    with helm().Chart.load(CHART) as chart:
        manifests = chart.render(values or {}, name="heed", namespace="heed")
    return [
        doc
        for path, text in sorted(manifests.items())
        if path.endswith(".yaml")
        for doc in yaml.load_all(text, Loader=_StrictLoader)
        if doc
    ]


def objects(values: dict[str, Any] | None = None) -> dict[tuple[str, str], dict]:
    """The chart's objects by (kind, name)."""
    docs = render(values)
    keyed = {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}
    assert len(keyed) == len(docs), "two objects of one kind share a name"
    return keyed


def settings(container: dict) -> Any:
    """The settings heed builds in ``container``: its flags over its literal HEED_* variables."""
    args = build_parser().parse_args(container["args"])  # exits (fails the test) on an unknown flag
    env = {name: entry["value"] for name, entry in env_of(container).items() if "value" in entry}
    cls, section = (ServeConfig, "serve") if args.command == "serve" else (TrainerFlags, "trainer")
    return config.load(cls, section, args, env=env)


def only_container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def volume_of(deployment: dict, mount_path: str) -> dict:
    pod = deployment["spec"]["template"]["spec"]
    (mount,) = [m for m in only_container(deployment)["volumeMounts"] if m["mountPath"] == mount_path]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume


def secret_value(objs: dict, name: str, key: str) -> str:
    return base64.b64decode(objs["Secret", name]["data"][key]).decode()


def test_the_chart_lints_clean() -> None:
    for values in LAYOUTS.values():
        report = helm().lint(CHART, values, strict=True)
        problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
        assert not report["errors"] and not problems, report


@pytest.mark.parametrize("values", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_every_manifest_is_valid_against_the_kubernetes_schemas(values: dict) -> None:
    docs = render(values)
    assert {doc["kind"] for doc in docs} >= {"Deployment", "Service", "Secret", "PersistentVolumeClaim"}
    for doc in docs:
        if doc["kind"] in OPERATOR_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["spec"]
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("values", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_the_pods_run_real_heed_commands_with_variables_heed_reads(values: dict) -> None:
    names: set[str] = set()
    for doc in render(values):
        if doc["kind"] == "Secret":  # the keys' Secret reaches the pods whole (envFrom)
            names |= set(doc["data"])
        for container in containers(doc):
            if container["name"] != "postgres":
                build_parser().parse_args(container["args"])  # exits (fails the test) on an unknown flag
            assert not database_urls(container)  # a URL (and its password) only ever in a Secret
            names |= set(env_of(container))

    assert {"HEED_API_KEYS", "HEED_ADMIN_KEYS", "HEED_CACHE_DIR"} <= names
    check_heed_variables({name for name in names if name.startswith("HEED_")})


def test_by_default_serving_and_the_trainer_are_separate_pods_on_an_in_cluster_postgresql() -> None:
    objs = objects()
    serving, trainer = objs["Deployment", "heed-serving"], objs["Deployment", "heed-trainer"]
    serve, train = settings(only_container(serving)), settings(only_container(trainer))
    serving_env, trainer_env = env_of(only_container(serving)), env_of(only_container(trainer))

    assert only_container(serving)["args"][0] == "serve" and only_container(trainer)["args"][0] == "trainer"
    assert serve.host == "0.0.0.0" and not serve.with_trainer
    assert trainer["spec"]["replicas"] == 1 and trainer["spec"]["strategy"] == {"type": "Recreate"}
    assert only_container(trainer)["resources"] != only_container(serving)["resources"]  # its own
    # the event log: one URL, in a Secret, naming the chart's PostgreSQL with its password
    assert secret_ref(serving_env["HEED_EVENT_LOG"]) == secret_ref(trainer_env["HEED_EVENT_LOG"])
    name, key = secret_ref(serving_env["HEED_EVENT_LOG"])
    url = urlsplit(secret_value(objs, name, key))
    postgres = objs["StatefulSet", "heed-postgresql"]
    pg_env = env_of(only_container(postgres))
    assert is_database_url(url.geturl()) and url.hostname == "heed-postgresql" and url.port == 5432
    assert objs["Service", "heed-postgresql"]["spec"]["selector"] == postgres["spec"]["selector"]["matchLabels"]
    assert url.password == secret_value(objs, *secret_ref(pg_env["POSTGRES_PASSWORD"]))
    assert (url.username, url.path) == (pg_env["POSTGRES_USER"]["value"], "/" + pg_env["POSTGRES_DB"]["value"])
    # the registry: one ReadWriteMany claim at the path both read from HEED_REGISTRY
    for deployment, env in ((serving, serving_env), (trainer, trainer_env)):
        registry = Path(env["HEED_REGISTRY"]["value"])
        claim = volume_of(deployment, str(registry.parent))["persistentVolumeClaim"]["claimName"]
        assert objs["PersistentVolumeClaim", claim]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "emptyDir" in volume_of(serving, str(serve.data_dir))  # the log and the state are in the database
    assert "persistentVolumeClaim" in volume_of(trainer, str(train.data_dir))
    # the trainer's /metrics is its liveness probe and its scraped port
    (port,) = only_container(trainer)["ports"]
    assert port["containerPort"] == train.metrics_port and train.metrics_host == "0.0.0.0"
    assert only_container(trainer)["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": port["name"]}


def test_the_serving_pod_has_probes_shm_ports_and_its_keys() -> None:
    objs = objects({"keys": {"apiKeys": "app:sk-a,web:sk-b", "adminKeys": "ops:adm-1"}})
    serving = objs["Deployment", "heed-serving"]
    container = only_container(serving)
    args = settings(container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service = objs["Service", "heed"]

    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert (ports["http"], ports["grpc"]) == (args.http_port, args.grpc_port) == (8000, 50051)
    assert volume_of(serving, "/dev/shm")["emptyDir"]["medium"] == "Memory"
    assert service["spec"]["selector"].items() <= serving["spec"]["template"]["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http", "grpc"}
    (keys,) = [e["secretRef"]["name"] for e in container["envFrom"]]
    assert secret_value(objs, keys, "HEED_API_KEYS") == "app:sk-a,web:sk-b"
    assert secret_value(objs, keys, "HEED_ADMIN_KEYS") == "ops:adm-1"
    assert serving["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001  # the image's user


def test_keys_not_given_are_generated_apart() -> None:
    objs = objects()
    api, admin = (secret_value(objs, "heed-keys", k) for k in ("HEED_API_KEYS", "HEED_ADMIN_KEYS"))

    callers, operators = ApiKeys.load(None, api), ApiKeys.load(None, admin, env="HEED_ADMIN_KEYS")  # as heed reads them
    api_key, admin_key = api.partition(":")[2], admin.partition(":")[2]

    assert callers.principal_for(f"Bearer {api_key}") == "app" and len(api_key) > 30
    assert operators.principal_for(f"Bearer {admin_key}") == "admin"
    assert not callers.overlaps(operators)
    assert objects()["Secret", "heed-keys"]["data"] != objs["Secret", "heed-keys"]["data"]  # not a fixed default
    with pytest.raises(helm().HelmError, match="must not be a caller's key"):
        render({"keys": {"apiKeys": "same", "adminKeys": "same"}})


def test_with_sqlite_one_pod_serves_and_trains_on_one_volume() -> None:
    objs = objects(SQLITE)
    (deployment,) = [doc for (kind, _), doc in objs.items() if kind == "Deployment"]
    container = only_container(deployment)
    args = settings(container)
    env = env_of(container)

    assert args.with_trainer and deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # one SQLite writer, never two pods
    claim = volume_of(deployment, str(args.data_dir))["persistentVolumeClaim"]["claimName"]
    assert objs["PersistentVolumeClaim", claim]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "HEED_EVENT_LOG" not in env and "HEED_REGISTRY" not in env  # both in the data directory
    assert not [kind for kind, _ in objs if kind in ("StatefulSet", "PodDisruptionBudget")]
    # the co-located trainer (a child of heed serve) serves its metrics on the pod's metrics port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert env["HEED_TRAINER_METRICS_PORT"]["value"] == str(ports["metrics"])
    with pytest.raises(helm().HelmError, match="needs PostgreSQL"):
        render({**SQLITE, "serving": {"replicas": 2}})
    with pytest.raises(helm().HelmError, match="two event logs"):
        render({"database": {"url": "postgresql://heed:pw@db/heed"}})


def test_gpus_are_requested_and_their_shares_passed_as_heed_serve_checks_them() -> None:
    objs = objects(GPUS)
    serving, trainer = objs["Deployment", "heed-serving"], objs["Deployment", "heed-trainer"]
    serve, train = settings(only_container(serving)), settings(only_container(trainer))

    assert only_container(serving)["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert only_container(trainer)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert serve.tensor_parallel_size == 2 and (serve.gpu_memory_utilization, serve.canary_gpu_memory_utilization) == (
        0.45,
        0.3,
    )
    assert train.rollout_gpu_memory_utilization == 0.5 and train.rollout == "vllm"  # its engine in that share
    assert objs["PodDisruptionBudget", "heed-serving"]["spec"]["minAvailable"] == 1
    assert "topologySpreadConstraints" in serving["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in only_container(objects()["Deployment", "heed-serving"])["resources"]["limits"]


@pytest.mark.parametrize(
    ("stable", "canary", "trainer"),
    [(0.45, 0.3, 0.15), (0.5, 0.45, 0.15), (0.6, 0.3, 0.1), (0.6, 0.36, 0.1), (0.7, 0.4, 0.0)],
)
@pytest.mark.parametrize("layout", [{}, SQLITE], ids=["separate trainer", "co-located trainer"])
def test_the_chart_refuses_the_gpu_shares_heed_serve_would_refuse(
    stable: float, canary: float, trainer: float, layout: dict
) -> None:
    serving = {"gpus": 1, "gpuMemoryUtilization": stable, "canaryGpuMemoryUtilization": canary}
    serving["trainerGpuMemoryUtilization"] = trainer or 0.01
    values = {**layout, "serving": serving}
    try:
        docs = render(values)
    except helm().HelmError as exc:
        assert "add up to" in str(exc)
        refused_by_chart = True
        # the flags the chart would have passed, as heed serve reads them
        flags = ["serve", "--gpu-memory-utilization", str(stable), "--canary-gpu-memory-utilization", str(canary)]
        if layout == SQLITE:
            flags += ["--with-trainer", "--trainer-gpu-memory-utilization", str(serving["trainerGpuMemoryUtilization"])]
        cfg = settings({"args": flags})
    else:
        refused_by_chart = False
        (deployment,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "heed-serving"]
        cfg = settings(only_container(deployment))
    try:
        check_gpu_shares(gpu_shares(cfg), 1)
        refused_by_heed = False
    except ValueError:
        refused_by_heed = True

    assert refused_by_chart == refused_by_heed


def test_monitoring_scrapes_both_and_carries_the_repositorys_rules_and_dashboard() -> None:
    objs = objects(MONITORING)
    service, trainer = objs["Service", "heed"], objs["Deployment", "heed-trainer"]
    monitor, pods = objs["ServiceMonitor", "heed"], objs["PodMonitor", "heed-trainer"]

    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert pods["spec"]["selector"]["matchLabels"].items() <= trainer["spec"]["template"]["metadata"]["labels"].items()
    trainer_ports = {p["name"] for p in only_container(trainer)["ports"]}
    assert {e["port"] for e in pods["spec"]["podMetricsEndpoints"]} <= trainer_ports
    rules = yaml.safe_load((CHART.parent.parent / "prometheus" / "alerts.yaml").read_text())
    assert objs["PrometheusRule", "heed"]["spec"] == rules
    dashboard = json.loads((CHART.parent.parent / "grafana" / "heed.json").read_text())
    configmap = objs["ConfigMap", "heed-dashboard"]
    assert json.loads(configmap["data"]["heed.json"]) == dashboard
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    # with SQLite the trainer's metrics are on the serving pod
    sqlite = objects({**SQLITE, **MONITORING})
    selector = sqlite["PodMonitor", "heed-trainer"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= sqlite["Deployment", "heed-serving"]["spec"]["template"]["metadata"]["labels"].items()
