"""Benchmark of the ppo_tune step (issue #5). Prints one table; writes JSON.

    .venv/bin/python benchmarks/bench_ppo.py                  # real SmolLM2-135M, ~6-9 minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_ppo.py --threads 1      # when other processes share the cores

In one run, with the same prompts, Q scorer and PPO settings:

1. **Overhead of our step**: PPO episodes/s and response tokens/s through ``ppo_tune.tune`` (the function
   ``python -m pipeline_steps.ppo_tune`` runs; its own pad token, the Q reward adapter, the MLflow/curve
   callback) against a plain TRL script (``PPOTrainer`` with the scorer as ``reward_model`` and the
   tokenizer as it comes). Both time the same span: value-model load + trainer construction + ``train()``.
   Runs alternate plain/ours/ours/plain so drift from other load cancels. Target: overhead <= 5%.
2. **fp32 vs bf16** (``ppo_tune.bf16``: autocast on CPU, weights stay fp32), through our step.
3. **Model FLOP utilisation**: analytic FLOPs of a PPO update (generation, reference/value/reward
   forwards, policy and value forward+backward per PPO epoch) over its time, against a dense matmul peak
   measured in the same process with the same thread count (fp32 and bf16).

The Q scorer is SmolLM2 as a sequence classifier with a seeded random head (fit_q's output has the same
shape; its values do not change the cost). Prompts are states rendered by ``contract.render_state``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

REPO = Path(__file__).resolve().parents[1]

CUSTOMER_LINES = [
    "Hi, we want to redo our kitchen, it's about 12 square meters.",
    "What would a new bathroom cost roughly?",
    "Can you also do the flooring in the living room?",
    "We're not in a hurry, just collecting quotes for now.",
    "Do you work on weekends? Both of us work during the week.",
    "The attic needs insulation before winter, how long does that take?",
    "My neighbour used you last year and was happy.",
    "Is it possible to keep the old tiles and just paint the walls?",
]


# ------------------------------------------------------------------------------------------------
# Workspace: params, Q scorer, returns rows
# ------------------------------------------------------------------------------------------------


def build_workspace(root: Path, base: Path, args: argparse.Namespace) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    import yaml
    from transformers import AutoModelForSequenceClassification

    from pipeline_steps.common.base_model import load_tokenizer
    from pipeline_steps.common.config import load_params
    from pipeline_steps.common.contract import HistoryTurn, render_state, system_prompt_for
    from pipeline_steps.returns import RETURNS_SCHEMA, returns_metadata
    from pipeline_steps.world.simulator import load_vertical

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["base_model"].update(name_or_path=str(base), dtype="float32", num_threads=0)
    data["ppo_tune"].update(
        algorithm="ppo", total_episodes=args.episodes, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=args.ppo_epochs,
        local_rollout_forward_batch_size=args.batch, response_length=args.response_length, bf16=False,
        gradient_checkpointing=False, eval_states=2, eval_samples_per_state=1, eval_batch_size=args.batch,
        bootstrap_resamples=100, sample_rows=2,
    )
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(data))
    params = load_params(params_file)

    tok = load_tokenizer(base)
    scorer_dir = root / "q_scorer"
    torch.manual_seed(0)
    q = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1, dtype=torch.float32)
    q.config.pad_token_id = tok.pad_token_id
    q.save_pretrained(scorer_dir)
    tok.save_pretrained(scorer_dir)

    system_prompt = system_prompt_for(load_vertical(params.world.vertical))
    rows = []
    for i in range(4 * len(CUSTOMER_LINES)):
        first = CUSTOMER_LINES[i % len(CUSTOMER_LINES)]
        hist = [HistoryTurn(f"{first} (ref {i})")]
        if i % 2:
            hist = [HistoryTurn(f"{first} (ref {i})", "Happy to help! Could you tell me a bit more?",
                                "Happy to help! Could you tell me a bit more?", "verbatim"),
                    HistoryTurn(CUSTOMER_LINES[(i + 3) % len(CUSTOMER_LINES)])]
        rows.append(dict(state_text=render_state(hist, tok, system_prompt, params.prompt.max_prompt_tokens),
                         action_text="Happy to help!", G=0.5, outcome=1, conversation_id=f"b{i:03d}", turn_index=len(hist),
                         split="validation" if i % 8 == 0 else "train", relation="verbatim",
                         prompt_version=params.prompt.version))
    returns = root / "returns.parquet"
    meta = returns_metadata(params, tok, system_prompt)
    pq.write_table(pa.Table.from_pylist(rows, schema=RETURNS_SCHEMA).replace_schema_metadata(meta), returns)
    return dict(params=params_file, scorer=scorer_dir, returns=returns, base=base)


# ------------------------------------------------------------------------------------------------
# The two contenders
# ------------------------------------------------------------------------------------------------


def run_ours(ws: dict, root: Path, bf16: bool) -> dict:
    """The step function itself (inputs checks, training, merge/save, held-out check): training span timed."""
    from pipeline_steps import ppo_tune
    from pipeline_steps.common.config import load_params

    params = load_params(ws["params"], {"ppo_tune.bf16": bf16})
    t0 = time.perf_counter()
    metrics, rows = ppo_tune.tune(params, ws["returns"], ws["scorer"], root / f"out_{time.time_ns()}", progress=False)
    wall = time.perf_counter() - t0
    return dict(train_seconds=metrics["training"]["train_seconds"], cpu_seconds=metrics["training"]["train_cpu_seconds"],
                episodes=metrics["training"]["episodes"], step_wall_seconds=wall, updates=len(rows))


def run_plain(ws: dict, root: Path, bf16: bool) -> dict:
    """What a user would write with TRL alone: same prompts, scorer, settings and LoRA."""
    import polars as pl
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from pipeline_steps.common.config import load_params

    p = load_params(ws["params"]).ppo_tune
    df = pl.read_parquet(ws["returns"]).sort(["conversation_id", "turn_index"])
    prompts = list(dict.fromkeys(df.filter(pl.col("split") == "train")["state_text"].to_list()))
    tok = AutoTokenizer.from_pretrained(str(ws["base"]), padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(str(ws["base"]), dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(str(ws["scorer"]), num_labels=1, dtype=torch.float32)
    t0, c0 = time.perf_counter(), time.process_time()
    value = AutoModelForSequenceClassification.from_pretrained(str(ws["scorer"]), num_labels=1, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": [tok(s, add_special_tokens=False)["input_ids"] for s in prompts]})
    args = PPOConfig(
        output_dir=str(root / f"plain_{time.time_ns()}"), learning_rate=p.learning_rate,
        per_device_train_batch_size=p.per_device_train_batch_size, gradient_accumulation_steps=p.gradient_accumulation_steps,
        total_episodes=p.total_episodes, num_mini_batches=p.num_mini_batches, num_ppo_epochs=p.num_ppo_epochs,
        local_rollout_forward_batch_size=p.local_rollout_forward_batch_size, response_length=p.response_length,
        stop_token="eos", missing_eos_penalty=p.missing_eos_penalty, kl_coef=p.kl_coef, temperature=p.temperature,
        cliprange=p.cliprange, vf_coef=p.vf_coef, cliprange_value=p.cliprange_value, lam=p.lam, seed=p.seed,
        bf16=bf16, use_cpu=bf16 and not torch.cuda.is_available(), gradient_checkpointing=False, report_to="none", num_sample_generations=0, save_strategy="no",
        disable_tqdm=True,
    )
    transformers.set_seed(p.seed)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=ds, value_model=value, eval_dataset=ds,
                         peft_config=LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
                                                target_modules="all-linear", task_type="CAUSAL_LM"))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return dict(train_seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0, episodes=trainer.state.episode,
                updates=trainer.state.global_step)


# ------------------------------------------------------------------------------------------------
# FLOPs and the matmul peak
# ------------------------------------------------------------------------------------------------


def matmul_peak(dtype_name: str, n: int = 2048, seconds: float = 3.0) -> float:
    """Best dense matmul throughput (FLOP/s) over repeated n x n products with the current threads."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def ppo_update_flops(base: Path, prompt_tokens: float, response: int, batch: int, ppo_epochs: int) -> dict:
    """Analytic FLOPs of one PPO update (2 FLOPs per multiply-add; causal attention included).

    Generation: prefill of the prompt through the body (logits only at the last position) and one body +
    LM-head pass per new token. Rollout: reference policy forward with logits at every position (TRL's
    ``forward``), value and reward backbones. Training, per PPO epoch: policy forward (all logits) and
    backward through activations only (LoRA: frozen weights need no weight gradients; adapter FLOPs are
    negligible), value model forward and full backward (2x forward).
    """
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(str(base))
    d, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    kv = c.num_key_value_heads * (d // c.num_attention_heads)
    body = layers * (d * d * 2 + d * kv * 2 + 3 * d * c.intermediate_size)  # q,o + k,v + gate,up,down
    head = d * vocab
    n = prompt_tokens + response

    def attn(tokens: float) -> float:  # QK^T and AV over a causal prefix, summed over positions
        return 2 * 2 * layers * d * tokens * tokens / 2

    gen = 2 * body * n + 2 * head * response + attn(n)
    body_fwd = 2 * body * n + attn(n)
    policy_fwd = body_fwd + 2 * head * n
    rollout = policy_fwd + 2 * body_fwd  # reference + value + reward
    train = ppo_epochs * (2 * policy_fwd + 3 * body_fwd)
    per_episode = gen + rollout + train
    return dict(per_update=batch * per_episode, body_params=body, head_params=head,
                share={"generation": gen / per_episode, "rollout": rollout / per_episode, "train": train / per_episode})


# ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=str(REPO / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--episodes", type=int, default=16, help="total_episodes per run")
    ap.add_argument("--batch", type=int, default=8, help="episodes per PPO update")
    ap.add_argument("--response-length", type=int, default=24)
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="plain/ours/ours/plain blocks in fp32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = 1 if the load average is >= 1.5, else torch's default)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_ppo.json"))
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    load_before = os.getloadavg()[0]
    threads = args.threads or (1 if load_before >= 1.5 else torch.get_num_threads())
    torch.set_num_threads(threads)
    print(f"load average {load_before:.2f}; torch threads {threads}")

    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as tmp:
        root = Path(tmp)
        ws = build_workspace(root, Path(args.base), args)
        peak = {"float32": matmul_peak("float32"), "bfloat16": matmul_peak("bfloat16")}
        runs: dict[str, list[dict]] = {"plain_fp32": [], "ours_fp32": [], "ours_bf16": [], "plain_bf16": []}
        order = ["plain_fp32", "ours_fp32", "ours_fp32", "plain_fp32"] * args.repeats + ["ours_bf16", "plain_bf16"]
        for name in order:
            who, prec = name.split("_")
            res = (run_ours if who == "ours" else run_plain)(ws, root, prec == "bf16")
            runs[name].append(res)
            print(f"{name}: {res['episodes']} episodes in {res['train_seconds']:.1f} s"
                  + (f" (whole step {res['step_wall_seconds']:.1f} s)" if "step_wall_seconds" in res else ""))

        from pipeline_steps.common.base_model import load_tokenizer
        import polars as pl

        tok = load_tokenizer(args.base)
        states = pl.read_parquet(ws["returns"]).filter(pl.col("split") == "train")["state_text"].to_list()
        prompt_tokens = statistics.mean(len(tok(s, add_special_tokens=False)["input_ids"]) for s in states)
        flops = ppo_update_flops(Path(args.base), prompt_tokens, args.response_length, args.batch, args.ppo_epochs)

    def summary(name: str) -> dict:
        rs = runs[name]
        secs = statistics.median(r["train_seconds"] for r in rs)
        eps = rs[0]["episodes"]
        updates = math.ceil(eps / args.batch)
        out = dict(runs=len(rs), train_seconds=secs, cpu_seconds=statistics.median(r["cpu_seconds"] for r in rs),
                   episodes=eps, episodes_per_s=eps / secs,
                   response_tokens_per_s=eps * args.response_length / secs,
                   achieved_flops=flops["per_update"] * updates / secs)
        prec = "bfloat16" if name.endswith("bf16") else "float32"
        out["mfu"] = out["achieved_flops"] / peak[prec]
        if "step_wall_seconds" in rs[0]:
            out["step_wall_seconds"] = statistics.median(r["step_wall_seconds"] for r in rs)
        return out

    res = {k: summary(k) for k in runs if runs[k]}
    overhead = res["ours_fp32"]["train_seconds"] / res["plain_fp32"]["train_seconds"] - 1
    overhead_bf16 = res["ours_bf16"]["train_seconds"] / res["plain_bf16"]["train_seconds"] - 1
    # CPU seconds of the benchmark process over the same span: the fairer comparison when other processes
    # compete for the cores (wall time then mostly measures the neighbours).
    overhead_cpu = res["ours_fp32"]["cpu_seconds"] / res["plain_fp32"]["cpu_seconds"] - 1
    overhead_cpu_bf16 = res["ours_bf16"]["cpu_seconds"] / res["plain_bf16"]["cpu_seconds"] - 1
    result = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": threads, "load_average_start": load_before,
                    "load_average_end": os.getloadavg()[0]},
        "settings": {"model": Path(args.base).name, "episodes": args.episodes, "batch": args.batch,
                     "response_length": args.response_length, "ppo_epochs": args.ppo_epochs,
                     "mean_prompt_tokens": prompt_tokens},
        "matmul_peak_gflops": {k: v / 1e9 for k, v in peak.items()},
        "flops_per_update_gflop": flops["per_update"] / 1e9, "flops_share": flops["share"],
        "runs": res, "overhead_fp32": overhead, "overhead_bf16": overhead_bf16,
        "overhead_cpu_fp32": overhead_cpu, "overhead_cpu_bf16": overhead_cpu_bf16,
        "bf16_speedup": res["ours_fp32"]["train_seconds"] / res["ours_bf16"]["train_seconds"],
        "raw": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    table = Table(title=f"ppo_tune on {Path(args.base).name}: {args.episodes} episodes, batch {args.batch}, "
                        f"{args.response_length}-token responses, {args.ppo_epochs} PPO epochs, {threads} thread(s)")
    for col in ("run", "train s", "CPU s", "episodes/s", "resp. tokens/s", "GFLOP/s", "MFU"):
        table.add_column(col, justify="right")
    for name, r in res.items():
        table.add_row(name + (f" (x{r['runs']})" if r["runs"] > 1 else ""), f"{r['train_seconds']:.1f}", f"{r['cpu_seconds']:.1f}",
                      f"{r['episodes_per_s']:.3f}", f"{r['response_tokens_per_s']:.2f}",
                      f"{r['achieved_flops'] / 1e9:.1f}", f"{r['mfu']:.1%}")
    Console().print(table)
    print(f"matmul peak: fp32 {peak['float32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bfloat16'] / 1e9:.0f} GFLOP/s "
          f"(2048x2048, {threads} thread(s)); {flops['per_update'] / 1e9:.0f} GFLOP per update "
          f"(generation {flops['share']['generation']:.0%}, rollout forwards {flops['share']['rollout']:.0%}, "
          f"training {flops['share']['train']:.0%})")
    print(f"our step vs plain TRL, wall: fp32 {overhead:+.1%}, bf16 {overhead_bf16:+.1%}; CPU time: fp32 {overhead_cpu:+.1%}, "
          f"bf16 {overhead_cpu_bf16:+.1%} (target <= +5%); "
          f"bf16 speed-up through our step x{result['bf16_speedup']:.2f}; whole step (checks, training, merge+save, "
          f"held-out check) {res['ours_fp32'].get('step_wall_seconds', float('nan')):.1f} s")
    print(f"load average at end {result['machine']['load_average_end']:.2f} -> {args.out}")


if __name__ == "__main__":
    main()
