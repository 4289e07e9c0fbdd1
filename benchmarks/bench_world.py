"""Benchmark of the world and of pi_0 (issue: foundation). Prints one table; writes JSON.

    .venv/bin/python benchmarks/bench_world.py --conversations 300 --pi0-conversations 96

1. Conversion with 95% Wilson CIs of every scripted strategy and of pi_0 (prompted SmolLM2) on the
   same seeded personas (conversation k meets the same customer in every arm).
2. World throughput in turns/s excluding LLM generation (scripted policies, featuriser cache warm and
   cold), target >= 1,000.
3. pi_0 generation tokens/s through ``collect``'s policy path (render + generate + world) against
   plain ``model.generate`` on the same prompts at the same batch size (target overhead <= 25%).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--conversations", type=int, default=300, help="per scripted strategy")
    ap.add_argument("--pi0-conversations", type=int, default=96)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--out", default="benchmarks/results/bench_world.json")
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    from pipeline_steps.common.base_model import sdpa_without_cudnn
    from pipeline_steps.common.config import load_params
    from pipeline_steps.common.policies import load_policy
    from pipeline_steps.common.stats import proportion_ci
    from pipeline_steps.world.scripted import STRATEGIES, ScriptedPolicy
    from pipeline_steps.world.simulator import World

    params = load_params(args.params)
    if args.threads:
        torch.set_num_threads(args.threads)
    world = World(params.world)
    results: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}, "arms": {}}

    # 1 + 2: scripted strategies; the first pass is featuriser-cold, a second pass is warm.
    for name in STRATEGIES:
        pol = ScriptedPolicy(name, world.vertical)
        t0 = time.perf_counter()
        convs = world.run(pol, args.conversations, seed=args.seed, batch_size=64)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        world.run(pol, args.conversations, seed=args.seed, batch_size=64)
        warm = time.perf_counter() - t0
        turns = sum(len(c.records) for c in convs)
        results["arms"][f"script:{name}"] = {
            "conversion": proportion_ci(sum(c.converted for c in convs), len(convs)).as_dict(),
            "turns_per_conversation": turns / len(convs),
            "turns_per_second_cold": turns / cold,
            "turns_per_second_warm": turns / warm,
        }

    # 3: pi_0 through the collect path, then plain generate on the same prompts.
    pi0 = load_policy("pi0", params, world.vertical, seed=params.world.seed)
    bs = params.collect.batch_size
    t0 = time.perf_counter()
    convs = world.run(pi0, args.pi0_conversations, seed=args.seed, batch_size=bs)
    wall = time.perf_counter() - t0
    collect_tps = pi0.stats.new_tokens / wall
    # Same prompts, same batch size, plain model.generate (no world, no rendering, no post-processing).
    from pipeline_steps.common.contract import history_from_records

    prompts = []
    for c in convs:
        recs = [r for r in c.records if r["suggestion"] is not None or r["relation"] == "abstained"]
        for i in range(1, len(recs) + 1):
            prompts.append(pi0.prompts([history_from_records(c.records[:i])])[0])
    prompts = prompts[: len(prompts) - len(prompts) % bs] or prompts
    tok, model = pi0.tokenizer, pi0.model
    new_tokens, t_plain = 0, 0.0
    for lo in range(0, len(prompts), bs):
        enc = tok(prompts[lo : lo + bs], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        torch.manual_seed(lo)
        t1 = time.perf_counter()
        with torch.inference_mode(), sdpa_without_cudnn():  # the kernels collect uses, so only overhead differs
            out = model.generate(**enc, max_new_tokens=params.collect.max_new_tokens, do_sample=True,
                                 temperature=params.collect.temperature, top_p=params.collect.top_p, top_k=None,
                                 pad_token_id=tok.pad_token_id)
        t_plain += time.perf_counter() - t1
        new = out[:, enc["input_ids"].shape[1]:]
        new_tokens += int(((new != tok.pad_token_id) & (new != tok.eos_token_id)).sum()) + int((new == tok.eos_token_id).any(dim=1).sum())
    plain_tps = new_tokens / t_plain
    results["arms"]["pi0"] = {
        "conversion": proportion_ci(sum(c.converted for c in convs), len(convs)).as_dict(),
        "turns_per_conversation": sum(len(c.records) for c in convs) / len(convs),
    }
    results["pi0_generation"] = {
        "batch_size": bs,
        "collect_tokens_per_second": collect_tps,
        "plain_generate_tokens_per_second": plain_tps,
        "collect_overhead": plain_tps / collect_tps - 1.0,
        "plain_prompts": len(prompts),
    }

    console = Console()
    t = Table(title=f"World calibration (same seeded personas, seed={args.seed})")
    for col in ("arm", "n", "conversion [95% CI]", "turns/conv", "turns/s cold", "turns/s warm"):
        t.add_column(col, justify="right" if col != "arm" else "left")
    for arm, r in results["arms"].items():
        c = r["conversion"]
        t.add_row(arm, str(c["trials"]), f"{c['rate']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}]",
                  f"{r['turns_per_conversation']:.2f}", f"{r.get('turns_per_second_cold', float('nan')):.0f}",
                  f"{r.get('turns_per_second_warm', float('nan')):.0f}")
    console.print(t)
    g = results["pi0_generation"]
    g2 = Table(title="pi_0 generation throughput (same prompts, same batch size)")
    for col in ("path", "tokens/s", "ratio"):
        g2.add_column(col)
    g2.add_row("plain model.generate", f"{g['plain_generate_tokens_per_second']:.1f}", "1.00")
    g2.add_row("collect (render + generate + world)", f"{g['collect_tokens_per_second']:.1f}",
               f"{g['collect_tokens_per_second'] / g['plain_generate_tokens_per_second']:.2f}")
    console.print(g2)
    console.print(f"collect overhead vs plain generate: {g['collect_overhead']:+.1%} (target <= +25%)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
