"""The manifests in deploy/, checked offline: against Kubernetes' own schemas (the kubernetes-validate package) and
the CRD schemas of Kubeflow Trainer and JobSet (tests/fixtures/schemas, with their licence and version); then what no
schema says: the exit codes each failure policy acts on, and the names Kubeflow Trainer looks for."""

import copy
import functools
import gzip
import json
import shlex

import jsonschema
import kubernetes_validate
import pytest
import yaml

from job import EXIT_BUDGET, EXIT_FAILED, EXIT_INVALID, EXIT_STOPPED
from job.spec import build_spec, parse_overrides

from .conftest import PROJECT

KUBERNETES = "1.31.0"  # the first release with pod failure policies generally available
SCHEMAS = PROJECT / "tests" / "fixtures" / "schemas"
CRDS = {
    "TrainJob": SCHEMAS / "kubeflow-trainer-v2.3.0" / "trainer.kubeflow.org_trainjobs.yaml.gz",
    "TrainingRuntime": SCHEMAS / "kubeflow-trainer-v2.3.0" / "trainer.kubeflow.org_trainingruntimes.yaml.gz",
    "JobSet": SCHEMAS / "jobset-v0.12.0" / "jobset.x-k8s.io_jobsets.yaml.gz",
}


def manifests(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((PROJECT / "deploy" / name).read_text()) if doc]


@functools.cache
def crd_schema(kind: str) -> dict:
    """The served version's schema, strict: the API server drops unknown fields without a word, so a misspelt or
    renamed field would vanish; here it is an error."""
    with gzip.open(CRDS[kind], "rt", encoding="utf-8") as text:
        crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 0.5-0.9 MB of YAML each
    (version,) = [v for v in crd["spec"]["versions"] if v["served"]]

    def strict(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for key, value in node.items():
                if key == "properties":
                    for child in value.values():
                        strict(child)
                elif key in ("items", "additionalProperties"):
                    strict(value)
                elif key in ("anyOf", "allOf", "oneOf"):
                    for child in value:
                        strict(child)
        return node

    return strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def crd_errors(kind: str, document: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(crd_schema(kind))  # the schemas use nothing newer than draft 4
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document))


def exit_code_actions(job_spec: dict, container: str) -> dict[int, str]:
    actions = {}
    for rule in job_spec["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            assert rule["onExitCodes"]["operator"] == "In" and rule["onExitCodes"]["containerName"] == container
            for code in rule["onExitCodes"]["values"]:
                actions.setdefault(code, rule["action"])
    return actions


def kubeflow() -> tuple[dict, dict, dict[str, dict]]:
    (runtime,), (trainjob,) = manifests("kubeflow/runtime.yaml"), manifests("kubeflow/trainjob.yaml")
    storage = {f"{doc['kind']}/{doc['metadata']['name']}": doc for doc in manifests("kubeflow/storage.yaml")}
    return runtime, trainjob, storage


def node_job(runtime: dict) -> dict:
    (replicated,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    return replicated


@pytest.mark.parametrize("name, path", [("job.yaml", ["spec"]), ("cronjob.yaml", ["spec", "jobTemplate", "spec"])])
def test_kubernetes_manifests_carry_the_failure_policy(name, path):
    (manifest,) = manifests(name)
    assert manifest["apiVersion"] == "batch/v1"
    spec = manifest
    for key in path:
        spec = spec[key]
    assert exit_code_actions(spec, "train") == {2: "FailJob", 3: "FailJob", 1: "Count", 75: "Count"}
    assert any(r["action"] == "Ignore" and r.get("onPodConditions", [{}])[0].get("type") == "DisruptionTarget"
               for r in spec["podFailurePolicy"]["rules"])
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # what podFailurePolicy requires
    assert pod["terminationGracePeriodSeconds"] >= 60 and pod["securityContext"]["runAsNonRoot"]
    (container,) = pod["containers"]
    assert container["name"] == "train" and container["args"][:3] == ["run", "--spec", "/config/job.yaml"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/repo"]["readOnly"] and mounts["/models"]["readOnly"] and "/runs" in mounts
    if name == "cronjob.yaml":
        assert manifest["spec"]["concurrencyPolicy"] == "Forbid" and len(manifest["spec"]["schedule"].split()) == 5


def test_the_run_volume_claim():
    (claim,) = manifests("pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["metadata"]["name"] == "job-runs"


@pytest.mark.parametrize("name", ["job.yaml", "cronjob.yaml", "pvc.yaml", "kubeflow/storage.yaml"])
def test_the_core_manifests_follow_the_kubernetes_schemas(name):
    for document in manifests(name):
        kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_the_kubeflow_manifests_follow_the_trainer_and_jobset_schemas():
    runtime, trainjob, _ = kubeflow()
    assert crd_errors("TrainingRuntime", runtime) == []
    assert crd_errors("TrainJob", trainjob) == []
    # The runtime's template is a JobSet, and its node template a batch/v1 Job: JobSet's and Kubernetes' schemas too.
    jobset = {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": {"name": "job-train"},
              "spec": runtime["spec"]["template"]["spec"]}
    assert crd_errors("JobSet", jobset) == []
    kubernetes_validate.validate({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "job-train-node"},
                                  **node_job(runtime)["template"]}, KUBERNETES, strict=True)


def test_the_schemas_reject_what_the_api_server_would_drop_or_refuse():
    """The checks above can fail: a misspelt field, a field of an older Trainer release, a wrong type."""
    runtime, trainjob, _ = kubeflow()
    misspelt = copy.deepcopy(runtime)
    node_job(misspelt)["template"]["spec"]["template"]["spec"]["containers"][0]["volumeMountz"] = []
    assert any("volumeMountz" in error for error in crd_errors("TrainingRuntime", misspelt))
    renamed = {**copy.deepcopy(trainjob), "spec": {**trainjob["spec"], "podTemplateOverrides": []}}  # Trainer v2.1
    assert any("podTemplateOverrides" in error for error in crd_errors("TrainJob", renamed))
    auto = copy.deepcopy(trainjob)
    auto["spec"]["trainer"]["numProcPerNode"] = "auto"  # an integer since Trainer v2.2
    assert crd_errors("TrainJob", auto)
    with pytest.raises(kubernetes_validate.ValidationError):
        job = copy.deepcopy(manifests("job.yaml")[0])
        job["spec"]["backoffLimit"] = "six"
        kubernetes_validate.validate(job, KUBERNETES, strict=True)


def test_the_kubeflow_failure_policies_follow_the_exit_codes():
    """2 and 3 fail the Job and then the JobSet (a restart cannot help); 1 and 75 fail the node's Job, and the JobSet
    restarts every node together; a disruption is ignored (the Job replaces the pod)."""
    runtime, _, _ = kubeflow()
    job = node_job(runtime)["template"]["spec"]
    assert exit_code_actions(job, "node") == {EXIT_INVALID: "FailJob", EXIT_BUDGET: "FailJob",
                                              EXIT_FAILED: "Count", EXIT_STOPPED: "Count"}
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in \
        job["podFailurePolicy"]["rules"]
    assert job["backoffLimit"] == 0 and job["template"]["spec"]["restartPolicy"] == "Never"
    policy = runtime["spec"]["template"]["spec"]["failurePolicy"]
    first = policy["rules"][0]
    assert first["action"] == "FailJobSet" and first["onJobFailureReasons"] == ["PodFailurePolicy"]
    assert all(rule["action"] == "RestartJobSet" for rule in policy["rules"][1:])
    assert policy["maxRestarts"] > 0 and policy["restartStrategy"] == "Recreate"


def test_kubeflow_trainer_finds_the_node_and_the_node_runs_the_launcher():
    runtime, trainjob, storage = kubeflow()
    replicated = node_job(runtime)
    # What Kubeflow Trainer looks for (pkg/constants, v2.3.0): the ancestor label, a job and a container named node.
    assert replicated["name"] == "node"
    assert replicated["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    pod = replicated["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "node" and container["command"] == ["python", "-m", "job"]
    # Restarts are the JobSet's, in fresh pods: the static rendezvous keeps one store across torchrun's own.
    assert container["args"][0] == "launch" and "--max-restarts" not in container["args"]
    assert not [e for e in container.get("env", []) + trainjob["spec"]["trainer"].get("env", [])
                if e["name"].startswith("PET_")]  # the runtime sets them; Trainer refuses a TrainJob that does
    assert trainjob["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": runtime["kind"],
                                              "name": runtime["metadata"]["name"]}
    assert pod["terminationGracePeriodSeconds"] >= 60 and pod["securityContext"]["runAsNonRoot"]

    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["repo"]["readOnly"] and mounts["models"]["readOnly"] and not mounts["runs"].get("readOnly")
    claims = {name: volumes[name]["persistentVolumeClaim"]["claimName"] for name in ("runs", "repo", "models")}
    assert storage[f"PersistentVolumeClaim/{claims['runs']}"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert all(f"PersistentVolumeClaim/{claim}" in storage for claim in claims.values())

    # The spec in the ConfigMap, with the container's --set overrides, is a valid spec.
    config_map = storage[f"ConfigMap/{volumes['spec']['configMap']['name']}"]
    arguments = container["args"]
    spec_file = arguments[arguments.index("--spec") + 1]
    assert spec_file == f"{mounts['spec']['mountPath']}/job.yaml"
    overrides = [arguments[i + 1] for i, a in enumerate(arguments) if a == "--set"]
    spec = build_spec(yaml.safe_load(config_map["data"]["job.yaml"]), parse_overrides(overrides))
    assert str(spec.run.output_dir) == mounts["runs"]["mountPath"] and str(spec.data.repo) == "/repo"
    assert spec.model.path.startswith(mounts["models"]["mountPath"] + "/")
    assert shlex.join(container["command"] + arguments).startswith("python -m job launch")


# SkyPilot (deploy/skypilot/): the schemas that `sky.Task.from_yaml` checks a task against, from SkyPilot v0.14.1.
SKYPILOT_SCHEMAS = SCHEMAS / "skypilot-v0.14.1" / "skypilot-task.json.gz"


@functools.cache
def skypilot_schemas() -> dict[str, dict]:
    """task, resources, storage (a bucket in file_mounts) and volume, strict: the client lets unknown keys under
    `job_recovery` and `config` through for the server, whose plugins may know them; with no plugin they are errors."""
    with gzip.open(SKYPILOT_SCHEMAS, "rt", encoding="utf-8") as text:
        schemas = json.load(text)

    def strict(node):
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties", True) is True:
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)
        return node

    return strict(schemas)


def _enum(case_sensitive: bool):
    def check(validator, enums, instance, schema):
        fold = (lambda s: s) if case_sensitive else str.lower
        if isinstance(instance, str) and fold(instance) not in [fold(e) for e in enums]:
            yield jsonschema.ValidationError(f"{instance!r} is not one of {enums!r}")
    return check


# SkyPilot's validator (sky/utils/validator.py): draft 7 with its two enum keywords.
SkyPilotValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {"case_insensitive_enum": _enum(False), "case_sensitive_enum": _enum(True)})


def skypilot_errors(kind: str, document: dict) -> list[str]:
    validator = SkyPilotValidator(skypilot_schemas()[kind])
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document))


def skypilot_task_errors(task: dict) -> list[str]:
    """What `sky.Task.from_yaml_config` checks: the task, its resources, and each bucket in file_mounts."""
    errors = skypilot_errors("task", task)
    errors += [f"resources.{e}" for e in skypilot_errors("resources", task.get("resources") or {})]
    for path, source in (task.get("file_mounts") or {}).items():
        if isinstance(source, dict):
            errors += [f"file_mounts.{path}.{e}" for e in skypilot_errors("storage", source)]
    return errors


def skypilot() -> tuple[dict, dict]:
    (task,), (volume,) = manifests("skypilot/task.yaml"), manifests("skypilot/volume.yaml")
    return task, volume


def skypilot_launch(task: dict) -> tuple[list[str], list[str]]:
    """The run script's lines (continuations joined) and the arguments of its `python -m job launch`."""
    lines = [line.strip() for line in task["run"].replace("\\\n", " ").splitlines() if line.strip()]
    (command,) = [line for line in lines if "job launch" in line]
    return lines, shlex.split(command)


def test_the_skypilot_task_follows_skypilots_schemas():
    task, volume = skypilot()
    assert skypilot_task_errors(task) == []
    assert skypilot_errors("volume", volume) == []


def test_the_skypilot_schemas_reject_a_misspelt_or_wrong_key():
    task, volume = skypilot()
    assert any("num_node" in e for e in skypilot_task_errors({**task, "num_node": 2}))
    misspelt = copy.deepcopy(task)
    misspelt["resources"]["use_spott"] = True
    assert any("use_spott" in e for e in skypilot_task_errors(misspelt))
    singular = copy.deepcopy(task)  # the key is plural; the client alone would pass it on to the server
    singular["resources"]["job_recovery"]["recover_on_exit_code"] = 75
    assert any("recover_on_exit_code" in e for e in skypilot_task_errors(singular))
    out_of_range = copy.deepcopy(task)
    out_of_range["resources"]["job_recovery"]["recover_on_exit_codes"] = [75, 300]
    assert skypilot_task_errors(out_of_range)
    mode = copy.deepcopy(task)
    mode["file_mounts"]["/repo"]["mode"] = "MOUNTED"
    assert any("MOUNTED" in e for e in skypilot_task_errors(mode))
    placed = copy.deepcopy(task)  # job_recovery belongs to resources, not to the task
    placed["job_recovery"] = placed["resources"].pop("job_recovery")
    assert any("job_recovery" in e for e in skypilot_task_errors(placed))
    assert skypilot_errors("volume", {**volume, "type": "pvc"})


def test_skypilot_recovers_a_stop_and_a_preemption_but_not_a_refusal():
    """75 is recovered; a pre-emption always is. max_restarts_on_errors counts every other non-zero code, 2 and 3
    among them, so it stays 0: a crash is torchrun's to restart in place (--max-restarts)."""
    task, _ = skypilot()
    resources = task["resources"]
    assert task["num_nodes"] == 2 and resources["use_spot"] is True and resources["accelerators"]
    assert resources["image_id"].startswith("docker:")
    recovery = resources["job_recovery"]
    assert recovery["recover_on_exit_codes"] == [EXIT_STOPPED]
    assert not {EXIT_INVALID, EXIT_BUDGET} & set(recovery["recover_on_exit_codes"])
    assert recovery["max_restarts_on_errors"] == 0 and recovery["strategy"]
    _, arguments = skypilot_launch(task)
    assert int(arguments[arguments.index("--max-restarts") + 1]) > 0


def test_the_skypilot_run_launches_at_a_rendezvous_on_the_first_node():
    task, _ = skypilot()
    lines, arguments = skypilot_launch(task)
    assert shlex.join(arguments).startswith("python -m job launch")
    option = {name: arguments[arguments.index(name) + 1] for name in
              ("--nnodes", "--nproc-per-node", "--node-rank", "--rdzv-backend", "--rdzv-endpoint", "--spec")}
    assert option["--nnodes"] == "$SKYPILOT_NUM_NODES" and option["--node-rank"] == "$SKYPILOT_NODE_RANK"
    assert option["--nproc-per-node"] == "$SKYPILOT_NUM_GPUS_PER_NODE" and option["--rdzv-backend"] == "c10d"
    host, port = option["--rdzv-endpoint"].split(":")
    assert f'{host.lstrip("$")}=$(echo "$SKYPILOT_NODE_IPS" | head -n 1)' in lines  # one IP a line, rank 0 first
    assert port.lstrip("$") in task["envs"]
    assert lines[-1] == "exit $?" and lines[-2].startswith("python -m job launch")  # the job's exit code

    # The spec is mounted where --spec reads it, and with the run's overrides it names the mounted folders.
    assert option["--spec"] in task["file_mounts"]
    overrides = [arguments[i + 1] for i, a in enumerate(arguments) if a == "--set"]
    spec = build_spec(yaml.safe_load((PROJECT / "examples" / "default.yaml").read_text()), parse_overrides(overrides))
    assert str(spec.data.repo) in task["file_mounts"] and str(spec.run.output_dir) in task["volumes"]


def test_the_skypilot_run_folder_is_a_shared_volume_and_the_inputs_read_only_buckets():
    """flock, a folder renamed into place and appends to JSONL files need a file system: a bucket in MOUNT mode has
    none of them. The run folder is a ReadWriteMany volume; the repository and the models are only read."""
    task, volume = skypilot()
    assert task["volumes"] == {"/runs": volume["name"]} and "/runs" not in task["file_mounts"]
    assert volume["type"] == "k8s-pvc" and volume["config"]["access_mode"] == "ReadWriteMany"
    repo, models = task["file_mounts"]["/repo"], task["file_mounts"]["/models"]
    assert repo["mode"] == "MOUNT" and repo["config"]["mount"]["read_only"] is True
    assert models["mode"] == "MOUNT_CACHED" and models["type"].endswith("_RO")
    assert task["resources"]["infra"].split("/")[0] in ("k8s", "kubernetes")  # where the volume lives
