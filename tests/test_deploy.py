"""Deployment artefacts: the kustomize overlays and the Dockerfile.

The overlays are built with ``kubectl kustomize`` (kubectl >= 1.24) or a standalone ``kustomize``
(``make k8s-test-tools`` installs one), every object of a built-in kind is validated strictly
against the Kubernetes OpenAPI schemas (kubernetes-validate), and the manifests are checked for
what the design asks of them. There is no Docker engine in the tests, so the Dockerfile is
checked statically. Without kubectl/kustomize the overlay tests skip, unless ``CI`` is set: there
they fail.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the [test] extra (kubernetes-validate)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the [test] extra")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu")
APP = "vision-serving"
GRPC_PORT = 8001
HTTP_PORT = 8000
METRICS_PORT = 8002
HEALTH_PORT = 8003  # plaintext, health checks only: the kubelet's gRPC probes cannot speak TLS
AUTH_SECRET, AUTH_KEY, AUTH_DIR = "vision-serving-auth", "token", "/etc/vision/auth"
TLS_SECRET, TLS_DIR = "vision-serving-tls", "/etc/vision/tls"
MODEL_STORE = "/var/lib/vision/models"
# Kubernetes versions the built-in objects must be valid for: the oldest we support (gRPC probes
# are GA since 1.27) and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
# Objects of CRDs, which kubernetes-validate has no schema for; their fields are checked by hand.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


# ---------------------------------------------------------------------------------------------
# Building the overlays


def _kustomize_commands() -> list[list[str]]:
    """Every way to build a kustomization found on PATH (kubectl's needs kustomize v4 or later)."""
    commands = []
    kubectl = shutil.which("kubectl")
    if kubectl:
        version = subprocess.run(
            [kubectl, "version", "--client"], capture_output=True, text=True, timeout=60, check=False
        ).stdout
        match = re.search(r"^Kustomize Version: v(\d+)\.", version, re.MULTILINE)
        if match and int(match.group(1)) >= 4:
            commands.append([kubectl, "kustomize"])
    kustomize = shutil.which("kustomize")
    if kustomize:
        commands.append([kustomize, "build"])
    return commands


def _build(command: list[str], overlay: str) -> list[dict]:
    path = DEPLOY / "overlays" / overlay
    result = subprocess.run([*command, str(path)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{' '.join(command)} {path} failed:\n{result.stderr}"
    # Deprecated kustomization fields still build, with a warning on stderr: keep it clean.
    assert "deprecated" not in result.stderr.lower(), result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict]]:
    """overlay -> its objects, built with every kustomize found; they must all agree."""
    commands = _kustomize_commands()
    if not commands:
        reason = "needs kubectl >= 1.24 or kustomize on PATH to build deploy/overlays (`make k8s-test-tools`)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip")
        pytest.skip(reason)
    overlays = {}
    for overlay in OVERLAYS:
        results = [(command, _build(command, overlay)) for command in commands]
        first_command, first = results[0]
        for command, objects in results[1:]:
            assert objects == first, f"{command} and {first_command} build {overlay} differently"
        overlays[overlay] = first
    return overlays


def _one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


@dataclass
class Workload:
    objects: list[dict]
    deployment: dict
    pod: dict  # the pod template's spec
    container: dict

    @property
    def pod_labels(self) -> dict[str, str]:
        return self.deployment["spec"]["template"]["metadata"]["labels"]

    def env(self) -> dict[str, dict]:
        return {e["name"]: e for e in self.container.get("env", [])}

    def env_value(self, name: str) -> str | None:
        entry = self.env().get(name)
        return None if entry is None else entry.get("value")


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def workload(built: dict[str, list[dict]], overlay: str) -> Workload:
    objects = built[overlay]
    deployment = _one(objects, "Deployment", APP)
    pod = deployment["spec"]["template"]["spec"]
    containers = [c for c in pod["containers"] if c["name"] == APP]
    assert len(containers) == 1, pod["containers"]
    return Workload(objects, deployment, pod, containers[0])


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------------------------------------
# Schema validation


def test_built_in_objects_are_valid_kubernetes(built: dict[str, list[dict]]) -> None:
    checked = 0
    for overlay, objects in built.items():
        for obj in objects:
            what = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
            if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
                continue
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    path = ".".join(str(p) for p in exc.path)
                    pytest.fail(f"{what} is not valid for Kubernetes {version}: {path}: {exc.message}")
                except kubernetes_validate.SchemaNotFoundError as exc:
                    pytest.fail(f"{what}: {exc.message} (a typo in apiVersion/kind?)")
            checked += 1
    assert checked >= 2 * 7


def test_strict_validation_rejects_unknown_fields() -> None:
    """Guards the test above: strict mode must reject a misspelt field, not ignore it."""
    probe_typo = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "i:1", "readinessProbe": {"grcp": {"port": 1}}}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(probe_typo, K8S_VERSIONS[-1], strict=True)


def test_each_overlay_has_the_expected_objects(built: dict[str, list[dict]]) -> None:
    expected = {
        ("ServiceAccount", APP),
        ("PersistentVolumeClaim", f"{APP}-models"),
        ("Deployment", APP),
        ("Service", APP),
        ("Service", f"{APP}-headless"),
        ("HorizontalPodAutoscaler", APP),
        ("PodDisruptionBudget", APP),
        ("ServiceMonitor", APP),
        ("ConfigMap", f"{APP}-dashboard"),
    }
    for overlay, objects in built.items():
        assert {(o["kind"], o["metadata"]["name"]) for o in objects} == expected, overlay


# ---------------------------------------------------------------------------------------------
# The Deployment


def test_probes_are_native_grpc_health_checks(workload: Workload) -> None:
    c = workload.container
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c.get(name)
        assert probe, f"{name} missing"
        assert set(probe) & {"httpGet", "tcpSocket", "exec"} == set(), f"{name} must be a gRPC probe: {probe}"
        assert probe["grpc"]["port"] == HEALTH_PORT, probe
    # The plaintext health-only port is what the probes reach, with or without TLS on 8001.
    assert workload.env_value("VISION_SERVE_HEALTH_PORT") == str(HEALTH_PORT)
    # "" is the whole server (all models loaded, not draining); "liveness" is the process.
    assert c["readinessProbe"]["grpc"].get("service", "") == ""
    assert c["livenessProbe"]["grpc"]["service"] == "liveness"
    startup = c["startupProbe"]
    assert startup["grpc"].get("service", "") in ("", "liveness")
    # VGG16 and ResNet101 loading on a CPU node: at least ten minutes before giving up.
    assert startup.get("failureThreshold", 3) * startup.get("periodSeconds", 10) >= 600


def test_termination_grace_covers_the_drain(workload: Workload) -> None:
    drain = float(workload.env_value("VISION_SERVE_DRAIN_SECONDS") or 25)  # the server's default
    grace = workload.pod.get("terminationGracePeriodSeconds", 30)
    assert grace >= drain + 10, f"grace {grace}s leaves no room after the {drain}s drain"


def test_pod_runs_as_non_root_with_a_read_only_root(workload: Workload) -> None:
    pod_sc = workload.pod.get("securityContext", {})
    sc = workload.container.get("securityContext", {})
    assert pod_sc.get("runAsNonRoot") is True or sc.get("runAsNonRoot") is True
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    assert uid is not None and uid != 0
    assert sc.get("allowPrivilegeEscalation") is False
    assert sc.get("readOnlyRootFilesystem") is True
    assert sc.get("capabilities", {}).get("drop") == ["ALL"]
    assert workload.pod.get("automountServiceAccountToken") is False
    # With a read-only root, /tmp is an emptyDir.
    mounts = {m["mountPath"]: m["name"] for m in workload.container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in workload.pod.get("volumes", [])}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_model_store_is_a_shared_volume(workload: Workload) -> None:
    pvc = _one(workload.objects, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"]
    volumes = {v["name"]: v for v in workload.pod["volumes"]}
    mounts = {m["mountPath"]: m for m in workload.container["volumeMounts"]}
    mount = mounts[MODEL_STORE]
    assert not mount.get("readOnly", False), "fine-tuning writes to the model store"
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert workload.env_value("VISION_SERVE_MODEL_STORE") == MODEL_STORE


def test_ports_resources_annotations_and_spread(workload: Workload) -> None:
    ports = {p["name"]: p["containerPort"] for p in workload.container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "http": HTTP_PORT, "metrics": METRICS_PORT, "health": HEALTH_PORT}
    resources = workload.container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), f"{kind}: {resources.get(kind)}"
    annotations = workload.deployment["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/port") == str(METRICS_PORT)
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"
    spread = workload.pod.get("topologySpreadConstraints", [])
    anti = workload.pod.get("affinity", {}).get("podAntiAffinity")
    assert anti or any(
        t["topologyKey"] == "kubernetes.io/hostname"
        and _selects(t["labelSelector"]["matchLabels"], workload.pod_labels)
        for t in spread
    ), "replicas must be spread over nodes"
    selector = workload.deployment["spec"]["selector"]["matchLabels"]
    assert _selects(selector, workload.pod_labels)


def test_image_has_an_explicit_tag(built: dict[str, list[dict]]) -> None:
    images = {}
    for overlay, objects in built.items():
        image = _one(objects, "Deployment", APP)["spec"]["template"]["spec"]["containers"][0]["image"]
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag and tag and tag != "latest", f"{overlay}: {image}"
        images[overlay] = image
    assert images["cpu"] != images["gpu"], "the gpu overlay runs the CUDA image"


def test_env_settings_are_server_options(workload: Workload) -> None:
    """Every VISION_SERVE_* variable names a real option, and the server accepts the values."""
    from service.cli import build_serve_parser, config_from_args

    env = {}
    for name, entry in workload.env().items():
        if not name.startswith("VISION_SERVE_"):
            continue
        env[name] = entry["value"]
    parser = build_serve_parser({})
    known = {
        "VISION_SERVE_" + flag.lstrip("-").replace("-", "_").upper()
        for action in parser._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag != "--help" and not flag.startswith("--no-")
    }
    assert set(env) <= known, f"not vision-serve options: {sorted(set(env) - known)}"
    # argparse checks choices for flags only, not for defaults that come from the environment.
    for action in parser._actions:
        name = "VISION_SERVE_" + action.dest.upper()
        if action.choices is not None and name in env:
            assert env[name] in action.choices, f"{name}={env[name]!r}: one of {list(action.choices)}"
    config = config_from_args(build_serve_parser(env).parse_args([]))
    assert str(config.model_store) == MODEL_STORE


def test_gpu_overlay_asks_for_a_gpu_and_cpu_overlay_does_not(built: dict[str, list[dict]]) -> None:
    cpu_text = yaml.safe_dump_all(built["cpu"])
    assert "nvidia.com/gpu" not in cpu_text
    cpu = _one(built["cpu"], "Deployment", APP)["spec"]["template"]["spec"]
    cpu_env = {e["name"]: e.get("value") for e in cpu["containers"][0]["env"]}
    assert cpu_env["VISION_SERVE_DEVICE"] == "cpu"

    gpu = _one(built["gpu"], "Deployment", APP)["spec"]["template"]["spec"]
    container = gpu["containers"][0]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    requests = container["resources"].get("requests", {})
    assert requests.get("nvidia.com/gpu", 1) == container["resources"]["limits"]["nvidia.com/gpu"]
    gpu_env = {e["name"]: e.get("value") for e in container["env"]}
    assert gpu_env["VISION_SERVE_DEVICE"] == "cuda"
    assert gpu.get("nodeSelector") or gpu.get("affinity", {}).get("nodeAffinity")
    assert any(t.get("key") == "nvidia.com/gpu" for t in gpu.get("tolerations", []))


# ---------------------------------------------------------------------------------------------
# Services, autoscaling, disruption budget, monitoring


def test_services_headless_for_grpc_clients_and_cluster_ip(workload: Workload) -> None:
    headless = _one(workload.objects, "Service", f"{APP}-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert not headless["spec"].get("publishNotReadyAddresses", False), "DNS must list ready pods only"
    assert _selects(headless["spec"]["selector"], workload.pod_labels)
    assert [(p["name"], p["port"], p.get("appProtocol")) for p in headless["spec"]["ports"]] == [
        ("grpc", GRPC_PORT, "grpc")
    ]

    service = _one(workload.objects, "Service", APP)
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"].get("clusterIP") != "None"
    assert _selects(service["spec"]["selector"], workload.pod_labels)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == GRPC_PORT and ports["grpc"]["appProtocol"] == "grpc"
    assert ports["metrics"]["port"] == METRICS_PORT
    assert ports["http"]["port"] == HTTP_PORT and ports["http"]["targetPort"] == "http"
    container_ports = {p["name"] for p in workload.container["ports"]}
    for svc in (service, headless):
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in container_ports | {GRPC_PORT, METRICS_PORT}


def test_hpa_scales_on_queue_pressure_with_cpu_fallback(workload: Workload) -> None:
    hpa = _one(workload.objects, "HorizontalPodAutoscaler", APP)
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", APP)
    assert 1 <= spec.get("minReplicas", 1) <= spec["maxReplicas"]
    pods = [m["pods"] for m in spec["metrics"] if m["type"] == "Pods"]
    assert [p["metric"]["name"] for p in pods] == ["vision_pending_images"]
    assert pods[0]["target"]["type"] == "AverageValue"
    cpu = [m["resource"] for m in spec["metrics"] if m["type"] == "Resource"]
    assert cpu and cpu[0]["name"] == "cpu" and cpu[0]["target"]["type"] == "Utilization"
    assert "cpu" in workload.container["resources"]["requests"], "CPU utilization needs a CPU request"


def test_pdb_keeps_replicas_up(workload: Workload) -> None:
    pdb = _one(workload.objects, "PodDisruptionBudget", APP)
    assert pdb["apiVersion"] == "policy/v1"
    spec = pdb["spec"]
    assert ("minAvailable" in spec) != ("maxUnavailable" in spec)
    assert spec.get("minAvailable", 1) == 1 and spec.get("maxUnavailable", 1) == 1
    assert _selects(spec["selector"]["matchLabels"], workload.pod_labels)
    hpa = _one(workload.objects, "HorizontalPodAutoscaler", APP)
    assert hpa["spec"].get("minReplicas", 1) >= 2, "with one replica the PDB would block every drain"


def test_service_monitor_scrapes_the_metrics_port_once(workload: Workload) -> None:
    monitor = _one(workload.objects, "ServiceMonitor", APP)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    endpoints = monitor["spec"]["endpoints"]
    assert [(e["port"], e.get("path", "/metrics")) for e in endpoints] == [("metrics", "/metrics")]
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [o for o in workload.objects if o["kind"] == "Service"]
    scraped = [
        s["metadata"]["name"]
        for s in services
        if _selects(selector, s["metadata"]["labels"]) and any(p["name"] == "metrics" for p in s["spec"]["ports"])
    ]
    assert scraped == [APP], f"each pod must be scraped through exactly one Service, not {scraped}"


def test_prometheus_adapter_rule_serves_the_hpa_metric() -> None:
    values = yaml.safe_load((DEPLOY / "prometheus-adapter-rules.yaml").read_text())
    rules = values["rules"]["custom"]
    hpa = yaml.safe_load((DEPLOY / "base" / "hpa.yaml").read_text())
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    served = {rule["name"].get("as") or rule["name"]["matches"].strip("^$") for rule in rules}
    assert wanted <= served
    rule = next(r for r in rules if r["name"].get("as") == "vision_pending_images")
    assert rule["seriesQuery"].startswith("vision_pending_images{")
    assert rule["resources"]["overrides"]["pod"]["resource"] == "pod"
    assert rule["resources"]["overrides"]["namespace"]["resource"] == "namespace"
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]


def test_prometheus_adapter_query_is_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool missing (`make system-test-tools` installs it)")
        pytest.skip("needs promtool (Debian's prometheus package)")
    values = yaml.safe_load((DEPLOY / "prometheus-adapter-rules.yaml").read_text())
    groups = []
    for i, rule in enumerate(values["rules"]["custom"]):
        # What the adapter substitutes when the HPA asks for two pods' values.
        expr = (
            rule["metricsQuery"]
            .replace("<<.Series>>", "vision_pending_images")
            .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"vision-serving-a|vision-serving-b"')
            .replace("<<.GroupBy>>", "pod")
        )
        groups.append({"record": f"vision:adapter_query_{i}", "expr": expr})
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": groups}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_server_exports_the_scaling_metric() -> None:
    """The HPA's metric is a gauge that follows the images a model's queue holds."""
    import torch

    from service.engine.batching import BatchQueue, WorkItem
    from service.engine.metrics import ServerMetrics

    metrics = ServerMetrics()
    queue = BatchQueue(capacity_images=64, on_depth_change=metrics.queue_depth_recorder("alexnet"))

    def pending() -> float | None:
        families = {m.name: m for m in metrics.registry.collect()}
        gauge = families["vision_pending_images"]
        assert gauge.type == "gauge"
        values = [s.value for s in gauge.samples if s.labels == {"model": "alexnet"}]
        return values[0] if values else None

    queue.put([WorkItem(pixels=torch.zeros(n, 3, 4, 4), on_result=lambda value: None) for n in (3, 5)])
    assert pending() == 8
    batch = queue.next_batch(max_images=4, max_delay_s=0.0)
    assert batch is not None and sum(item.size for item in batch[0]) == 3
    assert pending() == 5
    queue.close_rejecting(RuntimeError("stopped"))
    assert pending() == 0


# ---------------------------------------------------------------------------------------------
# Dockerfile (static checks: no Docker engine here)


@dataclass
class Instruction:
    keyword: str
    args: str


def _dockerfile() -> list[Instruction]:
    text = (ROOT / "Dockerfile").read_text()
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped by Docker too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"
    out = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
    return out


def _stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    stages: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _global_args(instructions: list[Instruction]) -> dict[str, str]:
    args = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            args[name] = default
    return args


def _args(stage: list[Instruction]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for ins in stage:
        if ins.keyword == "ARG":
            name, eq, default = ins.args.partition("=")
            out[name.strip()] = default.strip().strip('"') if eq else None
    return out


def _env(stage: list[Instruction]) -> dict[str, str]:
    env = {}
    for ins in stage:
        if ins.keyword == "ENV":
            for item in shlex.split(ins.args):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def _from_images(instructions: list[Instruction]) -> Iterator[tuple[str, str]]:
    """(as written, resolved with the global ARG defaults) for each FROM."""
    args = _global_args(instructions)
    stage_names = set()
    for ins in instructions:
        if ins.keyword != "FROM":
            continue
        words = [w for w in ins.args.split() if not w.startswith("--")]
        image = words[0]
        resolved = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
        if resolved not in stage_names:
            yield image, resolved
        if len(words) == 3 and words[1].upper() == "AS":
            stage_names.add(words[2])


def test_dockerfile_is_multi_stage() -> None:
    stages = _stages(_dockerfile())
    assert len(stages) >= 2
    first = stages[0][0].args.split()
    assert len(first) == 3 and first[1].upper() == "AS", "name the builder stage"
    builder = first[2]
    final = stages[-1]
    copies = [i.args for i in final if i.keyword == "COPY" and f"--from={builder}" in i.args]
    assert any("/opt/venv" in c for c in copies), "the final stage copies the builder's virtualenv"
    # Only the builder installs packages; the final stage adds the user and copies.
    assert not any(i.keyword == "RUN" and "pip install" in i.args for i in final)
    builder_runs = " ".join(i.args for i in stages[0] if i.keyword == "RUN")
    assert "./clients/python" in builder_runs and "pip install" in builder_runs


def test_dockerfile_runs_as_a_numeric_non_root_user() -> None:
    final = _stages(_dockerfile())[-1]
    users = [i.args for i in final if i.keyword == "USER"]
    assert users, "the final stage needs a USER"
    match = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    assert match, f"USER must be numeric (Kubernetes' runAsNonRoot checks it): {users[-1]}"
    assert int(match.group(1)) != 0 and (match.group(2) is None or int(match.group(2)) != 0)
    deployment = yaml.safe_load((DEPLOY / "base" / "deployment.yaml").read_text())
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(match.group(1))


def test_dockerfile_exposes_grpc_and_metrics() -> None:
    final = _stages(_dockerfile())[-1]
    exposed = {p.split("/")[0] for i in final if i.keyword == "EXPOSE" for p in i.args.split()}
    assert {str(GRPC_PORT), str(METRICS_PORT)} <= exposed


def test_dockerfile_bakes_weights_unless_told_not_to() -> None:
    from service.config import DEFAULT_MODELS

    stages = _stages(_dockerfile())
    builder_args = _args(stages[0])
    assert builder_args.get("FETCH_WEIGHTS") == "1"
    assert builder_args.get("MODELS") == ",".join(DEFAULT_MODELS)
    fetch = [i.args for s in stages for i in s if i.keyword == "RUN" and "vision-serve fetch-weights" in i.args]
    assert len(fetch) == 1 and "FETCH_WEIGHTS" in fetch[0] and "MODELS" in fetch[0]
    final_env = _env(stages[-1])
    torch_home = final_env["TORCH_HOME"]
    assert any(i.keyword == "COPY" and torch_home in i.args for i in stages[-1]), "weights reach the final stage"


def test_dockerfile_defaults_and_entrypoint() -> None:
    stages = _stages(_dockerfile())
    env = _env(stages[-1])
    assert env["VISION_SERVE_HOST"] == "0.0.0.0"
    assert env["VISION_SERVE_MODEL_STORE"] == MODEL_STORE
    assert env.get("VISION_SERVE_GRPC_PORT", str(GRPC_PORT)) == str(GRPC_PORT)
    assert env.get("VISION_SERVE_METRICS_PORT", str(METRICS_PORT)) == str(METRICS_PORT)
    entrypoints = [i.args for i in stages[-1] if i.keyword == "ENTRYPOINT"]
    assert entrypoints and yaml.safe_load(entrypoints[-1]) == ["vision-serve"], "exec form, so SIGTERM reaches it"
    # CPU build of torch by default; the CUDA build is a build argument away.
    torch_index = _args(stages[0]).get("TORCH_INDEX")
    assert torch_index == "https://download.pytorch.org/whl/cpu"


def test_dockerfile_base_images_are_pinned() -> None:
    instructions = _dockerfile()
    assert ":latest" not in (ROOT / "Dockerfile").read_text()
    images = list(_from_images(instructions))
    assert images
    for written, resolved in images:
        assert "$" not in resolved, f"{written}: no default for its build argument"
        name_and_tag = resolved.split("@")[0]
        tag = name_and_tag.rpartition(":")[2] if ":" in name_and_tag.rpartition("/")[2] else ""
        assert "@sha256:" in resolved or (tag and tag != "latest"), f"{written} -> {resolved}: pin a tag"


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    if patterns[0] == "*":  # an allow-list: only what the build needs
        allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
        assert {"pyproject.toml", "service", "clients/python/vision_client"} <= allowed
        assert not allowed & {".venv", ".git", "tests"}
    else:
        assert {".venv", ".git"} <= {p.strip("/") for p in patterns}
