"""The one place that knows each pipeline step's command line: ``dvc.yaml`` and the Airflow DAG both come from here.

    python -m pipeline_steps.common.step_commands write     # regenerate dvc.yaml + the DAG's defaults block
    python -m pipeline_steps.common.step_commands check     # exit 1 if either is stale (a test runs this)
    python -m pipeline_steps.common.step_commands argv fit_q --root runs/2026-01-05
    python -m pipeline_steps.common.step_commands exp-args profiles/gpu.yaml   # -> dvc exp run -S ... flags

Every step is ``python -m pipeline_steps.<step>`` with every path as an argument (CONVENTIONS 3). A
:class:`Step` lists its arguments in order; each path is a :class:`P` tagged with its DVC role (a dependency
produced upstream, a cached output, a metrics file, a plots folder), and each value read from ``params.yaml``
is a :class:`V`. From that one description:

* :func:`render_dvc_yaml` writes the DVC stage: ``cmd`` (paths relative to the workspace, ``V`` as DVC's
  ``${section.key}`` interpolation), ``deps`` (upstream paths + the code the step imports), ``params`` (the
  keys it reads), ``outs``, ``metrics`` and ``plots``;
* :func:`argv` gives the Airflow task's command: the same arguments with every path under the run's folder
  (``runs/<data interval start>/...``), ``--params`` pointing at that run's materialised params file and each
  ``V`` rendered by the DAG (from the ``configure`` task's result).

The ``configure`` sub-command is the DAG's first task: it materialises ``runs/<key>/params.yaml`` from the
image's ``params.yaml`` plus the run's overrides (trigger-form params, the data interval, the model cache of
the executor) and resolves ``collect.policy: auto`` (pi_i = the registry champion when one exists, else the
params.yaml value). Keeping it here means a run's exact configuration is a file next to its outputs.

Only the standard library is imported at module level: the DAG imports this module at parse time.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from pipeline_steps.common.config import apply_overrides, deep_merge, get_dotted

PARAMS_FILE = "params.yaml"
DVC_YAML = "dvc.yaml"
DAG_FILE = "dags/iterative_ppo.py"
PYTHON = "python"
RUN_PARAMS = "params.yaml"  # the run's materialised params file, under the run folder
RUN_RESULT = "configure.json"  # configure's result (resolved values), under the run folder

# ------------------------------------------------------------------------------------------------
# The vocabulary of a step description
# ------------------------------------------------------------------------------------------------

ROLES = ("dep", "part", "out", "metric", "plots", "file")


@dataclass(frozen=True)
class P:
    """A workspace path in a command line.

    ``role``: ``dep`` (produced by an upstream stage, listed in ``deps``), ``part`` (a path inside an upstream
    output folder that :attr:`Step.data` lists as the dependency instead), ``out`` (a cached output),
    ``metric`` (a small JSON, ``metrics`` with ``cache: false``), ``plots`` (a folder the step writes plots
    into; the plot files are declared in :attr:`Step.plots`), ``file`` (an uncached output, e.g. samples).
    ``prefix`` is text glued in front of the path (``logs=`` for ``NAME=PATH`` arguments).
    """

    path: str
    role: str = "dep"
    prefix: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"P({self.path!r}): role must be one of {ROLES}, got {self.role!r}")


@dataclass(frozen=True)
class V:
    """A value read from params.yaml (``section.key``); also tracked as a DVC param of the stage."""

    key: str


Token = str | P | V


@dataclass(frozen=True)
class Step:
    """One pipeline step: its command line (in order), the code it imports, the params it reads, its plots."""

    name: str
    args: tuple[tuple[str, tuple[Token, ...]], ...]
    code: tuple[str, ...]
    params: tuple[str, ...]
    plots: tuple[tuple[str, dict[str, Any]], ...] = ()
    data: tuple[str, ...] = ()  # upstream output folders the ``part`` paths live in (DVC deps)
    gpu: bool = False  # runs a language model: gets a GPU in the containerised executors
    result: str | None = None  # the flag whose file is the step's result (the Airflow task's XCom)
    description: str = ""

    @property
    def module(self) -> str:
        return f"pipeline_steps.{self.name}"

    def tokens(self) -> Iterable[Token]:
        for _flag, values in self.args:
            yield from values

    def paths(self, role: str) -> list[str]:
        return [t.path for t in self.tokens() if isinstance(t, P) and t.role == role]


def section(name: str) -> str:
    """Every key of a params.yaml section, expanded from its pydantic model when dvc.yaml is rendered."""
    return f"{name}.*"


# Code every step imports (config and tracking), and the simulated world (a folder: any file in it counts).
COMMON = ("pipeline_steps/common/config.py", "pipeline_steps/common/tracking.py")
WORLD = "pipeline_steps/world"
LLM_CODE = ("pipeline_steps/common/base_model.py", "pipeline_steps/common/contract.py", "pipeline_steps/common/policies.py")
BASE_MODEL_KEYS = ("base_model.name_or_path", "base_model.cache_dir", "base_model.dtype")
GENERATION_KEYS = ("collect.batch_size", "collect.max_new_tokens", "collect.temperature", "collect.top_p",
                   "collect.repetition_penalty")

# Workspace layout (relative to the DVC workspace, or to runs/<key>/ in Airflow).
RAW = "data/raw"
TURNS = "data/ingest/turns.parquet"
VALIDATED = "data/validate/turns.parquet"
RETURNS = "data/returns/returns.parquet"
Q_MODEL = "data/fit_q/model"
POLICY = "data/ppo_tune/model"

STEPS_SPEC: tuple[Step, ...] = (
    Step(
        "collect",
        description="deploy pi_i (collect.policy) in the simulated world and log its conversations",
        args=(("--params", (PARAMS_FILE,)), ("--out", (P(RAW, "out"),)), ("--summary", (P("metrics/collect.json", "metric"),))),
        code=("pipeline_steps/collect.py", *LLM_CODE, "pipeline_steps/common/stats.py", *COMMON, WORLD),
        params=(section("collect"), *BASE_MODEL_KEYS, section("prompt"), "world"),
        gpu=True,
    ),
    Step(
        "ingest",
        description="logs -> one canonical, de-duplicated, PII-redacted Parquet dataset",
        args=(
            ("--params", (PARAMS_FILE,)),
            ("--input", (P(RAW),)),
            ("--out", (P(TURNS, "out"),)),
            ("--rejects", (P("data/ingest/rejects.jsonl", "out"),)),
            ("--summary", (P("metrics/ingest.json", "metric"),)),
        ),
        code=("pipeline_steps/ingest.py", "pipeline_steps/common/contract.py", "pipeline_steps/common/config.py",
              "pipeline_steps/common/parquet_io.py", "pipeline_steps/common/tracking.py"),
        params=(section("ingest"),),
    ),
    Step(
        "validate",
        description="the Great Expectations gate; fails closed, quarantines bad conversations",
        args=(
            ("--params", (PARAMS_FILE,)),
            ("--input", (P(TURNS),)),
            ("--out", (P(VALIDATED, "out"),)),
            ("--quarantine", (P("data/validate/quarantine.parquet", "out"),)),
            ("--docs", (P("data/validate/data_docs", "out"),)),
            ("--summary", (P("metrics/validate.json", "metric"),)),
        ),
        code=("pipeline_steps/validate.py", "pipeline_steps/common/contract.py", "pipeline_steps/common/config.py",
              "pipeline_steps/common/parquet_io.py", "pipeline_steps/common/tracking.py"),
        params=(section("validate"),),
    ),
    Step(
        "returns",
        description="Monte-Carlo returns G per logged action: the (state, action, G) rows Q is fit on",
        args=(
            ("--params", (PARAMS_FILE,)),
            ("--input", (P(VALIDATED),)),
            ("--out", (P(RETURNS, "out"),)),
            ("--summary", (P("metrics/returns.json", "metric"),)),
        ),
        code=("pipeline_steps/returns.py", "pipeline_steps/common/contract.py", "pipeline_steps/common/config.py",
              "pipeline_steps/common/parquet_io.py", "pipeline_steps/common/tracking.py",
              "pipeline_steps/common/base_model.py", "pipeline_steps/world/simulator.py", "pipeline_steps/world/verticals",
              "pipeline_steps/world/state_reader.py", "pipeline_steps/world/featurizer.py"),
        params=(section("returns"), "base_model.name_or_path", "base_model.cache_dir", "prompt.max_prompt_tokens",
                "prompt.version", "prompt.state_notes", "world.vertical"),
    ),
    Step(
        "fit_q",
        description="fit Q(s, a) ~ G: LoRA on the base LM plus a scalar head",
        args=(
            ("--params", (PARAMS_FILE,)),
            ("--input", (P(RETURNS),)),
            ("--out", (P(Q_MODEL, "out"),)),
            ("--metrics", (P("metrics/fit_q.json", "metric"),)),
            ("--plots", (P("plots/fit_q", "plots"),)),
        ),
        code=("pipeline_steps/fit_q.py", "pipeline_steps/returns.py", "pipeline_steps/common/q_model.py",
              "pipeline_steps/common/q_input.py", "pipeline_steps/common/contract.py", "pipeline_steps/common/config.py",
              "pipeline_steps/common/parquet_io.py", "pipeline_steps/common/tracking.py",
              "pipeline_steps/common/base_model.py", "pipeline_steps/world/simulator.py", "pipeline_steps/world/verticals"),
        # not base_model.dtype: fit_q trains Q in fp32 whatever the policies' load dtype
        params=(section("fit_q"), *BASE_MODEL_KEYS[:2], "prompt.max_prompt_tokens", "prompt.version", "prompt.state_notes",
                "world.vertical"),
        plots=(
            ("plots/fit_q/learning_curve.csv", {"cache": False, "x": "epoch", "y": "eval_loss",
                                                "title": "fit_q: validation MSE per epoch"}),
            ("plots/fit_q/calibration.csv", {"cache": False, "x": "mean_q", "y": "mean_g", "template": "scatter",
                                             "title": "fit_q: reliability (binned mean Q vs mean G)"}),
            ("plots/fit_q/calibration.png", {"cache": False}),
            ("plots/fit_q/learning_curve.png", {"cache": False}),
        ),
        gpu=True,
    ),
    Step(
        "ppo_tune",
        description="pi_i -> pi_{i+1}: single-turn PPO with Q_i as the reward and a KL penalty to pi_i",
        args=(
            ("--params", (PARAMS_FILE,)),
            ("--policy", (V("collect.policy"),)),
            ("--returns", (P(RETURNS),)),
            ("--q-model", (P(Q_MODEL + "/scorer", "part"),)),
            ("--out", (P(POLICY, "out"),)),
            ("--metrics", (P("metrics/ppo_tune.json", "metric"),)),
            ("--curve", (P("plots/ppo_tune/training_curve.csv", "plots"),)),
        ),
        data=(Q_MODEL,),
        code=("pipeline_steps/ppo_tune.py", "pipeline_steps/returns.py", "pipeline_steps/common/q_model.py",
              "pipeline_steps/common/policies.py", "pipeline_steps/common/stats.py",
              "pipeline_steps/common/q_input.py", "pipeline_steps/common/contract.py", "pipeline_steps/common/config.py",
              "pipeline_steps/common/tracking.py", "pipeline_steps/common/base_model.py", "pipeline_steps/world/simulator.py",
              "pipeline_steps/world/verticals"),
        params=(section("ppo_tune"), "collect.policy", *BASE_MODEL_KEYS, "prompt.max_prompt_tokens", "prompt.version",
                "prompt.state_notes", "world.vertical"),
        plots=(("plots/ppo_tune/training_curve.csv", {"cache": False, "x": "episode", "y": "q_reward",
                                                      "title": "ppo_tune: mean Q reward of each rollout batch"}),),
        gpu=True,
    ),
    Step(
        "evaluate",
        description="pi_{i+1} against pi_i: offline (Theorems 1-2 quantities) and a paired A/B test in the world",
        args=(
            ("--params", (PARAMS_FILE,)),
            ("--baseline", (V("collect.policy"),)),
            ("--candidate", (P(POLICY + "/policy", "part"),)),
            ("--q-model", (P(Q_MODEL + "/scorer", "part"),)),
            ("--returns", (P(RETURNS),)),
            ("--fit-q-metrics", (P("metrics/fit_q.json"),)),
            ("--metrics", (P("metrics/evaluate.json", "metric"),)),
            ("--samples", (P("metrics/evaluate_samples.json", "file"),)),
            ("--plots", (P("plots/evaluate", "plots"),)),
        ),
        data=(POLICY, Q_MODEL),
        code=("pipeline_steps/evaluate.py", *LLM_CODE, "pipeline_steps/common/ab_stats.py", "pipeline_steps/common/stats.py",
              "pipeline_steps/common/q_model.py", "pipeline_steps/common/q_input.py", *COMMON, WORLD),
        params=(section("evaluate"), "collect.policy", *GENERATION_KEYS, *BASE_MODEL_KEYS, section("prompt"), "world"),
        plots=(
            ("plots/evaluate/ab_conversion.png", {"cache": False}),
            ("plots/evaluate/outcome_by_turn.png", {"cache": False}),
            ("plots/evaluate/ab_conversion.csv", {"cache": False, "x": "arm", "y": "rate"}),
            ("plots/evaluate/outcome_by_turn.csv", {"cache": False, "x": "turn"}),
        ),
        gpu=True,
    ),
    Step(
        "register",
        description="MLflow model versions with their evidence; the offline and A/B gates; alias 'challenger'",
        args=(
            ("--params", (PARAMS_FILE,)),
            ("--policy", (P(POLICY + "/policy", "part"),)),
            ("--q-model", (P(Q_MODEL + "/scorer", "part"),)),
            ("--evaluate-metrics", (P("metrics/evaluate.json"),)),
            ("--fit-q-metrics", (P("metrics/fit_q.json"),)),
            ("--validate-metrics", (P("metrics/validate.json"),)),
            ("--evidence", (P("metrics/evaluate_samples.json"), P("metrics/ppo_tune.json"),
                            P("plots/evaluate/ab_conversion.png"), P("plots/fit_q/calibration.png"))),
            ("--data", (P(VALIDATED, prefix="logs="), P(RETURNS, prefix="returns="))),
            ("--out", (P("metrics/register.json", "metric"),)),
        ),
        data=(POLICY, Q_MODEL),
        code=("pipeline_steps/register.py", "pipeline_steps/common/registry.py", "pipeline_steps/common/pyfunc_models.py",
              "pipeline_steps/common/contract.py", *COMMON, "pipeline_steps/world/simulator.py", "pipeline_steps/world/verticals",
              "pipeline_steps/world/state_reader.py", "pipeline_steps/world/featurizer.py"),
        params=(section("register"), "collect.max_new_tokens", "collect.repetition_penalty", "prompt.max_prompt_tokens",
                "prompt.state_notes", "world.vertical"),
        result="--out",
    ),
)

STEPS: tuple[str, ...] = tuple(s.name for s in STEPS_SPEC)
STEP: dict[str, Step] = {s.name: s for s in STEPS_SPEC}
GPU_STEPS: tuple[str, ...] = tuple(s.name for s in STEPS_SPEC if s.gpu)


# ------------------------------------------------------------------------------------------------
# Command lines
# ------------------------------------------------------------------------------------------------


def _join(root: str, path: str) -> str:
    return f"{root.rstrip('/')}/{path}" if root else path


def argv(
    step: str,
    root: str = "",
    params_file: str = PARAMS_FILE,
    value: Callable[[str], str] = lambda key: "${" + key + "}",
    python: str = PYTHON,
    replace: dict[str, str] | None = None,
) -> list[str]:
    """The step's command line. ``root`` prefixes every workspace path, ``params_file`` replaces ``--params``,
    ``value(key)`` renders each params.yaml value (default: DVC's ``${key}`` interpolation), ``replace`` maps a
    workspace path to what stands in its place (the DAG: ingest reads production logs when given)."""
    spec = STEP[step]
    out = [python, "-m", spec.module]
    for flag, values in spec.args:
        out.append(flag)
        for t in values:
            if flag == "--params":
                out.append(params_file)
            elif isinstance(t, P):
                out.append(t.prefix + (replace or {}).get(t.path, _join(root, t.path)))
            elif isinstance(t, V):
                out.append(value(t.key))
            else:
                out.append(t)
    return out


def result_path(step: str, root: str = "") -> str | None:
    """The file a step publishes as its result (the Airflow task's XCom), or None."""
    spec = STEP[step]
    if spec.result is None:
        return None
    for flag, values in spec.args:
        if flag == spec.result:
            return _join(root, values[0].path)  # type: ignore[union-attr]
    raise KeyError(f"{step}: result flag {spec.result} is not one of its arguments")


def values_used() -> list[str]:
    """Every params.yaml key a command line reads directly (the ``configure`` task resolves these)."""
    return sorted({t.key for s in STEPS_SPEC for t in s.tokens() if isinstance(t, V)})


def configure_argv(root: str, base_params: str, cache_dir: str, sets: str, python: str = PYTHON) -> list[str]:
    """The DAG's first task: materialise ``<root>/params.yaml`` (``sets`` is a JSON object of dotted keys)."""
    return [python, "-m", "pipeline_steps.common.step_commands", "configure", "--base", base_params,
            "--out", _join(root, RUN_PARAMS), "--result", _join(root, RUN_RESULT), "--cache-dir", cache_dir,
            "--set-json", sets]


def promote_argv(version: str, model: str, python: str = PYTHON) -> list[str]:
    """Move ``champion`` to an approved version (``ippo promote``; refuses without gates + approval)."""
    return [python, "-m", "pipeline_steps.cli", "promote", version, "--model", model]


# ------------------------------------------------------------------------------------------------
# dvc.yaml
# ------------------------------------------------------------------------------------------------

HEADER = """\
# GENERATED by `python -m pipeline_steps.common.step_commands write` from pipeline_steps/common/step_commands.py
# (the one place that knows each step's command line; the Airflow DAG runs the same commands). Edit that file,
# not this one: tests/test_step_commands.py fails when they disagree.
#
# One iteration of Algorithm 1: collect -> ingest -> validate -> returns -> fit_q -> ppo_tune -> evaluate -> register.
# Each stage depends on its step module and the shared code it imports, and lists exactly the params.yaml keys
# it reads. pi_i is collect.policy (pi0 on the first iteration, models:/ippo-policy@champion afterwards).
"""


def _expand_params(keys: Sequence[str]) -> list[str]:
    """``section.*`` -> every field of that params.yaml section (declaration order of its pydantic model)."""
    from pipeline_steps.common.config import Params

    sections = {(f.alias or name): f.annotation for name, f in Params.model_fields.items()}
    out: list[str] = []
    for key in keys:
        if key.endswith(".*"):
            name = key[:-2]
            out += [f"{name}.{k}" for k in sections[name].model_fields]  # type: ignore[union-attr]
        else:
            out.append(key)
    return list(dict.fromkeys(out))


def dvc_stage(step: str) -> dict[str, Any]:
    """The DVC stage of a step as a plain mapping."""
    spec = STEP[step]
    cmd = shlex.join(argv(step)).replace("'${", "${").replace("}'", "}")
    deps = [t.path for t in spec.tokens() if isinstance(t, P) and t.role == "dep"]
    deps = list(dict.fromkeys(deps + list(spec.data) + list(spec.code)))
    stage: dict[str, Any] = {"cmd": cmd, "deps": deps, "params": _expand_params(spec.params)}
    outs: list[Any] = spec.paths("out") + [{p: {"cache": False}} for p in spec.paths("file")]
    if outs:
        stage["outs"] = outs
    metrics = spec.paths("metric")
    if metrics:
        stage["metrics"] = [{m: {"cache": False}} for m in metrics]
    if spec.plots:
        stage["plots"] = [{p: dict(opts)} for p, opts in spec.plots]
    return stage


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    s = str(value)
    return s if re.fullmatch(r"[A-Za-z0-9_./@=${}-]+", s) and not s.startswith(("$", "{", "@")) else json.dumps(s)


def _wrap_cmd(cmd: str, width: int = 110) -> list[str]:
    """Split a command line before ``--flags`` into lines of at most ``width`` characters (a folded block)."""
    words, lines, line = cmd.split(" "), [], ""
    for w in words:
        if line and w.startswith("--") and len(line) + 1 + len(w) > width - 20:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}" if line else w
    return lines + [line]


def _emit_stage(step: str, stage: dict[str, Any]) -> str:
    out = [f"  {step}:", "    cmd: >-"] + [f"      {ln}" for ln in _wrap_cmd(stage["cmd"])]
    for key in ("deps", "params", "outs", "metrics", "plots"):
        if key not in stage:
            continue
        out.append(f"    {key}:")
        for item in stage[key]:
            if isinstance(item, dict):
                (path, opts), = item.items()
                out.append(f"      - {_scalar(path)}:")
                out += [f"          {k}: {_scalar(v)}" for k, v in opts.items()]
            else:
                out.append(f"      - {_scalar(item)}")
    return "\n".join(out) + "\n"


def render_dvc_yaml() -> str:
    """The whole dvc.yaml text (stable formatting, so `check` can compare it byte for byte)."""
    return HEADER + "stages:\n" + "\n".join(_emit_stage(s, dvc_stage(s)) for s in STEPS)


# ------------------------------------------------------------------------------------------------
# The DAG's defaults (generated into the DAG file, so it reads no file at parse time)
# ------------------------------------------------------------------------------------------------

BEGIN = "# >>> generated by `python -m pipeline_steps.common.step_commands write` from params.yaml: do not edit >>>"
END = "# <<< end of generated block <<<"
# The params.yaml keys the DAG's trigger form offers (typed Params); anything else goes in `overrides`.
DAG_PARAMS = ("collect.policy", "collect.conversations", "base_model.name_or_path", "fit_q.epochs",
              "ppo_tune.total_episodes", "evaluate.ab_conversations")


def render_dag_defaults(params_path: str | Path = PARAMS_FILE) -> str:
    """The Python block with params.yaml's values the DAG uses as defaults (trigger form + orchestration)."""
    from pprint import pformat

    from pipeline_steps.common.config import load_params

    params = load_params(params_path)
    data = params.model_dump(by_alias=True, mode="json")
    orch = data["orchestration"]
    values = {k: get_dotted(data, k) for k in DAG_PARAMS}
    values["collect.policy"] = orch.pop("policy")  # the DAG's pi_i rule (auto = champion, else collect.policy)
    return "\n".join([
        BEGIN,
        f"PARAM_DEFAULTS = {pformat(values, width=110, sort_dicts=False)}",
        f"ORCHESTRATION = {pformat(orch, width=110, sort_dicts=False)}",
        END,
    ])


def replace_block(text: str, block: str) -> str:
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0:
        raise ValueError(f"{DAG_FILE}: generated-block markers not found")
    return text[:start] + block + text[end + len(END):]


# ------------------------------------------------------------------------------------------------
# configure: a run's params file (the DAG's first task)
# ------------------------------------------------------------------------------------------------


def resolve_policy(spec: str, fallback: str, model_name: str, tracking_uri: str | None = None) -> str:
    """``auto`` -> ``models:/<name>@champion`` when the registry has a champion, else ``fallback``."""
    if spec != "auto":
        return spec
    from pipeline_steps.common.registry import CHAMPION, current_champion

    return f"models:/{model_name}@{CHAMPION}" if current_champion(model_name, tracking_uri) else fallback


def configure(base: str | Path, out: str | Path, result: str | Path, sets: dict[str, Any], cache_dir: str | None) -> dict[str, Any]:
    """Write the run's params file (base + overrides, validated) and its result JSON."""
    import yaml

    from pipeline_steps.common.config import Params, load_params, read_yaml
    from pipeline_steps.common.tracking import write_json

    data = apply_overrides(read_yaml(base), sets)
    if cache_dir:
        data.setdefault("base_model", {})["cache_dir"] = cache_dir
    policy = get_dotted(data, "collect.policy")
    if policy == "auto":
        fallback = read_yaml(base)["collect"]["policy"]
        model = data.get("register", {}).get("policy_model_name", "ippo-policy")
        data["collect"]["policy"] = resolve_policy("auto", fallback if fallback != "auto" else "pi0", model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    params: Params = load_params(tmp)  # fail here, naming the field, rather than in the third step
    tmp.replace(out)
    dumped = params.model_dump(by_alias=True, mode="json")
    res = {"params": str(out), "overrides": sets, "values": {k: get_dotted(dumped, k) for k in values_used()}}
    write_json(result, res)
    return res


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def _paths(root: Path) -> tuple[Path, Path, Path]:
    return root / DVC_YAML, root / DAG_FILE, root / PARAMS_FILE


def stale(root: Path) -> list[str]:
    """Generated files that differ from what step_commands + params.yaml render (empty = in sync)."""
    dvc, dag, params = _paths(root)
    out = []
    if not dvc.exists() or dvc.read_text() != render_dvc_yaml():
        out.append(str(dvc))
    if not dag.exists() or BEGIN not in dag.read_text() or replace_block(dag.read_text(), render_dag_defaults(params)) != dag.read_text():
        out.append(str(dag))
    return out


def exp_args(profile: str | Path) -> list[str]:
    """``dvc exp run`` flags (``-S key=value``) that apply a profile of dotted keys (profiles/*.yaml)."""
    from pipeline_steps.common.config import flatten_dotted, read_yaml

    flat = flatten_dotted(read_yaml(profile))
    return [a for k, v in flat.items() for a in ("-S", f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]


def main(argv_: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline_steps.common.step_commands", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("write", "check"):
        s = sub.add_parser(name, help=f"{name} dvc.yaml and the DAG's defaults block")
        s.add_argument("--root", default=".", help="repository root")
    s = sub.add_parser("argv", help="print a step's command line")
    s.add_argument("step", choices=STEPS)
    s.add_argument("--root", default="")
    s.add_argument("--params", default=PARAMS_FILE)
    s = sub.add_parser("exp-args", help="print `dvc exp run` -S flags for a profile")
    s.add_argument("profile")
    s = sub.add_parser("configure", help="materialise a run's params file (the DAG's first task)")
    s.add_argument("--base", default=PARAMS_FILE, help="params.yaml to start from")
    s.add_argument("--out", required=True, help="the run's params file")
    s.add_argument("--result", required=True, help="JSON with the resolved values (the task's XCom)")
    s.add_argument("--cache-dir", help="base_model.cache_dir of this executor (where the base model is baked/cached)")
    s.add_argument("--set-json", default="{}", help="JSON object of dotted params.yaml keys to override")
    args = p.parse_args(argv_)
    if args.cmd in ("write", "check"):
        root = Path(args.root)
        dvc, dag, params = _paths(root)
        if args.cmd == "check":
            bad = stale(root)
            for f in bad:
                print(f"stale: {f} (run: python -m pipeline_steps.common.step_commands write)", file=sys.stderr)
            return 1 if bad else 0
        dvc.write_text(render_dvc_yaml())
        dag.write_text(replace_block(dag.read_text(), render_dag_defaults(params)))
        print(f"wrote {dvc} and the defaults block of {dag}")
        return 0
    if args.cmd == "argv":
        print(shlex.join(argv(args.step, args.root, args.params)))
        return 0
    if args.cmd == "exp-args":
        print(shlex.join(exp_args(args.profile)))
        return 0
    try:
        sets = json.loads(args.set_json)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"error: --set-json is not valid JSON: {exc}") from exc
    if not isinstance(sets, dict):
        raise SystemExit("error: --set-json must be a JSON object of dotted keys")
    from pipeline_steps.common.config import ConfigError

    try:
        res = configure(args.base, args.out, args.result, sets, args.cache_dir)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
