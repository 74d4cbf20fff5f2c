"""The container image and Kubernetes manifests (Dockerfile, deploy/k8s).

Renders each overlay with kustomize (`kubectl kustomize`, or a standalone `kustomize build`)
and checks what the deployment relies on; validates the output with kubernetes-validate and
yamllint when they are installed (the dev extra has both).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from collections import Counter
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the dev extra")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
HERE = Path(__file__).resolve().parent
TARGETS = {
    "cpu": K8S / "overlays" / "cpu",
    "gpu": K8S / "overlays" / "gpu",
    # the GPU overlay with every component (servicemonitor, worker HPA, models-from-image)
    "all": HERE / "all-components",
}
NAMESPACE = "meshserve"
TIERS = ("gateway", "batcher", "worker", "cache")
GRPC_PORTS = {"gateway": 8001, "batcher": 8011, "worker": 8021, "cache": 8031}
METRICS_PORTS = {"gateway": 8002, "batcher": 8012, "worker": 8022, "cache": 8032}
OLDEST_KUBERNETES = "1.27.0"  # native gRPC probes are GA from 1.27 on

BASE_KINDS = {
    "Namespace": 1, "ServiceAccount": 6, "ConfigMap": 6, "Secret": 1, "Service": 6,
    "PersistentVolumeClaim": 1, "Deployment": 4, "StatefulSet": 2,
    "PodDisruptionBudget": 4, "HorizontalPodAutoscaler": 1, "NetworkPolicy": 7,
}
EXPECTED_KINDS = {
    "cpu": BASE_KINDS,
    "gpu": BASE_KINDS,
    "all": {**BASE_KINDS, "PersistentVolumeClaim": 0, "HorizontalPodAutoscaler": 2,
            "ServiceMonitor": 4,
            # components/async-runner: its Deployment, ConfigMap, ServiceAccount, PDB, policy
            "Deployment": 5, "ConfigMap": 7, "ServiceAccount": 7, "PodDisruptionBudget": 5,
            "NetworkPolicy": 8},
}


def _renderer() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


@pytest.fixture(scope="module")
def rendered() -> dict[str, tuple[str, list[dict]]]:
    """{target: (YAML text, objects)} for every kustomize target."""
    command = _renderer()
    if command is None:
        pytest.skip("needs kubectl (kustomize built in) or kustomize on the PATH")
    out = {}
    for name, path in TARGETS.items():
        text = subprocess.run([*command, str(path)], check=True, capture_output=True,
                              text=True, timeout=120).stdout
        out[name] = (text, [d for d in yaml.safe_load_all(text) if d])
    return out


def objects(rendered, target: str, kind: str | None = None) -> list[dict]:
    return [o for o in rendered[target][1] if kind is None or o["kind"] == kind]


def get(rendered, target: str, kind: str, name: str) -> dict:
    found = [o for o in objects(rendered, target, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{target}: expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def main_container(workload: dict) -> dict:
    return pod_spec(workload)["containers"][0]


def settings(rendered, target: str, tier: str) -> dict[str, str]:
    """The MESHSERVE_* variables a tier's Deployment gets through envFrom, and its own env
    values (which win, as in Kubernetes)."""
    deployment = get(rendered, target, "Deployment", f"meshserve-{tier}")
    env: dict[str, str] = {}
    for source in main_container(deployment).get("envFrom", []):
        config_map = get(rendered, target, "ConfigMap", source["configMapRef"]["name"])
        env.update(config_map["data"])
    env.update({e["name"]: e["value"] for e in main_container(deployment).get("env", [])
                if "value" in e})
    return env


def workloads(rendered, target: str) -> list[dict]:
    return objects(rendered, target, "Deployment") + objects(rendered, target, "StatefulSet")


@pytest.mark.parametrize("target", TARGETS)
def test_object_kinds_per_overlay(rendered, target):
    kinds = Counter(o["kind"] for o in objects(rendered, target))
    print(f"{target}: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    assert kinds == Counter({k: n for k, n in EXPECTED_KINDS[target].items() if n})


@pytest.mark.parametrize("target", TARGETS)
def test_everything_is_in_the_namespace(rendered, target):
    for o in objects(rendered, target):
        if o["kind"] == "Namespace":
            assert o["metadata"]["name"] == NAMESPACE
        else:
            assert o["metadata"].get("namespace") == NAMESPACE, o["metadata"]["name"]


@pytest.mark.parametrize("target", TARGETS)
def test_containers_run_hardened(rendered, target):
    for workload in workloads(rendered, target):
        spec = pod_spec(workload)
        pod = spec.get("securityContext", {})
        assert spec["automountServiceAccountToken"] is False
        assert spec["enableServiceLinks"] is False
        assert spec["serviceAccountName"] == workload["metadata"]["name"]
        for c in spec["containers"] + spec.get("initContainers", []):
            where = f"{target} {workload['metadata']['name']}/{c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod.get("runAsUser", 0)) > 0, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc.get("capabilities", {}).get("add") is None, where
            seccomp = sc.get("seccompProfile", pod.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), where
        # a read-only root filesystem: scratch space is an emptyDir at /tmp
        volumes = {v["name"]: v for v in spec["volumes"]}
        tmp = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert len(tmp) == 1 and "emptyDir" in volumes[tmp[0]["name"]]


@pytest.mark.parametrize("target", TARGETS)
def test_every_deployment_has_grpc_probes_and_drains_in_time(rendered, target):
    for tier in TIERS:
        deployment = get(rendered, target, "Deployment", f"meshserve-{tier}")
        container = main_container(deployment)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        http = {"http": 8000} if tier == "gateway" else {}  # the same API over HTTP/JSON
        assert ports == {"grpc": GRPC_PORTS[tier], **http, "metrics": METRICS_PORTS[tier]}
        assert container["args"] == [tier]
        # readiness is grpc.health.v1 on the gRPC port: NOT_SERVING (start-up, drain)
        # takes the pod out of its Service at once
        assert container["readinessProbe"]["grpc"]["port"] == GRPC_PORTS[tier]
        for probe in ("startupProbe", "livenessProbe"):
            spec = container[probe]
            # grpc.health.v1 where a tier's health does not follow another tier's; else the
            # listener only (a worker outage must not restart gateways and batchers)
            # (the gateway's liveness: its event loop answers HTTP, /v2/health/live)
            assert (spec.get("grpc", {}).get("port") == GRPC_PORTS[tier]
                    or spec.get("tcpSocket", {}).get("port") in ("grpc", GRPC_PORTS[tier])
                    or (tier, probe) == ("gateway", "livenessProbe")
                    and spec["httpGet"] == {"path": "/v2/health/live", "port": "http"}), \
                f"{tier} {probe}"
        if tier in ("worker", "cache"):
            assert container["livenessProbe"]["grpc"]["port"] == GRPC_PORTS[tier]
        grace_s = float(settings(rendered, target, tier)["MESHSERVE_GRACE_S"])
        assert pod_spec(deployment)["terminationGracePeriodSeconds"] >= grace_s + 10


def test_gpu_overlay_gives_each_worker_one_gpu(rendered):
    worker = get(rendered, "gpu", "Deployment", "meshserve-worker")
    spec = pod_spec(worker)
    resources = main_container(worker)["resources"]
    assert int(resources["requests"]["nvidia.com/gpu"]) == 1
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} \
        in spec["tolerations"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert settings(rendered, "gpu", "worker")["MESHSERVE_DEVICE"] == "cuda:0"
    assert worker["spec"]["replicas"] >= 1
    # no spare GPU for a surge pod during a rollout
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    for workload in workloads(rendered, "gpu"):
        image = main_container(workload)["image"]
        assert image.startswith("redis:") or image.endswith(":0.1.0-gpu"), image
        if workload["metadata"]["name"] != "meshserve-worker":
            for c in pod_spec(workload)["containers"]:
                assert "nvidia.com/gpu" not in str(c["resources"])


def test_cpu_overlay_runs_workers_on_cpu(rendered):
    assert settings(rendered, "cpu", "worker")["MESHSERVE_DEVICE"] == "cpu"
    assert "nvidia.com/gpu" not in rendered["cpu"][0]
    for workload in workloads(rendered, "cpu"):
        image = main_container(workload)["image"]
        assert image.startswith("redis:") or image.endswith(":0.1.0-cpu"), image


@pytest.mark.parametrize("target", TARGETS)
def test_services_name_their_ports_and_select_their_pods(rendered, target):
    for tier in (*TIERS, "redis", "state"):
        service = get(rendered, target, "Service", f"meshserve-{tier}")
        names = {p["name"] for p in service["spec"]["ports"]}
        assert names == ({"redis"} if tier in ("redis", "state") else {"grpc", "metrics"}
                         | ({"http"} if tier == "gateway" else set()))
        kind = "StatefulSet" if tier in ("redis", "state") else "Deployment"
        pods = get(rendered, target, kind, f"meshserve-{tier}")["spec"]["template"]
        labels = pods["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        container_ports = {p["name"] for p in main_container({"spec": {"template": pods}})["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    # inside the mesh, clients resolve every pod (headless) and balance per stream
    for tier in ("batcher", "worker", "cache", "redis", "state"):
        assert get(rendered, target, "Service", f"meshserve-{tier}")["spec"]["clusterIP"] == "None"
    gateway = get(rendered, target, "Service", "meshserve-gateway")["spec"]
    assert gateway.get("clusterIP") != "None"


def _dns_target(value: str) -> tuple[str, int]:
    match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", value)
    assert match, f"{value!r} is not dns:///name:port"
    return match[1], int(match[2])


@pytest.mark.parametrize("target", TARGETS)
def test_clients_use_dns_targets_of_headless_services(rendered, target):
    pairs = [("gateway", "MESHSERVE_BATCHER", "batcher"), ("gateway", "MESHSERVE_CACHE", "cache"),
             ("batcher", "MESHSERVE_WORKERS", "worker")]
    for client, variable, server in pairs:
        host, port = _dns_target(settings(rendered, target, client)[variable])
        service = get(rendered, target, "Service", host)
        assert service["metadata"]["name"] == f"meshserve-{server}"
        assert service["spec"]["clusterIP"] == "None"
        assert {"name": "grpc", "port": port} in [
            {"name": p["name"], "port": p["port"]} for p in service["spec"]["ports"]]
    redis_url = settings(rendered, target, "cache")["MESHSERVE_REDIS_URL"]
    assert re.fullmatch(r"redis://meshserve-redis:6379/\d+", redis_url)
    for tier in ("gateway", "batcher", "worker"):
        assert settings(rendered, target, tier)["MESHSERVE_MODEL_REPOSITORY"] == "/models"


@pytest.mark.parametrize("target", TARGETS)
def test_gateways_and_batchers_share_the_state_redis(rendered, target):
    """Durable async tasks, shared routing policies and rate limits (gateways) and the
    cluster's model control (gateways and batchers) in the state Redis, apart from the
    cache's, with its password from a Secret."""
    state_url = "redis://:$(REDIS_PASSWORD)@meshserve-state:6379/0"
    tiers = ("gateway", "batcher", *(("async-runner",) if target == "all" else ()))
    for tier in tiers:
        assert settings(rendered, target, tier)["MESHSERVE_REDIS_URL"] == state_url, tier
        env = main_container(get(rendered, target, "Deployment", f"meshserve-{tier}"))["env"]
        password = [e for e in env if e["name"] == "REDIS_PASSWORD"][0]
        assert password["valueFrom"]["secretKeyRef"]["name"] == "meshserve-state-redis"
    assert "meshserve-state" not in settings(rendered, target, "cache")["MESHSERVE_REDIS_URL"]


def test_async_runner_component(rendered):
    runner = get(rendered, "all", "Deployment", "meshserve-async-runner")
    container = main_container(runner)
    assert container["args"] == ["async-runner"]
    env = settings(rendered, "all", "async-runner")
    assert env["MESHSERVE_REDIS_URL"] == settings(rendered, "all", "gateway")["MESHSERVE_REDIS_URL"]
    assert env["MESHSERVE_BATCHER"] == settings(rendered, "all", "gateway")["MESHSERVE_BATCHER"]
    assert env["MESHSERVE_CACHE"] == settings(rendered, "all", "gateway")["MESHSERVE_CACHE"]
    # the gateways only queue tasks then; the runners run them
    assert settings(rendered, "all", "gateway")["MESHSERVE_ASYNC_RUNNERS"] == "0"
    assert "MESHSERVE_ASYNC_RUNNERS" not in settings(rendered, "gpu", "gateway")
    assert container["readinessProbe"]["grpc"]["port"] == 8041
    assert {p["containerPort"] for p in container["ports"]} == {8041, 8042}
    # models-from-image reaches the runner too (no claim left to mount)
    assert not [v for v in pod_spec(runner)["volumes"] if "persistentVolumeClaim" in v]


def _allowed(policies: list[dict], tier: str, port: int) -> set[str]:
    """Who may reach `port` of `tier` pods: "any", "pod:<name>" or "namespace:<name>"."""
    sources: set[str] = set()
    for policy in policies:
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if selector and selector != {"app.kubernetes.io/name": f"meshserve-{tier}"}:
            continue
        for rule in policy["spec"].get("ingress", []):
            if all(p["port"] != port for p in rule.get("ports", [{"port": port}])):
                continue
            if "from" not in rule:
                sources.add("any")
            for peer in rule.get("from", []):
                assert set(peer) <= {"podSelector", "namespaceSelector"}, peer
                if "namespaceSelector" in peer:
                    labels = peer["namespaceSelector"]["matchLabels"]
                    sources.add("namespace:" + labels["kubernetes.io/metadata.name"])
                else:
                    sources.add("pod:" + peer["podSelector"]["matchLabels"]
                                ["app.kubernetes.io/name"])
    return sources


@pytest.mark.parametrize("target", TARGETS)
def test_network_policies_deny_by_default_and_allow_each_tier_its_callers(rendered, target):
    policies = objects(rendered, target, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert len(deny) == 1 and deny[0]["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny[0]["spec"] and "egress" not in deny[0]["spec"]
    # components/async-runner: the runners call batchers, caches and Redis like a gateway
    runner = {"pod:meshserve-async-runner"} if target == "all" else set()
    callers = {"gateway": {"namespace:ingress-nginx"}, "batcher": {"pod:meshserve-gateway", *runner},
               "worker": {"pod:meshserve-batcher"}, "cache": {"pod:meshserve-gateway", *runner}}
    for tier, caller in callers.items():
        assert _allowed(policies, tier, GRPC_PORTS[tier]) == caller, tier
        assert _allowed(policies, tier, METRICS_PORTS[tier]) == {"namespace:monitoring"}, tier
    assert _allowed(policies, "gateway", 8000) == {"namespace:ingress-nginx"}  # like gRPC
    # The cache's Redis: its entries, cache pods only. The state Redis: the gateways' tasks,
    # policies, rate limits, model control; the batchers' model control.
    assert _allowed(policies, "redis", 6379) == {"pod:meshserve-cache"}
    assert _allowed(policies, "state", 6379) == {
        "pod:meshserve-gateway", "pod:meshserve-batcher", *runner}
    if runner:
        assert _allowed(policies, "async-runner", 8041) == set()  # nothing calls it
        assert _allowed(policies, "async-runner", 8042) == {"namespace:monitoring"}
    # every tier has a policy of its own
    selected = {p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name")
                for p in policies}
    assert {f"meshserve-{t}" for t in (*TIERS, "redis", "state")} <= selected


@pytest.mark.parametrize("target", TARGETS)
def test_disruption_budgets_and_autoscaling(rendered, target):
    for tier in TIERS:
        pdb = get(rendered, target, "PodDisruptionBudget", f"meshserve-{tier}")
        assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": f"meshserve-{tier}"}
    hpa = get(rendered, target, "HorizontalPodAutoscaler", "meshserve-gateway")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "meshserve-gateway"}
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["minReplicas"] >= 2
    # the HPA owns the gateway count
    assert "replicas" not in get(rendered, target, "Deployment", "meshserve-gateway")["spec"]


def test_worker_hpa_component_scales_on_batcher_queue_depth(rendered):
    hpa = get(rendered, "all", "HorizontalPodAutoscaler", "meshserve-worker")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "meshserve-worker"
    metric = hpa["metrics"][0]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "meshserve_batcher_queue_depth"
    assert hpa["maxReplicas"] <= get(rendered, "gpu", "Deployment",
                                     "meshserve-worker")["spec"]["replicas"]
    assert "replicas" not in get(rendered, "all", "Deployment", "meshserve-worker")["spec"]
    rules = yaml.safe_load((K8S / "components" / "worker-hpa-queue-depth" /
                            "prometheus-adapter-rules.yaml").read_text())
    external = yaml.safe_load(rules["data"]["config.yaml"])["externalRules"]
    assert external[0]["name"]["as"] == "meshserve_batcher_queue_depth"


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_model_repository_from_a_read_only_claim(rendered, target):
    claim = get(rendered, target, "PersistentVolumeClaim", "meshserve-models")
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    for tier in ("gateway", "batcher", "worker"):
        deployment = get(rendered, target, "Deployment", f"meshserve-{tier}")
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        mount = [m for m in main_container(deployment)["volumeMounts"]
                 if m["mountPath"] == "/models"]
        assert len(mount) == 1 and mount[0]["readOnly"] is True
        assert volumes[mount[0]["name"]]["persistentVolumeClaim"]["claimName"] == "meshserve-models"


def test_model_repository_from_the_models_image(rendered):
    for tier in ("gateway", "batcher", "worker"):
        deployment = get(rendered, "all", "Deployment", f"meshserve-{tier}")
        spec = pod_spec(deployment)
        volumes = {v["name"]: v for v in spec["volumes"]}
        mount = [m for m in main_container(deployment)["volumeMounts"]
                 if m["mountPath"] == "/models"][0]
        assert set(volumes[mount["name"]]) == {"name", "emptyDir"}
        [init] = spec["initContainers"]
        assert init["image"].startswith("meshserve-models:")
        assert init["command"][-1] == "/mnt/models/"
        assert {"name": mount["name"], "mountPath": "/mnt/models"} in init["volumeMounts"]


def test_service_monitors_scrape_every_metrics_port(rendered):
    monitors = {m["metadata"]["name"]: m for m in objects(rendered, "all", "ServiceMonitor")}
    assert set(monitors) == {f"meshserve-{t}" for t in TIERS}
    for tier in TIERS:
        spec = monitors[f"meshserve-{tier}"]["spec"]
        service = get(rendered, "all", "Service", f"meshserve-{tier}")
        assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert [e["port"] for e in spec["endpoints"]] == ["metrics"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name, policy", [("redis", "volatile-lru"), ("state", "noeviction")])
def test_redis_is_bounded_and_has_no_persistence(rendered, target, name, policy):
    """The cache's Redis evicts its least used entries; the state Redis never evicts (a
    full one refuses writes) and needs its password."""
    redis = get(rendered, target, "StatefulSet", f"meshserve-{name}")
    container = main_container(redis)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_volume = [v for v in pod_spec(redis)["volumes"] if v["name"] == "config"][0]
    config_map = get(rendered, target, "ConfigMap", config_volume["configMap"]["name"])
    conf_path = container["command"][1]
    assert conf_path == f"{mounts['config']}/redis.conf"
    conf = dict(line.split(None, 1) for line in config_map["data"]["redis.conf"].splitlines()
                if line.strip() and not line.startswith("#"))
    assert conf["maxmemory-policy"] == policy
    if name == "state":
        assert container["command"][2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
        password = [e for e in container["env"] if e["name"] == "REDIS_PASSWORD"][0]
        assert password["valueFrom"]["secretKeyRef"]["name"] == "meshserve-state-redis"
    maxmemory_mib = int(conf["maxmemory"].removesuffix("mb"))
    limit_mib = int(container["resources"]["limits"]["memory"].removesuffix("Mi"))
    assert maxmemory_mib < limit_mib  # room for Redis's own overhead
    assert conf["save"] == '""' and conf["appendonly"] == "no"


@pytest.mark.parametrize("target", TARGETS)
def test_schemas_strict(rendered, target):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    for version in (OLDEST_KUBERNETES, kv.latest_version()):
        for o in objects(rendered, target):
            try:
                kv.validate(o, version, strict=True)
            except kv.SchemaNotFoundError:
                assert o["kind"] == "ServiceMonitor", o["kind"]  # a CRD: no built-in schema
    rules = K8S / "components" / "worker-hpa-queue-depth" / "prometheus-adapter-rules.yaml"
    kv.validate(yaml.safe_load(rules.read_text()), kv.latest_version(), strict=True)


def test_yamllint(rendered):
    pytest.importorskip("yamllint", reason="yamllint not installed")
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(HERE / "yamllint.yaml"))
    texts = {str(p.relative_to(ROOT)): p.read_text()
             for p in sorted([*K8S.rglob("*.yaml"), *HERE.rglob("*.yaml")])}
    texts.update({f"rendered {t}": text for t, (text, _) in rendered.items()})
    problems = [f"{name}:{p.line}: {p.message}"
                for name, text in texts.items() for p in linter.run(text, config)]
    assert problems == []


# --- the image ------------------------------------------------------------------------------

def test_locked_requirements_pin_every_runtime_dependency():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "requirements" / "runtime.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            [spec] = requirement.specifier
            assert spec.operator == "==", f"{line}: not an exact pin"
            pins[canonicalize_name(requirement.name)] = spec.version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name == "torch":  # pinned by the Dockerfile's TORCH_VERSION build arg
            assert "torch" not in pins
            continue
        assert name in pins, f"{name} is not locked in requirements/runtime.txt"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} vs {line}"
        for extra in requirement.extras:  # redis[hiredis]
            assert extra in pins, extra


def test_dockerfile_builds_one_non_root_image_per_variant():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, re.M)
    assert stages == ["builder", "models", "runtime"]  # runtime last: the default target
    runtime = text.split("AS runtime", 1)[1]
    assert re.search(r'^ENTRYPOINT \["meshserve"\]$', runtime, re.M)
    user = re.findall(r"^USER (\S+)$", runtime, re.M)
    assert user == ["10001:10001"]
    assert "COPY --from=builder /opt/venv /opt/venv" in runtime
    assert not re.search(r"apt-get|gcc|build-essential", runtime)
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert "download.pytorch.org/whl/cpu" in text
    assert "-r /tmp/requirements/runtime.txt" in text
    # the build context keeps everything the Dockerfile copies
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "*" in ignore  # an allow-list
    for source in re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", text, re.M):
        for path in source.split():
            assert f"!{path.split('/')[0]}" in ignore or f"!{path.split('/')[0]}/" in ignore, path
