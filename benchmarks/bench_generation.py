"""Where pi_0's generation time goes, and what the obvious levers buy, on this machine (CPU or GPU).

    .venv/bin/python benchmarks/bench_generation.py --threads 2 --conversations 48 --batch-sizes 16,48 \
        --out benchmarks/results/bench_generation_cpu.json

1. **Batch size in the world.** pi_0 (``collect``'s policy path: render, generate, clean up, world) meets the
   same seeded customers once per ``--batch-sizes`` entry: wall time, generation time, new tokens/s,
   generate calls, conversion. The first entry is the baseline (params.yaml's ``collect.batch_size`` by
   default); each row's ratio is its tokens/s over the baseline's, in the same run.
2. **One generate call, taken apart.** The prompts of the heaviest call of the baseline run (most prompt
   tokens), generated again through ``LLMPolicy.generate`` with ``model.generate`` overrides: prefill alone
   (one new token), a static KV cache instead of the dynamic one, a top-k 1,000 pre-filter before top-p, and
   greedy decoding (no sampler at all): each against the call as collect makes it, best of ``--repeats``.
   Whether a variant's decoded text equals the baseline's is printed too: only identical output leaves every
   recorded result (the proof's conversions) reproducible.
3. **Weights dtype** (``--dtypes float32,bfloat16``: ``base_model.dtype``, what ``profiles/gpu.yaml`` sets). The
   policy loaded in each further dtype meets the same customers at the baseline batch size (tokens/s against
   the first dtype's run, conversion), and on the heaviest call's prompts and the first dtype's sampled replies
   the per-token ``KL(pi_dtype || pi_first)`` at the sampling temperature and how often both pick the same next
   token; that call is also timed in each dtype (the world runs diverge, so their token counts differ). A dtype that is
   faster but moves the policy as far as a PPO iteration does (the CPU proof's ``KL(pi_1 || pi_0)`` is 0.019
   per token) is not the same pi_0.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# name -> model.generate overrides; None marks the baseline (the call exactly as collect makes it)
PREFILL_ONLY = {"max_new_tokens": 1}
CALL_VARIANTS: dict[str, dict[str, Any] | None] = {
    "as collect calls it": None,
    "prefill only (1 new token)": PREFILL_ONLY,
    "static KV cache": {"cache_implementation": "static"},
    "top-k 1,000 before top-p": {"top_k": 1000},
    "greedy (no sampling)": {"do_sample": False, "temperature": None, "top_p": None},
}


def _world_run(world: Any, policy: Any, conversations: int, seed: int, batch_size: int) -> dict[str, Any]:
    from pipeline_steps.common.policies import GenerationStats
    from pipeline_steps.common.stats import proportion_ci

    policy.stats = GenerationStats()
    t0 = time.perf_counter()
    convs = world.run(policy, conversations, seed=seed, batch_size=batch_size)
    wall = time.perf_counter() - t0
    conversion = proportion_ci(sum(cv.converted for cv in convs), len(convs))
    return {
        "batch_size": batch_size, "conversations": len(convs), "turns": sum(len(cv.records) for cv in convs),
        "generate_calls": policy.stats.calls, "new_tokens": policy.stats.new_tokens,
        "generate_seconds": policy.stats.generate_seconds, "wall_seconds": wall,
        "tokens_per_second": policy.stats.tokens_per_second,
        "conversion": conversion.rate, "conversion_ci95": [conversion.ci_low, conversion.ci_high],
    }


def _time_call(policy: Any, prompts: list[str], seed: int, overrides: dict[str, Any],
               repeats: int) -> tuple[float, list[str]]:
    best, texts = float("inf"), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        texts = policy.generate(prompts, seed, **overrides)
        best = min(best, time.perf_counter() - t0)
    return best, texts


def _reply_divergence(policy: Any, other: Any, prompts: list[str], replies: list[str]) -> dict[str, Any]:
    """Per-token ``KL(other || policy)`` and next-token agreement on ``policy``'s own replies (teacher-forced).

    At the sampling temperature (the distributions that are deployed, as ``evaluate``'s KL), exact over the
    vocabulary at each reply position. Row by row, so no padding enters either model; both log-softmaxes in
    fp64: the KL of a bf16 copy of a tiny model can be ~1e-7 per token, below fp32's rounding of the sum (which
    then came out negative on an AMD EPYC). The decoded reply is tokenised again after its prompt (which ends
    with the assistant header), so the reply's tokens start right after the prompt's; its end-of-turn token is
    not scored.
    """
    import torch

    tok = policy.tokenizer
    t = policy.temperature or 1.0
    kls, agree, n, own_logp = [], 0, 0, 0.0
    with torch.inference_mode():
        for prompt, reply in zip(prompts, replies):
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            ids = tok(prompt + reply, add_special_tokens=False)["input_ids"]
            if len(ids) <= len(p_ids) or ids[: len(p_ids)] != p_ids:
                continue  # an empty reply, or a tokenisation that merged across the boundary: nothing to score
            x = torch.tensor([ids])
            # position i's logits predict token i + 1: the reply's tokens are predicted from len(p_ids) - 1 on
            lo = len(p_ids) - 1
            lp = torch.log_softmax(policy.model(x.to(policy.model.device)).logits[0, lo:-1].double() / t, -1)
            lq = torch.log_softmax(other.model(x.to(other.model.device)).logits[0, lo:-1].double() / t, -1)
            kls.append((lq.exp() * (lq - lp)).sum(-1).cpu())
            agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            own_logp += float(lp.gather(-1, x[0, lo + 1:, None].to(lp.device)).sum())
            n += lp.shape[0]
    kl = torch.cat(kls) if kls else torch.zeros(0)
    return {"reply_tokens": n, "rows_scored": len(kls), "temperature": t,
            "kl_per_token": float(kl.mean()) if n else float("nan"),
            "kl_per_token_p95": float(kl.quantile(0.95)) if n else float("nan"),
            "same_argmax_fraction": agree / n if n else float("nan"),
            # mean log-probability of the reply's own tokens under ``policy`` (at the temperature): a check that
            # the scored positions are the reply's (tests compare it with policies.response_logprobs)
            "reply_logprob_per_token": own_logp / n if n else float("nan")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--conversations", type=int, default=48, help="per batch size, the same customers each time")
    ap.add_argument("--batch-sizes", default=None,
                    help="comma-separated; the first is the baseline (default: collect.batch_size, then 3x it)")
    ap.add_argument("--repeats", type=int, default=2, help="timings of each call variant; the best is kept")
    ap.add_argument("--skip-calls", action="store_true", help="only the batch sizes (part 1)")
    ap.add_argument("--dtypes", default=None,
                    help="comma-separated base_model.dtype values (float32, bfloat16); the first is the run of part 1, "
                         "each further one is loaded and compared with it (default: base_model.dtype only)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--out", default="benchmarks/results/bench_generation.json")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from pipeline_steps.bench.iterate import machine_description
    from pipeline_steps.common.config import load_params
    from pipeline_steps.common.contract import HistoryTurn
    from pipeline_steps.common.policies import load_policy
    from pipeline_steps.world.simulator import World

    params = load_params(args.params)
    try:
        sizes = ([int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes
                 else [params.collect.batch_size, 3 * params.collect.batch_size])
    except ValueError:
        ap.error(f"--batch-sizes: {args.batch_sizes!r} is not a comma-separated list of integers")
    if not sizes or min(sizes) < 1 or args.conversations < 1 or args.repeats < 1:
        ap.error("--batch-sizes, --conversations and --repeats must be positive")
    from pipeline_steps.common.base_model import DTYPES

    dtypes = [d.strip() for d in args.dtypes.split(",")] if args.dtypes else [params.base_model.dtype]
    if not dtypes or any(d not in DTYPES for d in dtypes) or len(set(dtypes)) != len(dtypes):
        ap.error(f"--dtypes: {args.dtypes!r} is not a comma-separated list of distinct values of {', '.join(DTYPES)}")
    params.base_model.dtype = dtypes[0]
    world = World(params.world)
    seed = params.world.seed + params.collect.seed  # collect's customers
    policy = load_policy("pi0", params, world.vertical, seed=seed)
    if args.threads:  # after load_policy, which applies base_model.num_threads
        torch.set_num_threads(args.threads)
    # first-call costs (allocator growth; on a GPU, CUDA and kernel selection) must not land on the baseline
    policy.generate(policy.prompts([[HistoryTurn("Hello, we want a new kitchen. What would it cost?")]]), seed,
                    max_new_tokens=2)

    # part 1; the baseline run also records every call's prompts, for part 2
    calls: list[tuple[list[str], int, list[str]]] = []
    generate = policy.generate

    def recording(prompts: list[str], call_seed: int, **overrides: Any) -> list[str]:
        texts = generate(prompts, call_seed, **overrides)
        calls.append((list(prompts), call_seed, texts))
        return texts

    runs = []
    for i, bs in enumerate(sizes):
        policy.generate = recording if i == 0 else generate
        runs.append(_world_run(world, policy, args.conversations, seed, bs))
    policy.generate = generate
    base_tps = runs[0]["tokens_per_second"]
    for r in runs:
        r["tokens_per_second_vs_baseline"] = r["tokens_per_second"] / base_tps if base_tps else float("nan")

    result: dict[str, Any] = {
        "args": vars(args), "machine": machine_description(), "torch_threads": torch.get_num_threads(),
        "device": str(policy.model.device), "dtype": str(policy.model.dtype),
        "base_model": params.base_model.name_or_path, "max_new_tokens": policy.max_new_tokens,
        "batch_sizes": runs, "call": None,
    }

    console = Console(width=160)
    table = Table(title=f"pi_0 in the world, {args.conversations} conversations per row, the same customers "
                        f"({result['machine']}, {result['device']}, {result['dtype']})")
    for col in ("batch size", "generate calls", "turns", "new tokens", "generate s", "wall s", "tokens/s",
                f"vs batch {sizes[0]}", "conversion [95% CI]"):
        table.add_column(col, justify="right")
    for r in runs:
        lo, hi = r["conversion_ci95"]
        table.add_row(str(r["batch_size"]), str(r["generate_calls"]), str(r["turns"]), str(r["new_tokens"]),
                      f"{r['generate_seconds']:.1f}", f"{r['wall_seconds']:.1f}", f"{r['tokens_per_second']:.1f}",
                      f"{r['tokens_per_second_vs_baseline']:.2f}x", f"{r['conversion']:.3f} [{lo:.3f}, {hi:.3f}]")
    console.print(table)

    if not args.skip_calls:
        tok = policy.tokenizer
        prompts, call_seed, in_world = max(calls, key=lambda c: sum(len(ids) for ids in tok(c[0])["input_ids"]))
        lengths = [len(ids) for ids in tok(prompts)["input_ids"]]
        variants, reference = [], None
        for name, overrides in CALL_VARIANTS.items():
            seconds, texts = _time_call(policy, prompts, call_seed, overrides or {}, args.repeats)
            if overrides is None:
                reference = (seconds, texts)
            variants.append({"variant": name, "overrides": overrides or {}, "seconds": seconds,
                             "vs_collect": reference[0] / seconds,
                             "same_text": None if overrides == PREFILL_ONLY else texts == reference[1]})
        prefill = next(v for v in variants if v["overrides"] == PREFILL_ONLY)
        result["call"] = {"rows": len(prompts), "prompt_tokens": sum(lengths), "longest_prompt": max(lengths),
                          "seed": call_seed, "repeats": args.repeats, "variants": variants,
                          "baseline_reproduces_the_world_run": reference[1] == in_world,
                          "prefill_share": prefill["seconds"] / reference[0]}
        table = Table(title=f"one generate call: {len(prompts)} prompts, {sum(lengths)} prompt tokens (longest "
                            f"{max(lengths)}), up to {policy.max_new_tokens} new tokens; best of {args.repeats}")
        for col in ("variant", "seconds", "speed vs collect's call", "same text as collect's call"):
            table.add_column(col, justify="right")
        for v in variants:
            same = "n/a" if v["same_text"] is None else ("yes" if v["same_text"] else "no")
            table.add_row(v["variant"], f"{v['seconds']:.2f}", f"{v['vs_collect']:.2f}x", same)
        console.print(table)
        console.print(f"prefill is {result['call']['prefill_share']:.0%} of collect's call: every turn re-reads the "
                      "whole conversation, the shared system prompt included; the call re-run gives the text it gave "
                      f"in the world: {'yes' if result['call']['baseline_reproduces_the_world_run'] else 'NO'}")

    result["dtypes"] = None
    if len(dtypes) > 1:
        tok = policy.tokenizer
        prompts, call_seed, replies = max(calls, key=lambda c: sum(len(ids) for ids in tok(c[0])["input_ids"]))
        # part 2 timed this very call already (same prompts, seed and repeats) unless it was skipped
        first_call_s = (result["call"]["variants"][0]["seconds"] if result["call"]
                        else _time_call(policy, prompts, call_seed, {}, args.repeats)[0])
        rows = [{"dtype": dtypes[0], **runs[0], "tokens_per_second_vs_first": 1.0, "call_seconds": first_call_s,
                 "call_speedup_vs_first": 1.0, "divergence": None}]
        for dtype in dtypes[1:]:
            other_params = params.model_copy(deep=True)
            other_params.base_model.dtype = dtype
            other = load_policy("pi0", other_params, world.vertical, seed=seed)
            other.generate(policy.prompts([[HistoryTurn("Hello, we want a new kitchen. What would it cost?")]]), seed,
                           max_new_tokens=2)  # warm-up, as for the baseline
            run = _world_run(world, other, args.conversations, seed, sizes[0])
            # the world runs differ once a token differs; the heaviest call, timed in both, is like for like
            call_s, _ = _time_call(other, prompts, call_seed, {}, args.repeats)
            rows.append({"dtype": dtype, **run, "tokens_per_second_vs_first":
                         run["tokens_per_second"] / base_tps if base_tps else float("nan"),
                         "call_seconds": call_s, "call_speedup_vs_first": first_call_s / call_s,
                         "divergence": _reply_divergence(policy, other, prompts, replies)})
            del other
        result["dtypes"] = {"batch_size": sizes[0], "call_rows": len(prompts), "rows": rows}
        table = Table(title=f"weights dtype (base_model.dtype), batch size {sizes[0]}, the same customers; the heaviest "
                            f"call timed in each (best of {args.repeats}); divergence from {dtypes[0]} on its "
                            f"{len(prompts)} replies of that call, at temperature {policy.temperature}")
        for col in ("dtype", "new tokens", "generate s", "tokens/s", f"vs {dtypes[0]}", "conversion [95% CI]",
                    "heaviest call s", f"vs {dtypes[0]}", "KL per token (p95)", "same next token"):
            table.add_column(col, justify="right")
        for r in rows:
            lo, hi = r["conversion_ci95"]
            d = r["divergence"]
            table.add_row(r["dtype"], str(r["new_tokens"]), f"{r['generate_seconds']:.1f}", f"{r['tokens_per_second']:.1f}",
                          f"{r['tokens_per_second_vs_first']:.2f}x", f"{r['conversion']:.3f} [{lo:.3f}, {hi:.3f}]",
                          f"{r['call_seconds']:.2f}", f"{r['call_speedup_vs_first']:.2f}x",
                          "" if d is None else f"{d['kl_per_token']:.4f} ({d['kl_per_token_p95']:.4f})",
                          "" if d is None else f"{d['same_argmax_fraction']:.1%} of {d['reply_tokens']}")
        console.print(table)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    console.print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
