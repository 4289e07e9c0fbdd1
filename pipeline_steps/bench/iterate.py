"""``ippo bench iterate``: does Iterative PPO improve multi-turn outcomes? K iterations against baselines.

    ippo bench iterate --profile profiles/bench-cpu.yaml --out bench_runs/cpu
    ippo bench iterate --profile profiles/gpu.yaml --iterations 5 --out bench_runs/gpu

One run, one seeded world:

1. **Iterations.** Iteration k runs the eight pipeline steps (the same command lines as ``dvc repro`` and the
   Airflow DAG, from :mod:`pipeline_steps.common.step_commands`) in ``<out>/iter_<k>/`` with
   ``collect.policy`` = pi_{k-1}, a fresh collect seed and a week later in time; it produces Q_{k-1}, pi_k, an
   evaluation of pi_k against pi_{k-1} (offline + A/B) and a registered model version (the run's own MLflow
   store, ``<out>/mlflow.db``). ``bench.follow_gates`` chooses whether pi_k always becomes the next policy
   (Algorithm 1 as written) or only when the registry gates pass.
2. **Baselines**, on the same personas as every A/B arm (``world.seed + evaluate.ab_seed``, the first
   ``evaluate.ab_conversations`` conversations; common random numbers): pi_0 (iteration 1's control arm),
   best-of-n reranking of pi_0's samples by Q_0, a myopic PPO baseline (the same ``ppo_tune`` step, with a
   reward model fit on the immediate "the business sent it" signal, ``fit_q.target: sent``) and the
   scripted expert (ceiling).
3. **Report**: conversion with a Wilson 95% CI per policy, the normalised score
   ``(conv - conv_0) / (conv_expert - conv_0)``, each iteration's A/B lift over the previous one, the
   per-token ``KL(pi || pi_0)`` on iteration 1's held-out states, wall time per step; the issue's targets
   checked. Written to ``<out>/results.json``, ``results.md`` and ``results.png``.

Iteration 1 runs first, then the baselines (they need only Q_0 and iteration 1's data), then iterations
2..K, so an interrupted run already holds every comparison with pi_1. Every unit of work leaves a marker
when it succeeds: re-running the same command resumes where it stopped, ``--iterations`` with another K
extends a finished run (or reports its first K), ``--fresh`` starts over. Any other difference in the
configuration of an existing ``--out`` is refused rather than mixed.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from pipeline_steps.common.config import Params, apply_overrides, deep_merge, get_dotted, read_yaml, validate_params
from pipeline_steps.common.step_commands import POLICY, Q_MODEL, RETURNS, STEPS, argv
from pipeline_steps.common.tracking import git_commit, write_json

REVIEWER = "ippo-bench"


class BenchError(RuntimeError):
    """A bench run that cannot go on; the message names the unit of work and where its log is."""


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


def bench_config(params_path: str | Path, profiles: Sequence[str | Path] = (), sets: dict[str, Any] | None = None) -> dict[str, Any]:
    """params.yaml with the profiles merged over it (in order) and dotted ``sets`` applied; validated."""
    data = read_yaml(params_path)
    for prof in profiles:
        deep_merge(data, read_yaml(prof))
    apply_overrides(data, sets)
    cache = Path(data.get("base_model", {}).get("cache_dir", "models"))
    data.setdefault("base_model", {})["cache_dir"] = str(cache if cache.is_absolute() else cache.resolve())
    validate_params(data, params_path)
    return data


def iteration_config(base: dict[str, Any], k: int, policy: str) -> dict[str, Any]:
    """The params of iteration ``k`` (1-based): pi_{k-1} deployed, a fresh seed, a week later."""
    data = copy.deepcopy(base)
    c = data.setdefault("collect", {})
    b = Params.model_validate(base)
    c["policy"] = policy
    c["seed"] = b.collect.seed + (k - 1) * b.bench.collect_seed_stride
    start = datetime.fromisoformat(b.collect.start_time.replace("Z", "+00:00")) + timedelta(weeks=k - 1)
    c["start_time"] = start.strftime("%Y-%m-%dT%H:%M:%SZ")
    return data


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------
# Units of work: subprocess steps (the pipeline's own command lines) with markers for resuming
# ------------------------------------------------------------------------------------------------


def killed_by(returncode: int) -> str:
    """`` (killed by SIGKILL: ...)`` for a step ended by a signal, so an out-of-memory kill is not a mystery."""
    if returncode >= 0:
        return ""
    import signal

    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    hint = ": the kernel's out-of-memory killer sends it when RAM runs out (see `dmesg`)" if name == "SIGKILL" else ""
    return f" (killed by {name}{hint})"


MEMORY_POLL_SECONDS = 0.5


def peak_rss_gb(pid: int) -> float | None:
    """The peak resident memory (GB) of a running process since its exec: Linux's ``VmHWM``; None elsewhere.

    Not ``wait4``'s ``ru_maxrss``: that counts the parent's pages mapped between fork and exec, so every step
    would look as large as the bench process that started it.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / 1e9, 2)
    except (OSError, ValueError):
        return None
    return None


class Runner:
    """Runs units of work once: a finished unit leaves ``<out>/.done/<name>.json`` (its result + wall time)."""

    def __init__(self, out: Path, echo: Callable[[str], None] = print):
        self.out = out
        self.echo = echo
        self.done_dir = out / ".done"
        self.done_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{(out / 'mlflow.db').resolve()}",
                    "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}

    def marker(self, name: str) -> Path:
        return self.done_dir / f"{name.replace('/', '__')}.json"

    def done(self, name: str) -> dict[str, Any] | None:
        m = self.marker(name)
        return json.loads(m.read_text()) if m.is_file() else None

    def unit(self, name: str, fn: Callable[[], Any]) -> dict[str, Any]:
        """Run ``fn`` unless ``name`` already succeeded; returns ``{"result", "seconds"}``."""
        found = self.done(name)
        if found is not None:
            self.echo(f"   {name}: done earlier ({found['seconds']:.0f} s), skipped")
            return found
        self.echo(f"-> {name}")
        t0 = time.perf_counter()
        result = fn()
        rec = {"result": result, "seconds": time.perf_counter() - t0, "finished": datetime.now().isoformat(timespec="seconds")}
        write_json(self.marker(name), rec)
        self.echo(f"   {name}: {rec['seconds']:.0f} s")
        return rec

    def command(self, name: str, cmd: list[str], log: Path) -> dict[str, Any]:
        """Run a step's command line, its output in ``log``; a failure raises :class:`BenchError` with the log tail."""

        def go() -> dict[str, float | None]:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("w") as fh:
                fh.write("$ " + " ".join(cmd) + "\n")
                fh.flush()
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env)
                peak = None
                while True:
                    try:
                        proc.wait(timeout=MEMORY_POLL_SECONDS)
                        break
                    except subprocess.TimeoutExpired:
                        peak = peak_rss_gb(proc.pid) or peak
            if proc.returncode != 0:
                tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
                raise BenchError(f"{name}: exit code {proc.returncode}{killed_by(proc.returncode)}; log {log}\n{tail}")
            return {"peak_rss_gb": peak}

        return self.unit(name, go)


def step_command(step: str, root: Path, params_file: Path, data: dict[str, Any], replace: dict[str, str] | None = None) -> list[str]:
    """The pipeline's command line for ``step`` with every path under ``root`` and values from ``data``."""
    return argv(step, root=str(root), params_file=str(params_file), value=lambda key: str(get_dotted(data, key)),
                python=sys.executable, replace=replace)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BenchError(f"{path}: expected output is missing")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------
# The bench
# ------------------------------------------------------------------------------------------------


def run_iterations(runner: Runner, base: dict[str, Any], first: int, last: int, previous: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Iterations ``first..last`` of the pipeline after ``previous``; one record per iteration (policies, metrics, step times)."""
    params = Params.model_validate(base)
    policy = previous[-1]["next_policy"] if previous else params.collect.policy
    out = []
    for k in range(first, last + 1):
        root = runner.out / f"iter_{k}"
        data = iteration_config(base, k, policy)
        params_file = root / "params.yaml"
        if not params_file.exists():
            write_yaml(params_file, data)
        elif _without_k(read_yaml(params_file)) != _without_k(data):
            raise BenchError(f"{params_file}: iteration {k} already ran with other params; use --fresh or another --out")
        times, memory = {}, {}
        for step in STEPS:
            rec = runner.command(f"iter_{k}/{step}", step_command(step, root, params_file, data), root / "logs" / f"{step}.log")
            times[step] = rec["seconds"]
            memory[step] = (rec.get("result") or {}).get("peak_rss_gb")
        candidate = str(root / POLICY / "policy")
        register = read_json(root / "metrics" / "register.json")
        promoted = False
        if params.bench.follow_gates:
            promoted = bool(runner.unit(f"iter_{k}/promote", lambda: _approve_and_promote(runner, register))["result"])
        next_policy = candidate if (promoted or not params.bench.follow_gates) else policy
        out.append({
            "k": k, "root": str(root), "policy_in": policy, "candidate": candidate, "next_policy": next_policy,
            "evaluate": read_json(root / "metrics" / "evaluate.json"),
            "fit_q": read_json(root / "metrics" / "fit_q.json"),
            "ppo_tune": read_json(root / "metrics" / "ppo_tune.json"),
            "collect": read_json(root / "metrics" / "collect.json"),
            "register": register, "promoted": promoted, "step_seconds": times, "step_peak_rss_gb": memory,
        })
        policy = next_policy
    return out


def _approve_and_promote(runner: Runner, register: dict[str, Any]) -> bool:
    """Act as the reviewer when both gates passed (``bench.follow_gates``); False when they did not."""
    if not register["gates"]["passed"]:
        return False
    from pipeline_steps.common import registry

    uri = runner.env["MLFLOW_TRACKING_URI"]
    name, version = register["policy"]["name"], register["policy"]["version"]
    registry.approve(name, version, REVIEWER, "ippo bench: both gates passed", tracking_uri=uri)
    registry.promote(name, version, tracking_uri=uri)
    return True


def world_conversion(params: Params, policy: Any) -> dict[str, Any]:
    """Conversion of ``policy`` on the A/B personas (the same customers every arm and baseline meets)."""
    from tqdm.auto import tqdm

    from pipeline_steps.common.stats import proportion_ci
    from pipeline_steps.world.simulator import World

    world = World(params.world)
    e = params.evaluate
    with tqdm(total=e.ab_conversations, desc=policy.policy_id, unit="conv") as bar:
        convs = world.run(policy, e.ab_conversations, seed=params.world.seed + e.ab_seed,
                          batch_size=params.collect.batch_size, variant="bench", progress=bar.update)
    return proportion_ci(sum(c.converted for c in convs), len(convs)).as_dict()


def run_baselines(runner: Runner, base: dict[str, Any], iters: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """best-of-n, myopic PPO and the expert on the A/B personas; each returns its conversion record."""
    params = Params.model_validate(base)
    b = params.bench
    first = Path(iters[0]["root"])
    q0 = first / Q_MODEL / "scorer"
    seed = params.world.seed + params.evaluate.ab_seed
    out: dict[str, dict[str, Any]] = {}

    if "expert" in b.baselines:
        def expert() -> dict[str, Any]:
            from pipeline_steps.world.scripted import ScriptedPolicy
            from pipeline_steps.world.simulator import World

            return world_conversion(params, ScriptedPolicy(b.expert, World(params.world).vertical, seed=seed))

        rec = runner.unit("baselines/expert", expert)
        out["expert"] = {**rec["result"], "seconds": rec["seconds"]}

    if "best_of_n" in b.baselines:
        def best_of_n() -> dict[str, Any]:
            from pipeline_steps.common.policies import BestOfNPolicy, load_policy
            from pipeline_steps.common.q_model import load_scorer, read_manifest
            from pipeline_steps.world.simulator import World

            pi0 = load_policy("pi0", params, World(params.world).vertical, seed=seed)
            q_model, q_tok = load_scorer(q0)
            pol = BestOfNPolicy(pi0, q_model, q_tok, n=b.best_of_n, max_action_tokens=read_manifest(q0).get("max_action_tokens"),
                                score_batch_size=params.fit_q.eval_batch_size)
            return world_conversion(params, pol)

        rec = runner.unit("baselines/best_of_n", best_of_n)
        out["best_of_n"] = {**rec["result"], "seconds": rec["seconds"]}

    if "myopic" in b.baselines:
        root = runner.out / "baselines" / "myopic"
        data = iteration_config(base, 1, "pi0")
        data["fit_q"]["target"] = "sent"
        params_file = root / "params.yaml"
        write_yaml(params_file, data)
        replace = {RETURNS: str(first / RETURNS)}
        steps = {step: runner.command(f"baselines/myopic/{step}", step_command(step, root, params_file, data, replace),
                                      root / "logs" / f"{step}.log") for step in ("fit_q", "ppo_tune")}
        policy_dir = str(root / POLICY / "policy")

        def myopic() -> dict[str, Any]:
            from pipeline_steps.common.policies import load_policy
            from pipeline_steps.world.simulator import World

            return world_conversion(params, load_policy(policy_dir, params, World(params.world).vertical, seed=seed))

        rec = runner.unit("baselines/myopic/world", myopic)
        out["myopic"] = {**rec["result"], "seconds": rec["seconds"] + sum(r["seconds"] for r in steps.values()),
                         "policy": policy_dir, "step_seconds": {k: r["seconds"] for k, r in steps.items()},
                         "step_peak_rss_gb": {k: (r["result"] or {}).get("peak_rss_gb") for k, r in steps.items()},
                         "fit_q": read_json(root / "metrics" / "fit_q.json") if (root / "metrics" / "fit_q.json").is_file() else None}
    return out


def kl_from_pi0(runner: Runner, base: dict[str, Any], policies: dict[str, str], returns_path: Path) -> dict[str, float]:
    """Per-token ``KL(pi || pi_0)`` of each policy folder, on iteration 1's held-out states (as evaluate computes it).

    The exact KL over the vocabulary at each position of pi's own samples (at its sampling temperature), summed and
    divided by the tokens (``policies.kl_per_token``): never negative, and steady on a few states where the sampled
    ``sum(log pi - log pi_0)`` was not. One unit of work per policy (an extended run computes only the new ones).
    """
    params = Params.model_validate(base)
    cache: dict[str, Any] = {}

    def setup() -> tuple[Any, list[str], Any]:
        if not cache:
            from pipeline_steps.common.policies import load_policy
            from pipeline_steps.evaluate import heldout_states
            from pipeline_steps.world.simulator import World

            cache["vertical"] = World(params.world).vertical
            cache["states"], _ = heldout_states(returns_path, params.bench.kl_states)
            cache["pi0"] = load_policy("pi0", params, cache["vertical"])
        return cache["vertical"], cache["states"], cache["pi0"]

    def compute(folder: str) -> float:
        from pipeline_steps.common.policies import kl_per_token, load_policy
        from pipeline_steps.evaluate import sample_suggestions

        vertical, states, pi0 = setup()
        bs = params.collect.batch_size
        pol = load_policy(folder, params, vertical)
        _, ids = sample_suggestions(pol, states, bs, seed=params.world.seed)
        return kl_per_token(pol, pi0, states, ids, bs)

    return {name: runner.unit(f"kl_from_pi0/{name}", lambda f=folder: compute(f))["result"] for name, folder in policies.items()}


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def build_results(base: dict[str, Any], iters: list[dict[str, Any]], baselines: dict[str, dict[str, Any]],
                  kl: dict[str, float], meta: dict[str, Any]) -> dict[str, Any]:
    """The table rows, the per-step times and the issue's targets, as one JSON-able mapping."""
    params = Params.model_validate(base)
    alpha = params.evaluate.alpha
    ab0 = iters[0]["evaluate"]["ab"]
    rows = [{"policy": "pi_0", "kind": "start", **ab0["control"], "kl_from_pi0": 0.0, "seconds": None}]
    for it in iters:
        ab = it["evaluate"]["ab"]
        rows.append({
            "policy": f"pi_{it['k']}", "kind": "iteration", **ab["treatment"],
            "lift_vs_previous": {k: ab[k] for k in ("lift_abs", "lift_ci_low", "lift_ci_high", "p_value", "p_value_worse")},
            "previous_reproduced": ab["control"]["successes"] == (rows[-1]["successes"]) if it["k"] > 1 else True,
            "kl_from_pi0": kl.get(f"pi_{it['k']}"), "kl_vs_previous": it["evaluate"]["offline"]["kl_per_token"],
            "offline_improvement": it["evaluate"]["offline"]["improvement"],
            "q_auc": it["fit_q"].get("roc_auc_outcome"), "gates_passed": it["register"]["gates"]["passed"],
            "registered_version": it["register"]["policy"]["version"], "promoted": it["promoted"],
            "seconds": sum(it["step_seconds"].values()),
        })
    labels = {"best_of_n": f"best-of-{params.bench.best_of_n} (pi_0 + Q_0)", "myopic": "myopic PPO (immediate reward)",
              "expert": f"scripted {params.bench.expert} (ceiling)"}
    for name in ("best_of_n", "myopic", "expert"):
        if name in baselines:
            rows.append({"policy": labels[name], "kind": name,
                         **{k: v for k, v in baselines[name].items() if k not in ("policy", "step_seconds", "step_peak_rss_gb")},
                         "kl_from_pi0": kl.get(name)})
    conv0 = rows[0]["rate"]
    expert = baselines.get("expert", {}).get("rate")
    for r in rows:
        r["normalised"] = (r["rate"] - conv0) / (expert - conv0) if expert is not None and expert != conv0 else None
    last = rows[len(iters)]
    myopic = next((r for r in rows if r["kind"] == "myopic"), None)
    targets = {
        "ab_lift_not_significantly_negative": {
            "passed": all(r["lift_vs_previous"]["lift_ci_high"] >= 0 for r in rows if r["kind"] == "iteration"),
            "detail": {r["policy"]: round(r["lift_vs_previous"]["lift_ci_high"], 4) for r in rows if r["kind"] == "iteration"},
            "rule": "upper end of each iteration's 95% lift CI over the previous policy >= 0",
        },
        "pi_K_beats_pi_0": {"passed": last["ci_low"] > rows[0]["ci_high"], "margin": last["ci_low"] - rows[0]["ci_high"],
                            "rule": "non-overlapping 95% CIs: ci_low(pi_K) > ci_high(pi_0)"},
        "pi_K_beats_myopic": None if myopic is None else {
            "passed": last["ci_low"] > myopic["ci_high"], "margin": last["ci_low"] - myopic["ci_high"],
            "rule": "non-overlapping 95% CIs: ci_low(pi_K) > ci_high(myopic)"},
        "normalised_score": None if last["normalised"] is None else {
            "passed": last["normalised"] >= 0.5, "value": last["normalised"], "rule": ">= 0.5"},
    }
    # Per-step tables: one row per iteration, and the myopic baseline's own fit_q and ppo_tune.
    tables: dict[str, dict[str, Any]] = {}
    for key in ("step_seconds", "step_peak_rss_gb"):
        tables[key] = {f"pi_{it['k']}": it.get(key, {}) for it in iters}
        if baselines.get("myopic", {}).get(key):
            tables[key]["myopic"] = baselines["myopic"][key]
    return {"meta": meta, "alpha": alpha, "rows": rows, **tables, "targets": targets}


def _step_table(title: str, table: dict[str, dict[str, float | None]], fmt: str, total: bool = False) -> list[str]:
    """A markdown table with one row per run and one column per step (blank where a run lacks the step)."""
    table = {run: row for run, row in table.items() if row and any(v is not None for v in row.values())}
    if not table:
        return []
    names = list(dict.fromkeys(name for row in table.values() for name in row))
    lines = ["", title, "", "| run | " + " | ".join(names) + (" | total |" if total else " |"),
             "|---" * (len(names) + 1 + total) + "|"]
    for run, row in table.items():
        cells = ["" if row.get(n) is None else fmt.format(row[n]) for n in names]
        if total:
            cells.append(fmt.format(sum(v for v in row.values() if v is not None)))
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return lines


def _fmt_ci(r: dict[str, Any]) -> str:
    return f"{r['rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"


def render_markdown(res: dict[str, Any]) -> str:
    m = res["meta"]
    lines = [
        f"Command: `{m['command']}`  ",
        f"Machine: {m['machine']}; date {m['date']}; commit {m['commit']}; wall time {m['wall_seconds'] / 60:.1f} min; "
        f"{m['conversations']} conversations per policy on the same seeded personas.",
        "",
        "| policy | conversion [95% CI] | n | normalised | A/B lift vs previous [95% CI], p | KL from pi_0 (per token) | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lift = r.get("lift_vs_previous")
        lift_s = f"{lift['lift_abs']:+.3f} [{lift['lift_ci_low']:+.3f}, {lift['lift_ci_high']:+.3f}], p={lift['p_value']:.2g}" if lift else ""
        norm = "" if r.get("normalised") is None else f"{r['normalised']:+.2f}"
        kl = "" if r.get("kl_from_pi0") is None else f"{r['kl_from_pi0']:.4f}"
        secs = "" if not r.get("seconds") else f"{r['seconds'] / 60:.1f} min"
        lines.append(f"| {r['policy']} | {_fmt_ci(r)} | {r['trials']} | {norm} | {lift_s} | {kl} | {secs} |")
    lines += _step_table("Wall time per step (seconds):", res["step_seconds"], "{:.0f}", total=True)
    lines += _step_table("Peak resident memory per step (GB, the step's process):", res.get("step_peak_rss_gb", {}), "{:.1f}")
    lines += ["", "Targets (issue #8):", ""]
    for name, t in res["targets"].items():
        if t is not None:
            extra = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in t.items() if k not in ("passed", "rule"))
            lines.append(f"- {name}: {'PASSED' if t['passed'] else 'MISSED'} ({t['rule']}; {extra})")
    return "\n".join(lines) + "\n"


def plot_results(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    colors = {"start": "#777777", "iteration": "#2b7bba", "best_of_n": "#e39b2d", "myopic": "#c0392b", "expert": "#27ae60"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    x = range(len(rows))
    ax.bar(x, [r["rate"] for r in rows], color=[colors[r["kind"]] for r in rows],
           yerr=[[r["rate"] - r["ci_low"] for r in rows], [r["ci_high"] - r["rate"] for r in rows]], capsize=4)
    ax.set_xticks(list(x), [r["policy"].split(" (")[0] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("conversion (95% Wilson CI)")
    ax.set_title(f"Conversion on the same {rows[0]['trials']} seeded personas", fontsize=10)
    its = [r for r in rows if r["kind"] == "iteration"]
    ax2.errorbar([r["policy"] for r in its], [r["lift_vs_previous"]["lift_abs"] for r in its],
                 yerr=[[r["lift_vs_previous"]["lift_abs"] - r["lift_vs_previous"]["lift_ci_low"] for r in its],
                       [r["lift_vs_previous"]["lift_ci_high"] - r["lift_vs_previous"]["lift_abs"] for r in its]],
                 fmt="o", capsize=4, color=colors["iteration"])
    ax2.axhline(0, color="#999999", lw=0.8)
    ax2.set_ylabel("A/B lift over previous policy (95% CI)")
    ax2.set_title("Theorem 1: lift should not be negative", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_description() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}"


def _without_k(data: dict[str, Any]) -> dict[str, Any]:
    """The config minus ``bench.iterations``: a finished run can be extended (or reported) with another K."""
    d = copy.deepcopy(data)
    d.get("bench", {}).pop("iterations", None)
    return d


def bench_iterate(params_path: str | Path, profiles: Sequence[str | Path], out: str | Path, iterations: int | None = None,
                  fresh: bool = False, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the whole bench; returns the results mapping (also written under ``out``)."""
    sets = {"bench.iterations": iterations} if iterations else {}
    base = bench_config(params_path, profiles, sets)
    params = Params.model_validate(base)
    out = Path(out).resolve()
    if fresh and out.exists():
        shutil.rmtree(out)
    cfg = out / "params.yaml"
    if cfg.exists() and _without_k(read_yaml(cfg)) != _without_k(base):
        raise BenchError(f"{out}: holds a bench run with other params ({cfg}); use --fresh or another --out")
    write_yaml(cfg, base)
    t0 = time.perf_counter()
    runner = Runner(out, echo)
    # Iteration 1 first, then the baselines (they need only Q_0 and D_0), then iterations 2..K: an interrupted
    # run already holds every comparison with pi_1.
    iters = run_iterations(runner, base, 1, 1, [])
    baselines = run_baselines(runner, base, iters)
    iters += run_iterations(runner, base, 2, params.bench.iterations, iters)
    policies = {f"pi_{it['k']}": it["candidate"] for it in iters}
    if "myopic" in baselines:
        policies["myopic"] = baselines["myopic"]["policy"]
    kl = kl_from_pi0(runner, base, policies, Path(iters[0]["root"]) / RETURNS)
    spent = sum(json.loads(p.read_text())["seconds"] for p in runner.done_dir.glob("*.json"))
    meta = {
        "command": " ".join(["ippo bench iterate", *(f"--profile {p}" for p in profiles),
                             *([f"--iterations {iterations}"] if iterations else []), f"--out {os.path.relpath(out)}"]),
        "machine": machine_description(), "date": datetime.now().strftime("%Y-%m-%d"),
        "commit": git_commit(Path(__file__).resolve().parent, short=True, mark_dirty=True),
        "wall_seconds": spent, "this_invocation_seconds": time.perf_counter() - t0,
        "conversations": params.evaluate.ab_conversations, "iterations": params.bench.iterations,
        "base_model": params.base_model.name_or_path, "follow_gates": params.bench.follow_gates,
    }
    res = build_results(base, iters, baselines, kl, meta)
    write_json(out / "results.json", res)
    (out / "results.md").write_text(render_markdown(res))
    plot_results(res, out / "results.png")
    echo(render_markdown(res))
    return res
