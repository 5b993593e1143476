"""deploy/: the Compose file and the Kubernetes manifests agree with the one gateway config and
with what the code generates, and the manifests validate against Kubernetes' schemas."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tandem.protocols.http import SESSION_HEADER
from tandem.remote_gateway.config import GatewayConfig
from tandem.remote_gateway.replicas import nginx_config, nginx_config_dns

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]


def _one(name: str, kind: str, meta_name: str | None = None) -> dict:
    found = [d for d in _docs(name) if d["kind"] == kind and (meta_name is None or d["metadata"]["name"] == meta_name)]
    assert len(found) == 1, (name, kind, meta_name)
    return found[0]


def test_the_gateway_config_is_valid_and_the_configmap_carries_it_unchanged():
    text = (DEPLOY / "gateway.yaml").read_text()
    cfg = GatewayConfig.model_validate(yaml.safe_load(text))
    cfg.check_exposure()  # served beyond loopback: it must ask for keys
    assert cfg.auth == "keys"
    assert _one("gateway.yaml", "ConfigMap")["data"]["gateway.yaml"] == text


def test_the_statefulset_serves_the_configs_port_with_readiness_on_healthz_and_its_pod_name_as_replica_id():
    cfg = GatewayConfig.model_validate(yaml.safe_load((DEPLOY / "gateway.yaml").read_text()))
    sts = _one("gateway.yaml", "StatefulSet")
    c = sts["spec"]["template"]["spec"]["containers"][0]
    assert c["ports"][0]["containerPort"] == cfg.port
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["args"] == ["--replica-id", "$(POD_NAME)"]
    assert sts["spec"]["serviceName"] == "tandem-gateway"
    assert _one("gateway.yaml", "Service", "tandem-gateway")["spec"]["clusterIP"] == "None"  # headless: pod DNS names


def test_the_k8s_nginx_config_is_what_the_command_writes():
    conf = _one("nginx.yaml", "ConfigMap")["data"]["nginx.conf"]
    assert conf == nginx_config_dns("tandem-gateway.tandem.svc.cluster.local", "tandem-gateway-pool.tandem.svc.cluster.local",
                                    8000, "0.0.0.0:8080")


def test_the_compose_nginx_config_is_what_the_command_writes_for_its_replicas():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    replicas = {name: f"http://{name}:8000" for name, svc in compose["services"].items() if svc.get("command", [None])[0] == "--replica-id"}
    assert replicas == {"gateway-a": "http://gateway-a:8000", "gateway-b": "http://gateway-b:8000"}
    for name, svc in compose["services"].items():
        if name in replicas:
            assert svc["command"] == ["--replica-id", name]
    assert (DEPLOY / "nginx.conf").read_text() == nginx_config(replicas, "0.0.0.0:8080")
    targets = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(targets) == sorted(u.removeprefix("http://") for u in replicas.values())


def test_the_ingress_hashes_on_the_session_header_and_the_hpa_scales_the_gateway_on_its_own_metric():
    ingress = _one("ingress.yaml", "Ingress")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == f"$http_{SESSION_HEADER.replace('-', '_')}"
    hpa = _one("hpa.yaml", "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "tandem-gateway"}
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load(_one("hpa.yaml", "ConfigMap")["data"]["rules.yaml"])["rules"]
    assert [r["name"]["as"] for r in rules] == [metric]
    from tandem.remote_gateway.metrics import GatewayMetrics

    exported = GatewayMetrics().render().decode()
    series = rules[0]["seriesQuery"].strip("'").split("{")[0]
    assert f"\n{series} " in exported and f"\n{series.replace('_sum', '_count')} " in exported


def test_the_manifests_validate_against_the_kubernetes_schemas():
    tool = Path(sys.executable).with_name("kubernetes-validate")
    if not tool.exists():
        pytest.skip("kubernetes-validate is not installed (pip install 'tandem[test]')")
    files = sorted(str(p) for p in (DEPLOY / "k8s").glob("*.yaml"))
    out = subprocess.run([str(tool), "--strict", *files], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_dns_nginx_config_passes_nginx_own_check(tmp_path):
    from tandem.protocols.broker import free_port
    from tandem.sdk.bench.launch import nginx_binary

    try:
        nginx = nginx_binary()
    except FileNotFoundError:
        pytest.skip("nginx is not installed (Debian/Ubuntu: apt-get install nginx); .ci/run installs it")
    conf = nginx_config_dns("gw.local", "pool.local", 8000, f"127.0.0.1:{free_port()}", resolver="127.0.0.1")
    conf = conf.replace("http {\n", f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nhttp {{\n", 1)
    conf = conf.replace("http {\n", "http {\n" + "".join(f"    {k}_temp_path {tmp_path}/{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")) + "    access_log off;\n", 1)
    (tmp_path / "nginx.conf").write_text(conf)
    out = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_the_compose_file_is_valid_where_docker_is_installed(monkeypatch):
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose is not installed")
    monkeypatch.setenv("TANDEM_KEY_APP", "test-key")
    out = subprocess.run([docker, "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "-q"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
