"""Benchmark the data steps (ingest, validate, returns) on synthetic contract logs, side by side in one run.

    python benchmarks/bench_data_steps.py                 # 100k and 1M turns
    python benchmarks/bench_data_steps.py --sizes 20000   # a quick look
    python benchmarks/bench_data_steps.py --full-render   # also render every state at the largest size

Prints, per size: wall time and peak memory (max RSS) of the real ``ingest`` and ``validate`` steps (each a
fresh ``python -m pipeline_steps.<step>`` process, so imports count), and of the vectorised part of
``returns`` (G, final outcome, action rows, split); then the ratios between sizes (target: <= 11x time
for 10x data), the vectorised G against a naive pandas per-conversation loop (target: >= 10x faster), and
the state rendering with the real SmolLM2 tokenizer measured separately: the batched path used by the
step against one ``render_state`` call per state, on a sample of states, extrapolated to all states, plus
the complete ``returns`` step (rendering included) at the smallest size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline_steps.common.contract import LOG_SCHEMA, history_from_records, render_state  # noqa: E402
from pipeline_steps.returns import action_rows, assign_splits, render_states  # noqa: E402

CUSTOMER = np.array([
    "Hi, I want to redo my kitchen.", "How much would a small bathroom cost?", "We have about 12 square meters.",
    "Modern, white cabinets, and soon please.", "Do you do basements too?", "What does a visit cost?",
    "Can you send me a quote by email at anna@example.com?", "Call me on 555-123-4567.", "Tuesday would work.",
    "Not sure yet, just looking.",
], dtype=object)
SUGGEST = np.array([
    "Happy to help! How big is the room?", "What style do you have in mind?", "When would you like the work done?",
    "Shall we book a free visit this week?", "Could you tell me more about the layout?", "Our visits are free of charge.",
], dtype=object)

# Runs a step module in this process and reports its peak RSS (KiB) on the last stderr line.
WRAPPER = (
    "import resource, runpy, sys; mod = sys.argv[1]; sys.argv = [mod] + sys.argv[2:]\n"
    "try:\n    runpy.run_module(mod, run_name='__main__')\n"
    "finally:\n    print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
)


def synth_turns(n_turns: int, seed: int = 0) -> pa.Table:
    """About ``n_turns`` contract records: conversations of 1-12 actions, ~35% converting (vectorised)."""
    rng = np.random.default_rng(seed)
    n_conv = max(1, int(n_turns / 7.0))
    actions = rng.integers(1, 13, n_conv)
    ending = rng.choice(4, n_conv, p=[0.35, 0.45, 0.1, 0.1])  # convert, leave, business stops, open
    length = actions + (ending <= 1)
    conv = np.repeat(np.arange(n_conv), length)
    first = np.repeat(np.cumsum(length) - length, length)
    turn = np.arange(len(conv)) - first + 1
    is_last = turn == np.repeat(length, length)
    terminal = is_last & np.repeat(ending <= 1, length)
    outcome = (terminal & np.repeat(ending == 0, length)).astype(np.int8)
    stop = is_last & np.repeat(ending == 2, length)
    n = len(conv)
    cust = CUSTOMER[rng.integers(0, len(CUSTOMER), n)]
    sug = SUGGEST[rng.integers(0, len(SUGGEST), n)]
    rel = rng.choice(np.array(["verbatim", "edited", "rejected", "abstained"], dtype=object), n, p=[0.55, 0.2, 0.15, 0.1])
    msg = np.where(rel == "verbatim", sug, np.where(rel == "edited", sug + " Thanks!", "Let me check with the team."))
    sug = np.where(rel == "abstained", None, sug)
    msg = np.where(stop, None, msg)
    rel = np.where(stop & (rel == "abstained"), "abstained", np.where(stop & (rel != "abstained"), "rejected", rel))
    cust = np.where(terminal & (outcome == 0), None, np.where(terminal, "Great, please book the visit.", cust))
    sug, msg, rel = (np.where(terminal, None, a) for a in (sug, msg, rel))
    start = np.datetime64("2026-01-05T00:00:00", "us") + rng.integers(0, 7 * 24 * 3600, n_conv).astype("timedelta64[s]")
    ts = np.repeat(start, length) + ((turn - 1) * 90).astype("timedelta64[s]")
    bts = np.where(msg == None, np.datetime64("NaT"), ts + np.timedelta64(30, "s"))  # noqa: E711
    ids = np.char.add("c-", np.char.zfill(conv.astype(str), 7)).astype(object)
    cols = dict(
        conversation_id=ids, turn_index=turn.astype(np.int32), customer_message=cust, outcome=outcome, suggestion=sug,
        business_message=msg, relation=rel, policy_id=np.full(n, "pi0", object), policy_version=np.full(n, "0", object),
        variant=np.full(n, "control", object), customer_ts=ts, business_ts=bts, behaviour=np.full(n, None, object),
    )
    arrays = []
    for f in LOG_SCHEMA:
        v = cols[f.name]
        if pa.types.is_timestamp(f.type):
            arrays.append(pa.array(v.astype("datetime64[us]"), pa.timestamp("us")).cast(f.type))
        else:
            arrays.append(pa.array(v, f.type, from_pandas=True))
    return pa.Table.from_arrays(arrays, schema=LOG_SCHEMA)


def write_raw(table: pa.Table, raw: Path) -> None:
    """Date-partitioned Parquet, as the collect step (or the serving system) lands it."""
    first = pl.from_arrow(table).with_columns(day=pl.col("customer_ts").min().over("conversation_id").dt.strftime("%Y-%m-%d"))
    for (day,), part in first.partition_by("day", as_dict=True).items():
        path = raw / f"date={day}" / "part-control.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(part.drop("day").to_arrow().cast(LOG_SCHEMA), path, compression="zstd")


def run_step(module: str, *args: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of ``python -m <module> args`` in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, module, *args], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    rss = [line for line in proc.stderr.splitlines() if line.startswith("MAXRSS")][-1]
    return wall, int(rss.split()[1]) / 1024


def best_of(k: int, fn):  # in-process timings: the best of k runs, less noise from a shared machine
    times, out = [], None
    for _ in range(k):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def vectorised_returns(turns: pl.DataFrame, gamma: float) -> pl.DataFrame:
    rows = action_rows(turns, gamma, "keep")
    return rows.with_columns(assign_splits(rows.get_column("conversation_id"), 0.1, "v1"))


def naive_returns(turns: pd.DataFrame, gamma: float) -> np.ndarray:
    """The obvious pandas version: per conversation, per turn, sum the discounted later outcomes."""
    G = np.zeros(len(turns))
    for _, g in turns.groupby("conversation_id", sort=False):
        o = g["outcome"].to_numpy()
        for i, idx in enumerate(g.index):
            G[idx] = sum(gamma**j * o[i + j + 1] for j in range(len(o) - i - 1))
    return G


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--render-sample", type=int, default=5_000, help="States rendered per path for the rendering rate.")
    ap.add_argument("--full-render", action="store_true", help="Run the complete returns step at the largest size too.")
    ap.add_argument("--base-model", default="tiny-random", help="Whose tokenizer renders states (tiny-random = SmolLM2's).")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    gamma = 0.9
    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_data_steps_") as tmp_name:
        tmp = Path(tmp_name)
        params = tmp / "params.yaml"
        import yaml

        data = yaml.safe_load((REPO / "params.yaml").read_text())
        data["base_model"]["name_or_path"] = args.base_model
        data["base_model"]["cache_dir"] = str(REPO / "models")
        params.write_text(yaml.safe_dump(data))
        for n in args.sizes:
            d = tmp / str(n)
            t0 = time.perf_counter()
            table = synth_turns(n)
            write_raw(table, d / "raw")
            print(f"[{n:>9,}] generated {table.num_rows:,} turns in {time.perf_counter() - t0:.1f}s", flush=True)
            r: dict[str, float] = {"turns": table.num_rows}
            r["ingest_s"], r["ingest_mb"] = run_step(
                "pipeline_steps.ingest", "--params", str(params), "--input", str(d / "raw"), "--out", str(d / "ingest.parquet"),
                "--rejects", str(d / "rejects.jsonl"), "--summary", str(d / "ingest.json"), "--no-mlflow", "--no-progress")
            print(f"[{n:>9,}] ingest   {r['ingest_s']:7.2f}s {r['ingest_mb']:7.0f} MiB", flush=True)
            r["validate_s"], r["validate_mb"] = run_step(
                "pipeline_steps.validate", "--params", str(params), "--input", str(d / "ingest.parquet"),
                "--out", str(d / "valid.parquet"), "--quarantine", str(d / "q.parquet"), "--docs", str(d / "docs"),
                "--summary", str(d / "validate.json"), "--no-mlflow", "--no-progress")
            print(f"[{n:>9,}] validate {r['validate_s']:7.2f}s {r['validate_mb']:7.0f} MiB", flush=True)
            turns = pl.read_parquet(d / "valid.parquet")
            r["returns_g_s"], rows = best_of(3, lambda: vectorised_returns(turns, gamma))
            r["action_rows"] = rows.height
            print(f"[{n:>9,}] returns (G, rows, split; vectorised) {r['returns_g_s']:.3f}s for {rows.height:,} rows", flush=True)
            if n == max(args.sizes):
                pdf = turns.select("conversation_id", "turn_index", "outcome").to_pandas()
                t0 = time.perf_counter()
                G_naive = naive_returns(pdf, gamma)
                r["naive_g_s"] = time.perf_counter() - t0
                r["vector_g_s"], g_df = best_of(3, lambda: action_rows(turns, gamma, "keep"))
                assert np.allclose(G_naive[g_df.get_column("_record").to_numpy()], g_df.get_column("G").to_numpy())
                print(f"[{n:>9,}] G naive pandas loop {r['naive_g_s']:.2f}s vs vectorised {r['vector_g_s']:.3f}s", flush=True)
                render_bench(turns, g_df, args, params, r)
            if n == min(args.sizes) or (args.full_render and n == max(args.sizes)):
                r["returns_s"], r["returns_mb"] = run_step(
                    "pipeline_steps.returns", "--params", str(params), "--input", str(d / "valid.parquet"),
                    "--out", str(d / "returns.parquet"), "--summary", str(d / "returns.json"), "--no-mlflow", "--no-progress")
                print(f"[{n:>9,}] returns step (incl. rendering) {r['returns_s']:.1f}s {r['returns_mb']:.0f} MiB", flush=True)
            results[n] = r
    report(results, args)


def render_bench(turns: pl.DataFrame, rows: pl.DataFrame, args: argparse.Namespace, params: Path, r: dict[str, float]) -> None:
    """States/s of the step's batched rendering vs one render_state call per state, on a sample."""
    from pipeline_steps.common.base_model import load_tokenizer, resolve_base_model
    from pipeline_steps.common.config import load_params
    from pipeline_steps.common.contract import system_prompt_for
    from pipeline_steps.world.simulator import load_vertical

    p = load_params(params)
    tok = load_tokenizer(resolve_base_model(p.base_model.name_or_path, p.base_model.cache_dir))
    sp = system_prompt_for(load_vertical(p.world.vertical))
    # the first conversations, so histories are complete slices of the log
    idx = rows.get_column("_record").to_list()[: args.render_sample]
    sub = turns.head(idx[-1] + 1)
    t0 = time.perf_counter()
    batched = render_states(sub, idx, tok, sp, p.prompt.max_prompt_tokens)
    r["render_batched_per_s"] = len(idx) / (time.perf_counter() - t0)
    records = sub.to_dicts()
    starts, s = [], 0
    for i, rec in enumerate(records):
        if i and rec["conversation_id"] != records[i - 1]["conversation_id"]:
            s = i
        starts.append(s)
    t0 = time.perf_counter()
    single = [render_state(history_from_records(records[starts[i] : i + 1]), tok, sp, p.prompt.max_prompt_tokens) for i in idx]
    r["render_single_per_s"] = len(idx) / (time.perf_counter() - t0)
    assert batched == single
    r["render_all_est_s"] = rows.height / r["render_batched_per_s"]


def report(results: dict[int, dict[str, float]], args: argparse.Namespace) -> None:
    sizes = sorted(results)
    print("\n== data steps, side by side (wall s / peak RSS MiB; each step a fresh process incl. imports) ==")
    print(f"{'turns':>10} | {'ingest':>17} | {'validate':>17} | {'returns: G+rows+split':>22} | {'returns step (render)':>22}")
    for n in sizes:
        r = results[n]
        ret = f"{r['returns_s']:8.1f}s {r['returns_mb']:6.0f}MiB" if "returns_s" in r else "-"
        print(f"{int(r['turns']):>10,} | {r['ingest_s']:7.2f}s {r['ingest_mb']:6.0f}MiB | {r['validate_s']:7.2f}s "
              f"{r['validate_mb']:6.0f}MiB | {r['returns_g_s']:20.3f}s | {ret:>22}")
    if len(sizes) >= 2:
        a, b = results[sizes[0]], results[sizes[-1]]
        data_x = b["turns"] / a["turns"]
        print(f"\n== scaling {int(a['turns']):,} -> {int(b['turns']):,} turns ({data_x:.1f}x data; target <= {data_x * 1.1:.1f}x time) ==")
        for key, name in (("ingest_s", "ingest"), ("validate_s", "validate"), ("returns_g_s", "returns G+rows+split")):
            print(f"  {name:<22} {b[key] / a[key]:6.2f}x")
    big = results[sizes[-1]]
    if "naive_g_s" in big:
        print(f"\n== G at {int(big['turns']):,} turns: naive pandas per-conversation loop {big['naive_g_s']:.2f}s, "
              f"vectorised (polars column expressions) {big['vector_g_s']:.3f}s -> {big['naive_g_s'] / big['vector_g_s']:.0f}x faster "
              f"(target >= 10x); results equal ==")
    if "render_batched_per_s" in big:
        print(f"\n== state rendering, real SmolLM2 tokenizer ({args.base_model}), sample of {args.render_sample:,} states ==")
        print(f"  batched (step's path)      {big['render_batched_per_s']:8.0f} states/s")
        print(f"  render_state per state     {big['render_single_per_s']:8.0f} states/s "
              f"({big['render_batched_per_s'] / big['render_single_per_s']:.1f}x slower; identical text)")
        print(f"  all {int(big['action_rows']):,} states at {int(big['turns']):,} turns: ~{big['render_all_est_s']:.0f}s (extrapolated) "
              f"vs {big['vector_g_s']:.3f}s for G: rendering dominates the returns step")
    print(json.dumps({str(k): v for k, v in results.items()}, indent=None))


if __name__ == "__main__":
    main()
