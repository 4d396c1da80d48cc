"""deploy/ against real tools: Debian's Prometheus scraping a live server, promtool, hadolint,
Kubernetes and compose schemas, and the Grafana dashboard's queries run in Prometheus.

One ``lcmserve serve --model preset:tiny-sd`` and one Prometheus (configured from the shipped
deploy/prometheus/prometheus.yml, retargeted to loopback) start once for the module.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from lcmserve.server.app import HTTP_SHUTDOWN_S
from lcmserve.server.metrics import ServerMetrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120
# Kubernetes releases the manifests are checked against: the first with the preStop sleep
# action on by default, and the newest the validator knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): DEPLOY / "schemas" / "servicemonitor-v1.schema.json",
    ("keda.sh/v1alpha1", "ScaledObject"): DEPLOY / "schemas" / "scaledobject-v1alpha1.schema.json",
}
GENERATION_ENDPOINTS = ("/generate", "/v1/images/generations", "Generate", "GenerateStream")

needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="Debian's prometheus package (prometheus, promtool) is not installed: apt-get install -y prometheus "
           "(.ci/run installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return str(path)


def _stop(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_http(url: str, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{what} not ready after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> dict[tuple[str, str], dict]:
    found = {}
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in _docs(path):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def _exported_names() -> set[str]:
    """Every sample name the server's registry can expose, children or not."""
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",),
                "info": ("_info",), "summary": ("_sum", "_count", "")}
    names = set()
    for family in ServerMetrics().registry.collect():
        names.update(family.name + s for s in suffixes[family.type])
    return names


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\blcmserve_[a-zA-Z0-9_]*[a-zA-Z0-9]\b", expr))


# fixtures: one server, some traffic, one Prometheus ---------------------------------------------
class Server:
    def __init__(self, log_dir: Path) -> None:
        self.port, self.grpc_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / "server.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "lcmserve.cli", "serve", "--model", "preset:tiny-sd", "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(self.port), "--grpc-port", str(self.grpc_port),
               "--warmup-steps", "1", "--max-queue-delay-ms", "5", "--drain-grace-s", "5"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("deploy-server"))
    try:
        _wait_http(srv.url + "/readyz", srv.proc, srv.log, "lcmserve")
        yield srv
    finally:
        _stop(srv.proc)


@pytest.fixture(scope="module")
def traffic(server):
    """Six images and one rejected request, so that every labelled series the dashboard reads exists."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for seed in range(6):
            response = http.post("/generate", json={"prompt": "a red circle", "steps": 1, "seed": seed})
            assert response.status_code == 200, response.text
        assert http.post("/generate", json={"prompt": "a red circle", "steps": 99}).status_code == 422
    return server


def _loopback_prometheus_config(server: Server) -> dict:
    """The shipped config, its lcmserve job pointed at the test server and every interval 1 s."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "prometheus" / f) for f in config.get("rule_files", [])]
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "lcmserve"]
    assert len(jobs) == 1, "deploy/prometheus/prometheus.yml must have one job named lcmserve"
    jobs[0]["scrape_interval"] = "1s"
    jobs[0]["static_configs"] = [{"targets": [f"127.0.0.1:{server.port}"]}]
    config["scrape_configs"] = jobs
    return config


class Prometheus:
    def __init__(self, folder: Path, config: dict) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "prometheus.log"
        config_path = folder / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config_path}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    def query(self, promql: str) -> list[dict]:
        response = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{promql}\n{body}"
        return body["data"]["result"]

    def wait_for(self, promql: str, timeout_s: float = 30.0) -> list[dict]:
        """The query's vector once it has a finite value (scrapes and rule evaluations come every 1 s)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = self.query(promql)
            if result and all(math.isfinite(float(r["value"][1])) for r in result):
                return result
            time.sleep(0.5)
        pytest.fail(f"no finite value for {promql} in {timeout_s} s; last {result}\n{self.log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    if PROMETHEUS is None:
        pytest.skip("Debian's prometheus package is not installed: apt-get install -y prometheus")
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"), _loopback_prometheus_config(server))
    try:
        _wait_http(prom.url + "/-/ready", prom.proc, prom.log, "prometheus")
        # one scrape before the traffic, so that rate() sees the counters move
        prom.wait_for('up{job="lcmserve"} == 1')
        yield prom
    finally:
        _stop(prom.proc)


@pytest.fixture(scope="module")
def scraped(prometheus, traffic):
    """Prometheus after it has scraped the traffic: the p50 of /generate is a finite number."""
    query = ('histogram_quantile(0.5, sum by (le) '
             '(rate(lcmserve_request_duration_seconds_bucket{endpoint="/generate"}[1m])))')
    # The labelled series first appears with all the traffic already counted, so rate() is 0/0
    # until it moves: send more requests once Prometheus has scraped the series.
    prometheus.wait_for('lcmserve_request_duration_seconds_count{endpoint="/generate"}')
    with httpx.Client(base_url=traffic.url, timeout=60) as http:
        for seed in range(2):
            response = http.post("/generate", json={"prompt": "a red circle", "steps": 1, "seed": 100 + seed})
            assert response.status_code == 200, response.text
    result = prometheus.wait_for(query)
    return prometheus, float(result[0]["value"][1])


# (a) Prometheus scrapes the live server --------------------------------------------------------
@needs_prometheus
def test_prometheus_scrapes_server_and_histogram_quantile_is_a_number(scraped):
    prom, p50_s = scraped
    # the tiny model answers a 1-step request in well under a minute on any machine
    assert 0.0 < p50_s < 60.0
    images = prom.wait_for("sum(lcmserve_images_generated_total)")
    assert float(images[0]["value"][1]) >= 6
    failures = prom.wait_for('sum by (type) (lcmserve_failures_total{type="invalid_request"})')
    assert float(failures[0]["value"][1]) >= 1
    # the shipped recording rules evaluate on the scraped series
    recorded = prom.wait_for("lcmserve:request_duration_seconds:p50_1m")
    assert 0.0 < float(recorded[0]["value"][1]) < 60.0


# (b) promtool ------------------------------------------------------------------------------------
@needs_prometheus
def test_promtool_checks_shipped_config_and_rules():
    config = DEPLOY / "prometheus" / "prometheus.yml"
    run = subprocess.run([PROMTOOL, "check", "config", str(config)], check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout + run.stderr


@needs_prometheus
def test_promtool_checks_live_metrics(traffic):
    text = httpx.get(traffic.url + "/metrics", timeout=10).text
    assert "lcmserve_request_duration_seconds_bucket" in text
    run = subprocess.run([PROMTOOL, "check", "metrics"], input=text,
                         check=False, capture_output=True, text=True)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


@needs_prometheus
def test_promtool_alert_rules_fire_on_backlog_and_server_errors(tmp_path):
    """Unit tests of the shipped alerts: a growing backlog and 10% engine faults fire, a small queue does not."""
    tests = {
        "rule_files": [str(DEPLOY / "prometheus" / "rules.yml")],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": 'lcmserve_queue_depth_rows{job="lcmserve",instance="a:8000"}', "values": "200x10"},
                {"series": 'lcmserve_queue_depth_rows{job="lcmserve",instance="b:8000"}', "values": "10x10"},
                {"series": 'lcmserve_failures_total{job="lcmserve",instance="a:8000",type="internal_error"}',
                 "values": "0+60x10"},
                {"series": 'lcmserve_failures_total{job="lcmserve",instance="a:8000",type="invalid_request"}',
                 "values": "0+600x10"},
                {"series": 'lcmserve_request_duration_seconds_count{job="lcmserve",instance="a:8000",'
                           'protocol="http",endpoint="/generate",status="200"}', "values": "0+600x10"},
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "LcmserveQueueBacklog", "exp_alerts": []},
                {"eval_time": "5m", "alertname": "LcmserveQueueBacklog", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "job": "lcmserve", "instance": "a:8000"},
                    "exp_annotations": {"summary": "a:8000 has 200 rows queued: scale out"}}]},
                # invalid_request is the client's fault and does not count; internal_error is 1/s of 10/s
                {"eval_time": "10m", "alertname": "LcmserveServerErrors", "exp_alerts": [{
                    "exp_labels": {"severity": "critical"},
                    "exp_annotations": {"summary": "more than 5% of lcmserve requests fail on the server's side"}}]},
            ],
        }],
    }
    path = tmp_path / "rules.test.yml"
    path.write_text(yaml.safe_dump(tests))
    run = subprocess.run([PROMTOOL, "test", "rules", str(path)], check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


# (c) Grafana -------------------------------------------------------------------------------------
def _dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "lcmserve.json").read_text())


def _dashboard_queries(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash.get("templating", {}).get("list", []) if v.get("definition")]
    return exprs


def _as_promql(expr: str) -> str:
    """A Grafana query as Prometheus runs it: template variables replaced by their widest values."""
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*")


def test_dashboard_names_only_exported_metrics_and_covers_the_panels():
    dash = _dashboard()
    exported = _exported_names()
    named = set().union(*(_metric_names(e) for e in _dashboard_queries(dash)))
    assert named, "the dashboard names no lcmserve_ metric"
    assert named <= exported, f"not exported by the server: {sorted(named - exported)}"
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for needed in ("p50", "p99", "throughput", "queue depth", "batch size", "errors by type"):
        assert needed in titles, f"no panel about {needed!r} in: {titles}"
    # provisioning: the datasource uid the panels use and the folder compose mounts
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {d["uid"] for d in datasource["datasources"]}
    assert {p["datasource"]["uid"] for p in dash["panels"]} <= uids
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "lcmserve.yml").read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in mounts


@needs_prometheus
def test_dashboard_queries_run_in_prometheus_and_name_live_series(scraped, traffic):
    prom, _ = scraped
    live = {line.split("{")[0].split(" ")[0] for line in httpx.get(traffic.url + "/metrics").text.splitlines()
            if line and not line.startswith("#")}
    for expr in _dashboard_queries(_dashboard()):
        missing = _metric_names(expr) - live
        assert not missing, f"{expr}: not in the live /metrics: {missing}"
        if expr.startswith("label_values("):
            continue  # Grafana's own function, not PromQL
        prom.query(_as_promql(expr))  # raises on a PromQL error
    latency = next(t["expr"] for p in _dashboard()["panels"] if "latency" in p["title"].lower() for t in p["targets"])
    result = prom.wait_for(_as_promql(latency))
    assert 0.0 < float(result[0]["value"][1]) < 60.0


# (d) Kubernetes ----------------------------------------------------------------------------------
def _validate(doc: dict) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        jsonschema.validate(doc, json.loads(CRD_SCHEMAS[key].read_text()))
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def test_k8s_manifests_pass_schema_validation():
    manifests = _manifests()
    kinds = {kind for kind, _ in manifests}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ServiceMonitor", "ScaledObject",
            "ConfigMap"} <= kinds, kinds
    for doc in manifests.values():
        _validate(doc)


def test_k8s_validation_rejects_typos():
    """The validators are strict: an unknown field fails, in a core kind and in a CRD."""
    manifests = _manifests()
    deployment = copy.deepcopy(manifests[("Deployment", "lcmserve")])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)
    monitor = copy.deepcopy(manifests[("ServiceMonitor", "lcmserve")])
    monitor["spec"]["endpoints"][0]["intervall"] = "5s"
    with pytest.raises(jsonschema.ValidationError):
        _validate(monitor)
    scaled = copy.deepcopy(manifests[("ScaledObject", "lcmserve")])
    del scaled["spec"]["triggers"][0]["metadata"]["query"]
    with pytest.raises(jsonschema.ValidationError):
        _validate(scaled)


def _container() -> tuple[dict, dict, dict]:
    deployment = _manifests()[("Deployment", "lcmserve")]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    return deployment, container, env


def test_k8s_ports_labels_and_references_agree():
    manifests = _manifests()
    deployment, container, env = _container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(env["LCMSERVE_PORT"]), "grpc": int(env["LCMSERVE_GRPC_PORT"])}
    assert env["LCMSERVE_HOST"] == "0.0.0.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in ports
    # Services select the pods and target named container ports
    for (kind, name), svc in manifests.items():
        if kind == "Service":
            assert svc["spec"]["selector"].items() <= pod_labels.items(), name
            assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports.keys(), name
    service = manifests[("Service", "lcmserve")]
    assert {p["name"] for p in service["spec"]["ports"]} == {"http", "grpc"}
    # the ServiceMonitor scrapes /metrics on a port of that Service
    monitor = manifests[("ServiceMonitor", "lcmserve")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics"}
    # both autoscalers drive the Deployment on an exported metric
    exported = _exported_names()
    hpa = manifests[("HorizontalPodAutoscaler", "lcmserve")]
    scaled = manifests[("ScaledObject", "lcmserve")]
    for ref in (hpa["spec"]["scaleTargetRef"], scaled["spec"]["scaleTargetRef"]):
        assert (ref["kind"], ref["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in exported
    assert _metric_names(scaled["spec"]["triggers"][0]["metadata"]["query"]) <= exported
    rules = yaml.safe_load(manifests[("ConfigMap", "adapter-config")]["data"]["config.yaml"])["rules"]
    assert {r["name"]["as"] for r in rules} >= {hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]}
    assert set().union(*(_metric_names(r["seriesQuery"]) for r in rules)) <= exported


def test_k8s_termination_grace_covers_the_drain():
    deployment, container, env = _container()
    grace_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain_s = float(env["LCMSERVE_DRAIN_GRACE_S"])
    assert grace_s >= pre_stop_s + drain_s + HTTP_SHUTDOWN_S, (grace_s, pre_stop_s, drain_s)
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"LCMSERVE_DRAIN_GRACE_S={drain_s:g}\b", dockerfile), "the image and the Deployment drain alike"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert int(compose["services"]["lcmserve"]["stop_grace_period"].rstrip("s")) >= drain_s + HTTP_SHUTDOWN_S


def test_k8s_probe_routes_answer_on_a_live_server(server):
    _, container, _ = _container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = container[probe]["httpGet"]["path"]
        response = httpx.get(server.url + path, timeout=5)
        assert response.status_code == 200, (probe, path, response.text)
    # the gRPC port answers grpc.health.v1 (what a `grpc:` probe or a mesh would ask)
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@needs_prometheus
def test_autoscaling_queries_run_in_prometheus(scraped):
    """The adapter's metricsQuery (templated as the adapter does) and KEDA's query return a value."""
    prom, _ = scraped
    manifests = _manifests()
    for rule in yaml.safe_load(manifests[("ConfigMap", "adapter-config")]["data"]["config.yaml"])["rules"]:
        series = rule["name"]["as"]
        query = (rule["metricsQuery"].replace("<<.Series>>", series)
                 .replace("<<.LabelMatchers>>", 'job="lcmserve"').replace("<<.GroupBy>>", "instance"))
        assert prom.wait_for(query), query
    keda_query = manifests[("ScaledObject", "lcmserve")]["spec"]["triggers"][0]["metadata"]["query"]
    assert prom.wait_for(keda_query), keda_query


def test_compose_files_match_the_compose_spec():
    files = [str(DEPLOY / "compose.yaml"), str(DEPLOY / "compose.gpu.yaml")]
    run = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *files],
                         check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


# (e) Dockerfile ----------------------------------------------------------------------------------
def test_hadolint_passes_on_the_dockerfile():
    run = subprocess.run([_tool("hadolint"), "--no-color", str(REPO / "Dockerfile")],
                         check=False, capture_output=True, text=True)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """hadolint really lints: an unpinned base, a root user and apt without cleanup are flagged."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\nCMD curl localhost\n")
    run = subprocess.run([_tool("hadolint"), "--no-color", str(bad)], check=False, capture_output=True, text=True)
    assert run.returncode != 0 and "DL3006" in run.stdout, run.stdout


def test_dockerfile_contract():
    """What the deployment files rely on: ports, loopback override, non-root user, health check."""
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+runtime", text, re.MULTILINE)
    assert re.search(r"^EXPOSE 8000 50051$", text, re.MULTILINE)
    assert "LCMSERVE_HOST=0.0.0.0" in text
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and not users[-1].startswith(("root", "0")), users
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.MULTILINE)
    assert "!lcmserve/" in (REPO / ".dockerignore").read_text()
