"""The Airflow DAG `iterative_ppo`: it parses, its tasks run exactly the step commands, its Docker and Kubernetes
variants ask for the right image, GPUs and environment, and `dag.test()` runs a whole iteration on the tiny model
(local executor, SQLite metadata DB and a local MLflow), the approval sensor honouring a reviewer's tag.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "dags/iterative_ppo.py"

# Airflow reads its configuration once, at import: a private AIRFLOW_HOME with a SQLite DB for this module.
_HOME = Path(tempfile.mkdtemp(prefix="ippo_airflow_"))
atexit.register(shutil.rmtree, _HOME, True)
AIRFLOW_ENV = {
    "AIRFLOW_HOME": str(_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_HOME}/airflow.db",
    "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
}
os.environ.update(AIRFLOW_ENV)
for var in ("IPPO_EXECUTOR", "IPPO_ORCHESTRATION", "IPPO_WORKDIR"):
    os.environ.pop(var, None)

from pipeline_steps.common import step_commands as sc  # noqa: E402

STEP_TASKS = list(sc.STEPS)
ALL_TASKS = ["configure", "simulate", *STEP_TASKS, "wait_for_approval", "promote"]


def load_dag_module():
    spec = importlib.util.spec_from_file_location("iterative_ppo", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dagmod():
    return load_dag_module()


def task_argv(op, executor: str) -> list[str]:
    """The command an operator runs, without the result-publishing wrapper."""
    if executor == "local":
        cmd = op.op_kwargs["argv"]
    elif executor == "docker":
        cmd = op.command
    else:
        cmd = [*op.cmds, *op.arguments]
    if cmd[:2] == ["/bin/sh", "-c"]:
        cmd = cmd[5:]  # sh -c SCRIPT sh RESULT ARGV...
    return list(cmd)


# ------------------------------------------------------------------------------------------------
# Parsing and structure (fast)
# ------------------------------------------------------------------------------------------------


def test_dag_folder_imports_without_errors():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"), safe_mode=True)
    assert bag.import_errors == {}
    assert "iterative_ppo" in bag.dags
    assert bag.dags["iterative_ppo"].fileloc == str(DAG_FILE)


def test_schedule_params_and_defaults(dagmod):
    from airflow.sdk import CronDataIntervalTimetable

    dag = dagmod.dag
    assert dag.dag_id == "iterative_ppo" == DAG_FILE.stem
    assert isinstance(dag.timetable, CronDataIntervalTimetable) and dag.timetable.expression == "0 6 * * 1"
    assert dag.catchup is False and dag.max_active_runs == 1
    assert dag.doc_md and "Algorithm 1" in dag.doc_md
    params = dag.params
    assert params["collect.policy"] == "auto"
    from pipeline_steps.common.config import load_params

    p = load_params(REPO / "params.yaml")
    assert params["collect.conversations"] == p.collect.conversations
    assert params["base_model.name_or_path"] == p.base_model.name_or_path
    assert params["ppo_tune.total_episodes"] == p.ppo_tune.total_episodes
    schema = {k: params.get_param(k).schema.get("type") for k in params.keys()}
    assert schema["collect.conversations"] == "integer" and schema["overrides"] == "object" and schema["logs"] == "string"
    assert sorted(t.task_id for t in dag.tasks) == sorted(ALL_TASKS)


def test_retries_backoff_and_failure_callback(dagmod):
    dag = dagmod.dag
    orch = dagmod.ORCHESTRATION
    for t in dag.tasks:
        if t.task_id == "wait_for_approval":
            continue
        assert t.retries == orch["retries"], t.task_id
        assert t.retry_delay == timedelta(minutes=orch["retry_delay_minutes"])
        assert t.retry_exponential_backoff and t.max_retry_delay == timedelta(minutes=orch["max_retry_delay_minutes"])
        assert t.on_failure_callback, t.task_id
    sensor = dag.get_task("wait_for_approval")
    assert sensor.mode == "reschedule"
    assert sensor.timeout == orch["approval_timeout_hours"] * 3600 and sensor.poke_interval == orch["approval_poke_seconds"]


def test_dependencies_follow_algorithm_1(dagmod):
    dag = dagmod.dag
    chain = ["configure", "simulate", *STEP_TASKS, "wait_for_approval", "promote"]
    for up, down in zip(chain, chain[1:]):
        assert down in dag.get_task(up).downstream_task_ids, (up, down)
    assert dag.get_task("ingest").trigger_rule == "none_failed"  # runs when collect is skipped (production logs)


def test_failure_callback_logs_and_never_raises(dagmod, caplog):
    class TI:
        task_id, run_id, try_number = "fit_q", "manual__x", 2

    with caplog.at_level(logging.ERROR):
        dagmod.notify_failure({"task_instance": TI(), "exception": RuntimeError("boom")}, alert_email=None)
    assert "fit_q" in caplog.text and "boom" in caplog.text
    # A configured but unreachable mail server is logged, not raised.
    dagmod.notify_failure({"task_instance": TI(), "exception": RuntimeError("boom")}, alert_email="ml@example.com")


def test_sets_template_helper(dagmod):
    start, end = datetime(2026, 1, 5, 6, tzinfo=timezone.utc), datetime(2026, 1, 12, 6, tzinfo=timezone.utc)
    params = {**dagmod.PARAM_DEFAULTS, "logs": "", "params_file": "params.yaml", "overrides": {"fit_q.bf16": True}}
    sets = json.loads(dagmod.ippo_sets(params, start, end))
    # Unchanged form fields leave the base params file alone; the interval and overrides always apply.
    assert sets == {"collect.policy": "auto", "collect.start_time": "2026-01-05T06:00:00Z",
                    "ingest.window_start": "2026-01-05T06:00:00Z", "ingest.window_end": "2026-01-12T06:00:00Z",
                    "fit_q.bf16": True}
    params["collect.conversations"] = 5
    assert json.loads(dagmod.ippo_sets(params, start, end))["collect.conversations"] == 5
    assert dagmod.as_dict('{"a": 1}') == {"a": 1} == dagmod.as_dict({"a": 1})


# ------------------------------------------------------------------------------------------------
# One command line: the DAG's tasks run step_commands' argv, under every executor
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("executor", ["local", "docker", "kubernetes"])
def test_task_commands_are_the_step_commands(dagmod, executor):
    dag = dagmod.build_dag(executor=executor)
    cfg = dagmod.settings(executor=executor)
    root = f"{cfg['workdir']}/runs/{dagmod.RUN_KEY}"
    for step in STEP_TASKS:
        replace = {sc.RAW: dagmod.logs_or(cfg["workdir"], sc.RAW)} if step == "ingest" else None
        expected = sc.argv(step, root=root, params_file=f"{root}/params.yaml", value=dagmod.value_template,
                           python=cfg["python"], replace=replace)
        assert task_argv(dag.get_task(step), executor) == expected, step
        # Same arguments as the DVC stage, modulo the run folder (and ingest's input: the `logs` field or raw/).
        dag_args = [a.replace(f"{root}/", "") for a in expected[3:]]
        dvc_args = [dagmod.value_template(a[2:-1]) if a.startswith("${") else a for a in sc.argv(step)[3:]]
        if step != "ingest":
            assert dag_args == dvc_args, step
    assert task_argv(dag.get_task("configure"), executor)[1:4] == ["-m", "pipeline_steps.common.step_commands", "configure"]
    assert task_argv(dag.get_task("promote"), executor)[1:4] == ["-m", "pipeline_steps.cli", "promote"]


def test_kubernetes_variant(dagmod):
    from kubernetes.client import models as k8s

    dag = dagmod.build_dag(executor="kubernetes")
    orch = dagmod.ORCHESTRATION
    for step in STEP_TASKS + ["configure", "promote"]:
        op = dag.get_task(step)
        assert type(op).__name__ == "KubernetesPodOperator"
        pod = op.build_pod_request_obj(dry_run=True)
        c = pod.spec.containers[0]
        assert c.image == orch["image"] and pod.metadata.namespace == orch["namespace"]
        limits = c.resources.limits
        gpu = step in sc.GPU_STEPS
        assert limits.get("nvidia.com/gpu") == (str(orch["gpus"]) if gpu else None), step
        assert c.resources.requests == {"cpu": orch["cpu"], "memory": orch["memory"]}
        assert (pod.spec.node_selector or {}) == (orch["node_selector"] if gpu else {})
        tol = [(t.key, t.operator, t.effect) for t in pod.spec.tolerations or []]
        assert tol == ([("nvidia.com/gpu", "Exists", "NoSchedule")] if gpu else [])
        env = {e.name: e.value for e in c.env}
        assert env["HF_HUB_OFFLINE"] == "1" and "MLFLOW_TRACKING_URI" in env
        assert c.env_from[0].secret_ref.name == orch["secret"]
        assert [m.mount_path for m in c.volume_mounts if m.name == "runs"] == [orch["workdir"]]
        claim = next(v for v in pod.spec.volumes if v.name == "runs").persistent_volume_claim.claim_name
        assert claim == orch["volume_claim"]
        assert c.command + c.args == [*op.cmds, *op.arguments]
        assert op.do_xcom_push == (step in ("configure", "register")), step
    reg = dag.get_task("register")
    assert reg.cmds == ["/bin/sh"] and "/airflow/xcom/return.json" in reg.arguments[1]
    assert reg.arguments[3].endswith("/metrics/register.json")
    assert isinstance(reg.container_resources, k8s.V1ResourceRequirements)


def test_docker_variant(dagmod):
    dag = dagmod.build_dag(executor="docker")
    orch = dagmod.ORCHESTRATION
    for step in STEP_TASKS + ["configure", "promote"]:
        op = dag.get_task(step)
        assert type(op).__name__ == "DockerOperator"
        assert op.image == orch["image"] and op.working_dir == orch["workdir"]
        gpu = step in sc.GPU_STEPS
        if gpu:
            (req,) = op.device_requests
            assert req["Count"] == orch["gpus"] and req["Capabilities"] == [["gpu"]]
        else:
            assert not op.device_requests, step
        assert [(m["Target"], m["Source"], m["Type"]) for m in op.mounts] == [(orch["workdir"], orch["docker_volume"], "volume")]
        assert op.environment["HF_HUB_OFFLINE"] == "1" and "MLFLOW_TRACKING_URI" in op.environment
        assert op.docker_url == orch["docker_url"]
    reg = dag.get_task("register")
    assert reg.command[:2] == ["/bin/sh", "-c"] and "tr -d" in reg.command[2] and reg.do_xcom_push


def test_executor_from_the_environment(monkeypatch):
    monkeypatch.setenv("IPPO_EXECUTOR", "kubernetes")
    monkeypatch.setenv("IPPO_ORCHESTRATION", json.dumps({"image": "registry.example.com/ippo:1.2", "gpus": 2}))
    mod = load_dag_module()
    op = mod.dag.get_task("ppo_tune")
    assert type(op).__name__ == "KubernetesPodOperator" and op.image == "registry.example.com/ippo:1.2"
    assert op.container_resources.limits["nvidia.com/gpu"] == "2"


# ------------------------------------------------------------------------------------------------
# dag.test(): a whole iteration on the tiny model, approved by a "reviewer" thread
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def airflow_db():
    proc = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env={**os.environ, **AIRFLOW_ENV},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from airflow import settings

    settings.configure_orm()
    return _HOME


def create_mlflow_store(uri: str) -> None:
    """Create the MLflow store's tables before two processes open it: the reviewer thread's first poll and the
    configure task would otherwise both run MLflow's SQLite migrations at once, and the loser fails half-way
    ("no such column: spans.dimension_attributes", seen in CI). A deployment's store exists before any reviewer."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_experiments()
    client.search_registered_models()


def approve_when_registered(uri: str, stop: threading.Event, log: list, delay: float) -> None:
    """A reviewer: waits for the policy version the run registers, looks at it for ``delay`` seconds (the sensor
    pokes meanwhile and reschedules itself), then approves it (tags on the version, as `ippo approve` does)."""
    from mlflow import MlflowClient

    from pipeline_steps.common import registry

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    seen: dict[str, float] = {}
    while not stop.wait(0.5):
        try:
            versions = client.search_model_versions("name='ippo-policy'")
        except Exception:
            continue
        for mv in versions:
            if mv.tags.get(registry.TAG_GATES) == "passed" and not mv.tags.get(registry.TAG_APPROVAL):
                if time.time() - seen.setdefault(mv.version, time.time()) >= delay:
                    registry.approve("ippo-policy", mv.version, reviewer="test-reviewer", note="dag.test", tracking_uri=uri)
                    log.append(mv.version)
                    return


def test_dag_test_runs_one_iteration_and_waits_for_approval(dagmod, airflow_db, tmp_path, tiny_model_dir):
    from test_dvc_pipeline import tiny_params

    workdir = tmp_path / "work"
    workdir.mkdir()
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    dag = dagmod.build_dag(executor="local", workdir=str(workdir), mlflow_tracking_uri=uri, approval_poke_seconds=2,
                           retries=0)
    create_mlflow_store(uri)
    stop, approvals = threading.Event(), []
    reviewer = threading.Thread(target=approve_when_registered, args=(uri, stop, approvals, 12.0), daemon=True)
    reviewer.start()
    t0 = time.perf_counter()
    try:
        dr = dag.test(logical_date=datetime(2026, 1, 12, 6, tzinfo=timezone.utc),
                      run_conf={"params_file": str(params_file), "overrides": {"base_model.name_or_path": "tiny-random"}})
    finally:
        stop.set()
        reviewer.join(5)
    print(f"\ndag.test() (tiny pipeline, local executor): {time.perf_counter() - t0:.1f} s")
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    assert dr.state == "success", states
    assert all(s == "success" for s in states.values()), states

    run = workdir / "runs" / "2026-01-05"  # data interval start of the run: paths are keyed by it
    run_params = yaml.safe_load((run / "params.yaml").read_text())
    assert run_params["ingest"]["window_start"] == "2026-01-05T06:00:00Z"
    assert run_params["collect"]["policy"] == "pi0"  # auto, and no champion yet
    assert (run / "data/raw").is_dir() and (run / "data/fit_q/model/scorer").is_dir()
    assert (run / "data/ppo_tune/model/policy/config.json").exists()
    reg = json.loads((run / "metrics/register.json").read_text())
    assert [str(v) for v in approvals] == [str(reg["policy"]["version"])]

    # The sensor poked before the approval and gave its slot back in between (reschedule mode).
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskreschedule import TaskReschedule
    from airflow.utils.session import create_session

    with create_session() as session:
        ti = session.query(TaskInstance).filter_by(dag_id=dag.dag_id, run_id=dr.run_id, task_id="wait_for_approval").one()
        assert session.query(TaskReschedule).filter_by(ti_id=ti.id).count() >= 1

    from pipeline_steps.common import registry

    assert str(registry.current_champion("ippo-policy", uri)) == str(reg["policy"]["version"])  # promoted after approval
