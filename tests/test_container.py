"""The container, offline: compose.yaml through the real Compose binary, the Dockerfile through hadolint and a
parser, the Kubernetes manifests, and (opt-in, where a Docker engine answers) a real build, stop and resume."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import PROJECT

BIN = Path(sys.executable).parent
COMPOSE = BIN / "docker-compose"
HADOLINT = BIN / "hadolint"


def compose_config(*files: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [str(COMPOSE)]
    for path in files:
        command += ["-f", str(path)]
    # The models folder need not exist for validation: compose only resolves the path.
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("REPO", "MODELS", "JOB_SPEC_FILE", "BASE_IMAGE", "JOB_IMAGE")}
    return subprocess.run(command + ["config", "--format", "json"], cwd=PROJECT, capture_output=True, text=True,
                          env={**environment, **(env or {})}, timeout=60)


@pytest.fixture(scope="module")
def service() -> dict:
    result = compose_config(PROJECT / "compose.yaml")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]["train"]


def test_compose_restarts_on_failure_with_a_limit_and_a_grace_period(service):
    assert service["restart"] == "on-failure:5"
    assert service["stop_grace_period"] == "2m0s" and service["stop_signal"] == "SIGTERM"
    assert service["init"] is True
    compose_text = (PROJECT / "compose.yaml").read_text()
    assert "stop_grace_period" in compose_text and "checkpoint" in compose_text.split("stop_grace_period")[0][-600:]


def test_compose_mounts_the_volume_the_repository_the_models_and_the_spec(service):
    mounts = {m["target"]: m for m in service["volumes"]}
    assert mounts["/runs"]["type"] == "volume" and mounts["/runs"]["source"] == "runs"
    assert mounts["/repo"]["source"] == str(PROJECT) and mounts["/repo"]["read_only"]
    assert mounts["/models"]["source"] == str(PROJECT / "models") and mounts["/models"]["read_only"]
    assert mounts["/config/job.yaml"]["source"] == str(PROJECT / "examples" / "default.yaml")
    assert mounts["/config/job.yaml"]["read_only"]
    assert service["environment"]["HF_HUB_OFFLINE"] == "1"


def test_compose_reserves_the_gpu_and_checks_health(service):
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == -1 and device["capabilities"] == ["gpu"]
    check = service["healthcheck"]
    assert check["test"][:4] == ["CMD", "python", "-m", "job"] and "health" in check["test"]
    assert check["start_period"] and check["retries"] >= 1


def test_compose_variables_move_the_mounts(tmp_path):
    spec = tmp_path / "mine.yaml"
    spec.write_text("train: {max_steps: 1}\n")
    result = compose_config(PROJECT / "compose.yaml",
                            env={"REPO": str(tmp_path), "MODELS": "/srv/models", "JOB_SPEC_FILE": str(spec)})
    assert result.returncode == 0, result.stderr
    mounts = {m["target"]: m["source"] for m in json.loads(result.stdout)["services"]["train"]["volumes"]}
    assert (mounts["/repo"] == str(tmp_path) and mounts["/models"] == "/srv/models"
            and mounts["/config/job.yaml"] == str(spec))


def test_the_cpu_variant_reserves_no_gpu():
    result = compose_config(PROJECT / "compose.yaml", PROJECT / "compose.cpu.yaml")
    assert result.returncode == 0, result.stderr
    service = json.loads(result.stdout)["services"]["train"]
    assert "deploy" not in service or not service["deploy"].get("resources")
    assert service["build"]["args"]["TORCH_INDEX_URL"].endswith("/cpu")
    assert service["restart"] == "on-failure:5"


@pytest.mark.parametrize("breakage", [
    ("\nvolumes:\n  runs:\n", "\n"),  # the named volume the service mounts, undefined
    ("stop_grace_period: 2m", "stop_grace_period: two minutes"),
    ("    init: true", "    init: maybe"),
    ("              count: all", "              count: every"),
    ("services:", "service:"),
])
def test_broken_copies_of_compose_yaml_are_rejected(tmp_path, breakage):
    old, new = breakage
    text = (PROJECT / "compose.yaml").read_text()
    assert old in text
    broken = tmp_path / "compose.yaml"
    broken.write_text(text.replace(old, new))
    shutil.copy(PROJECT / "Dockerfile", tmp_path / "Dockerfile")
    result = compose_config(broken)
    assert result.returncode != 0, result.stdout[:500]


def test_hadolint_finds_nothing_in_the_dockerfile():
    result = subprocess.run([str(HADOLINT), "--format", "json", str(PROJECT / "Dockerfile")], capture_output=True,
                            text=True, timeout=60)
    assert json.loads(result.stdout or "[]") == [] and result.returncode == 0, result.stdout


def test_the_dockerfile_structure():
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(path=str(PROJECT / "Dockerfile"))
    instructions = [(i["instruction"], i["value"]) for i in parser.structure]

    def values(kind):
        return [value for instruction, value in instructions if instruction == kind]

    base_arg = next(v for v in values("ARG") if v.startswith("BASE_IMAGE="))
    image, _, tag = base_arg.split("=", 1)[1].rpartition(":")
    assert image.startswith("nvidia/cuda") and tag and tag != "latest" and tag[0].isdigit()
    assert values("FROM")[-1] == "${BASE_IMAGE}"
    (entrypoint,) = values("ENTRYPOINT")
    assert json.loads(entrypoint) == ["python", "-m", "job"]  # JSON form: the job is PID 1's child with signals intact
    (command,) = values("CMD")
    assert json.loads(command)[:3] == ["run", "--spec", "/config/job.yaml"]
    assert values("STOPSIGNAL") == ["SIGTERM"]
    (check,) = values("HEALTHCHECK")
    assert "job" in check and "health" in check
    (user,) = values("USER")
    assert user.split(":")[0] not in ("root", "0")
    env = " ".join(values("ENV"))
    assert "HF_HUB_OFFLINE=1" in env
    # Dependencies are installed before the source is copied: a code change reuses the dependency layer.
    order = [value for instruction, value in instructions if instruction in ("COPY", "RUN")]
    requirements = next(i for i, v in enumerate(order) if "requirements.txt" in v and v.startswith("requirements.txt"))
    source = next(i for i, v in enumerate(order) if v.startswith("job "))
    assert requirements < source
    # The GPU-only pins (Liger Kernel) are exact, installed without their dependencies, and only with CUDA torch.
    cuda_pins = [line for line in (PROJECT / "requirements-cuda.txt").read_text().splitlines()
                 if line and not line.startswith("#")]
    assert cuda_pins and all("==" in pin for pin in cuda_pins)
    cuda_install = next(v for v in order if "requirements-cuda.txt" in v and "uv pip install" in v)
    assert "--no-deps" in cuda_install and '-z "$TORCH_INDEX_URL"' in cuda_install
    assert cuda_install in order[:source]
    # llama.cpp's converter (job export --format gguf) lands where job export looks: the image Python's prefix.
    converter = next(v for v in order if v.startswith("/app/scripts/llama-cpp-converter.sh "))
    assert converter.split()[1] == "/opt/venv/share/llama.cpp" and "VIRTUAL_ENV=/opt/venv" in env
    assert order.index(converter) < source
    ignored = (PROJECT / ".dockerignore").read_text().split()
    assert {"runs", ".venv", ".git"} <= set(ignored)


def docker_answers() -> bool:
    if os.environ.get("JOB_TEST_DOCKER") != "1" or not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("JOB_TEST_DOCKER") != "1",
                    reason="opt-in: JOB_TEST_DOCKER=1 builds and runs the image")
@pytest.mark.skipif(not docker_answers(), reason="no Docker engine answers on this machine")
def test_the_image_trains_stops_and_resumes(tmp_path):
    """The CPU variant of the service, for real: build, train, `docker stop` mid-run (exit 75), start again, complete.

    Where base images cannot be pulled, BASE_IMAGE and UV_IMAGE name local ones (tests/docker/local-base-images.sh
    makes them); the engine may have no network bridge, so the containers run without a network (the job needs none).
    """
    import time

    tag = f"jobtest{os.getpid()}"
    env = {**os.environ, "COMPOSE_PROJECT_NAME": tag, "JOB_IMAGE": f"job-test:{tag}", "MODELS": str(tmp_path)}
    spec = tmp_path / "job.yaml"
    spec.write_text((PROJECT / "examples" / "default.yaml").read_text().replace("max_steps: 180", "max_steps: 40"))
    env["JOB_SPEC_FILE"] = str(spec)
    offline = tmp_path / "compose.offline.yaml"
    offline.write_text("services:\n  train:\n    network_mode: none\n")
    compose = ["docker", "compose", "-f", "compose.yaml", "-f", "compose.cpu.yaml", "-f", str(offline)]
    # A local base image brings its own CPU torch; otherwise the CPU variant's index provides it.
    build_args = [] if os.environ.get("BASE_IMAGE") else ["--build-arg", "BASE_IMAGE=debian:bookworm-slim",
                                                          "--build-arg",
                                                          "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"]
    for name in ("BASE_IMAGE", "UV_IMAGE"):
        if os.environ.get(name):
            build_args += ["--build-arg", f"{name}={os.environ[name]}"]

    def compose_run(*args, timeout=1800):
        return subprocess.run(compose + list(args), cwd=PROJECT, env=env, capture_output=True, text=True,
                              timeout=timeout)

    def status() -> list[dict]:
        result = compose_run("run", "--rm", "--no-deps", "-T", "--entrypoint", "python", "train", "-m", "job", "status",
                             "/runs", "--json")
        return json.loads(result.stdout) if result.returncode == 0 and result.stdout.strip() else []

    try:
        built = subprocess.run(["docker", "build", "--network", "host", "-t", env["JOB_IMAGE"], *build_args, "."],
                               cwd=PROJECT, capture_output=True, text=True, timeout=3600)
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
        up = compose_run("up", "--detach", "--no-build")
        assert up.returncode == 0, up.stderr
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not any(run["step"] >= 5 for run in status()):
            time.sleep(5)
        stopped = compose_run("stop", "--timeout", "120")
        assert stopped.returncode == 0, stopped.stderr
        code = subprocess.run(["docker", "inspect", "--format", "{{.State.ExitCode}}", f"{tag}-train-1"],
                              capture_output=True, text=True)
        assert code.stdout.strip() == "75", compose_run("logs").stdout[-3000:]
        (run,) = status()
        assert run["status"] == "stopped" and 5 <= run["step"] < 40
        again = compose_run("up", "--no-build")  # attached: returns when the job exits
        assert again.returncode == 0, again.stdout[-3000:]
        (run,) = status()
        assert run["status"] == "completed" and run["step"] == 40 and run["restarts"] == 1
        health = compose_run("run", "--rm", "--no-deps", "-T", "--entrypoint", "python", "train", "-m", "job", "health",
                             "--spec", "/config/job.yaml", "--set", "run.output_dir=/runs")
        assert health.returncode == 0 and health.stdout.startswith("healthy")
    finally:
        compose_run("down", "--volumes", timeout=300)
        subprocess.run(["docker", "image", "rm", "-f", env["JOB_IMAGE"]], capture_output=True)


def health(tmp_path, spec: dict | None = None) -> "subprocess.CompletedProcess":
    from .conftest import run_job, write_spec

    spec_path = write_spec(tmp_path / "job.yaml",
                           spec or {"run": {"name": "h", "output_dir": str(tmp_path / "runs"),
                                            "heartbeat_timeout": 600}, "train": {"max_steps": 1}})
    return run_job("health", "--spec", str(spec_path))


def test_health_follows_the_heartbeat(tmp_path):
    import time

    run = tmp_path / "runs" / "h"
    missing = health(tmp_path)
    assert missing.returncode == 1 and "no heartbeat yet" in missing.stdout
    run.mkdir(parents=True)
    (run / "state.json").write_text(json.dumps({"status": "running", "step": 7}))
    (run / "heartbeat.json").write_text(json.dumps({"time": time.time() - 30, "step": 7, "phase": "training"}))
    fresh = health(tmp_path)
    assert fresh.returncode == 0 and fresh.stdout.startswith("healthy: training at step 7")
    (run / "heartbeat.json").write_text(json.dumps({"time": time.time() - 4000, "step": 7, "phase": "evaluating"}))
    stale = health(tmp_path)
    assert stale.returncode == 1 and "run.heartbeat_timeout is 600 s" in stale.stdout
    (run / "state.json").write_text(json.dumps({"status": "completed", "step": 9}))
    assert health(tmp_path).returncode == 0  # a finished run is healthy however old its heartbeat
    invalid = health(tmp_path, {"train": {"max_steps": 0}})
    assert invalid.returncode == 1 and invalid.stdout.startswith("unhealthy:")  # never 2: Docker reserves it
