"""The Kubernetes manifests in k8s/ are valid, locked down, and start real platescope commands.

All offline: KubeRay kinds are checked against KubeRay 1.7's CRD schemas made strict
(../shared/k8s-schemas; those checks skip when it is absent), core kinds with kubernetes-validate's
strict schemas, the overlays rendered with `kubectl kustomize` (skipped without kubectl, unless
PLATESCOPE_REQUIRE_KUBECTL=1), and every entrypoint goes through the CLI's own parser and config loader.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml

from platescope import cli
from platescope.config import ConfigError, TrainConfig, build_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
JOBS_DIR = REPO / "jobs"
SCHEMAS = Path(__file__).resolve().parents[3] / "shared" / "k8s-schemas"

OVERLAYS = ("dev", "prod", "prod-cronjob")
NAMESPACES = {"dev": "platescope-dev", "prod": "platescope", "prod-cronjob": "platescope"}
GPU_OVERLAYS = ("prod", "prod-cronjob")
# The oldest Kubernetes the manifests are for (CronJob timeZone is GA there) and the newest known.
KUBERNETES_VERSIONS = ("1.27", kubernetes_validate.latest_version())
KNOWN_KINDS = {"ConfigMap", "RayJob", "RayCronJob", "CronJob", "ServiceAccount", "Role", "RoleBinding"}
RAY_KINDS = {"RayJob", "RayCronJob"}
# KubeRay 1.7 rejects longer names (MaxRayJobNameLength, MaxRayCronJobNameLength in its utils/constant.go).
MAX_NAME = {"RayJob": 47, "RayCronJob": 36}
IMAGE = "ghcr.io/platescope/platescope:0.1.0-ray2.60.0-gpu"
JOB_MOUNT = PurePosixPath("/home/ray/jobs")
SECRET_KEYS = {
    "platescope-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
    "platescope-ray-auth": {"auth_token"},  # the key KubeRay reads for authOptions.secretName
}
AUTH_OPTIONS = {"mode": "token", "secretName": "platescope-ray-auth"}
GPU = "nvidia.com/gpu"
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}
# The instant the sample entrypoints are submitted at; `date -u -d yesterday +%F` then prints 2026-11-21.
SAMPLE_NOW = dt.datetime(2026, 11, 22, 1, 0, tzinfo=dt.timezone.utc)


def load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def is_object(doc) -> bool:
    return isinstance(doc, dict) and "apiVersion" in doc and doc.get("kind") not in (None, "Kustomization")


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if any(is_object(d) for d in load_docs(p)))


def job_files() -> list[Path]:
    return sorted(p for p in JOBS_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def kustomizations() -> list[Path]:
    return sorted([*K8S.rglob("kustomization.yaml"), JOBS_DIR / "kustomization.yaml"])


@functools.cache
def _ray_validator(kind: str, version: str) -> jsonschema.Draft7Validator:
    if not SCHEMAS.is_dir():
        pytest.skip(f"no KubeRay schemas at {SCHEMAS}")
    schema = json.loads((SCHEMAS / "ray.io" / f"{kind.lower()}_{version}.json").read_text())
    return jsonschema.Draft7Validator(schema)


def validate(obj: dict) -> None:
    """Raises jsonschema.ValidationError for an unknown field or a wrong type, as the API server would."""
    group, _, version = obj["apiVersion"].rpartition("/")
    if group == "ray.io":
        _ray_validator(obj["kind"], version).validate(obj)
    else:
        for kubernetes in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, kubernetes, strict=True)


@functools.cache
def _render(overlay: str) -> tuple:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("PLATESCOPE_REQUIRE_KUBECTL") == "1":
            pytest.fail("PLATESCOPE_REQUIRE_KUBECTL=1 but no kubectl on PATH")
        pytest.skip("no kubectl on PATH to render the overlays (PLATESCOPE_REQUIRE_KUBECTL=1 makes this fail)")
    done = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d is not None)


def render(overlay: str) -> list[dict]:
    return copy.deepcopy(list(_render(overlay)))


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]


def job_spec(obj: dict) -> dict:
    """The RayJob spec of a RayJob, or the one a RayCronJob creates."""
    return obj["spec"]["jobTemplate"] if obj["kind"] == "RayCronJob" else obj["spec"]


def ray_pod_specs(obj: dict) -> list[tuple[str, dict]]:
    cluster = job_spec(obj)["rayClusterSpec"]
    return [("head", cluster["headGroupSpec"]["template"]["spec"]),
            *((f"worker {g['groupName']}", g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", []))]


def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """Every pod template an object makes, with where it is."""
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    if obj["kind"] in RAY_KINDS:
        submitter = job_spec(obj)["submitterPodTemplate"]["spec"]
        return [(f"{name} {where}", spec) for where, spec in [*ray_pod_specs(obj), ("submitter", submitter)]]
    if obj["kind"] == "CronJob":
        return [(name, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])]
    return []


def containers(objs: list[dict]) -> list[tuple[str, dict, dict]]:
    return [(f"{where} {c['name']}", c, spec)
            for obj in objs for where, spec in pod_specs(obj)
            for c in [*spec.get("initContainers", []), *spec["containers"]]]


def gpus(container: dict) -> int:
    return int(container["resources"].get("limits", {}).get(GPU, 0))


def worker_groups(obj: dict) -> list[dict]:
    return job_spec(obj)["rayClusterSpec"].get("workerGroupSpecs", [])


# ---- schemas


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_file_validates(path):
    for doc in load_docs(path):
        if is_object(doc):
            validate(doc)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_validates(overlay):
    objs = render(overlay)
    assert {o["kind"] for o in objs} <= KNOWN_KINDS
    for obj in objs:
        validate(obj)
        assert obj["metadata"]["namespace"] == NAMESPACES[overlay]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "platescope"
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(("file", "where", "field", "misspelt"), [
    ("base/rayjob-detect-nightly.yaml", ["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
    ("base/rayjob-detect-nightly.yaml",
     ["spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0], "resources", "resource"),
    ("base/rayjob-train.yaml", ["spec", "rayClusterSpec", "authOptions"], "secretName", "secretname"),
    ("overlays/prod/raycronjob-detect-nightly.yaml", ["spec"], "timeZone", "timezone"),
    ("overlays/prod-cronjob/cronjob.yaml", ["spec"], "concurrencyPolicy", "concurrencypolicy"),
    ("overlays/prod-cronjob/cronjob.yaml", ["spec", "jobTemplate", "spec", "template", "spec", "containers", 0],
     "securityContext", "securitycontext"),
])
def test_a_misspelt_field_fails_validation(file, where, field, misspelt):
    obj = load_docs(K8S / file)[0]
    validate(obj)
    node = functools.reduce(lambda n, key: n[key], where, obj)
    node[misspelt] = node.pop(field)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(misspelt)):
        validate(obj)


def test_kustomizations_use_only_what_kustomize_v2_knows():
    """kubectl before 1.21 bundles kustomize v2.0.3: directories go under bases, files under resources."""
    v2_fields = {"apiVersion", "kind", "resources", "bases", "patchesStrategicMerge", "patchesJson6902",
                 "configMapGenerator", "generatorOptions", "namespace", "commonLabels", "images"}
    for path in kustomizations():
        k = load_docs(path)[0]
        assert set(k) <= v2_fields, path
        assert all((path.parent / r).is_file() for r in k.get("resources", [])), path
        assert all((path.parent / b / "kustomization.yaml").is_file() for b in k.get("bases", [])), path
        assert all((path.parent / p["path"]).is_file() for p in k.get("patchesJson6902", [])), path


# ---- the commands the jobs run

_SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")


def _shell_date(command: str) -> str:
    """What `date -u [-d yesterday] +FORMAT` prints at SAMPLE_NOW; any other substitution fails."""
    m = re.fullmatch(r"date -u (-d yesterday )?\+(\S+)", command.strip())
    assert m, f"unexpected shell substitution $({command})"
    return (SAMPLE_NOW - dt.timedelta(days=1 if m.group(1) else 0)).strftime(m.group(2))


def load_entrypoint(entrypoint: str):
    """The command as the submitter's shell would run it, parsed and loaded the way `platescope` does."""
    argv = shlex.split(_SUBSTITUTION.sub(lambda m: _shell_date(m.group(1)), entrypoint))
    assert argv[0] == "platescope"
    try:
        args = cli.build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"platescope rejects the arguments of {entrypoint!r}")
    config = PurePosixPath(args.config)
    assert config.parent == JOB_MOUNT and (JOBS_DIR / config.name).is_file(), args.config
    args.config = str(JOBS_DIR / config.name)
    if args.command == "detect":
        return args, cli.detect_config_from_args(args)
    assert args.command == "train", entrypoint
    return args, build_config(TrainConfig, file=args.config, overrides=args.overrides)  # as cli._cmd_train


def check_entrypoint(obj: dict) -> None:
    args, cfg = load_entrypoint(job_spec(obj)["entrypoint"])
    workers = worker_groups(obj)
    gpu_slots = [gpus(g["template"]["spec"]["containers"][0]) for g in workers]
    if args.command == "detect":
        if "$(date" in job_spec(obj)["entrypoint"]:  # the day lands in the run's name and its inputs
            day = _shell_date("date -u -d yesterday +%F")
            assert day in cfg.run_id and all(day in path for path in cfg.input)
        assert not cfg.progress  # a progress bar is noise in the job's log
        if any(gpu_slots):  # the autoscaler can reach the largest detector pool
            most = sum(g["maxReplicas"] * n for g, n in zip(workers, gpu_slots))
            assert most >= cfg.num_actors_max * (cfg.num_gpus_per_actor or 1)
    else:  # Ray Train starts all its workers at once, one GPU each
        assert cfg.use_gpu == any(gpu_slots)
        slots = sum(g["minReplicas"] * (n if cfg.use_gpu else 1) for g, n in zip(workers, gpu_slots))
        assert cfg.num_workers <= slots


RAY_OBJECTS_IN_FILES = [
    pytest.param(d, id=f"{p.relative_to(K8S)}:{d['metadata']['name']}")
    for p in manifest_files() for d in load_docs(p) if is_object(d) and d["kind"] in RAY_KINDS
]


@pytest.mark.parametrize("obj", RAY_OBJECTS_IN_FILES)
def test_entrypoint_in_file_runs_a_real_job_file_and_options(obj):
    check_entrypoint(obj)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_entrypoints_run_real_job_files_and_options(overlay):
    jobs = [o for o in render(overlay) if o["kind"] in RAY_KINDS]
    assert {o["metadata"]["name"] for o in jobs} >= {"platescope-detect-nightly", "platescope-train"}
    for obj in jobs:
        check_entrypoint(obj)


def test_an_unknown_option_in_an_entrypoint_is_caught():
    with pytest.raises(pytest.fail.Exception):
        load_entrypoint("platescope detect --config /home/ray/jobs/plates-nightly.yaml --no-progess")
    with pytest.raises(ConfigError, match="run_idd"):
        load_entrypoint("platescope detect --config /home/ray/jobs/plates-nightly.yaml run_idd=x")


# ---- what the pods may do and use


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_sized_and_unprivileged(overlay):
    found = containers(render(overlay))
    assert found
    for where, c, pod in found:
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"].get(bound, {})), f"{where}: {bound}"
        security = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
        assert security.get("runAsNonRoot") is True and security.get("runAsUser", 0) != 0, where
        assert c["securityContext"].get("allowPrivilegeEscalation") is False, where
        assert "ALL" in c["securityContext"].get("capabilities", {}).get("drop", []), where
        image, _, tag = c["image"].rpartition(":")
        assert image and tag and tag != "latest", where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_clusters_use_the_image_its_ray_version_and_token_auth(overlay):
    objs = render(overlay)
    for obj in find(objs, "RayJob") + find(objs, "RayCronJob"):
        cluster = job_spec(obj)["rayClusterSpec"]
        assert f"-ray{cluster['rayVersion']}-" in IMAGE
        assert cluster["authOptions"] == AUTH_OPTIONS
        if cluster.get("enableInTreeAutoscaling"):
            autoscaler = cluster["autoscalerOptions"]
            assert {"requests", "limits"} <= set(autoscaler["resources"])
            assert autoscaler["securityContext"]["allowPrivilegeEscalation"] is False
    for where, c, _ in containers([o for o in objs if o["kind"] in RAY_KINDS]):
        assert c["image"] == IMAGE, where
        # KubeRay skips its own token wiring for a container that sets these: authOptions stays the one switch.
        assert not {e["name"] for e in c.get("env", [])} & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, where


def env_vars(node):
    """Every env entry anywhere below node."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield from value
            else:
                yield from env_vars(value)
    elif isinstance(node, list):
        for item in node:
            yield from env_vars(item)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_come_only_from_secret_refs(overlay):
    objs = render(overlay)
    assert not find(objs, "Secret")
    refs = [e for e in env_vars(objs) if "secretKeyRef" in e.get("valueFrom", {})]
    assert {e["name"] for e in refs} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for e in env_vars(objs):
        if re.search("SECRET|TOKEN|PASSWORD|KEY", e["name"]):
            assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), e
    for e in refs:
        ref = e["valueFrom"]["secretKeyRef"]
        assert ref["key"] in SECRET_KEYS[ref["name"]], e
    for e in env_vars(objs):
        ref = e.get("valueFrom", {}).get("configMapKeyRef")
        if ref:
            assert ref["key"] in find(objs, "ConfigMap", ref["name"])[0]["data"], e


def test_the_secret_example_is_placeholders_outside_every_kustomization():
    docs = load_docs(K8S / "secrets.example.yaml")
    assert {d["metadata"]["name"]: set(d["stringData"]) for d in docs} == SECRET_KEYS
    assert all(re.fullmatch(r"<[^<>]+>", v) for d in docs for v in d["stringData"].values())
    assert not any("secrets.example.yaml" in p.read_text() for p in kustomizations())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_workers_in_prod_and_none_in_dev(overlay):
    jobs = [o for o in render(overlay) if o["kind"] in RAY_KINDS]
    for obj in jobs:
        for where, spec in ray_pod_specs(obj):
            has_gpu = overlay in GPU_OVERLAYS and where != "head"
            at = f"{obj['metadata']['name']} {where}"
            assert all((gpus(c) >= 1) == has_gpu for c in spec["containers"]), at
            assert (GPU_TOLERATION in spec.get("tolerations", [])) == has_gpu, at
        for g in worker_groups(obj):
            assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
            if overlay == "dev":
                assert g["maxReplicas"] == 1
    detect = job_spec(find(jobs, "RayJob", "platescope-detect-nightly")[0])["rayClusterSpec"]
    assert detect["enableInTreeAutoscaling"] is True
    if overlay in GPU_OVERLAYS:
        (train,) = worker_groups(find(jobs, "RayJob", "platescope-train")[0])
        assert train["minReplicas"] == train["maxReplicas"] == 4
        assert gpus(train["template"]["spec"]["containers"][0]) == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_jobs_configmap_holds_the_job_files_mounted_read_only(overlay):
    objs = render(overlay)
    (jobs,) = find(objs, "ConfigMap", "platescope-jobs")
    assert jobs["data"] == {p.name: p.read_text() for p in job_files()}
    for obj in objs:
        if obj["kind"] not in RAY_KINDS:
            continue
        for where, spec in ray_pod_specs(obj):
            volumes = {v["name"]: v for v in spec["volumes"]}
            mounts = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == str(JOB_MOUNT)]
            assert len(mounts) == 1 and mounts[0]["readOnly"] is True, where
            assert volumes[mounts[0]["name"]]["configMap"]["name"] == "platescope-jobs", where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjobs_clean_up_after_themselves_and_start_suspended(overlay):
    for obj in render(overlay):
        if obj["kind"] not in RAY_KINDS:
            continue
        spec = job_spec(obj)
        assert len(obj["metadata"]["name"]) <= MAX_NAME[obj["kind"]]
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
        assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0
        assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"  # a Job's pods must not restart
        # Applying an overlay must not start a run; only a schedule's copies run.
        assert spec.get("suspend", False) is (obj["kind"] == "RayJob")


# ---- the nightly schedule


def check_schedule_keeps_one_day(schedule: dict, job: dict) -> None:
    """Every attempt, retries included, ends on the UTC day it started, so `yesterday` stays the same day."""
    assert schedule["timeZone"] in ("Etc/UTC", "UTC") and "date -u" in job["entrypoint"]
    minute, hour, *every_day = schedule["schedule"].split()
    assert every_day == ["*", "*", "*"]
    last_end = int(hour) * 3600 + int(minute) * 60 + (job["backoffLimit"] + 1) * job["activeDeadlineSeconds"]
    assert last_end < 24 * 3600


def test_the_raycronjob_runs_the_detect_rayjob_every_night():
    objs = render("prod")
    (cron,) = find(objs, "RayCronJob")
    (template,) = find(objs, "RayJob", "platescope-detect-nightly")
    expected = {k: v for k, v in template["spec"].items() if k != "suspend"}
    assert cron["spec"]["jobTemplate"] == expected
    check_schedule_keeps_one_day(cron["spec"], cron["spec"]["jobTemplate"])


def test_the_fallback_cronjob_matches_prod_and_may_only_read_and_create_rayjobs():
    objs, prod = render("prod-cronjob"), render("prod")
    assert not find(objs, "RayCronJob")
    for kind in ("RayJob", "ConfigMap"):  # the same jobs as prod, only another schedule
        own = [o for o in find(objs, kind) if o["metadata"]["name"] != "platescope-nightly-script"]
        assert own == find(prod, kind)
    (cron,) = find(objs, "CronJob")
    (raycron,) = find(prod, "RayCronJob")
    for key in ("schedule", "timeZone"):
        assert cron["spec"][key] == raycron["spec"][key]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["successfulJobsHistoryLimit"] >= 1 and cron["spec"]["failedJobsHistoryLimit"] >= 1
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    template_name = {e["name"]: e.get("value") for e in container["env"]}["RAYJOB_TEMPLATE"]
    (template,) = find(objs, "RayJob", template_name)
    assert template["spec"]["suspend"] is True
    check_schedule_keeps_one_day(cron["spec"], template["spec"])
    assert len(f"{template_name}-YYYYMMDD") <= MAX_NAME["RayJob"]

    account = pod["serviceAccountName"]
    assert find(objs, "ServiceAccount", account)
    (role,) = find(objs, "Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get", "create"]}]
    (binding,) = find(objs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "platescope"}]
    assert not find(objs, "ClusterRole") and not find(objs, "ClusterRoleBinding")


# Stands in for kubectl with RayJobs kept as files; records each verb so the test can hold it to the Role.
FAKE_KUBECTL = """#!{python}
import json, pathlib, sys
state = pathlib.Path({state!r})
args = sys.argv[1:]
with open(state / "verbs", "a") as log:
    log.write(args[0] + "\\n")
if args[:2] == ["get", "rayjob"]:
    path = state / (args[2] + ".json")
    if "--ignore-not-found" in args:
        print("rayjob.ray.io/" + args[2] if path.exists() else "")
    elif path.exists():
        print(path.read_text())
    else:
        sys.exit("Error from server (NotFound): rayjobs.ray.io " + args[2] + " not found")
elif args == ["create", "-f", "-"]:
    obj = json.load(sys.stdin)
    path = state / (obj["metadata"]["name"] + ".json")
    if path.exists():
        sys.exit("Error from server (AlreadyExists)")
    path.write_text(json.dumps(obj))
    print("rayjob.ray.io/" + obj["metadata"]["name"] + " created")
else:
    sys.exit("fake kubectl: unexpected " + " ".join(args))
"""


def test_the_fallback_script_creates_one_dated_unsuspended_copy(tmp_path):
    gnu_date = subprocess.run(["date", "-u", "-d", "yesterday"], check=False, capture_output=True)
    if not (shutil.which("bash") and shutil.which("jq")) or gnu_date.returncode != 0:
        pytest.skip("needs bash, jq and GNU date, as the kubectl image has them")
    objs = render("prod-cronjob")
    script = find(objs, "ConfigMap", "platescope-nightly-script")[0]["data"]["create-nightly-rayjob.sh"]
    template = find(objs, "RayJob", "platescope-detect-nightly")[0]
    # As the API server returns it: with server-set metadata and a status, none of which may be copied.
    served = copy.deepcopy(template)
    served["metadata"].update(uid="1234", resourceVersion="42", creationTimestamp="2026-11-01T00:00:00Z",
                              annotations={"kubectl.kubernetes.io/last-applied-configuration": "{}"})
    served["status"] = {"jobDeploymentStatus": "Suspended"}
    state, bin_dir = tmp_path / "state", tmp_path / "bin"
    state.mkdir()
    bin_dir.mkdir()
    (state / "platescope-detect-nightly.json").write_text(json.dumps(served))
    fake = bin_dir / "kubectl"
    fake.write_text(FAKE_KUBECTL.format(python=sys.executable, state=str(state)))
    fake.chmod(0o755)
    (tmp_path / "create.sh").write_text(script)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "RAYJOB_TEMPLATE": "platescope-detect-nightly"}

    def run():
        days = {(dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)).strftime("%Y%m%d")}
        done = subprocess.run(["bash", str(tmp_path / "create.sh")], check=False, env=env,
                              capture_output=True, text=True, timeout=60)
        days.add((dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)).strftime("%Y%m%d"))
        assert done.returncode == 0, done.stderr
        return days, done.stdout

    days, _ = run()
    (created,) = [p for p in state.glob("*.json") if p.name != "platescope-detect-nightly.json"]
    night = json.loads(created.read_text())
    assert night["metadata"]["name"] in {f"platescope-detect-nightly-{d}" for d in days}
    assert set(night["metadata"]) == {"name", "labels"} and "status" not in night
    assert night["metadata"]["labels"].items() >= template["metadata"]["labels"].items()
    assert night["spec"] == {**template["spec"], "suspend": False}
    validate(night)

    _, out = run()  # the same night again: nothing new
    assert "exists already" in out and len(list(state.glob("*.json"))) == 2
    (role,) = find(objs, "Role")
    assert set((state / "verbs").read_text().split()) <= set(role["rules"][0]["verbs"])
