"""Training speed of fit_q's model shape on a GPU, by precision and attention kernel, side by side.

    python benchmarks/bench_attention_backends.py                 # needs CUDA; ~1 min on an H200
    python benchmarks/bench_attention_backends.py --layers 2 --steps 3 --device cpu   # a smoke run anywhere

Why: on an H200, fit_q's bf16 training ran at 0.30x the speed of fp32 (benchmarks/results/bench_fit_q_gpu/).
PyTorch picks cuDNN's attention for bf16 on Hopper, and cuDNN builds an execution plan for every new sequence
length (pytorch/pytorch#155958); our batches are padded to their longest row, so almost every step has a new
length. This measures, on SmolLM2-135M's architecture with random weights (speed does not depend on the
weights, so no checkpoint is needed) and fit_q's LoRA, batch 32, right-padded rows:

* fp32 / bf16 autocast, a new length every step (what training sees) and one fixed length;
* the same with cuDNN excluded (``pipeline_steps.common.base_model.sdpa_without_cudnn``, what the pipeline does);
* bf16 with cuDNN again on the same lengths, its plans now cached (the first sight of a length costs most).

Every case runs the same list of lengths (the fixed case: 128 throughout). Each row is tokens/s and ms/step over
``--steps`` optimiser steps after one warm-up step at the case's first length, and its ratio to the first row
(fp32, default kernels), all in one run. fp32 never uses cuDNN attention (it takes bf16/fp16 only), so the two
fp32 rows differ by run-order noise alone: read the other differences against theirs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=30, help="SmolLM2-135M has 30")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--min-len", type=int, default=60)
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the table as JSON here too")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from rich.console import Console
    from rich.table import Table
    from transformers import LlamaConfig, LlamaForSequenceClassification

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here: this measures GPU attention kernels (--device cpu for a smoke run)")
    from pipeline_steps.common.base_model import sdpa_without_cudnn

    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      tie_word_embeddings=True, num_labels=1, pad_token_id=2)
    torch.manual_seed(args.seed)
    model = LlamaForSequenceClassification(cfg).to(args.device)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rng = random.Random(args.seed)

    def step(length: int, bf16: bool) -> None:
        x = torch.randint(3, 49000, (args.batch_size, length), device=args.device)
        keep = torch.tensor([rng.randint(length // 2, length) for _ in range(args.batch_size)], device=args.device)
        mask = (torch.arange(length, device=args.device)[None, :] < keep[:, None]).long()
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, attention_mask=mask).logits.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    cases = [("fp32", False, "default", None), ("bf16 autocast", True, "default", None),
             ("bf16 autocast", True, "default", 128), ("bf16 autocast", True, "no cuDNN", None),
             ("fp32", False, "no cuDNN", None), ("bf16 autocast", True, "default, repeat", None)]
    varying = [rng.randint(args.min_len, args.max_len) for _ in range(args.steps)]
    rows = []
    for precision, bf16, kernels, fixed in cases:
        ctx = sdpa_without_cudnn if kernels == "no cuDNN" else contextlib.nullcontext
        lengths = [fixed] * args.steps if fixed else varying
        with ctx():
            step(lengths[0] if fixed else max(args.min_len - 1, 1), bf16)  # warm-up; a varying case's lengths stay new
            sync()
            t0 = time.perf_counter()
            for n in lengths:
                step(n, bf16)
            sync()
            dt = time.perf_counter() - t0
        rows.append({"precision": precision, "attention": kernels, "lengths": "one (128)" if fixed else "new each step",
                     "tokens_per_second": args.batch_size * sum(lengths) / dt, "ms_per_step": dt / args.steps * 1e3})
    table = Table(title=f"{torch.cuda.get_device_name(0) if cuda else 'CPU'}, torch {torch.__version__}: "
                        f"{args.layers}-layer SmolLM2 shape + LoRA, batch {args.batch_size}, {args.steps} steps")
    for col in ("precision", "attention kernels", "sequence lengths", "tok/s", "ms/step", "vs fp32 default"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["precision"], r["attention"], r["lengths"], f"{r['tokens_per_second']:.0f}",
                      f"{r['ms_per_step']:.1f}", f"{r['tokens_per_second'] / rows[0]['tokens_per_second']:.2f}x")
    Console(width=140).print(table)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
