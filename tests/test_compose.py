"""Checks of the docker-compose stack and Dockerfile without a Docker engine.

The compose files are validated against the Compose specification's JSON schema, and then
cross-checked where the schema cannot: references between services, files the stack mounts,
the Prometheus and collector configs against the service names and ports, and every service
command against the real `splitserve` CLI parser.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_PATH = REPO_ROOT / "docker-compose.yml"
GPU_OVERRIDE_PATH = REPO_ROOT / "deploy" / "docker-compose.gpu.yml"
SUBCOMMANDS = {"up", "gateway", "prefill", "decode", "worker"}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load(COMPOSE_PATH)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _splitserve_services(services: dict) -> dict:
    """Services running the project's image (built from the Dockerfile)."""
    return {name: s for name, s in services.items() if "build" in s}


def _flag(command: list[str], name: str) -> str | None:
    """The value after `name` in an argv list, or None."""
    return command[command.index(name) + 1] if name in command else None


def _listening_ports(service: dict) -> set[int]:
    """Container ports a service listens on: its --port, `expose`, and the container side of `ports`."""
    ports = {int(p) for p in service.get("expose", [])}
    ports |= {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}
    command = service.get("command") or []
    if isinstance(command, list) and _flag(command, "--port"):
        ports.add(int(_flag(command, "--port")))
    return ports


def _check_jsonschema(*paths: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "check-jsonschema"
    if not exe.exists():
        pytest.skip(f"check-jsonschema is not installed next to {sys.executable}")
    return subprocess.run([str(exe), "--builtin-schema", "vendor.compose-spec", *map(str, paths)],
                          capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------- schema


def test_compose_files_match_compose_spec_schema():
    proc = _check_jsonschema(COMPOSE_PATH, GPU_OVERRIDE_PATH)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_check_rejects_a_broken_file(tmp_path):
    broken = _load(COMPOSE_PATH)
    broken["services"]["gateway"]["depends_on"]["prefill"]["condition"] = "whenever"
    broken["services"]["decode"]["healthcheck"]["retries"] = "many"
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    proc = _check_jsonschema(path)
    assert proc.returncode != 0 and "whenever" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- references


def test_expected_services_exist(services):
    assert {"gateway", "prefill", "decode", "otel-collector", "jaeger", "prometheus"} <= set(services)


def test_depends_on_targets_exist_and_are_always_started(services):
    for name, service in services.items():
        depends = service.get("depends_on", {})
        targets = depends if isinstance(depends, list) else list(depends)
        for target in targets:
            assert target in services, f"{name} depends on unknown service {target!r}"
            # A service outside every profile cannot wait on one that only starts with a profile.
            if not service.get("profiles"):
                assert not services[target].get("profiles"), f"{name} depends on profiled service {target}"
            if isinstance(depends, dict) and depends[target].get("condition") == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy: no healthcheck"


def test_mounted_files_exist_and_named_volumes_are_declared(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith((".", "/")):
                assert (REPO_ROOT / source).exists(), f"{name} mounts {source}, which is not in the repo"
            else:
                assert source in declared, f"{name} uses volume {source!r}, not declared at the top level"


def test_gpu_override_only_extends_existing_services(services):
    override = _load(GPU_OVERRIDE_PATH)
    for name, service in override["services"].items():
        assert name in services, f"the GPU override names unknown service {name}"
    devices = override["services"]["prefill"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


# ----------------------------------------------------------------------------- observability configs


def test_prometheus_targets_are_listening_services(services):
    config = _load(REPO_ROOT / "deploy" / "prometheus.yml")
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "gateway:8000" in targets
    for target in targets:
        host, port = target.rsplit(":", 1)
        assert host in services, f"prometheus scrapes {target}: no service {host!r}"
        assert int(port) in _listening_ports(services[host]), f"prometheus scrapes {target}: {host} does not listen there"


def test_otel_collector_config_wires_otlp_to_jaeger(services):
    config = _load(REPO_ROOT / "deploy" / "otel-collector.yaml")
    grpc_endpoint = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert grpc_endpoint.endswith(":4317")
    jaeger_host, jaeger_port = config["exporters"]["otlp/jaeger"]["endpoint"].rsplit(":", 1)
    assert jaeger_host in services and int(jaeger_port) in _listening_ports(services[jaeger_host])
    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"pipeline uses undefined {kind[:-1]} {component}"
    assert "otlp/jaeger" in config["service"]["pipelines"]["traces"]["exporters"]
    mount = services["otel-collector"]["volumes"][0]
    assert mount.startswith("./deploy/otel-collector.yaml:")
    assert any(mount.split(":")[1] in arg for arg in services["otel-collector"]["command"])


def test_splitserve_services_export_traces_to_the_collector(services):
    names = []
    for name, service in _splitserve_services(services).items():
        env = service["environment"]
        endpoint = urlparse(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint.hostname == "otel-collector" and endpoint.port == 4317
        assert env["SPLITSERVE_CACHE"] == "/cache"
        assert any(str(v).endswith(":/cache") for v in service["volumes"])
        names.append(env["OTEL_SERVICE_NAME"])
    assert len(names) == len(set(names)) >= 3, f"OTEL_SERVICE_NAME must differ per service: {names}"


# ----------------------------------------------------------------------------- commands and CLI


def test_commands_are_splitserve_subcommands(services):
    for name, service in _splitserve_services(services).items():
        command = service["command"]
        assert isinstance(command, list) and command[0] in SUBCOMMANDS, f"{name}: {command}"


def test_gateway_worker_urls_point_at_listening_services(services):
    for name, service in _splitserve_services(services).items():
        command = service["command"]
        for flag in ("--prefill-urls", "--decode-urls", "--worker-urls"):
            for url in filter(None, (_flag(command, flag) or "").split(",")):
                host, port = url.rsplit(":", 1)
                assert host in services, f"{name} {flag} names unknown service {host}"
                assert _flag(services[host]["command"], "--port") == port, f"{name} {flag} {url}: wrong port"
                assert services[host].get("profiles") == service.get("profiles"), f"{name} -> {host}: profiles differ"


def test_published_ports_bind_the_host_loopback_only(compose):
    """`ports` without a host address publish on every interface of the host; ours name 127.0.0.1."""
    gpu = _load(GPU_OVERRIDE_PATH)["services"]
    published = [(name, str(p)) for file in (compose["services"], gpu) for name, s in file.items()
                 for p in s.get("ports", [])]
    assert published, "the stack publishes nothing?"
    for name, port in published:
        assert port.startswith("127.0.0.1:") and port.count(":") == 2, f"{name} publishes {port!r}"


def test_healthchecks_probe_the_service_port(services):
    for name, service in _splitserve_services(services).items():
        probe = " ".join(service["healthcheck"]["test"])
        port = _flag(service["command"], "--port")
        assert re.search(rf"127\.0\.0\.1:{port}\b", probe), f"{name} healthcheck does not probe port {port}: {probe}"


def _cli_parser():
    try:
        from splitserve.cli import build_parser
    except ImportError as exc:
        pytest.skip(f"splitserve.cli.build_parser is not available yet: {exc}")
    return build_parser()


def _parse_or_fail(parser, argv: list[str], where: str):
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: `splitserve {shlex.join(argv)}` is rejected by the CLI parser (exit {exc.code})")


def test_commands_parse_with_the_real_cli(services):
    parser = _cli_parser()
    for name, service in _splitserve_services(services).items():
        args = _parse_or_fail(parser, service["command"], f"service {name}")
        assert args.command == service["command"][0]
        assert args.host == "0.0.0.0", f"{name} must bind all interfaces inside its container"


def _dockerfile_instruction(keyword: str) -> list[str]:
    lines = [line for line in (REPO_ROOT / "Dockerfile").read_text().splitlines() if line.startswith(keyword + " ")]
    assert len(lines) == 1, f"expected one {keyword} in the Dockerfile, found {len(lines)}"
    return json.loads(lines[0][len(keyword) + 1:])  # exec form only: a JSON array


def test_dockerfile_entrypoint_is_the_console_script():
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = _dockerfile_instruction("ENTRYPOINT")
    assert entrypoint == ["splitserve"] and "splitserve" in scripts
    module_name, _, function_name = scripts["splitserve"].partition(":")
    assert module_name == "splitserve.cli" and function_name == "main"
    parser = _cli_parser()
    _parse_or_fail(parser, _dockerfile_instruction("CMD"), "Dockerfile CMD")
