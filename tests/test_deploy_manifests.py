"""deploy/ and docker-compose.yml: valid against the Kubernetes schemas offline, and consistent
with each other, with the image and with what production needs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "base"
TEMPLATE = ROOT / "deploy" / "examples" / "secrets.template.yaml"
INGRESS = ROOT / "deploy" / "overlays" / "ingress"
# The oldest Kubernetes release the manifests are meant for, and the newest schema shipped.
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]

Doc = dict[str, Any]


def _load(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _base() -> list[Doc]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in _load(BASE / name)]


def _one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_specs() -> dict[str, Doc]:
    docs = _base()
    return {
        "Deployment": _one(docs, "Deployment")["spec"]["template"]["spec"],
        "Job": _one(docs, "Job")["spec"]["template"]["spec"],
    }


def _ids(docs: list[Doc]) -> list[str]:
    return [f"{d['kind']}/{d['metadata']['name']}" for d in docs]


ALL = _base() + _load(TEMPLATE)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("doc", ALL, ids=_ids(ALL))
def test_each_manifest_is_valid_for_kubernetes(doc: Doc, version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (
            lambda c: c.update(readinesProbe=c.pop("readinessProbe")),
            "'readinesProbe' was unexpected",
        ),
        (lambda c: c.pop("name"), "'name' is a required property"),
        (lambda c: c["ports"][0].update(containerPort="8443"), "'8443' is not of type 'integer'"),
    ],
    ids=["unknown-field", "missing-required", "wrong-type"],
)
def test_the_validation_refuses_what_kubernetes_would(break_it: Any, message: str) -> None:
    deployment = _one(_base(), "Deployment")
    break_it(deployment["spec"]["template"]["spec"]["containers"][0])
    with pytest.raises(kubernetes_validate.ValidationError, match=re.escape(message)):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not found")
def test_kustomize_renders_the_base_into_valid_manifests() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    docs = [doc for doc in yaml.safe_load_all(rendered) if doc]
    assert sorted(_ids(docs)) == sorted(_ids(_base()))
    for doc in docs:
        kubernetes_validate.validate(doc, VERSIONS[0], strict=True)
    assert _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "authsvc:0.1.0"
    )


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not found")
def test_the_ingress_overlay_serves_plain_http_on_a_private_port() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(INGRESS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    docs = [doc for doc in yaml.safe_load_all(rendered) if doc]
    for doc in docs:
        kubernetes_validate.validate(doc, VERSIONS[0], strict=True)
    config = _one(docs, "ConfigMap", "authsvc-config")["data"]
    assert config["BIND"] == "" and config["TRUSTED_PROXIES"]
    assert not {"TLS_CERT_FILE", "TLS_KEY_FILE"} & set(config), "no certificate in the pods"
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["ports"] == [
        {
            "name": "http",
            "containerPort": int(config["PROXY_BIND"].rpartition(":")[2]),
            "protocol": "TCP",
        }
    ]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert (get["scheme"], get["port"]) == ("HTTP", "http"), probe
    assert "tls" not in {v["name"] for v in pod["volumes"]}
    assert "tls" not in {m["name"] for m in container["volumeMounts"]}
    service = _one(docs, "Service")["spec"]["ports"]
    assert [(p["targetPort"], p["appProtocol"]) for p in service] == [("http", "kubernetes.io/h2c")]
    backend = _one(docs, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]
    assert backend["service"] == {"name": "authsvc", "port": {"name": "http"}}
    allowed = _one(docs, "NetworkPolicy")["spec"]["ingress"]
    assert [rule["ports"] for rule in allowed] == [[{"port": "http", "protocol": "TCP"}]]


def test_secrets_are_referenced_and_never_part_of_the_base() -> None:
    assert not [d for d in _base() if d["kind"] == "Secret"]
    template = {d["metadata"]["name"]: d for d in _load(TEMPLATE)}
    assert "TEMPLATE" in TEMPLATE.read_text().splitlines()[0]
    for kind, pod in _pod_specs().items():
        for container in pod["containers"]:
            for env in container.get("env", []):
                assert "value" not in env, f"{kind}: {env['name']} is inlined"
                ref = env["valueFrom"]["secretKeyRef"]
                assert ref["key"] in template[ref["name"]]["stringData"], (kind, ref)
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in template


def test_pods_run_as_the_images_user_on_a_read_only_root_filesystem() -> None:
    uid = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert uid is not None
    config = _one(_base(), "ConfigMap", "authsvc-config")["data"]
    for kind, pod in _pod_specs().items():
        assert pod["automountServiceAccountToken"] is False
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True
        assert (context["runAsUser"], context["runAsGroup"]) == (int(uid[1]), int(uid[2]))
        empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, kind
            assert sc["allowPrivilegeEscalation"] is False, kind
            assert sc["capabilities"]["drop"] == ["ALL"], kind
            writable = {
                m["mountPath"] for m in container["volumeMounts"] if m["name"] in empty_dirs
            }
            assert {config["INSTANCE_DIR"], "/tmp"} <= writable, kind  # noqa: S108
            for section in ("requests", "limits"):
                assert set(container["resources"][section]) == {"cpu", "memory"}, kind


def test_probes_ask_readyz_and_healthz_over_https_on_the_bound_port() -> None:
    docs = _base()
    config = _one(docs, "ConfigMap", "authsvc-config")["data"]
    container = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["https"] == int(config["BIND"].rpartition(":")[2])
    expected = {
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
        "startupProbe": "/healthz",
    }
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert (get["path"], get["scheme"], get["port"]) == (path, "HTTPS", "https"), probe
    assert {"TLS_CERT_FILE", "TLS_KEY_FILE"} <= set(config)
    assert config["TLS_CERT_FILE"].startswith(
        next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "tls")
    )


def test_service_budget_and_autoscaler_point_at_the_deployment() -> None:
    docs = _base()
    deployment = _one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    service = _one(docs, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "https"
    assert _one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    hpa = _one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["minReplicas"] >= 2
    job = _one(docs, "Job")["spec"]["template"]["spec"]
    assert job["containers"][0]["args"] == ["migrate"]
    assert job["restartPolicy"] == "Never"


def test_compose_runs_production_redis_and_migrates_once_before_the_replicas() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    redis = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy noeviction" in redis
    assert "--appendonly yes" in redis
    assert services["migrate"]["command"] == ["migrate"]
    replicas = [name for name, s in services.items() if s.get("ports")]
    assert len(replicas) == 2
    made = (ROOT / "scripts" / "compose-secrets").read_text()
    for name in replicas:
        service = services[name]
        assert service["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert service["environment"]["MIGRATE_ON_START"] == "false"
        assert service["read_only"] is True
        for variable in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "JWT_SECRET"):
            assert variable not in service["environment"], "secrets come from files"
            path = service["environment"][f"{variable}_FILE"]
            assert path.rpartition("/")[2] in service["secrets"]
    for secret in compose["secrets"].values():
        assert Path(secret["file"]).name in made, f"scripts/compose-secrets does not make {secret}"
