"""The cluster/ files (local script, Ray cluster-launcher YAML, KubeRay manifests, README) agree with the
lock file, pyproject.toml, jobs/ and each other, and would run the job they describe. No network, no cluster:
local.sh's start/stop is exercised against a stub `ray` that only serves the dashboard port."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LOCAL_SH = CLUSTER / "local.sh"
AWS = CLUSTER / "aws-gpu.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
README = CLUSTER / "README.md"
IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<major>\d)(?P<minor>\d+)-gpu$")

# Fields of the KubeRay v1 types (ray-operator/apis/ray/v1/{raycluster,rayjob}_types.go): a misspelt field is
# dropped by the API server's pruning without an error, so the manifests may use only these.
RAYCLUSTER_SPEC_FIELDS = {
    "headGroupSpec",
    "workerGroupSpecs",
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headServiceAnnotations",
    "suspend",
    "managedBy",
    "gcsFaultToleranceOptions",
    "upgradeStrategy",
    "authOptions",
}
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "numOfHosts",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "suspend",
    "idleTimeoutSeconds",
}
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "submitterPodTemplate",
    "metadata",
    "clusterSelector",
    "submitterConfig",
    "managedBy",
    "deletionStrategy",
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "submissionMode",
    "entrypointResources",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes",
    "suspend",
    "schedule",
}
# KubeRay's submitter runs `... ray job submit ... -- <entrypoint>` through bash with the entrypoint unquoted
# and the runtime env as JSON inside double quotes (ray-operator/controllers/ray/common/job.go).
SHELL_METACHARACTERS = set(";&|<>$`()\\\"'*?[]{}!#~\n")


# --- helpers ---------------------------------------------------------------------------------------------------


@functools.cache
def locked_version(package: str) -> str:
    """The version uv.lock pins for ``package`` (exactly one entry)."""
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    versions = {entry["version"] for entry in lock["package"] if entry["name"] == package}
    assert len(versions) == 1, f"uv.lock pins {package} {sorted(versions) or 'nowhere'}; expected one version"
    return versions.pop()


@functools.cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def images(node) -> list[str]:
    """Every container image named anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k in ("image", "head_image", "worker_image") and isinstance(v, str)]
        return found + [image for v in node.values() for image in images(v)]
    if isinstance(node, list):
        return [image for v in node for image in images(v)]
    return []


def size_bytes(text: str) -> float:
    """A Kubernetes quantity (``4``, ``500m``, ``16Gi``, ``2G``) or docker size (``4g``, ``512m``) in units."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(text).strip())
    assert match, f"cannot parse size {text!r}"
    number, unit = float(match[1]), match[2]
    factors = {
        "": 1,
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    assert unit in factors, f"unknown unit in {text!r}"
    return number * factors[unit]


def docker_size(text: str) -> int:
    """``docker run --shm-size`` value: a number with an optional b/k/m/g suffix (powers of 1024)."""
    match = re.fullmatch(r"(\d+)([bkmgBKMG]?)", text.strip())
    assert match, f"cannot parse docker size {text!r}"
    return int(match[1]) * 1024 ** "bkmg".index((match[2] or "b").lower())


def object_store_memory(command: str) -> int:
    match = re.search(r"--object-store-memory[= ](\d+)", command)
    assert match, f"`ray start` without --object-store-memory: {command}"
    return int(match[1])


@functools.cache
def meta_train_module():
    """jobs/meta_train.py, the Ray job entrypoint, imported from its file."""
    path = REPO / "jobs" / "meta_train.py"
    assert path.is_file(), "jobs/meta_train.py (the Ray job entrypoint) does not exist"
    spec = importlib.util.spec_from_file_location("meta_train_entrypoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_entrypoint(tokens: list[str]):
    """``python jobs/meta_train.py ARGS``: the script exists, accepts ARGS, and its config loads with the overrides.

    Returns the run's distributed section (the job's default one when the config has none)."""
    from metaopt.config import DistributedConfig, load_config

    assert len(tokens) >= 2 and tokens[0] in ("python", "python3"), f"entrypoint is not `python SCRIPT ...`: {tokens}"
    assert tokens[1] == "jobs/meta_train.py", f"entrypoint runs {tokens[1]}, not jobs/meta_train.py"
    assert (REPO / tokens[1]).is_file(), f"{tokens[1]} does not exist"
    args = tokens[2:]
    try:
        meta_train_module().parse(args)
    except SystemExit as error:
        pytest.fail(f"jobs/meta_train.py rejects {args}: exit {error.code}")
    assert args.count("--config") == 1, f"entrypoint needs one --config: {args}"
    config_path = args[args.index("--config") + 1]
    assert (REPO / config_path).is_file(), f"--config {config_path} does not exist"
    overrides = [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]
    config = load_config(REPO / config_path, overrides)  # raises ConfigError on a bad override
    return config.distributed or DistributedConfig()


def submit_commands(text: str) -> list[list[str]]:
    """Each ``ray job submit ... -- ENTRYPOINT`` in ``text`` (backslash continuations joined), as its entrypoint."""
    lines = text.replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        if "ray job submit" not in line:
            continue
        tokens = shlex.split(line[line.index("ray job submit") :], comments=True)
        assert "--" in tokens, f"`ray job submit` without `-- ENTRYPOINT`: {line}"
        commands.append(tokens[tokens.index("--") + 1 :])
    return commands


def readme_sections() -> dict[str, str]:
    """cluster/README.md split at its ``## `` headings (the text before the first one under "")."""
    sections, title = {"": []}, ""
    for line in README.read_text().splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            sections[title] = []
        sections[title].append(line)
    return {name: "\n".join(body) for name, body in sections.items()}


def assert_fits(dist, cpus: float, gpus: float, where: str) -> None:
    """The learner refuses to start unless the cluster already has workers × num_cpus CPUs (and GPUs)."""
    need_cpus = dist.workers * dist.num_cpus
    assert need_cpus <= cpus, f"{where}: the job needs {need_cpus:g} CPUs at start, the cluster has {cpus:g}"
    if dist.num_gpus != "auto":
        need_gpus = dist.workers * dist.num_gpus
        assert need_gpus <= gpus, f"{where}: the job needs {need_gpus:g} GPUs at start, the cluster has {gpus:g}"


def aws_capacity(config: dict) -> tuple[float, float]:
    """CPUs and GPUs of the head plus every worker type's min_workers."""
    cpus = gpus = 0.0
    for name, node_type in config["available_node_types"].items():
        count = 1 if name == config["head_node_type"] else node_type.get("min_workers", 0)
        cpus += count * node_type["resources"].get("CPU", 0)
        gpus += count * node_type["resources"].get("GPU", 0)
    return cpus, gpus


def kuberay_groups(spec: dict) -> list[tuple[str, dict, int]]:
    """(name, group, guaranteed pods) for the head and every worker group of a RayClusterSpec."""
    groups = [("head", spec["headGroupSpec"], 1)]
    return groups + [(g["groupName"], g, g["minReplicas"] * g.get("numOfHosts", 1)) for g in spec["workerGroupSpecs"]]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def kuberay_capacity(spec: dict) -> tuple[float, float]:
    """CPUs and GPUs Ray advertises: rayStartParams num-cpus/num-gpus, else the container's limits."""
    cpus = gpus = 0.0
    for _, group, pods in kuberay_groups(spec):
        limits = ray_container(group).get("resources", {}).get("limits", {})
        params = group["rayStartParams"]
        cpus += pods * size_bytes(params.get("num-cpus", limits.get("cpu", "0")))
        gpus += pods * size_bytes(params.get("num-gpus", limits.get("nvidia.com/gpu", "0")))
    return cpus, gpus


def rayjob_runtime_env() -> dict:
    env = yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])
    assert isinstance(env, dict), "runtimeEnvYAML is not a YAML mapping"
    return env


# --- every file ---------------------------------------------------------------------------------------------------


def test_cluster_folder_has_the_three_ways():
    for path in (LOCAL_SH, AWS, RAYCLUSTER, RAYJOB, README):
        assert path.is_file(), f"{path.relative_to(REPO)} is missing"
    assert os.access(LOCAL_SH, os.X_OK), "cluster/local.sh is not executable"


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses_and_names_images(path):
    assert images(load(path)), f"{path.relative_to(REPO)} names no container image"


def test_locked_version_reads_uv_lock():
    """The helper finds the Ray that `uv sync --locked` installed into this environment."""
    from importlib.metadata import version

    assert re.fullmatch(r"\d+\.\d+\.\d+", locked_version("ray"))
    assert locked_version("ray") == version("ray")
    with pytest.raises(AssertionError, match="expected one version"):
        locked_version("no-such-package")


def test_images_match_locked_ray_and_supported_python():
    ray_version = locked_version("ray")
    supported = SpecifierSet(pyproject()["requires-python"])
    named = [(path, image) for path in sorted(CLUSTER.rglob("*.yaml")) for image in images(load(path))]
    named += [(README, image) for image in re.findall(r"rayproject/ray:[\w.-]+", README.read_text())]
    assert len(named) >= 5, named
    for path, image in named:
        match = IMAGE.match(image)
        assert match, f"{path.relative_to(REPO)}: {image} is not rayproject/ray:VERSION-pyXY-gpu"
        assert match["ray"] == ray_version, (
            f"{path.relative_to(REPO)}: {image} has Ray {match['ray']}, uv.lock {ray_version}"
        )
        python = f"{match['major']}.{match['minor']}"
        assert supported.contains(python), (
            f"{path.relative_to(REPO)}: {image} has Python {python}, pyproject wants {supported}"
        )


def test_kuberay_ray_version_is_locked_version():
    for path, spec in ((RAYCLUSTER, load(RAYCLUSTER)["spec"]), (RAYJOB, load(RAYJOB)["spec"]["rayClusterSpec"])):
        assert spec["rayVersion"] == locked_version("ray"), (
            f"{path.relative_to(REPO)}: rayVersion {spec['rayVersion']}, uv.lock {locked_version('ray')}"
        )


# --- cluster launcher (AWS) ---------------------------------------------------------------------------------------


def test_aws_config_is_valid_for_ray_up():
    """Ray's own preparation and JSON-schema validation of a cluster config, as `ray up` runs them (offline)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(AWS)
    for key in (
        "cluster_name",
        "max_workers",
        "provider",
        "available_node_types",
        "head_node_type",
        "docker",
        "file_mounts",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        assert key in config, f"aws-gpu.yaml lacks {key}"
    assert config["provider"]["type"] == "aws" and config["provider"].get("region")
    assert config["head_node_type"] in config["available_node_types"]
    validate_config(prepare_config(copy.deepcopy(config)))


def test_aws_has_gpu_workers():
    config = load(AWS)
    workers = {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    gpu_types = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no worker node type advertises a GPU"
    for name, node_type in gpu_types.items():
        assert node_type["node_config"].get("InstanceType"), f"{name} has no InstanceType"
        assert node_type.get("min_workers", 0) <= node_type["max_workers"] <= config["max_workers"]


def test_aws_installs_the_synced_checkout():
    config = load(AWS)
    synced = [remote for remote, local in config["file_mounts"].items() if (REPO / local).resolve() == REPO]
    assert synced, "file_mounts does not sync the repository root"
    assert any("pip install" in command and synced[0].rstrip("/") in command for command in config["setup_commands"]), (
        f"no setup command pip-installs {synced[0]}"
    )
    # What .gitignore lists (the 5 GB .venv, data/, runs/) must not be rsynced to every node.
    assert ".gitignore" in config.get("rsync_filter", []) and ".venv/" in (REPO / ".gitignore").read_text()


def test_aws_nodes_run_with_your_token():
    """Every node's container has RAY_AUTH_MODE=token and gets the token ~/.ray/auth_token from the laptop."""
    config = load(AWS)
    assert "--env=RAY_AUTH_MODE=token" in config["docker"]["run_options"], "the containers run without token auth"
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", "file_mounts does not copy the token"
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"] + config["setup_commands"]:
        assert "RAY_AUTH_MODE" not in command, f"a command overrides the containers' RAY_AUTH_MODE: {command}"


def test_aws_shm_holds_the_object_store():
    config = load(AWS)
    docker = config["docker"]
    for role, commands in (
        ("head", config["head_start_ray_commands"]),
        ("worker", config["worker_start_ray_commands"]),
    ):
        options = " ".join(docker.get("run_options", []) + docker.get(f"{role}_run_options", []))
        shm = re.findall(r"--shm-size[= ](\S+)", options)
        assert shm, f"no --shm-size in the {role}'s docker run options"
        starts = [c for c in commands if "ray start" in c]
        assert starts, f"no `ray start` in {role}_start_ray_commands"
        for command in starts:
            assert docker_size(shm[-1]) >= object_store_memory(command), (
                f"{role}: /dev/shm {shm[-1]} is smaller than the object store of `{command}`"
            )


# --- KubeRay --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path,kind", [(RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob")], ids=["raycluster", "rayjob"])
def test_kuberay_manifest_uses_v1_fields(path, kind):
    manifest = load(path)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    if kind == "RayJob":
        assert set(spec) <= RAYJOB_SPEC_FIELDS, f"unknown RayJob fields: {set(spec) - RAYJOB_SPEC_FIELDS}"
        spec = spec["rayClusterSpec"]
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, f"unknown RayCluster fields: {set(spec) - RAYCLUSTER_SPEC_FIELDS}"
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    assert spec["workerGroupSpecs"], "no worker group"
    for name, group, _ in kuberay_groups(spec):
        if name != "head":
            assert set(group) <= WORKER_GROUP_FIELDS, f"unknown fields in worker group {name}"
            assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        # rayStartParams is map[string]string: a YAML number there is rejected by the CRD.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), f"{name}: non-string rayStartParams"
        assert ray_container(group)["image"]


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=["raycluster", "rayjob"])
def test_kuberay_gpu_worker_group_requests_gpus(path):
    manifest = load(path)
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    gpu_groups = 0
    for group in spec["workerGroupSpecs"]:
        resources = ray_container(group).get("resources", {})
        gpus = resources.get("limits", {}).get("nvidia.com/gpu")
        if gpus is not None and int(gpus) >= 1:
            gpu_groups += 1
            # An extended resource's request, when given, must equal its limit.
            assert resources.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus
    assert gpu_groups, f"{path.name}: no worker group has an nvidia.com/gpu limit"


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=["raycluster", "rayjob"])
def test_kuberay_shm_holds_the_object_store(path):
    manifest = load(path)
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    for name, group, _ in kuberay_groups(spec):
        pod = group["template"]["spec"]
        container = ray_container(group)
        mounts = [m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert mounts, f"{name}: nothing mounted at /dev/shm"
        volume = next(v for v in pod.get("volumes", []) if v["name"] == mounts[0])
        assert volume["emptyDir"]["medium"] == "Memory", f"{name}: /dev/shm is not a memory-backed emptyDir"
        shm = size_bytes(volume["emptyDir"]["sizeLimit"])
        store = int(group["rayStartParams"]["object-store-memory"])
        assert shm >= store, f"{name}: /dev/shm {shm:g} B < object-store-memory {store} B"
        memory = size_bytes(container["resources"]["limits"]["memory"])
        assert memory > shm, f"{name}: memory limit {memory:g} B leaves no room beside /dev/shm ({shm:g} B)"


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=["raycluster", "rayjob"])
def test_kuberay_cluster_requires_a_token(path):
    """KubeRay (>= 1.5.1) makes the token Secret and sets RAY_AUTH_* in every Ray container: none may override it."""
    manifest = load(path)
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    assert spec.get("authOptions") == {"mode": "token"}, f"{path.name}: token authentication is not on"
    for name, group, _ in kuberay_groups(spec):
        names = {var["name"] for var in ray_container(group).get("env", [])}
        assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}, f"{name} sets its own RAY_AUTH_*"


def test_rayjob_runs_the_same_cluster_as_raycluster():
    assert load(RAYJOB)["spec"]["rayClusterSpec"] == load(RAYCLUSTER)["spec"]


def test_rayjob_entrypoint_runs_meta_train_on_its_cluster():
    spec = load(RAYJOB)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    entrypoint = spec["entrypoint"]
    assert not SHELL_METACHARACTERS & set(entrypoint), f"shell metacharacters in the entrypoint: {entrypoint!r}"
    dist = check_entrypoint(shlex.split(entrypoint))
    assert_fits(dist, *kuberay_capacity(spec["rayClusterSpec"]), where="rayjob.yaml")


def test_rayjob_runtime_env_installs_metaopt_from_its_working_dir():
    from ray.runtime_env import RuntimeEnv

    env = rayjob_runtime_env()
    RuntimeEnv(**env)  # Ray's own validation of every field
    assert not {"$", "`"} & set(json.dumps(env)), "the runtime env JSON would be expanded by the submitter's bash"
    working_dir = env["working_dir"]
    assert re.match(r"^(https|s3|gs)://.+\.zip$", working_dir), (
        f"a RayJob cannot upload a local folder; working_dir must be a remote zip, not {working_dir!r}"
    )
    installs = [Requirement(p) for p in env["pip"]]
    ours = [r for r in installs if r.name == pyproject()["name"]]
    assert ours, f"runtime env pip does not install {pyproject()['name']}"
    assert ours[0].url == working_dir, "pip installs metaopt from another archive than the job's working_dir"


# --- local.sh -------------------------------------------------------------------------------------------------------


def test_local_sh_syntax():
    result = subprocess.run(["bash", "-n", str(LOCAL_SH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_local_sh_is_strict_and_never_stops_by_name():
    text = LOCAL_SH.read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines()[1:])
    assert "set -euo pipefail" in code
    for forbidden in ("ray stop", "pkill", "killall"):
        assert forbidden not in code, f"cluster/local.sh uses `{forbidden}`"


def test_local_sh_rejects_unknown_command(tmp_path):
    result = subprocess.run(
        [str(LOCAL_SH), "restart"], capture_output=True, text=True, env={**os.environ, "METAOPT_RAY_DIR": str(tmp_path)}
    )
    assert result.returncode == 2 and "usage" in result.stderr


STUB_RAY = """#!{python}
# A stand-in for `ray start --head --block`: records its arguments and authentication settings, starts a child
# (like GCS/raylet) and serves the dashboard port until signalled.
import http.server, json, os, subprocess, sys
args = sys.argv[1:]
child = subprocess.Popen(["sleep", "300"])
auth = {{k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH_")}}
with open(os.environ["STUB_RECORD"], "w") as f:
    json.dump({{"args": args, "auth": auth, "pid": os.getpid(), "pgid": os.getpgid(0), "child": child.pid}}, f)
port = int(next(a.split("=", 1)[1] for a in args if a.startswith("--dashboard-port=")))
http.server.HTTPServer(("127.0.0.1", port), http.server.BaseHTTPRequestHandler).serve_forever()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stub_ray(tmp_path: Path) -> dict[str, str]:
    """The environment that makes cluster/local.sh run STUB_RAY, which records to tmp_path/record.json."""
    stub = tmp_path / "ray"
    stub.write_text(STUB_RAY.format(python=sys.executable))
    stub.chmod(0o755)
    return {
        "RAY": str(stub),
        "RAY_DASHBOARD_PORT": str(_free_port()),
        "METAOPT_RAY_DIR": str(tmp_path / "state"),
        "STUB_RECORD": str(tmp_path / "record.json"),
    }


def exports(stdout: str) -> dict[str, str]:
    """The ``export NAME=VALUE`` lines local.sh prints for a client."""
    return {name: shlex.split(value)[0] for name, value in re.findall(r"^\s*export (\w+)=(.*)$", stdout, re.M)}


def test_local_sh_starts_head_and_stops_only_its_process_group(tmp_path):
    env = {**os.environ, **stub_ray(tmp_path)}
    record, port = Path(env["STUB_RECORD"]), env["RAY_DASHBOARD_PORT"]
    # A bystander that looks like a Ray head by name: stopping by name would hit it, stopping by PID must not.
    decoy = subprocess.Popen(
        ["bash", "-c", 'exec -a "ray start --head --block decoy" sleep 300'], start_new_session=True
    )

    def run(*args):
        return subprocess.run([str(LOCAL_SH), *args], capture_output=True, text=True, env=env, timeout=60)

    started = None
    try:
        result = run("start", "--num-cpus=2")
        assert result.returncode == 0, result.stdout + result.stderr
        started = json.loads(record.read_text())
        args = started["args"]
        assert args[:3] == ["start", "--head", "--block"], args
        for expected in (
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={port}",
            "--num-cpus=2",
        ):
            assert expected in args, f"ray start lacks {expected}: {args}"
        assert started["pgid"] == started["pid"], "the head does not lead its own process group"
        assert (tmp_path / "state" / "head.pid").read_text().strip() == str(started["pid"])
        # The suite's RAY_AUTH_MODE=token and RAY_AUTH_TOKEN: the head takes the token from the environment.
        assert started["auth"] == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.environ["RAY_AUTH_TOKEN"]}
        assert exports(result.stdout) == {"RAY_ADDRESS": f"http://127.0.0.1:{port}", "RAY_AUTH_MODE": "token"}
        assert os.environ["RAY_AUTH_TOKEN"] not in result.stdout
        (entrypoint,) = submit_commands(result.stdout)
        check_entrypoint(entrypoint)

        again = run("start")  # already running: reports it, starts nothing
        assert again.returncode == 0 and json.loads(record.read_text())["pid"] == started["pid"]
        assert run("status").returncode == 0

        clock = time.monotonic()
        stopped = run("stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        # SIGTERM to the whole group ends it at once; a signal to the PID alone would leave the child until SIGKILL.
        assert time.monotonic() - clock < 15, "stop waited for its SIGKILL fallback"
        deadline = time.monotonic() + 10
        while (_alive(started["pid"]) or _alive(started["child"])) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(started["pid"]) and not _alive(started["child"]), "stop left the head's processes running"
        assert _alive(decoy.pid), "stop killed a process it did not start"
        assert not (tmp_path / "state" / "head.pid").exists()
        assert run("status").returncode == 1 and run("stop").returncode == 0
    finally:
        decoy.kill()
        decoy.wait()
        started = json.loads(record.read_text()) if record.exists() else None
        for pid in (started["pid"], started["child"]) if started else ():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("case", ["default file", "token path", "disabled", "unknown mode"])
def test_local_sh_decides_authentication(tmp_path, case):
    """Without RAY_AUTH_* in the shell, start writes a private token to ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH)
    and runs the head with it; RAY_AUTH_MODE=disabled opts out with a warning; any other mode is refused."""
    home, path = tmp_path / "home", tmp_path / "secrets" / "ray-token"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    env |= stub_ray(tmp_path) | {"HOME": str(home)}
    env |= {
        "token path": {"RAY_AUTH_TOKEN_PATH": str(path)},
        "disabled": {"RAY_AUTH_MODE": "disabled"},
        "unknown mode": {"RAY_AUTH_MODE": "tokens"},
    }.get(case, {})

    def run(command):
        return subprocess.run([str(LOCAL_SH), command], capture_output=True, text=True, env=env, timeout=60)

    started = run("start")
    try:
        if case == "unknown mode":
            assert started.returncode == 1 and "RAY_AUTH_MODE=tokens" in started.stderr
            assert not Path(env["STUB_RECORD"]).exists(), "local.sh started a head with an unknown mode"
            return
        assert started.returncode == 0, started.stdout + started.stderr
        head = json.loads(Path(env["STUB_RECORD"]).read_text())["auth"]
        client = exports(started.stdout)
        assert client.pop("RAY_ADDRESS") == f"http://127.0.0.1:{env['RAY_DASHBOARD_PORT']}"
        if case == "disabled":
            assert head == client == {"RAY_AUTH_MODE": "disabled"}
            assert "without token authentication" in started.stderr and not (home / ".ray").exists()
            return
        token_file = home / ".ray" / "auth_token" if case == "default file" else path
        assert re.fullmatch(r"[0-9a-f]{64}", token_file.read_text()), "not a 256-bit hex token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert head == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
        custom_path = {"RAY_AUTH_TOKEN_PATH": str(path)} if case == "token path" else {}
        assert client == {"RAY_AUTH_MODE": "token"} | custom_path
        assert (tmp_path / "state" / "client.env").read_text() in started.stdout.replace("\n  ", "\n")
    finally:
        assert run("stop").returncode == 0


# --- README ---------------------------------------------------------------------------------------------------------


def test_readme_covers_start_follow_stop_for_each_way():
    text = README.read_text()
    for needed in (
        "cluster/local.sh stop",
        "ray up cluster/aws-gpu.yaml",
        "ray dashboard cluster/aws-gpu.yaml",
        "ray down cluster/aws-gpu.yaml",
        "helm install",
        "kubectl apply -f cluster/kuberay/raycluster.yaml",
        "kubectl apply -f cluster/kuberay/rayjob.yaml",
        "ray job logs",
        "--follow",
        "ray job stop",
        "kubectl logs",
        "kubectl delete",
    ):
        assert needed in text, f"cluster/README.md does not mention `{needed}`"
    for path in re.findall(r"\bcluster/[\w./-]+\.(?:sh|yaml)\b", text):
        assert (REPO / path).is_file(), f"cluster/README.md names {path}, which does not exist"


def test_readme_clients_send_the_token():
    """Each way's commands export RAY_AUTH_MODE=token before their first `ray job` command: without it Ray sends
    no token and the cluster refuses the job."""
    for title, body in readme_sections().items():
        if not title.startswith(("Local", "Cloud", "Kubernetes")):
            continue
        code = "\n".join(re.findall(r"^```(?:bash|sh)\n(.*?)^```", body, re.S | re.M))
        first_job = code.index("ray job ")
        assert "export RAY_AUTH_MODE=token" in code[:first_job], f"README section {title!r}: no RAY_AUTH_MODE=token"


def test_readme_jobs_are_valid_and_fit_their_clusters():
    """Every `ray job submit` in cluster/README.md runs jobs/meta_train.py with a config that loads, and the
    cloud/Kubernetes ones fit the resources their cluster has at start (the learner refuses otherwise)."""
    capacity = {
        "Cloud": lambda: aws_capacity(load(AWS)),
        "Kubernetes": lambda: kuberay_capacity(load(RAYCLUSTER)["spec"]),
    }
    checked = set()
    for title, body in readme_sections().items():
        code = "\n".join(re.findall(r"^```(?:bash|sh)\n(.*?)^```", body, re.S | re.M))
        for entrypoint in submit_commands(code):
            dist = check_entrypoint(entrypoint)
            for prefix, cluster_capacity in capacity.items():
                if title.startswith(prefix):
                    assert_fits(dist, *cluster_capacity(), where=f"README section {title!r}")
                    checked.add(prefix)
    assert checked == set(capacity), f"README sections without a job to check: {set(capacity) - checked}"
