"""The deployment files in infra/deploy/, checked offline: every YAML parses; Kubernetes manifests match the API
schemas shipped with `kubernetes-validate` (strict: unknown fields are errors); compose.yaml matches the
compose-spec schema shipped with `check-jsonschema`; every container runs a real `llava-serve` subcommand with real
flags (parsed by the CLI's own parser) and only `LLAVA_*` variables the process reads; the settings they build
agree with the probes, grace periods and autoscaling around them. `docker compose config` and `kubectl kustomize`
run where those tools work."""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "infra" / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
# Oldest Kubernetes the manifests promise (the preStop `sleep` action is on by default from 1.30), and the newest
# whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30", "latest")
# Custom resources: kubernetes-validate ships schemas for built-in kinds only.
CRD_GROUPS = {"keda.sh": "KEDA"}
# After its drain timeout a worker settles what is left and gives Redis up to 10 s more to take the last results
# (workers/worker_lifecycle.py `_drain_step`, `_abandon`), then waits up to 5 s for its sweeper thread (workers/cli.py
# `run_worker`); the grace period must cover the drain and both.
DRAIN_SETTLE_MARGIN_S = 15
K8S_DEFAULT_GRACE_S = 30
COMPOSE_DEFAULT_GRACE_S = 10


def load_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_documents() -> list[tuple[Path, dict]]:
    """Every Kubernetes object under k8s/ (Helm values and the kustomization are not objects of the API)."""
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in load_yaml(path):
            if isinstance(doc, dict) and "apiVersion" in doc and doc.get("kind") != "Kustomization":
                found.append((path, doc))
    return found


def doc_id(item: tuple[Path, dict]) -> str:
    path, doc = item
    return f"{path.relative_to(DEPLOY)}:{doc['kind']}/{doc['metadata']['name']}"


# ---- every file parses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_file_parses_to_mappings(path: Path) -> None:
    docs = load_yaml(path)
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(doc, dict) for doc in docs), f"{path}: every document is a mapping"


# ---- Kubernetes: schemas, kustomization -----------------------------------------------------------------------


def validate_k8s(doc: dict) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]'")
    for version in K8S_VERSIONS:
        wanted = kubernetes_validate.latest_version() if version == "latest" else version
        kubernetes_validate.validate(doc, wanted, strict=True)


@pytest.mark.parametrize("item", k8s_documents(), ids=doc_id)
def test_k8s_object_matches_the_api_schema(item: tuple[Path, dict]) -> None:
    _, doc = item
    group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
    if group in CRD_GROUPS:
        pytest.skip(f"{doc['kind']} is a {CRD_GROUPS[group]} custom resource; kubernetes-validate has no schema for it")
    validate_k8s(doc)


def test_k8s_schema_check_rejects_a_misspelled_field() -> None:
    pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]'")
    from kubernetes_validate import ValidationError

    deployment = next(doc for _, doc in k8s_documents() if doc["kind"] == "Deployment")
    broken = json.loads(json.dumps(deployment))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    with pytest.raises(ValidationError):
        validate_k8s(broken)


def kustomization() -> dict:
    return load_yaml(K8S / "kustomization.yaml")[0]


def test_kustomization_lists_every_manifest_and_only_existing_ones() -> None:
    listed = kustomization()["resources"]
    assert all((K8S / name).is_file() for name in listed), listed
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == manifests, "optional/ holds what is not applied by default; the rest is listed"


def test_kubectl_kustomize_builds_valid_objects() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed here")
    done = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    built = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    assert len(built) == len([d for p, d in k8s_documents() if p.parent == K8S])
    for doc in built:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization()["namespace"], doc["metadata"]["name"]
        validate_k8s(doc)


# ---- compose --------------------------------------------------------------------------------------------------


def compose() -> dict:
    return load_yaml(COMPOSE)[0]


def compose_schema() -> dict:
    pytest.importorskip("check_jsonschema", reason="pip install -e '.[test]'")
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads(vendor.joinpath("compose-spec.json").read_text())


def compose_errors(document: dict) -> list[str]:
    import jsonschema

    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_matches_the_compose_spec_schema() -> None:
    assert compose_errors(compose()) == []


def test_compose_schema_check_rejects_a_misspelled_key() -> None:
    broken = compose()
    broken["services"]["worker"]["stop_grace_periods"] = broken["services"]["worker"].pop("stop_grace_period")
    assert compose_errors(broken)


def test_docker_compose_config_accepts_the_file() -> None:
    if shutil.which("docker") is None:
        pytest.skip("docker is not installed here")
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"`docker compose` does not work here: {(probe.stderr or probe.stdout).strip()}")
    done = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


# ---- containers: real commands, real settings -----------------------------------------------------------------


@dataclass
class Process:
    """One llava-serve process a deployment file starts: where, its argv after `llava-serve`, its environment."""

    where: str
    argv: list[str]
    env: dict[str, str]
    spec: dict = field(default_factory=dict)  # the pod spec, compose service or Dockerfile stage it came from
    shared: set[str] = field(default_factory=set)  # names from a ConfigMap shared by several kinds of process

    @property
    def command(self) -> str:
        return self.argv[0]


def interpolate(value: str) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, with the variables unset."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def k8s_processes() -> list[Process]:
    docs = k8s_documents()
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for _, d in docs if d["kind"] == "ConfigMap"}
    found = []
    for path, doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            continue
        pod = doc["spec"]["template"]["spec"]
        for container in pod["containers"]:
            if not container["image"].startswith("llava-serve:"):
                continue
            env: dict[str, str] = {}
            for source in container.get("envFrom", []):
                env.update(config_maps[source["configMapRef"]["name"]])
            own = {var["name"]: str(var.get("value", "from-" + var["name"])) for var in container.get("env", [])}
            where = f"{path.relative_to(DEPLOY)}:{doc['metadata']['name']}/{container['name']}"
            argv = [str(a) for a in container.get("command", []) + container["args"]]
            spec = {"doc": doc, "container": container}
            found.append(Process(where, argv, {**env, **own}, spec, set(env) - set(own)))
    return found


def compose_processes() -> list[Process]:
    found = []
    for name, service in compose()["services"].items():
        if not service["image"].startswith("llava-serve:"):
            continue
        env = service.get("environment", {})
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        argv = [interpolate(str(a)) for a in service["command"]]
        found.append(Process(f"compose.yaml:{name}", argv, {k: interpolate(str(v)) for k, v in env.items()}, service))
    return found


@dataclass
class Stage:
    name: str
    parent: str
    instructions: list[tuple[str, str]]


def dockerfile_stages() -> dict[str, Stage]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            parts = rest.split()
            current = Stage(parts[-1] if len(parts) == 3 and parts[1].upper() == "AS" else "", parts[0], [])
            stages[current.name] = current
        elif current is not None:
            current.instructions.append((keyword.upper(), rest.strip()))
    return stages


def stage_instruction(stages: dict[str, Stage], name: str, keyword: str) -> str | None:
    """The last `keyword` of a stage, inherited from its parent stages in this file."""
    stage: Stage | None = stages[name]
    while stage is not None:
        for kw, rest in reversed(stage.instructions):
            if kw == keyword:
                return rest
        stage = stages.get(stage.parent)
    return None


def dockerfile_processes() -> list[Process]:
    stages = dockerfile_stages()
    found = []
    for target in ("cpu", "cuda"):
        cmd = stage_instruction(stages, target, "CMD")
        found.append(Process(f"Dockerfile:{target}", json.loads(cmd or "[]"), {}, {"stage": stages[target]}))
    return found


def dockerfile_env_names() -> set[str]:
    names = set()
    for stage in dockerfile_stages().values():
        for keyword, rest in stage.instructions:
            if keyword == "ENV":
                names.update(re.findall(r"(\w+)=", rest))
    return names


def all_processes() -> list[Process]:
    return [*k8s_processes(), *compose_processes(), *dockerfile_processes()]


@functools.cache
def cli_parser() -> argparse.ArgumentParser:
    from cli.main import build_parser

    return build_parser()


def settings_builders() -> dict[str, Callable[[argparse.Namespace], Any]]:
    from broker.app import controller_settings_from_args
    from frontend.app import web_settings_from_args
    from workers.cli import worker_settings_from_args

    return {
        "controller": controller_settings_from_args,
        "worker": worker_settings_from_args,
        "web": web_settings_from_args,
    }


def settings_classes() -> dict[str, type]:
    from infra.settings import ControllerSettings, WebSettings, WorkerSettings

    return {"controller": ControllerSettings, "worker": WorkerSettings, "web": WebSettings}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The test's environment without any LLAVA_* variable, so a process sees only what its file gives it."""
    for name in list(os.environ):
        if name.startswith("LLAVA_"):
            monkeypatch.delenv(name)
    yield monkeypatch


def settings_of(process: Process, env: pytest.MonkeyPatch) -> Any:
    """The settings object the process builds from its argv and environment, through the CLI's own code."""
    for name, value in process.env.items():
        env.setenv(name, value)
    try:
        args = cli_parser().parse_args(process.argv)
    except SystemExit:
        pytest.fail(f"{process.where}: `llava-serve {' '.join(process.argv)}` is refused by the CLI (stderr above)")
    return settings_builders()[args.command](args)


def variable_is_read(name: str, command: str, env: pytest.MonkeyPatch) -> bool:
    """Whether `llava-serve <command>` reads environment variable `name` into its settings."""
    from pydantic_settings import EnvSettingsSource

    from infra.settings import default_cache_dir

    env.setenv(name, "/probe")
    try:
        if name == "LLAVA_CACHE_DIR":
            return default_cache_dir() == Path("/probe")
        return bool(EnvSettingsSource(settings_classes()[command])())
    finally:
        env.delenv(name)


PROCESSES = all_processes()


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.where)
def test_process_runs_a_real_subcommand_with_valid_settings(process: Process, clean_env: pytest.MonkeyPatch) -> None:
    assert process.command in settings_builders(), f"{process.where}: {process.argv}"
    settings = settings_of(process, clean_env)
    if process.command in ("controller", "web"):
        assert settings.host == "0.0.0.0", f"{process.where}: a container must listen beyond its loopback"
    if process.command == "worker" and settings.metrics_port is not None:
        assert settings.metrics_host == "0.0.0.0", f"{process.where}: /metrics must be reachable from outside"


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.where)
def test_every_llava_variable_is_read_by_its_process(process: Process, clean_env: pytest.MonkeyPatch) -> None:
    """A variable set for one process is read by it; one from a shared ConfigMap by some llava-serve process (one
    environment may hold the settings of all of them)."""
    for name in process.env:
        if not name.startswith("LLAVA_"):
            continue
        readers = settings_classes() if name in process.shared else [process.command]
        assert any(variable_is_read(name, c, clean_env) for c in readers), f"{process.where}: {name} is read by none"


def test_dockerfile_sets_only_variables_some_process_reads(clean_env: pytest.MonkeyPatch) -> None:
    for name in dockerfile_env_names():
        if name.startswith("LLAVA_"):
            assert any(variable_is_read(name, c, clean_env) for c in settings_classes()), name


def test_variable_check_refuses_a_misspelled_name(clean_env: pytest.MonkeyPatch) -> None:
    assert variable_is_read("LLAVA_CONTROLLER_MAX_QUEUE", "controller", clean_env)
    assert not variable_is_read("LLAVA_CONTROLLER_MAX_QUEUES", "controller", clean_env)
    assert not variable_is_read("LLAVA_CONTROLLER_MAX_QUEUE", "worker", clean_env)


# ---- Dockerfile -----------------------------------------------------------------------------------------------


def test_dockerfile_entrypoint_passes_sigterm_to_llava_serve() -> None:
    """Exec form under tini: SIGTERM reaches llava-serve (a worker's drain starts with it); a shell would not pass it
    on, and a Python PID 1 without a handler of its own (the web UI) ignores it."""
    stages = dockerfile_stages()
    for target in ("cpu", "cuda"):
        entrypoint = stage_instruction(stages, target, "ENTRYPOINT")
        assert json.loads(entrypoint or "null") == ["tini", "--", "llava-serve"], (target, entrypoint)
    apt = " ".join(rest for kw, rest in stages["base"].instructions if kw == "RUN")
    assert "tini" in apt


def test_dockerfile_pins_torch_as_scripts_install_does_and_copies_every_package() -> None:
    pinned = re.search(r"torch==([\w.]+)", (ROOT / "scripts" / "install").read_text())
    assert pinned is not None
    stages = dockerfile_stages()
    assert {"cpu", "cuda"} <= set(stages)
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))
    assert args["TORCH_VERSION"] == pinned.group(1)
    cpu_install = " ".join(rest for kw, rest in stages["torch-cpu"].instructions if kw == "RUN")
    assert '"torch==${TORCH_VERSION}"' in cpu_install and "${TORCH_CPU_INDEX}" in cpu_install
    assert args["TORCH_CPU_INDEX"].endswith("/whl/cpu")
    include = re.search(r"^include = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), flags=re.M)
    assert include is not None  # [tool.setuptools.packages.find]; tomllib is 3.11+, the project supports 3.10
    packages = set(re.findall(r'"(\w+)\*"', include.group(1)))
    copied = {rest.split()[0] for kw, rest in stages["wheel"].instructions if kw == "COPY"}
    assert packages and packages <= copied, packages - copied


# ---- what surrounds the processes: probes, grace periods, GPUs, autoscaling ------------------------------------


def k8s_named(kind: str, name: str) -> dict:
    return next(d for _, d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name)


def test_controller_readiness_is_the_readyz_route_on_its_port(clean_env: pytest.MonkeyPatch) -> None:
    from broker.routes_api import router

    routes = {route.path for route in router.routes}
    controllers = [p for p in k8s_processes() if p.command == "controller"]
    assert controllers
    for process in controllers:
        settings = settings_of(process, clean_env)
        container = process.spec["container"]
        probe = container["readinessProbe"]["httpGet"]
        assert probe["path"] == "/readyz" and "/readyz" in routes
        port = next(p for p in container["ports"] if p["name"] == probe["port"])
        assert port["containerPort"] == settings.port
        assert container["livenessProbe"]["httpGet"]["path"] in routes


def test_worker_grace_period_outlasts_its_drain(clean_env: pytest.MonkeyPatch) -> None:
    workers = [p for p in [*k8s_processes(), *compose_processes()] if p.command == "worker"]
    assert len(workers) >= 3
    for process in workers:
        drain_s = settings_of(process, clean_env).drain_timeout_s
        if "doc" in process.spec:
            grace_s = process.spec["doc"]["spec"]["template"]["spec"].get(
                "terminationGracePeriodSeconds", K8S_DEFAULT_GRACE_S
            )
        else:
            grace = str(process.spec.get("stop_grace_period", f"{COMPOSE_DEFAULT_GRACE_S}s"))
            assert grace.endswith("s") and grace[:-1].isdigit(), grace
            grace_s = int(grace[:-1])
        assert grace_s >= drain_s + DRAIN_SETTLE_MARGIN_S, f"{process.where}: {grace_s} s for a {drain_s} s drain"


def test_gpu_workers_get_a_gpu_and_the_cuda_image(clean_env: pytest.MonkeyPatch) -> None:
    gpu_workers = [
        p for p in [*k8s_processes(), *compose_processes()]
        if p.command == "worker" and settings_of(p, clean_env).device.startswith("cuda")
    ]  # fmt: skip
    assert {p.where.split(":")[0] for p in gpu_workers} >= {"compose.yaml", "k8s/worker-llava-1.5-7b.yaml"}
    for process in gpu_workers:
        if "container" in process.spec:
            container = process.spec["container"]
            assert container["image"] == "llava-serve:cuda"
            assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
        else:
            assert process.spec["image"] == "llava-serve:cuda" and process.spec["build"]["target"] == "cuda"
            devices = process.spec["deploy"]["resources"]["reservations"]["devices"]
            assert any("gpu" in d["capabilities"] for d in devices)


def test_web_ui_points_at_the_controller_service(clean_env: pytest.MonkeyPatch) -> None:
    k8s_controller_port = settings_of(next(p for p in k8s_processes() if p.command == "controller"), clean_env).port
    compose_controller_port = settings_of(
        next(p for p in compose_processes() if p.command == "controller"), clean_env
    ).port
    for process in [p for p in [*k8s_processes(), *compose_processes()] if p.command == "web"]:
        url = urlsplit(settings_of(process, clean_env).controller_url)
        if "container" in process.spec:
            service = k8s_named("Service", url.hostname or "")
            assert url.port in [p["port"] for p in service["spec"]["ports"]] and url.port == k8s_controller_port
        else:
            assert url.hostname in compose()["services"] and url.port == compose_controller_port


def exported_metric_names(redis_client: Any) -> set[str]:
    from broker.metrics import ControllerMetrics

    metrics = ControllerMetrics()
    metrics.watch_redis(lambda: redis_client)
    return set(re.findall(r"^# TYPE (\w+) ", metrics.exposition().decode(), flags=re.M))


def test_autoscaling_targets_a_worker_on_metrics_the_controller_exports(
    redis_client: Any, clean_env: pytest.MonkeyPatch
) -> None:
    exported = exported_metric_names(redis_client)
    assert {"llava_num_requests_waiting", "llava_num_requests_running"} <= exported
    workers = {p.spec["doc"]["metadata"]["name"]: settings_of(p, clean_env) for p in k8s_processes()
               if p.command == "worker"}  # fmt: skip

    hpa = k8s_named("HorizontalPodAutoscaler", "worker-llava-1.5-7b")
    target = workers[hpa["spec"]["scaleTargetRef"]["name"]]
    external = hpa["spec"]["metrics"][0]["external"]
    assert external["metric"]["selector"]["matchLabels"]["model_name"] == target.resolved_model_name()
    assert int(external["target"]["averageValue"]) == target.max_batch
    adapter = load_yaml(K8S / "optional" / "prometheus-adapter-values.yaml")[0]
    rule = next(r for r in adapter["rules"]["external"] if r["name"]["as"] == external["metric"]["name"])
    used = set(re.findall(r"\bllava_\w+", rule["metricsQuery"] + rule["seriesQuery"]))
    assert used and used <= exported, used - exported

    scaled = next(d for _, d in k8s_documents() if d["kind"] == "ScaledObject")
    target = workers[scaled["spec"]["scaleTargetRef"]["name"]]
    trigger = scaled["spec"]["triggers"][0]["metadata"]
    used = set(re.findall(r"\bllava_\w+", trigger["query"]))
    assert used and used <= exported, used - exported
    assert set(re.findall(r'model_name="([^"]+)"', trigger["query"])) == {target.resolved_model_name()}
    assert int(trigger["threshold"]) == target.max_batch
    assert scaled["spec"]["minReplicaCount"] >= 1 and hpa["spec"]["minReplicas"] >= 1
