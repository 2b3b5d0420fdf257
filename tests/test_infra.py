"""The cluster road: KubeRay manifests, the container image and the Ray cluster launcher config are consistent with
the repository (every entrypoint names a script and a config that exist and load), without a cluster."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

from jobkit.config import PRESETS, load_config
from jobkit.jobs import JOBS

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
MANIFESTS = sorted((INFRA / "k8s").glob("*.yaml"))
IMAGE_ROOT = "/opt/vosr"  # WORKDIR of infra/Dockerfile: where the repository lives inside the image
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
REQUIRED_JOBS = {name: JOBS[name].script for name in ("curate", "precompute", "pretrain", "distill")}


def _load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: one document per manifest"
    return docs[0]


def _repo_path(image_path: str) -> Path:
    """Map a path inside the image (or a repo-relative one) to the checkout."""
    if image_path.startswith(IMAGE_ROOT + "/"):
        image_path = image_path[len(IMAGE_ROOT) + 1:]
    assert not image_path.startswith("/"), f"{image_path} is outside the project folder of the image"
    return ROOT / image_path


def _commands(entrypoint: str) -> list[tuple[Path, Path]]:
    """(script, config) of every command of an entrypoint (stages chained with `&&` run in order)."""
    return [_script_and_config(part) for part in entrypoint.split("&&")]


def _script_and_config(command: str) -> tuple[Path, Path]:
    argv = shlex.split(command)
    assert argv[0] in {"python", "python3"}, f"entrypoint must run python: {command}"
    script = _repo_path(argv[1])
    assert "--config" in argv, f"entrypoint must pass --config: {command}"
    config = _repo_path(argv[argv.index("--config") + 1])
    return script, config


def _containers(pod_template: dict) -> list[dict]:
    spec = pod_template["spec"]
    assert spec["containers"], "pod template without containers"
    for c in spec["containers"]:
        assert c["name"] and c["image"], c
        mounts = {m["name"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"] for v in spec.get("volumes", [])}
        assert mounts <= volumes, f"container {c['name']} mounts undeclared volumes {mounts - volumes}"
    return spec["containers"]


def _check_cluster_spec(spec: dict) -> dict:
    """Check a RayCluster spec (RayJob.rayClusterSpec / RayService.rayClusterConfig); return facts about it."""
    from ray import __version__ as ray_version

    assert spec["rayVersion"] == ray_version, "rayVersion must match the Ray pinned in pyproject.toml"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    images = {c["image"] for c in _containers(head["template"])}
    gpus = 0
    assert spec["workerGroupSpecs"], "at least one worker group"
    names = set()
    for group in spec["workerGroupSpecs"]:
        assert DNS1123.match(group["groupName"]), group["groupName"]
        assert group["groupName"] not in names
        names.add(group["groupName"])
        assert isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        for c in _containers(group["template"]):
            images.add(c["image"])
            limits = c.get("resources", {}).get("limits", {})
            gpus += int(limits.get("nvidia.com/gpu", 0)) * group["maxReplicas"]
    return {"images": images, "max_gpus": gpus}


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_is_a_valid_kuberay_object(path):
    doc = _load(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] in {"RayJob", "RayService"}
    assert DNS1123.match(doc["metadata"]["name"]), doc["metadata"]["name"]
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        assert spec["submissionMode"] in {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
        assert isinstance(yaml.safe_load(spec.get("runtimeEnvYAML", "{}")), dict)
        facts = _check_cluster_spec(spec["rayClusterSpec"])
        for script, config in _commands(spec["entrypoint"]):
            assert script.is_file(), f"{path.name}: entrypoint script {script} does not exist"
            assert config.is_file(), f"{path.name}: entrypoint config {config} does not exist"
            cfg = load_config(config)
            assert cfg.preset != "tiny" and cfg.preset in PRESETS, "cluster jobs run a real preset"
            if "training/" in str(script):
                assert cfg.train.use_gpu
                assert facts["max_gpus"] >= cfg.train.num_workers, f"{path.name}: fewer GPUs than train.num_workers"
    else:
        facts = _check_cluster_spec(spec["rayClusterConfig"])
        serve = yaml.safe_load(spec["serveConfigV2"])
        assert serve["applications"]
        for app in serve["applications"]:
            module, _, attr = app["import_path"].partition(":")
            assert attr, "import_path must be module:attribute"
            source = ROOT / (module.replace(".", "/") + ".py")
            if not source.is_file():                                   # a package
                source = ROOT / module.replace(".", "/") / "__init__.py"
            assert source.is_file(), f"{source} does not exist"
            tree = ast.parse(source.read_text())
            names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            names |= {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign)
                      for t in n.targets if isinstance(t, ast.Name)}
            if "__getattr__" in names:   # a module __getattr__ builds the names it compares against (PEP 562)
                getattr_fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__")
                names |= {c.value for c in ast.walk(getattr_fn) if isinstance(c, ast.Constant)
                          and isinstance(c.value, str) and c.value.isidentifier()}
            assert attr in names, f"{source} defines no {attr}"
            config = _repo_path(app["runtime_env"]["env_vars"]["VOSR_CONFIG"])
            cfg = load_config(config)
            assert cfg.inference.checkpoint.startswith("models:/"), "the endpoint loads the registered student"
    assert len(facts["images"]) == 1, f"{path.name}: one image for all pods, got {facts['images']}"


def test_every_stage_has_a_rayjob_and_the_endpoint_a_rayservice():
    scripts = {}
    kinds = set()
    for path in MANIFESTS:
        doc = _load(path)
        kinds.add(doc["kind"])
        if doc["kind"] == "RayJob":
            for script, _ in _commands(doc["spec"]["entrypoint"]):
                scripts[script.relative_to(ROOT).as_posix()] = path.name
    for stage, script in REQUIRED_JOBS.items():
        assert script in scripts, f"no RayJob runs {stage} ({script})"
    assert "RayService" in kinds


def test_cluster_configs_keep_data_on_s3():
    for name in ("curate", "precompute-256", "precompute", "pretrain-256", "pretrain", "distill"):
        cfg = load_config(ROOT / "configs" / "cluster" / f"{name}.yaml")
        stage = name.split("-")[0]
        uris = {"curate": [cfg.curate.output, *cfg.curate.sources],
                "precompute": [cfg.precompute.input, cfg.precompute.output]}.get(
            stage, [cfg.train.features, cfg.train.storage_path])
        assert all(u.startswith("s3://") for u in uris), (stage, uris)
        assert cfg.run.mlflow.tracking_uri.startswith("http"), "cluster runs log to an MLflow server"
        assert cfg.run.mlflow.artifact_location.startswith("s3://")
    distill = load_config(ROOT / "configs" / "cluster" / "distill.yaml")
    assert distill.distill_job.register_name
    serve = load_config(ROOT / "configs" / "cluster" / "serve.yaml")
    assert serve.inference.checkpoint == f"models:/{distill.distill_job.register_name}/1"


def test_endpoint_is_redundant_and_its_readiness_means_ready():
    """Two model replicas and two ingress replicas on different nodes, pods ready only when the application answers
    /readyz (a model replica loaded), and graceful shutdowns that fit in the pods' termination grace period."""
    cfg = load_config(ROOT / "configs" / "cluster" / "serve.yaml").serve
    assert cfg.min_replicas >= 2 and cfg.ingress_replicas >= 2 and cfg.max_replicas_per_node == 1
    assert cfg.max_surge_percent > 0, "redeploys keep the old model replicas until the new ones have loaded"
    doc = _load(INFRA / "k8s" / "rayservice-endpoint.yaml")
    spec = doc["spec"]
    assert spec["excludeHeadPodFromServeSvc"] is True
    http = yaml.safe_load(spec["serveConfigV2"])["http_options"]
    drain_s = cfg.request_timeout_s + cfg.body_timeout_s
    assert http["request_timeout_s"] == drain_s + 5, "the proxy's 408 comes after the ingress's own answer"
    serving = [g for g in spec["rayClusterConfig"]["workerGroupSpecs"]
               if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                      for c in g["template"]["spec"]["containers"])]
    assert serving
    assert sum(g["minReplicas"] for g in serving) >= cfg.min_replicas, "one node per model replica"
    assert sum(g["maxReplicas"] for g in serving) >= cfg.max_replicas
    for group in serving:
        pod = group["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > drain_s, "replicas drain before the pod is killed"
        for c in pod["containers"]:
            probe = c["readinessProbe"]["httpGet"]
            assert probe["path"] == "/readyz" and probe["port"] == 8000, probe


def test_dockerfile_uses_cuda_base_and_installs_the_project():
    text = (INFRA / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms and froms[0].startswith("nvidia/cuda:"), froms
    assert re.search(r"^WORKDIR\s+\$\{VOSR_HOME\}|^WORKDIR\s+" + IMAGE_ROOT, text, flags=re.M)
    assert f"VOSR_HOME={IMAGE_ROOT}" in text
    pinned = re.search(r'"torch==([\d.]+)"', text)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert pinned and f"torch=={pinned.group(1)}" in pyproject, "the image pins the project's torch"
    assert "-c constraints.txt" in text and re.search(r"pip install .*-e \"?\.", text)
    copied = set(re.findall(r"^COPY\s+(\S+)\s", text, flags=re.M))
    packages = [name.rstrip("*") for name in
                re.findall(r'"([^"]+)"', re.search(r"^include = \[(.*)\]", pyproject, flags=re.M).group(1))]
    assert "jobkit" in packages  # every installed package is copied into the image, the console script's included
    for needed in (*packages, "configs", "pyproject.toml"):
        assert needed in copied, f"the image does not copy {needed}"
    for src in copied:
        assert (ROOT / src).exists(), f"COPY of a missing path {src}"


def test_cluster_launcher_config():
    cfg = yaml.safe_load((INFRA / "cluster-aws.yaml").read_text())
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    total = 0
    for name, node in types.items():
        assert "InstanceType" in node["node_config"], name
        assert "resources" in node
        if name != cfg["head_node_type"]:
            assert 0 <= node["min_workers"] <= node["max_workers"]
            total += node["max_workers"]
    assert total >= cfg["max_workers"] >= 1
    images = {_load(p)["spec"].get("rayClusterSpec", _load(p)["spec"].get("rayClusterConfig"))
              ["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] for p in MANIFESTS}
    assert {cfg["docker"]["image"]} == images, "launcher and KubeRay run the same image"
    # Ray 2.60 token authentication: every node starts with it and gets the token made before `ray up`
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert "RAY_AUTH_MODE=token" in cmd and "ray start" in cmd, cmd
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_infra_readme_names_every_manifest_and_the_mlflow_server():
    text = (INFRA / "README.md").read_text()
    for path in MANIFESTS:
        assert f"k8s/{path.name}" in text, f"infra/README.md does not mention {path.name}"
    for word in ("s3://", "run.mlflow.tracking_uri", "ray job submit", "cluster-aws.yaml", "Dockerfile"):
        assert word in text, word


def test_every_documented_request_to_the_endpoint_sends_the_api_key():
    """The endpoint binds beyond loopback only with a key: every curl the docs show against /upscale or /healthz
    (README, infra/) sends X-API-Key."""
    texts = {p: p.read_text() for p in [ROOT / "README.md", *INFRA.rglob("*.md"), *INFRA.rglob("*.yaml")]}
    calls = [(p.name, line.strip()) for p, text in texts.items() for line in text.splitlines()
             if "curl" in line and re.search(r"/(upscale|healthz)\b", line)]
    assert len(calls) >= 4, calls
    missing = [c for c in calls if "X-API-Key" not in c[1]]
    assert not missing, f"curl without the X-API-Key header: {missing}"
