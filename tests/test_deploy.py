"""The manifests in deploy/, checked offline: against Kubernetes' own schemas (the kubernetes-validate package) and
the CRD schemas of Kubeflow Trainer and JobSet (tests/fixtures/schemas, with their licence and version); then what no
schema says: the exit codes each failure policy acts on, and the names Kubeflow Trainer looks for."""

import copy
import functools
import gzip
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
