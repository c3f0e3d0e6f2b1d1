"""The deploy/ manifests agree with the code: flags exist, ports and probe paths are served, the
HEED_* variables are ones heed reads; and they are valid Kubernetes objects (kubernetes-validate
checks them against the Kubernetes schemas it bundles, offline)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from heed.cli import build_parser
from heed.config import OTHER_VARIABLES, SECTIONS
from heed.eventlog import is_database_url
from serving.config import ServeConfig
from training.config import TrainerFlags

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
REPLICATED = KUBERNETES / "replicated"
# Kubernetes objects; a kustomization.yaml is kustomize's, not one (kubectl apply -k reads it).
MANIFESTS = sorted(path for path in KUBERNETES.rglob("*.yaml") if path.name != "kustomization.yaml")
KUSTOMIZATIONS = sorted(KUBERNETES.rglob("kustomization.yaml"))
# The oldest Kubernetes the manifests are meant for, and the newest one kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
# The config class of each section a HEED_<SECTION>_<FIELD> variable in the manifests may name.
SECTION_CLASSES: dict[str, Any] = {"serve": ServeConfig, "trainer": TrainerFlags}


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


def by_kind(path: Path) -> dict[str, dict]:
    """The file's objects by kind (each kind once per file)."""
    docs = load_all(path)
    kinds = [doc["kind"] for doc in docs]
    assert len(set(kinds)) == len(kinds), f"{path}: several objects of one kind: {kinds}"
    return {doc["kind"]: doc for doc in docs}


def containers(doc: dict) -> list[dict]:
    """A workload's containers (init containers too); none for other kinds."""
    if doc["kind"] not in ("Deployment", "StatefulSet"):
        return []
    pod = doc["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def env_of(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def strings(value: Any) -> Iterator[str]:
    """Every string inside ``value`` (dicts' keys and values, lists' items)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings(key)
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def database_urls(value: Any) -> list[str]:
    """The strings inside ``value`` that hold a PostgreSQL URL (and maybe its password)."""
    return [text for text in strings(value) if "postgresql://" in text or "postgres://" in text]


def mounted_claim(deployment: dict, path: str) -> str:
    """The PersistentVolumeClaim mounted where ``path`` is (its deepest mount)."""
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = [m for m in container["volumeMounts"] if PurePosixPath(path).is_relative_to(m["mountPath"])]
    assert mounts, f"{path} is on no volume of {deployment['metadata']['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "persistentVolumeClaim" in volume, f"{path} is on {volume}, not on a PersistentVolumeClaim"
    return volume["persistentVolumeClaim"]["claimName"]


def secret_ref(entry: dict) -> tuple[str, str]:
    """(Secret, key) that the env entry takes its value from; fails for a literal value."""
    assert "value" not in entry, f"{entry['name']} is a literal value, not taken from a Secret"
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def test_the_serving_deployment_runs_heed_serve_with_real_flags_ports_and_probes() -> None:
    docs = {doc["kind"]: doc for doc in load_all(DEPLOY / "kubernetes" / "serving.yaml")}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]

    args = build_parser().parse_args(container["args"])  # exits (fails the test) on an unknown flag
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    assert args.command == "serve" and args.host == "0.0.0.0"
    assert ports == {"http": ServeConfig().http_port, "grpc": ServeConfig().grpc_port}
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert docs["Deployment"]["spec"]["replicas"] == 1  # this layout's SQLite log has one writer
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


def test_the_manifests_are_found() -> None:
    names = {str(path.relative_to(KUBERNETES)) for path in MANIFESTS}

    assert {"serving.yaml", "postgres.yaml", "replicated/serving.yaml", "replicated/trainer.yaml"} <= names


def test_each_kustomization_lists_every_manifest_beside_it() -> None:
    assert KUSTOMIZATIONS == [REPLICATED / "kustomization.yaml"]
    for path in KUSTOMIZATIONS:
        (kustomization,) = load_all(path)
        beside = {p.name for p in path.parent.glob("*.yaml")} - {path.name}

        assert kustomization["kind"] == "Kustomization"
        assert sorted(kustomization["resources"]) == sorted(beside)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: str(path.relative_to(KUBERNETES)))
def test_every_manifest_is_valid_against_the_kubernetes_schemas(path: Path) -> None:
    for doc in load_all(path):
        for version in KUBERNETES_VERSIONS:
            # strict: a field the schema does not have is an error (kubectl would drop it or refuse)
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    ("break_it", "error"),
    [
        (
            lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinesProbe={}),
            "'readinesProbe' was unexpected",
        ),
        (lambda d: d["spec"].update(replica=2), "'replica' was unexpected"),  # beside the real field
        (lambda d: d["spec"].update(replicas="2"), "'2' is not of type 'integer'"),
        (
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"].update(
                secretKeyRef={"nmae": "heed-secrets", "key": "HEED_API_KEYS"}
            ),
            "'nmae' was unexpected",
        ),
        (lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"), "'name' is a required property"),
    ],
    ids=["container field", "spec field", "type", "deep field", "required field"],
)
def test_the_schema_check_fails_on_a_broken_copy(break_it: Any, error: str) -> None:
    deployment = by_kind(REPLICATED / "serving.yaml")["Deployment"]
    broken = copy.deepcopy(deployment)
    break_it(broken)

    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(deployment, version, strict=True)
        with pytest.raises(kubernetes_validate.ValidationError) as caught:
            kubernetes_validate.validate(broken, version, strict=True)
        assert error in caught.value.message


def test_the_replicated_serving_deployment_runs_several_replicas_without_the_trainer() -> None:
    docs = by_kind(REPLICATED / "serving.yaml")
    deployment = docs["Deployment"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    args = build_parser().parse_args(container["args"])  # exits (fails the test) on an unknown flag
    env = env_of(container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (data,) = [m["name"] for m in container["volumeMounts"] if m["mountPath"] == args.data_dir]

    assert args.command == "serve" and args.host == "0.0.0.0"
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert not args.with_trainer and "HEED_SERVE_WITH_TRAINER" not in env  # trainer.yaml runs it
    assert args.event_log is None and secret_ref(env["HEED_EVENT_LOG"]) == ("heed-secrets", "HEED_EVENT_LOG")
    assert not database_urls(container)  # no URL (nor password) in sight
    assert "emptyDir" in volumes[data]  # the log and the rollout state are in the database
    assert ports == {"http": ServeConfig().http_port, "grpc": ServeConfig().grpc_port}
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert (
        pod["metadata"]["annotations"]
        == load_all(KUBERNETES / "serving.yaml")[2]["spec"]["template"]["metadata"]["annotations"]
    )
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert docs["PodDisruptionBudget"]["spec"] == {"minAvailable": 1, "selector": {"matchLabels": selector}}
    assert docs["Service"]["spec"]["selector"] == selector
    service_ports = {p["name"]: (p["targetPort"], p.get("appProtocol")) for p in docs["Service"]["spec"]["ports"]}
    assert service_ports == {"http": ("http", None), "grpc": ("grpc", "grpc")}


def test_the_trainer_is_one_pod_with_a_volume_of_its_own() -> None:
    docs = by_kind(REPLICATED / "trainer.yaml")
    deployment = docs["Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(container["args"])
    env = env_of(container)

    assert args.command == "trainer" and args.trainer_command is None  # follows the log until stopped
    assert deployment["spec"]["replicas"] == 1  # a second trainer would wait on the database's lock
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert args.event_log is None and secret_ref(env["HEED_EVENT_LOG"]) == ("heed-secrets", "HEED_EVENT_LOG")
    assert not database_urls(container)
    claim = docs["PersistentVolumeClaim"]
    assert mounted_claim(deployment, args.data_dir) == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_serving_and_trainer_share_one_readwritemany_registry() -> None:
    serving = by_kind(REPLICATED / "serving.yaml")["Deployment"]
    trainer = by_kind(REPLICATED / "trainer.yaml")["Deployment"]
    claims = {
        doc["metadata"]["name"]: doc
        for path in REPLICATED.glob("*.yaml")
        for doc in load_all(path)
        if doc["kind"] == "PersistentVolumeClaim"
    }

    registries = set()
    for deployment in (serving, trainer):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert "--registry" not in container["args"]
        registry = env_of(container)["HEED_REGISTRY"]["value"]
        registries.add((registry, mounted_claim(deployment, registry)))
    ((_, claim),) = registries  # one path, on one claim, in both
    assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_every_secret_key_the_pods_take_is_in_the_secret() -> None:
    secrets = {
        doc["metadata"]["name"]: doc["stringData"]
        for path in MANIFESTS
        for doc in load_all(path)
        if doc["kind"] == "Secret"
    }
    refs = [
        secret_ref(entry)
        for path in MANIFESTS
        for doc in load_all(path)
        for container in containers(doc)
        for entry in container.get("env", [])
        if "valueFrom" in entry
    ]

    assert refs
    for name, key in refs:
        assert key in secrets[name], f"{name} has no {key}"


def test_every_heed_variable_in_the_manifests_is_one_heed_reads() -> None:
    names: set[str] = set()
    for path in MANIFESTS:
        for doc in load_all(path):
            if doc["kind"] == "Secret":  # serving.yaml's pods take its keys as variables (envFrom)
                names |= set(doc["stringData"])
            for container in containers(doc):
                names |= set(env_of(container))
    names = {name for name in names if name.startswith("HEED_")}

    assert {"HEED_API_KEYS", "HEED_ADMIN_KEYS", "HEED_EVENT_LOG", "HEED_REGISTRY"} <= names
    check_heed_variables(names)


def check_heed_variables(names: set[str]) -> None:
    """Each HEED_* name is a setting of a config section heed has, or another variable heed reads."""
    for name in names - OTHER_VARIABLES:
        section, _, field = name.removeprefix("HEED_").lower().partition("_")
        assert section in SECTIONS, f"{name} is neither a setting nor a variable heed reads"
        assert section in SECTION_CLASSES, f"{name}: add the [{section}] config class to SECTION_CLASSES"
        assert field in {f.name for f in dataclasses.fields(SECTION_CLASSES[section])}, f"[{section}] has no {field}"


def test_the_in_cluster_postgres_is_the_one_the_replicated_layout_names() -> None:
    docs = by_kind(KUBERNETES / "postgres.yaml")
    statefulset, service = docs["StatefulSet"], docs["Service"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    env = env_of(container)
    url = urlsplit(by_kind(REPLICATED / "secret.yaml")["Secret"]["stringData"]["HEED_EVENT_LOG"])
    password_secret, password_key = secret_ref(env["POSTGRES_PASSWORD"])
    (port,) = service["spec"]["ports"]

    assert is_database_url(url.geturl())
    assert service["spec"]["clusterIP"] == "None" and statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == statefulset["spec"]["selector"]["matchLabels"]
    assert (url.hostname, url.port) == (service["metadata"]["name"], port["port"])
    assert (url.username, url.path) == (env["POSTGRES_USER"]["value"], "/" + env["POSTGRES_DB"]["value"])
    assert password_secret == docs["Secret"]["metadata"]["name"]
    assert url.password == docs["Secret"]["stringData"][password_key]  # one password, set in both files
    assert [t["spec"]["accessModes"] for t in statefulset["spec"]["volumeClaimTemplates"]] == [["ReadWriteOnce"]]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"][0] == "pg_isready"
