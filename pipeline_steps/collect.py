"""collect: deploy a policy in the world and log its conversations (Algorithm 1, step 4).

    python -m pipeline_steps.collect --params params.yaml --out data/raw --summary metrics/collect.json
    python -m pipeline_steps.collect --policy script:expert --conversations 200
    python -m pipeline_steps.collect --policy models:/ippo-policy@champion

Logs follow the contract (:mod:`pipeline_steps.common.contract`) as Parquet partitioned by the date
of each conversation's first message (``<out>/date=YYYY-MM-DD/part-<variant>.parquet``), as a
production serving system would land them in S3. Same params and seed, same bytes.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_steps.common.config import ConfigError, Params, load_params
from pipeline_steps.common.contract import LOG_SCHEMA, validate_conversation
from pipeline_steps.common.stats import proportion_ci
from pipeline_steps.common.tracking import flat_metrics, step_run, write_json

STEP = "collect"


def summarise(convs: Sequence[Any], wall_seconds: float, gen_stats: Any | None = None) -> dict[str, Any]:
    """Conversion with a 95% CI, turns, the business's accept/edit/reject mix and throughput."""
    n = len(convs)
    conversions = sum(c.converted for c in convs)
    turns = sum(len(c.records) for c in convs)
    actions = Counter(r["relation"] for c in convs for r in c.records if r["relation"] is not None)
    n_actions = sum(actions.values()) or 1
    ended = Counter(
        "converted" if c.converted else ("customer_left" if c.records[-1]["customer_message"] is None else "business_stopped")
        for c in convs
    )
    summary: dict[str, Any] = {
        "conversations": n,
        "conversion": proportion_ci(conversions, n).as_dict(),
        "turns_total": turns,
        "turns_per_conversation": turns / n if n else 0.0,
        "relation_share": {k: actions.get(k, 0) / n_actions for k in ("verbatim", "edited", "rejected", "abstained")},
        "ended": dict(sorted(ended.items())),
        "wall_seconds": wall_seconds,
        "turns_per_second": turns / wall_seconds if wall_seconds else 0.0,
    }
    if gen_stats is not None and gen_stats.calls:
        summary["generation"] = {
            "new_tokens": gen_stats.new_tokens,
            "generate_seconds": gen_stats.generate_seconds,
            "tokens_per_second": gen_stats.tokens_per_second,
            "end_to_end_tokens_per_second": gen_stats.new_tokens / wall_seconds if wall_seconds else 0.0,
        }
    return summary


def write_logs(turns: list[Any], out_dir: Path, variant: str) -> list[Path]:
    """Write the records date-partitioned, atomically: a retry replaces the whole folder at once."""
    table = pa.Table.from_pylist([t.to_record() for t in turns], schema=LOG_SCHEMA)
    first_ts: dict[str, datetime] = {}
    for t in turns:
        first_ts.setdefault(t.conversation_id, t.customer_ts)
    dates = [first_ts[cid].strftime("%Y-%m-%d") for cid in table.column("conversation_id").to_pylist()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    written = []
    try:
        for day in sorted(set(dates)):
            mask = pa.array([d == day for d in dates])
            part = tmp / f"date={day}"
            part.mkdir()
            path = part / f"part-{variant}.parquet"
            pq.write_table(table.filter(mask), path, compression="zstd", write_statistics=False)
            written.append(out_dir / f"date={day}" / path.name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return written


def collect(params: Params, policy_spec: str, out_dir: Path, progress: bool = True) -> tuple[list[Any], dict[str, Any]]:
    """Run ``policy_spec`` in the world for ``collect.conversations`` conversations; write the logs."""
    from tqdm.auto import tqdm

    from pipeline_steps.common.policies import load_policy
    from pipeline_steps.world.simulator import World, conversations_to_turns

    c = params.collect
    world = World(params.world)
    seed = params.world.seed + c.seed
    policy = load_policy(policy_spec, params, world.vertical, seed=seed)
    start_time = datetime.fromisoformat(c.start_time.replace("Z", "+00:00")).astimezone(timezone.utc)
    t0 = time.perf_counter()
    with tqdm(total=c.conversations, desc=f"collect {policy.policy_id}", unit="conv", disable=not progress) as bar:
        convs = world.run(
            policy, c.conversations, seed=seed, batch_size=c.batch_size, variant=c.variant,
            start_time=start_time, progress=bar.update,
        )
    wall = time.perf_counter() - t0
    turns = conversations_to_turns(convs)
    for conv_id in dict.fromkeys(t.conversation_id for t in turns):
        validate_conversation([t for t in turns if t.conversation_id == conv_id])
    write_logs(turns, out_dir, c.variant)
    summary = summarise(convs, wall, getattr(policy, "stats", None))
    summary["policy"] = {"spec": policy_spec, "policy_id": policy.policy_id, "policy_version": policy.policy_version}
    return convs, summary


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    conv = summary["conversion"]
    table = Table(title=f"collect: {summary['policy']['policy_id']} ({summary['conversations']} conversations)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("conversion (95% CI)", f"{conv['rate']:.3f} [{conv['ci_low']:.3f}, {conv['ci_high']:.3f}]")
    table.add_row("turns / conversation", f"{summary['turns_per_conversation']:.2f}")
    for k, v in summary["relation_share"].items():
        table.add_row(f"suggestions {k}", f"{v:.1%}")
    for k, v in summary["ended"].items():
        table.add_row(f"ended: {k}", str(v))
    if "generation" in summary:
        table.add_row("generation tokens/s", f"{summary['generation']['tokens_per_second']:.1f}")
    table.add_row("wall time (s)", f"{summary['wall_seconds']:.1f}")
    Console().print(table)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline_steps.collect", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="params.yaml", help="params.yaml to read (section 'collect').")
    p.add_argument("--policy", help="Override collect.policy (pi0 | explore | script:<name> | folder | models:/...).")
    p.add_argument("--conversations", type=int, help="Override collect.conversations.")
    p.add_argument("--seed", type=int, help="Override collect.seed (offset to world.seed).")
    p.add_argument("--variant", help="Override collect.variant (A/B label).")
    p.add_argument("--start-time", help="Override collect.start_time (ISO 8601), e.g. the Airflow data interval start.")
    p.add_argument("--base-model", help="Override base_model.name_or_path.")
    p.add_argument("--out", default="data/raw", help="Folder for the conversation logs.")
    p.add_argument("--summary", default="metrics/collect.json", help="Summary metrics JSON (DVC metrics).")
    p.add_argument("--no-mlflow", action="store_true", help="Do not log to MLflow.")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    overrides = {
        f"collect.{k}": v
        for k, v in {
            "policy": args.policy, "conversations": args.conversations, "seed": args.seed,
            "variant": args.variant, "start_time": args.start_time,
        }.items()
        if v is not None
    }
    if args.base_model:
        overrides["base_model.name_or_path"] = args.base_model
    try:
        params = load_params(args.params, overrides)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from exc
    with step_run(STEP, params.collect.model_dump(), enabled=not args.no_mlflow) as run:
        _, summary = collect(params, params.collect.policy, Path(args.out), progress=not args.no_progress)
        if run is not None:
            import mlflow

            mlflow.log_metrics(flat_metrics({k: v for k, v in summary.items() if k != "policy"}))
            mlflow.set_tag("ippo.policy", summary["policy"]["policy_id"])
    write_json(args.summary, summary)
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
