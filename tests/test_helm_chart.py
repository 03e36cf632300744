"""The Helm chart in deploy/helm/splitserve, rendered by Helm's own Go SDK (helm-python-sdk, no
helm binary or cluster needed) and checked the way `kubectl apply --dry-run` would not do alone:

- every rendered object validates against the Kubernetes OpenAPI schemas (kubernetes-validate);
- references hold: Service and PodDisruptionBudget selectors pick the pods of a Deployment, named
  target ports exist, probes hit a port the container listens on, the gateway's worker addresses
  name the headless Services on their gRPC ports, Secrets referenced exist;
- every container's args parse with the real `splitserve` CLI (the helper test_compose.py uses).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from test_compose import _cli_parser, _parse_or_fail  # noqa: E402  (tests/ is on sys.path)

CHART_DIR = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "splitserve"
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
"""Oldest checked (gRPC probes are GA since 1.27) and the newest schemas bundled."""
CUSTOM_KINDS = {"ServiceMonitor"}  # Prometheus Operator CRD: no schema in the Kubernetes set

VALUE_SETS = {
    "defaults": {},
    "colocated-cpu": {"mode": "colocated", "gpusPerWorker": 0, "worker": {"replicas": 3}},
    "everything": {
        "model": {"path": "/models/llama", "servedModelName": "llama", "persistentVolumeClaim": "models"},
        "otel": {"endpoint": "http://otel-collector.observability:4317"},
        "gateway": {"replicas": 2, "apiKey": {"value": "sk-test"}, "extraArgs": ["--max-n", "4"]},
        "prefill": {"replicas": 4, "extraArgs": ["--max-num-batched-tokens", "8192"]},
        "decode": {"replicas": 2},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "internalSecret": {"existingSecret": "splitserve-internal"},
        "nodeSelector": {"gpu": "h200"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "existing-secret-hostpath": {"gateway": {"apiKey": {"existingSecret": "llm-keys", "secretKey": "k"}},
                                 "model": {"path": "/models/m", "hostPath": "/data/models"},
                                 "podDisruptionBudget": {"enabled": False}},
}


def render(values: dict, name: str = "demo", namespace: str = "llm") -> list[dict]:
    with helm.Chart.load(CHART_DIR) as chart:
        manifests = chart.render(values, name=name, namespace=namespace)
    return [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def objects(request) -> list[dict]:
    return render(VALUE_SETS[request.param])


def _of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def _deployments_selected_by(objects: list[dict], selector: dict) -> list[dict]:
    return [d for d in _of_kind(objects, "Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]


def _containers(objects: list[dict]) -> list[tuple[dict, dict]]:
    return [(d, c) for d in _of_kind(objects, "Deployment") for c in d["spec"]["template"]["spec"]["containers"]]


# ----------------------------------------------------------------------------- schemas


def test_every_object_validates_against_the_kubernetes_schemas(objects):
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_schema_validation_catches_a_broken_value():
    broken = _of_kind(render({"gateway": {"replicas": "two"}}), "Deployment")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken[0], KUBE_VERSIONS[-1], strict=True)


def test_an_unknown_mode_fails_to_render_with_its_name():
    with pytest.raises(helm.HelmError, match="mode must be disaggregated or colocated"):
        render({"mode": "sideways"})


def test_the_chart_lints_clean():
    report = helm.lint(CHART_DIR, strict=True)
    assert not report["errors"] and not [m for m in report["messages"] if m["severity"] >= 2], report


# ----------------------------------------------------------------------------- references


def test_services_and_budgets_select_deployed_pods(objects):
    for obj in _of_kind(objects, "Service"):
        selected = _deployments_selected_by(objects, obj["spec"]["selector"])
        assert len(selected) == 1, f"Service {obj['metadata']['name']} selects {len(selected)} Deployments"
        ports = {p["name"] for _, c in _containers(selected) for p in c["ports"]}
        for port in obj["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{obj['metadata']['name']}: no container port {port['targetPort']}"
    for obj in _of_kind(objects, "PodDisruptionBudget"):
        assert len(_deployments_selected_by(objects, obj["spec"]["selector"]["matchLabels"])) == 1


def test_probes_hit_a_port_the_container_listens_on(objects):
    for deployment, container in _containers(objects):
        ports = {p["containerPort"] for p in container["ports"]} | {p["name"] for p in container["ports"]}
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container[kind]
            handler = probe.get("grpc") or probe.get("httpGet")
            assert handler["port"] in ports, f"{deployment['metadata']['name']} {kind} port {handler['port']}"


def test_workers_probe_grpc_health_and_the_gateway_its_http_health(objects):
    for deployment, container in _containers(objects):
        if container["args"][0] == "gateway":
            assert container["readinessProbe"]["httpGet"]["path"] == "/health"
            assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        else:
            # The services services/worker/health.py serves: readiness drops while draining, liveness not.
            assert container["readinessProbe"]["grpc"]["service"] == "splitserve.v1.Worker"
            assert container["livenessProbe"]["grpc"]["service"] == "liveness"


def test_gateway_worker_addresses_name_headless_services(objects):
    services = {s["metadata"]["name"]: s for s in _of_kind(objects, "Service")}
    gateway = next(c for _, c in _containers(objects) if c["args"][0] == "gateway")
    args = gateway["args"]
    flags = [f for f in ("--prefill-urls", "--decode-urls", "--worker-urls") if f in args]
    assert flags
    for flag in flags:
        address = args[args.index(flag) + 1]
        assert address.startswith("dns:///"), f"{flag} {address}: the gateway must discover the pods"
        host, port = address.removeprefix("dns:///").rsplit(":", 1)
        service = services[host]
        assert service["spec"]["clusterIP"] == "None", f"{host} is not headless"
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}
        worker = _deployments_selected_by(objects, service["spec"]["selector"])[0]
        worker_args = worker["spec"]["template"]["spec"]["containers"][0]["args"]
        assert worker_args[worker_args.index("--port") + 1] == port


def test_worker_gpus_are_requested_and_limited():
    for values, expected in (({}, 1), ({"gpusPerWorker": 2}, 2), ({"gpusPerWorker": 0}, None)):
        for _, container in _containers(render(values)):
            if container["args"][0] == "gateway":
                assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
                continue
            for side in ("requests", "limits"):
                assert container["resources"][side].get("nvidia.com/gpu") == expected


def test_each_role_runs_its_own_tensor_parallel_size_with_a_gpu_per_rank():
    objects = render({"prefill": {"tensorParallelSize": 2}, "gpusPerWorker": 1})
    parser = _cli_parser()
    for deployment, container in _containers(objects):
        if container["args"][0] == "gateway":
            continue
        size = 2 if container["args"][0] == "prefill" else 1
        args = _parse_or_fail(parser, container["args"], deployment["metadata"]["name"])
        assert args.tensor_parallel_size == size
        for side in ("requests", "limits"):
            assert container["resources"][side]["nvidia.com/gpu"] == size


def test_api_key_secret_and_model_volume_are_wired():
    objects = render(VALUE_SETS["everything"])
    secret = _of_kind(objects, "Secret")[0]
    gateway = next(c for _, c in _containers(objects) if c["args"][0] == "gateway")
    key_ref = next(e for e in gateway["env"] if e["name"] == "SPLITSERVE_API_KEY")["valueFrom"]["secretKeyRef"]
    assert key_ref["name"] == secret["metadata"]["name"] and key_ref["key"] in secret["stringData"]
    for deployment, container in _containers(objects):
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "models"
        assert mounts["model"]["mountPath"] == "/models" and mounts["model"]["readOnly"]
        assert container["args"][container["args"].index("--model") + 1] == "/models/llama"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
    names = {next(e["value"] for e in c["env"] if e["name"] == "OTEL_SERVICE_NAME") for _, c in _containers(objects)}
    assert len(names) == 3  # one per component, as the traces need


def test_no_secret_is_created_for_an_existing_one():
    objects = render(VALUE_SETS["existing-secret-hostpath"])
    assert not _of_kind(objects, "Secret")
    gateway = next(c for _, c in _containers(objects) if c["args"][0] == "gateway")
    key_ref = next(e for e in gateway["env"] if e["name"] == "SPLITSERVE_API_KEY")["valueFrom"]["secretKeyRef"]
    assert key_ref == {"name": "llm-keys", "key": "k"}


def test_service_monitor_scrapes_the_gateway_metrics_port():
    objects = render(VALUE_SETS["everything"])
    monitor = _of_kind(objects, "ServiceMonitor")[0]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    services = [s for s in _of_kind(objects, "Service")
                if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in services] == ["demo-splitserve-gateway"]
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in services[0]["spec"]["ports"]}
    assert not _of_kind(render({}), "ServiceMonitor")


# ----------------------------------------------------------------------------- commands


def test_container_args_parse_with_the_real_cli(objects):
    parser = _cli_parser()
    for deployment, container in _containers(objects):
        where = f"Deployment {deployment['metadata']['name']}"
        args = _parse_or_fail(parser, container["args"], where)
        assert args.command == container["args"][0]
        assert args.host == "0.0.0.0", f"{where} must bind all interfaces inside its pod"
        if args.command == "gateway":
            _gateway_config(args).validate()  # the dns:/// worker addresses included


def _gateway_config(args):
    from splitserve.services.gateway.config import GatewayConfig, RequestLimits
    from splitserve.shared.config_flags import dataclass_from_args

    return dataclass_from_args(GatewayConfig, args, model_dir="/models/m", served_model_name="m",
                               limits=dataclass_from_args(RequestLimits, args))


def test_transfer_endpoints_advertise_the_pod_ip(objects):
    for _, container in _containers(objects):
        args = container["args"]
        if args[0] in ("prefill", "decode"):
            assert args[args.index("--transfer-host") + 1] == "$(POD_IP)"
            pod_ip = next(e for e in container["env"] if e["name"] == "POD_IP")
            assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_workers_drain_within_the_grace_period(objects):
    for deployment, container in _containers(objects):
        args = container["args"]
        if args[0] != "gateway":
            grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            assert float(args[args.index("--drain-timeout-s") + 1]) < grace


def test_a_drain_longer_than_the_grace_period_fails_to_render():
    with pytest.raises(helm.HelmError, match="drainTimeoutSeconds"):
        render({"drainTimeoutSeconds": 90, "terminationGracePeriodSeconds": 60})


def test_every_pod_gets_the_internal_secret_as_a_private_file():
    objects = render(VALUE_SETS["everything"])
    for deployment, container in _containers(objects):
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["internal-secret-source"]["secret"]["secretName"] == "splitserve-internal"
        init = pod["initContainers"][0]
        script = init["command"][-1]
        assert "install -m 600 /etc/splitserve/internal-secret/secret /run/splitserve/secret" == script
        assert {m["mountPath"] for m in init["volumeMounts"]} == {"/etc/splitserve/internal-secret", "/run/splitserve"}
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["SPLITSERVE_SECRET_FILE"] == "/run/splitserve/secret"
        assert any(m["mountPath"] == "/run/splitserve" for m in container["volumeMounts"])
        assert pod["securityContext"]["runAsUser"] == 1000  # the image's splitserve user owns the copy
    for _, container in _containers(render({})):
        assert "SPLITSERVE_SECRET_FILE" not in {e["name"] for e in container["env"]}
