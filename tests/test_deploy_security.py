"""Security in deploy/: the token Secret, the optional TLS components, probes that survive TLS.

The Secrets are made by the very commands docs/deployment.md documents (``kubectl create secret
... --dry-run=client``) and validated strictly, together with the overlays built with the
``tls`` and ``mtls`` components. Skips without kubectl unless ``CI`` is set.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the [test] extra (kubernetes-validate)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the [test] extra")

from tests.test_deploy import (  # noqa: E402
    APP,
    AUTH_DIR,
    AUTH_KEY,
    AUTH_SECRET,
    DEPLOY,
    HEALTH_PORT,
    K8S_VERSIONS,
    OVERLAYS,
    TLS_DIR,
    TLS_SECRET,
    _build,
    _kustomize_commands,
    _one,
)

README = (DEPLOY.parent / "docs" / "deployment.md").read_text()


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is missing; CI is set, so this is a failure, not a skip")
        pytest.skip("needs kubectl on PATH")
    return kubectl


def _commands() -> list[list[str]]:
    commands = _kustomize_commands()
    if not commands:
        if os.environ.get("CI"):
            pytest.fail("needs kubectl >= 1.24 or kustomize (`make k8s-test-tools`)")
        pytest.skip("needs kubectl >= 1.24 or kustomize on PATH (`make k8s-test-tools`)")
    return commands


def _validate(obj: dict) -> None:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for {version}: {path}: {exc.message}")


def _with_components(tmp_path: Path, overlay: str, *components: str) -> list[dict]:
    """Build ``overlay`` plus ``components`` as a user's overlay would, with every kustomize found."""
    root = tmp_path / f"{overlay}-{'-'.join(components)}"
    root.mkdir()
    relative = os.path.relpath(DEPLOY, root)
    (root / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [f"{relative}/overlays/{overlay}"],
                "components": [f"{relative}/components/{c}" for c in components],
            }
        )
    )
    results = []
    for command in _commands():
        result = subprocess.run([*command, str(root)], capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, f"{' '.join(command)} {root}: {result.stderr}"
        results.append([doc for doc in yaml.safe_load_all(result.stdout) if doc])
    assert all(r == results[0] for r in results), "the kustomize builds disagree"
    return results[0]


def _container(objects: list[dict]) -> tuple[dict, dict]:
    pod = _one(objects, "Deployment", APP)["spec"]["template"]["spec"]
    [container] = [c for c in pod["containers"] if c["name"] == APP]
    return pod, container


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _secret_volume(pod: dict, container: dict, secret: str) -> tuple[dict, dict]:
    volumes = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret]
    assert len(volumes) == 1, f"one volume of the Secret {secret}: {pod['volumes']}"
    [mount] = [m for m in container["volumeMounts"] if m["name"] == volumes[0]["name"]]
    assert mount.get("readOnly") is True
    assert "subPath" not in mount, "a subPath mount is never updated: rotation would need a restart"
    return volumes[0], mount


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_token_comes_from_the_secret_and_probes_use_the_health_port(overlay: str) -> None:
    objects = _build(_commands()[0], overlay)
    pod, container = _container(objects)
    volume, mount = _secret_volume(pod, container, AUTH_SECRET)
    assert mount["mountPath"] == AUTH_DIR
    assert volume["secret"].get("optional", False) is False, "no token: the pod must not start"
    items = volume["secret"].get("items")
    assert items is None or {i["key"]: i["path"] for i in items} == {AUTH_KEY: AUTH_KEY}
    env = _env(container)
    assert env["VISION_SERVE_AUTH_TOKEN_FILE"] == f"{AUTH_DIR}/{AUTH_KEY}"
    assert env.get("VISION_SERVE_AUTH_SCOPE", "management") in ("management", "all")
    assert not any(k.startswith("VISION_SERVE_TLS_") for k in env), "TLS is the optional component's"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == HEALTH_PORT
    assert env["VISION_SERVE_HEALTH_PORT"] == str(HEALTH_PORT)


def test_the_documented_secrets_are_valid_and_match_the_manifests(tmp_path: Path) -> None:
    from tests.certs import CertificateAuthority, write_pair

    kubectl = _kubectl()
    documented = re.search(r"kubectl -n vision create secret generic (\S+) --from-literal=(\w+)=", README)
    assert documented, "docs/deployment.md shows how to create the token Secret"
    assert (documented.group(1), documented.group(2)) == (AUTH_SECRET, AUTH_KEY)
    assert f"create secret tls {TLS_SECRET} " in README

    def dry_run(*args: str) -> dict:
        result = subprocess.run(
            [kubectl, "create", "secret", *args, "--dry-run=client", "-o", "yaml"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return yaml.safe_load(result.stdout)

    token = dry_run("generic", AUTH_SECRET, f"--from-literal={AUTH_KEY}=" + "ab" * 32)
    _validate(token)
    assert set(token["data"]) == {AUTH_KEY}

    cert, key = write_pair(tmp_path, CertificateAuthority("ca").issue("localhost", server=True), "server")
    tls = dry_run("tls", TLS_SECRET, f"--cert={cert}", f"--key={key}")
    _validate(tls)
    assert tls["type"] == "kubernetes.io/tls" and {"tls.crt", "tls.key"} <= set(tls["data"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tls_components_mount_the_tls_secret_and_keep_probes_working(tmp_path: Path, overlay: str) -> None:
    from service.cli import build_serve_parser, config_from_args

    for components, mutual in ((("tls",), False), (("tls", "mtls"), True)):
        objects = _with_components(tmp_path, overlay, *components)
        for obj in objects:
            if obj["kind"] in ("Deployment", "Service"):
                _validate(obj)
        pod, container = _container(objects)
        _, mount = _secret_volume(pod, container, TLS_SECRET)
        assert mount["mountPath"] == TLS_DIR
        _secret_volume(pod, container, AUTH_SECRET)  # the token stays
        env = _env(container)
        assert env["VISION_SERVE_TLS_CERT_FILE"] == f"{TLS_DIR}/tls.crt"
        assert env["VISION_SERVE_TLS_KEY_FILE"] == f"{TLS_DIR}/tls.key"
        assert (env.get("VISION_SERVE_TLS_CLIENT_CA_FILE") == f"{TLS_DIR}/ca.crt") is mutual
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == HEALTH_PORT, "kubelet's gRPC probes cannot speak TLS"
        config = config_from_args(
            build_serve_parser({k: v for k, v in env.items() if k.startswith("VISION_SERVE_") and v}).parse_args([])
        )
        assert str(config.tls_cert_file) == f"{TLS_DIR}/tls.crt" and config.health_port == HEALTH_PORT


def test_the_cert_manager_example_fits_the_manifests() -> None:
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", README, re.DOTALL)]
    [certificate] = [b for b in blocks if isinstance(b, dict) and b.get("kind") == "Certificate"]
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    spec = certificate["spec"]
    assert spec["secretName"] == TLS_SECRET
    namespace = certificate["metadata"]["namespace"]
    services = {
        yaml.safe_load((DEPLOY / "base" / name).read_text())["metadata"]["name"]
        for name in ("service.yaml", "service-headless.yaml")
    }
    for service in services:  # both Services' names verify against the certificate
        assert f"{service}.{namespace}.svc.cluster.local" in spec["dnsNames"]
    assert spec["issuerRef"]["name"] and spec["privateKey"]["rotationPolicy"] == "Always"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_s3_store_component_replaces_the_volume_with_a_bucket(tmp_path: Path, overlay: str) -> None:
    """No PVC and no store volume; the store URL and endpoint from the ConfigMap, credentials from an
    optional Secret (else the AWS chain: web identity); every ConfigMap key a setting the server reads."""
    from service.cli import build_serve_parser, config_from_args
    from service.storage import S3Location

    objects = _with_components(tmp_path, overlay, "s3-store")
    for obj in objects:
        if obj["kind"] in ("Deployment", "ConfigMap"):
            _validate(obj)
    assert [o for o in objects if o["kind"] == "PersistentVolumeClaim"] == []
    pod, container = _container(objects)
    assert "model-store" not in {v["name"] for v in pod["volumes"]}
    assert "/var/lib/vision/models" not in {m["mountPath"] for m in container["volumeMounts"]}
    assert "VISION_SERVE_MODEL_STORE" not in _env(container)  # env would win over envFrom
    assert container["envFrom"] == [
        {"configMapRef": {"name": "vision-serving-s3"}},
        {"secretRef": {"name": "vision-serving-s3", "optional": True}},
    ]
    assert {"name": "runtime-cache", "emptyDir": {"sizeLimit": "3Gi"}} in pod["volumes"]  # stays node-local
    settings = _one(objects, "ConfigMap", "vision-serving-s3")["data"]
    assert all(key.startswith(("VISION_SERVE_", "AWS_")) for key in settings)
    config = config_from_args(build_serve_parser({**_env(container), **settings}).parse_args([]))
    assert isinstance(config.model_store, S3Location)
