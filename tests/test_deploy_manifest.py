"""The deployment recipes that cannot run here (no Docker, no Kubernetes): the manifest parses and
has what a GPU deployment needs and what the appliance expects (probes on /ready and /health, a
grace period covering the drain, one GPU per pod, scrape annotations, flags the CLI accepts,
conversation-hash affinity); the Dockerfile's base image matches onnxruntime-gpu's CUDA, and its
package list covers every third-party module the runtime imports. And the nginx config the
cluster launcher renders: nginx itself accepts it (`nginx -t`, where nginx is installed), its
size limits are the appliance's, and a non-loopback listen without an API key is refused."""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runtime import config as cfgmod
from runtime.__main__ import build_parser
from runtime.server.routes_misc import MULTIPART_SLACK

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "build" / "deploy"
sys.path.insert(0, str(DEPLOY))
import nginx_conf  # noqa: E402

SERVER_CLOSE_SLACK = 5.0             # runtime/server/app.py: shutdown_timeout = grace + 5 s


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    loaded = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if d]
    return {d["kind"]: d for d in loaded}


def _container(docs) -> dict:
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def _appliance_config(container) -> cfgmod.AppConfig:
    """The config the pod's args give, read by the appliance's own CLI parser."""
    args = [a.replace("$(POD_NAME)", "pod-0") for a in container["args"]]
    parsed = build_parser().parse_args(["serve", *args])
    return cfgmod.load(None, cfgmod.cli_overrides(vars(parsed)), engine=parsed.engine)


def test_the_deployment_gives_each_pod_one_gpu_and_probes_readiness_and_liveness(docs):
    dep = docs["Deployment"]
    assert dep["apiVersion"] == "apps/v1"
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    c = _container(docs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    cfg = _appliance_config(c)
    assert cfg.server.port == port and cfg.server.host == "0.0.0.0"
    assert cfg.server.replica_name == "pod-0"
    env = {e["name"]: e for e in c["env"]}
    assert env[cfgmod.API_KEY_ENV]["valueFrom"]["secretKeyRef"]      # off loopback a key is required
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts[cfg.engine]["readOnly"] is True


def test_the_grace_period_covers_the_drain(docs):
    spec = docs["Deployment"]["spec"]["template"]["spec"]
    c = _container(docs)
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(pre_stop[1]) + _appliance_config(c).server.shutdown_grace_seconds + SERVER_CLOSE_SLACK
    assert spec["terminationGracePeriodSeconds"] >= drain


def test_prometheus_scrapes_the_metrics_port(docs):
    c = _container(docs)
    port = str(_appliance_config(c).server.port)
    for meta in (docs["Deployment"]["spec"]["template"]["metadata"], docs["Service"]["metadata"]):
        ann = meta["annotations"]
        assert (ann["prometheus.io/scrape"], ann["prometheus.io/port"], ann["prometheus.io/path"]) == \
            ("true", port, "/metrics")


def test_the_service_and_ingress_reach_the_pods_with_conversation_affinity(docs):
    svc, ing = docs["Service"], docs["Ingress"]
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == {"http"}
    ann = ing["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_x_conversation_id"
    assert ann["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(ann["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600
    body = cfgmod.parse_bytes(ann["nginx.ingress.kubernetes.io/proxy-body-size"].replace("m", "MiB"))
    assert body >= cfgmod.LimitsConfig().max_upload_bytes + MULTIPART_SLACK
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == svc["metadata"]["name"]


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def test_the_image_base_matches_onnxruntime_gpus_cuda():
    base = re.search(r"ARG BASE_IMAGE=(\S+)", _dockerfile()).group(1)
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu[\d.]+", base)
    assert m, f"a CUDA runtime image with cuDNN, not {base}"
    wants = [r for r in md.requires("onnxruntime-gpu") or [] if r.startswith("nvidia-cuda-runtime")]
    assert wants, "onnxruntime-gpu names no CUDA runtime; check the base image by hand"
    assert re.search(r"~=\s*(\d+)", wants[0]).group(1) == m.group(1), (wants[0], base)


def _third_party_imports() -> set[str]:
    names = set()
    for f in (ROOT / "runtime").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("runtime", "__future__")}


def test_the_image_installs_every_package_the_runtime_imports_at_the_pinned_versions():
    packages = re.search(r'ARG RUNTIME_PACKAGES="([^"]+)"', _dockerfile()).group(1).split()
    requirements = (ROOT / "requirements.txt").read_text()
    for p in packages:                               # the Dockerfile's grep finds each one
        assert re.search(rf"^{re.escape(p)}([=<>!~ ]|$)", requirements, re.I | re.M), p
    dists = md.packages_distributions()
    normal = {p.lower().replace("_", "-") for p in packages}
    for module in sorted(_third_party_imports()):
        provided_by = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        assert provided_by & normal, f"runtime imports {module} ({provided_by}) but the image lacks it"
    assert "torch" not in normal and "transformers" not in normal


def test_the_image_serves_the_runtime_on_the_manifests_port(docs):
    text = _dockerfile()
    assert 'ENTRYPOINT ["python3", "-m", "runtime", "serve"]' in text
    assert re.search(r"^EXPOSE (\d+)$", text, re.M).group(1) == str(_appliance_config(_container(docs)).server.port)
    for path in ("runtime/", "web/"):
        assert f"COPY {path} {path}" in text


def _render(tmp_path: Path, limits: cfgmod.LimitsConfig, listen: str = "127.0.0.1:18080") -> Path:
    ups = [nginx_conf.Upstream.parse("127.0.0.1:18081"), nginx_conf.Upstream.parse("[::1]:18082"),
           nginx_conf.Upstream.parse("gpu-node-3.internal:8080")]
    nginx_conf.prepare_run_dir(tmp_path)
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf.render(ups, listen=listen, run_dir=tmp_path, limits=limits,
                                      user=nginx_conf.worker_user()))
    return conf


def test_the_rendered_nginx_config_has_the_appliances_limits_and_affinity(tmp_path):
    limits = cfgmod.LimitsConfig(max_body_bytes=3_000_000, max_upload_bytes=50_000_000)
    text = _render(tmp_path, limits).read_text()
    assert "hash $affinity_key consistent;" in text
    assert re.search(r"server 127\.0\.0\.1:18081 max_fails=\d+ fail_timeout=\d+s;", text)
    assert "server [::1]:18082 " in text and "server gpu-node-3.internal:8080 " in text
    assert re.findall(r"client_max_body_size (\d+);", text) == \
        [str(limits.max_body_bytes), str(limits.max_upload_bytes + MULTIPART_SLACK)]
    assert "proxy_buffering off;" in text and "proxy_set_header Host $http_host;" in text
    nxt = re.search(r"proxy_next_upstream ([^;]+);", text).group(1).split()
    assert {"error", "timeout", "http_502", "http_503", "http_429", "non_idempotent"} <= set(nxt)
    assert "{{" not in text


@pytest.mark.skipif(nginx_conf.find_nginx() is None, reason="nginx is missing (make test-setup)")
def test_nginx_accepts_the_rendered_config(tmp_path):
    conf = _render(tmp_path, cfgmod.LimitsConfig())
    text = conf.read_text().replace("gpu-node-3.internal", "127.0.0.1")   # no DNS here
    conf.write_text(text)
    r = subprocess.run([nginx_conf.find_nginx(), "-t", "-e", "stderr", "-p", str(tmp_path), "-c", str(conf)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_the_launcher_refuses_to_expose_keyless_appliances(monkeypatch):
    monkeypatch.delenv(cfgmod.API_KEY_ENV, raising=False)
    r = subprocess.run([sys.executable, str(DEPLOY / "cluster.py"), "run", "--host", "0.0.0.0",
                        "--port", "18099"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2
    assert "api_key" in r.stderr or "nginx is not installed" in r.stderr
    r = subprocess.run([sys.executable, str(DEPLOY / "cluster.py"), "run", "--", "--port", "1"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and ("sets these itself" in r.stderr or "nginx is not installed" in r.stderr)
