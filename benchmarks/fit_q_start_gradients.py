"""Where does fit_q's first gradient go? Per-parameter gradient sizes of Q at its start, the probe head against a zero one.

    .venv/bin/python benchmarks/fit_q_start_gradients.py --params <params> --input <returns.parquet> \\
        --out benchmarks/results/fit_q_start_gradients.json

A diagnostic for a Q whose LoRA epoch does not lower the validation loss (README, fit_q on world logs). fit_q starts
the scalar head as a ridge probe (``fit_q.probe_init_rows`` train rows, no bias) and LoRA's B matrices at zero, so
the backbone's first gradients are the head's weights times the residual: when the probe finds nothing and picks
its largest penalty, the head is near zero and so are they. Adam rescales each parameter's step, so the size that
matters is the gradient's against Adam's ``eps`` (1e-8) and the head's step in Q against LoRA's: a head of d weights
moves Q by about ``lr * sum|h|`` per step (``h``: the last hidden state), far more than a LoRA step does.

For one batch of train rows, with the probe head and with a zero head, it prints and saves: the head's mean
``|w|``, the spread of Q, and for LoRA A, LoRA B and the head the median and 90th percentile of ``|grad|`` and the
share below 1e-8, with ``lr * sum|h|`` (the head's step in Q) beside the residual's size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def start_gradients(params: Any, rows: Any, batch_rows: int, seed: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from pipeline_steps.common.base_model import load_tokenizer, resolve_base_model
    from pipeline_steps.common.q_model import encode
    from pipeline_steps.fit_q import build_q_model

    fq = params.fit_q
    base = resolve_base_model(params.base_model.name_or_path, params.base_model.cache_dir)
    tok = load_tokenizer(base)
    train = rows.filter(rows["split"] == "train")
    probe_rows = fq.probe_init_rows if fq.probe_init_rows is not None else train.height - batch_rows  # null: all
    need = probe_rows + batch_rows
    if train.height < need:
        raise SystemExit(f"--input: {train.height} train rows, {need} needed (probe rows + --batch-rows)")
    take = np.random.default_rng(seed).choice(train.height, need, replace=False)
    sub = train[take.tolist()]
    ids = [encode(tok, s, a, fq.max_action_tokens) for s, a in zip(sub["state_text"].to_list(), sub["action_text"].to_list())]
    g = sub["G"].to_numpy().astype(float)
    probe_ids, probe_g = ids[:probe_rows], g[:probe_rows]
    batch, target = ids[probe_rows:], torch.tensor(g[probe_rows:], dtype=torch.float32)
    width = max(map(len, batch))
    x = torch.full((len(batch), width), tok.pad_token_id)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):  # right padding: the head reads the last non-padding token
        x[i, : len(b)], mask[i, : len(b)] = torch.tensor(b), 1
    out: dict[str, Any] = {}
    for name, probe in (("probe head", (probe_ids, probe_g)), ("zero head", None)):
        model, info = build_q_model(base, fq, tok.pad_token_id, probe=probe if probe_rows else None)
        model.train()
        res = model(input_ids=x, attention_mask=mask, output_hidden_states=True)
        q = res.logits.squeeze(-1)
        last = mask.sum(1) - 1
        h = res.hidden_states[-1][torch.arange(len(batch)), last]
        ((q - target) ** 2).mean().backward()
        groups: dict[str, list[Any]] = {}
        head_w = None
        for pname, p in model.named_parameters():
            if p.grad is None:
                continue
            kind = "lora_B" if "lora_B" in pname else "lora_A" if "lora_A" in pname else "head" if "score" in pname else "other"
            groups.setdefault(kind, []).append(p.grad.detach().abs().flatten())
            if kind == "head":
                head_w = p.detach()
        row: dict[str, Any] = {"init": info, "head_mean_abs_w": float(head_w.abs().mean()) if head_w is not None else None,
                               "q_min": float(q.detach().min()), "q_max": float(q.detach().max()),
                               "residual_mean_abs": float((q.detach() - target).abs().mean()),
                               "head_step_in_q": float(fq.learning_rate * h.detach().abs().sum(1).mean())}
        for kind, parts in sorted(groups.items()):
            v = torch.cat(parts)
            sample = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(seed))[:1_000_000]]
            row[kind] = {"median_abs_grad": float(sample.median()), "p90_abs_grad": float(sample.quantile(0.9)),
                         "share_below_adam_eps": float((v < 1e-8).float().mean()), "parameters": int(v.numel())}
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import polars as pl
    from rich.console import Console
    from rich.table import Table

    from pipeline_steps.common.config import load_params
    from pipeline_steps.common.tracking import write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml", help="params whose fit_q, base_model Q is built with")
    ap.add_argument("--input", required=True, help="a returns file (the returns step's, or --export-train's)")
    ap.add_argument("--batch-rows", type=int, default=16, help="train rows in the one batch whose gradient is read")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON of the numbers printed")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    result = {"args": vars(args), "learning_rate": params.fit_q.learning_rate,
              "inits": start_gradients(params, pl.read_parquet(args.input), args.batch_rows, args.seed)}
    inits = result["inits"]
    table = Table(title=f"fit_q's first gradient on {args.batch_rows} train rows of {args.input}")
    table.add_column("")
    for name in inits:
        table.add_column(name, justify="right")

    def cell(r: dict[str, Any], kind: str, key: str, fmt: str) -> str:
        return format(r[kind][key], fmt) if kind in r else "no gradient"

    lines = [("head mean |w|", lambda r: f"{r['head_mean_abs_w']:.2e}"),
             ("Q range", lambda r: f"{r['q_min']:.3f} .. {r['q_max']:.3f}"),
             ("mean |Q - G|", lambda r: f"{r['residual_mean_abs']:.3f}"),
             ("head's step in Q (lr x sum|h|)", lambda r: f"{r['head_step_in_q']:.3f}")]
    for kind in ("head", "lora_B", "lora_A"):
        lines += [(f"{kind} median |grad|", lambda r, k=kind: cell(r, k, "median_abs_grad", ".2e")),
                  (f"{kind} p90 |grad|", lambda r, k=kind: cell(r, k, "p90_abs_grad", ".2e")),
                  (f"{kind} share |grad| < 1e-8 (Adam eps)", lambda r, k=kind: cell(r, k, "share_below_adam_eps", ".2f"))]
    for label, fn in lines:
        table.add_row(label, *(fn(r) for r in inits.values()))
    Console().print(table)
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
