"""Benchmark of fit_q (issue #4) with the real SmolLM2-135M on CPU or one GPU. Prints tables; writes JSON.

    .venv/bin/python benchmarks/bench_fit_q.py        # defaults: small samples, ~15 min on 2 cores
    .venv/bin/python benchmarks/bench_fit_q.py --dnd-train-rows 1024 --dnd-val-rows 512 --epochs 1 \
        --world-train-rows 320 --world-val-rows 192 --eval-rows 128   # the README's 3e-4 table: 28 min, quiet 2 cores
    .venv/bin/python benchmarks/bench_fit_q.py --threads 2 --dnd-train-rows 4000 --dnd-val-rows 512 --epochs 2 \
        --eval-rows 128 --world-train-rows 320 --world-val-rows 192   # every DND train row: 83 min, 10.8 GiB
    .venv/bin/python benchmarks/bench_fit_q.py --threads 2 --precision bf16 --tasks dnd --dnd-train-rows 4000 \
        --dnd-val-rows 512 --epochs 1 --eval-rows 128 --learning-rate 1e-3   # one sweep point: 15-23 min, Q 0.844
    .venv/bin/python benchmarks/bench_fit_q.py --threads 2 --dnd-train-rows 4000 --dnd-val-rows 4000 --epochs 1 \
        --eval-rows 128 --world-train-rows 320 --world-val-rows 192 --learning-rate 1e-3   # the README's table: 30 min
    .venv/bin/python benchmarks/summarise_bench_fit_q.py RUN_SEED0.json RUN_SEED1.json ...   # the mean over seeds
    .venv/bin/python benchmarks/bench_fit_q.py --threads 2 --precision bf16 --tasks dnd --folds 3 \
        --dnd-train-rows 4000 --dnd-val-rows 4000 --eval-rows 128 --learning-rate 1e-3   # cross-fitted: 3 x ~20 min
    .venv/bin/python benchmarks/bench_fit_q.py --threads 2 --precision bf16 --tasks dnd --dnd-train-rows 4000 \
        --dnd-val-rows 4000 --eval-rows 128 --learning-rate 1e-3 --dnd-extra-train data/dealornodeal/test.txt --dnd-hold-out-all \
        --out A.json   # the corpus's split: trained on test.txt, every val.txt row held out; then the reverse, pooled
    .venv/bin/python benchmarks/bench_fit_q.py --threads 2 --precision bf16 --tasks dnd --dnd-train-rows 4000 \
        --dnd-val-rows 4000 --eval-rows 128 --learning-rate 1e-3 --dnd-extra-train data/dealornodeal/test.txt --dnd-folds-by-file
        # the same in one run: each file scored by a Q trained on the other, pooled (~100 min on 2 cores)
    python benchmarks/bench_fit_q.py --threads 8 --tasks dnd --throughput-rows 1024 --dnd-train-rows 1024 \
        --dnd-val-rows 512 --eval-rows 128 --learning-rate 1e-3 --batch-size 32   # fp32 vs bf16 on a GPU: 83 s, H200
    python benchmarks/bench_fit_q.py --threads 8 --tasks world \
        --world-logs benchmarks/results/bench_fit_q_world_logs_gpu/explore_logs_2048 --precision fp32 --folds 2 \
        --world-train-rows 3000 --world-val-rows 100000 --eval-rows 128 --learning-rate 1e-3 --batch-size 32
        # an LLM policy's logs (2,048 conversations collect wrote on a GPU), cross-fitted: 165 s on an H200
    .venv/bin/python benchmarks/bench_fit_q.py --threads 2 --tasks world --world-logs $P/explore_logs_2048 \
        --params $P/params_q_explore_notes_probe_cpu.yaml --precision fp32 --folds 2 --world-train-rows 3000 \
        --world-val-rows 1500 --eval-rows 128 --epochs 0   # the default Q (notes + probe alone), cross-fitted on 2 CPU cores

1. **Precision**: Q is trained on the first ``--throughput-rows`` Deal-or-No-Deal train rows twice, fp32 and
   with bf16 autocast (same rows, seed, budget), so the speed *and* the quality of the two are compared side
   by side; the runs below use the faster one unless bf16 costs quality.
2. **Deal-or-No-Deal** (``/work/shared/data/dealornodeal/val.txt`` through the ingest adapter: agent = YOU,
   outcome = a deal was reached), rows built by the returns step's code, split *by dialogue* (the corpus
   holds every dialogue twice, once from each side; both copies land on the same side of the split), at
   ``--dnd-train-rows`` and ``--epochs``.
3. **World logs** from a mix of scripted strategies (expert, friendly-generic, premature-pitch, random), or
   with ``--world-logs DIR`` the logs a ``collect`` run wrote (an LLM policy's wording), rows from the returns
   step, split by conversation.

Q is fit_q's recipe (linear-probe head init on the train rows, then LoRA + head for ``--epochs``, the best
of the initial and each epoch's weights kept by validation loss on ``--eval-rows`` rows).
On each: held-out ROC-AUC for the final outcome of our Q against two baselines trained on the same rows
-- TF-IDF (1-2 grams of state + action) with logistic regression on the outcome, and the outcome rate by
turn index -- with a paired bootstrap 95% CI of AUC(Q) - AUC(best baseline) that resamples whole
conversations (a dialogue's turns share its outcome; the row bootstrap of earlier runs is printed beside it
and is too narrow) (target: >= +0.05), plus
Spearman(Q, G), MSE and p90 |Q - G|; the margin again on the validation rows past the first ``--eval-rows``,
which the Trainer never evaluated to keep its best weights. Every scored row goes to ``<out>.rows.parquet``.

**Cross-fitting** (``--folds K``): one validation split holds too few dialogues for a tight CI (Deal-or-No-Deal:
162 of 562). With ``--folds K`` the conversations are cut into K folds by a hash of their cluster (a dialogue's
two copies share one); each fold is scored by a Q and baselines trained on the other K-1 folds, and the
held-out scores of all folds are pooled into one set where every conversation is held out once, so the
margin and its conversation-resampled CI use every dialogue. ``--*-train-rows`` and ``--*-val-rows`` then cap
each fold's sample; the first ``--eval-rows`` held-out rows of each fold are the Trainer's selection rows.

**More dialogues to train on** (``--dnd-extra-train FILE``, repeatable): rows of further files of the corpus
(its ``test.txt``, which ``fetch_dealornodeal.py`` downloads; ``../shared/data`` holds only ``val.txt``) join
every training set, Q's and the baselines' alike, and are never held out; a dialogue also in the main file is dropped. With ``--dnd-hold-out-all`` they
are the only training rows and every main-file row is held out: the corpus's own split, one model scoring
every ``val.txt`` dialogue, paired row for row with a cross-fitted run by ``compare_bench_fit_q_rows.py --align``.
``--dnd-folds-by-file`` makes the files the folds: each file's rows are held out in turn and scored by a Q (and
baselines) trained on the other files, and the pooled rows are scored as one set, as ``--folds`` pools its folds.

**Throughput** of every run: tokens/s counts real (non-pad) tokens over the timed optimisation steps
(evaluation and checkpointing excluded). Model FLOP utilisation is given against a matmul peak measured
in the same run and at the same thread count, two ways:
   * ``MFU 6N``: the usual 6 * N * tokens, N = the non-embedding parameters (every backbone linear layer
     and the head; embedding lookups are not matmuls). It overstates the work of LoRA training, where the
     frozen weights get no weight gradients;
   * ``MFU exec``: the FLOPs actually executed: forward 2N + attention 4*L*d*T per token, backward ~ the
     same again for the activation gradients (the LoRA weight gradients are negligible).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DIR = Path(os.environ.get("IPPO_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
DND_FILE = os.environ.get("IPPO_DND_FILE", str(SHARED_DIR / "data" / "dealornodeal" / "val.txt"))
DND_SYSTEM_PROMPT = (
    "You suggest the next message for YOU, who negotiates with THEM over how to split books, hats and balls."
)
STRATEGIES = ("expert", "friendly_generic", "premature_pitch", "random")


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


DND_ITEMS = ("book", "hat", "ball")


def dnd_input_sentence(you_input: str) -> str:
    """YOU's ``<input>`` (count and value to YOU of each item type) as a sentence: ``1 6 3 0 2 2`` ->
    ``YOU's items: 1 book worth 6 each to YOU, 3 hats worth 0 each to YOU, 2 balls worth 2 each to YOU.``"""
    n = [int(x) for x in you_input.split()]
    if len(n) != 6:
        raise ValueError(f"Deal-or-No-Deal <input> {you_input!r}: expected 6 numbers (count, value) x 3 items")
    return "YOU's items: " + ", ".join(f"{c} {item}{'' if c == 1 else 's'} worth {v} each to YOU"
                                       for item, c, v in zip(DND_ITEMS, n[0::2], n[1::2])) + "."


def dnd_returns(params: Any, tokenizer: Any, val_fraction: float, with_input: bool = False,
                path: str = DND_FILE) -> Any:
    """Deal-or-No-Deal returns rows (ingest adapter + returns code), re-split by dialogue.

    ``with_input``: each conversation's system prompt also states YOU's items and their values to YOU (the
    ``<input>`` a negotiator sees, as a business agent sees its customer's account), for Q and the baselines alike.
    The info dict carries ``keys``, the dialogue keys, so that another file's rows can be checked for overlap.
    """
    import polars as pl
    import pyarrow as pa

    from pipeline_steps import ingest, returns
    from pipeline_steps.common.config import IngestParams

    canon, rejects, _ = ingest.ingest(path, IngestParams(format="dealornodeal"))  # rejected lines: counted below
    turns = pl.from_arrow(canon)
    if with_input:
        you_input = {cid: json.loads(b)["you_input"] for cid, b in
                     turns.select("conversation_id", "behaviour").unique("conversation_id").iter_rows()}
        by_prompt: dict[str, list[str]] = {}
        for cid, inp in you_input.items():
            by_prompt.setdefault(f"{DND_SYSTEM_PROMPT} {dnd_input_sentence(inp)}", []).append(cid)
        parts = [returns.build_returns(turns.filter(pl.col("conversation_id").is_in(cids)), params, tokenizer, prompt)
                 for prompt, cids in sorted(by_prompt.items())]
        table = pa.concat_tables(parts).sort_by([("conversation_id", "ascending"), ("turn_index", "ascending")])
    else:
        table = returns.build_returns(turns, params, tokenizer, DND_SYSTEM_PROMPT)
    # One key per dialogue: its messages without the adapter's placeholders, order-free, so the copy of a
    # dialogue seen from THEM's side gets the same key.
    skip = {ingest.DND_OPENING, ingest.DND_SELECTION, None}
    msgs: dict[str, list[str]] = {}
    for r in pl.from_arrow(canon).select("conversation_id", "customer_message", "business_message").iter_rows():
        msgs.setdefault(r[0], []).extend(m for m in r[1:] if m not in skip)
    key = {cid: "\x1f".join(sorted(m)) for cid, m in msgs.items()}
    digest = {cid: hashlib.sha256(k.encode()).digest() for cid, k in key.items()}  # one hash per conversation

    def side(cid: str) -> str:
        h = int.from_bytes(digest[cid][:8], "big") / 2**64
        return "validation" if h < val_fraction else "train"

    df = pl.from_arrow(table).with_columns(
        pl.col("conversation_id").map_elements(side, return_dtype=pl.String).alias("split"),
        # The bootstrap's resampling unit: a dialogue (its two copies share the outcome, so they are not independent).
        pl.col("conversation_id").map_elements(lambda c: digest[c].hex()[:16], return_dtype=pl.String).alias("cluster"),
    )
    n_dialogues = len(set(key.values()))
    return df, {"file": path, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
                "conversations": len(key), "dialogues": n_dialogues, "lines_rejected_by_ingest": len(rejects),
                "keys": set(key.values())}


def dnd_extra_train(params: Any, tokenizer: Any, paths: list[str], held_out_keys: set[str],
                    with_input: bool = False) -> tuple[Any, dict[str, Any]]:
    """Rows of further Deal-or-No-Deal files (e.g. the corpus's ``test.txt``) that only ever *train*: added to every
    training set (each fold's, or the single split's), Q's and the baselines' alike, never held out. A dialogue
    that is also in the main file is dropped (its outcome would leak into the held-out rows), and counted."""
    import polars as pl

    parts, infos = [], []
    for i, path in enumerate(paths, start=1):  # file 0 is the main file
        df, info = dnd_returns(params, tokenizer, 0.0, with_input, path=path)
        keys = info.pop("keys")
        overlap = keys & held_out_keys
        if overlap:
            gone = {hashlib.sha256(k.encode()).digest().hex()[:16] for k in overlap}
            df = df.filter(~pl.col("cluster").is_in(sorted(gone)))
        parts.append(df.with_columns(pl.lit("train").alias("split"), pl.lit(i).alias("source_file")))
        infos.append(info | {"rows": df.height, "dialogues_dropped_as_in_the_main_file": len(overlap)})
    extra = pl.concat(parts)
    return extra, {"files": infos, "rows": extra.height}


def with_extra(train: Any, extra: Any, seed: int) -> Any:
    """``train`` plus the extra training rows, shuffled together (seeded) so that epochs mix both sources."""
    import polars as pl

    if extra is None or extra.height == 0:
        return train
    both = pl.concat([train, extra], how="diagonal_relaxed")  # the extra rows have no fold
    return both.sample(fraction=1.0, seed=seed + 2, shuffle=True)


def world_returns(params: Any, tokenizer: Any, per_strategy: int) -> Any:
    import polars as pl

    from pipeline_steps import returns
    from pipeline_steps.common.contract import system_prompt_for, turns_to_table
    from pipeline_steps.world.scripted import ScriptedPolicy
    from pipeline_steps.world.simulator import World, conversations_to_turns

    world = World(params.world)
    convs = []
    for k, name in enumerate(STRATEGIES):
        convs += world.run(ScriptedPolicy(name, world.vertical, seed=k), per_strategy, seed=params.world.seed + 7,
                           batch_size=64, first_index=per_strategy * k)
    table = returns.build_returns(pl.from_arrow(turns_to_table(conversations_to_turns(convs))), params, tokenizer,
                                  system_prompt_for(world.vertical))
    df = pl.from_arrow(table).with_columns(pl.col("conversation_id").alias("cluster"))
    return df, {"conversations": len(convs), "source": f"scripted mix {','.join(STRATEGIES)} x {per_strategy}"}


def read_world_logs(logs: str) -> Any:
    """The canonical records (Arrow) of conversation logs under the contract; any rejected record stops the bench."""
    from pipeline_steps import ingest
    from pipeline_steps.common.config import IngestParams

    canon, rejects, _ = ingest.ingest(logs, IngestParams(format="auto"))
    if rejects:
        raise SystemExit(f"--world-logs {logs}: {len(rejects)} records rejected by ingest, first: {rejects[0]}")
    return canon


def world_log_returns(params: Any, tokenizer: Any, logs: str) -> Any:
    """Returns rows of conversation logs written by ``collect`` (or any logs under the contract), e.g. an LLM
    behaviour policy's, whose wording does not name a scripted strategy; split by the returns step's own hash."""
    import polars as pl

    from pipeline_steps import returns
    from pipeline_steps.common.contract import system_prompt_for
    from pipeline_steps.world.simulator import load_vertical

    canon = read_world_logs(logs)
    # The prompt as the returns step renders it (no World: its featuriser is not needed to read logs).
    table = returns.build_returns(pl.from_arrow(canon), params, tokenizer, system_prompt_for(load_vertical(params.world.vertical)))
    df = pl.from_arrow(table).with_columns(pl.col("conversation_id").alias("cluster"))
    finals = df.group_by("conversation_id").agg(pl.col("outcome").max())
    return df, {"conversations": finals.height, "conversions": int(finals["outcome"].sum()), "source": f"logs {logs}"}


def sample(df: Any, n_train: int, n_val: int, seed: int) -> tuple[Any, Any]:
    """Seeded row samples of each side of the split (sizes capped by what exists)."""
    tr, va = df.filter(df["split"] == "train"), df.filter(df["split"] == "validation")
    return (tr.sample(min(n_train, tr.height), seed=seed, shuffle=True),
            va.sample(min(n_val, va.height), seed=seed + 1, shuffle=True))


def fold_of(clusters: Any, k: int) -> Any:
    """Fold (0..k-1) of each row from a hash of its cluster: every row of a conversation (and both copies of a
    Deal-or-No-Deal dialogue) lands in one fold, and the folds do not depend on row order or seed."""
    import numpy as np

    h = {c: int.from_bytes(hashlib.sha256(str(c).encode()).digest()[:8], "big") for c in set(clusters)}
    return np.array([h[c] * k >> 64 for c in clusters], dtype=np.int64)


def cross_fit(df: Any, k: int, n_train: int, n_val: int, seed: int, eval_rows: int,
              fit: Any, extra: Any = None, folds: Any = None) -> tuple[Any, Any, dict[str, Any], list[dict[str, Any]]]:
    """Scores every held-out row of ``k`` folds with models trained on the other folds.

    ``fit(train, val)`` returns ``(q, base_preds, run)`` for one fold. The pooled rows come back with each
    fold's first ``eval_rows`` (the Trainer's selection rows) first, so ``quality(..., k * eval_rows)``
    reports the margin on the never-evaluated rest as for one split. ``extra`` rows join every fold's training set.
    ``folds`` (0..k-1 per row) replaces the hash of the cluster, e.g. one fold per corpus file.
    """
    import numpy as np
    import polars as pl

    df = df.with_columns(pl.Series("fold", fold_of(df["cluster"].to_list(), k) if folds is None else folds))
    parts, runs = [], []
    for f in range(k):
        tr, va = sample(df.with_columns(pl.when(pl.col("fold") == f).then(pl.lit("validation")).otherwise(pl.lit("train"))
                                        .alias("split")), n_train, n_val, seed)
        if va.height <= eval_rows or len(set(va["outcome"].to_list())) < 2:
            hint = "use fewer folds" if folds is None else "fold = file: check that file's rows and outcomes"
            raise SystemExit(f"fold {f} of {k} holds {va.height} rows ({va['cluster'].n_unique()} conversations), "
                             f"too few past --eval-rows {eval_rows} or one outcome only; {hint}")
        q, base_preds, run = fit(with_extra(tr, extra, seed), va)
        parts.append((va, q, base_preds))
        runs.append(run)

    def pooled(per_fold: list[Any]) -> Any:  # the folds' selection rows first, then the rest
        items = [x[:eval_rows] for x in per_fold] + [x[eval_rows:] for x in per_fold]
        return pl.concat(items) if isinstance(items[0], pl.DataFrame) else np.concatenate(items)

    val = pooled([va for va, _, _ in parts])
    q = pooled([q for _, q, _ in parts])
    base_preds = {name: pooled([b[name] for _, _, b in parts]) for name in parts[0][2]}
    return val, q, base_preds, runs


def combine_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One record for the K fold runs of a cross-fit: rows and tokens summed, throughput over the summed time."""
    import numpy as np

    out = {k: v for k, v in runs[0].items() if k in ("bf16", "non_embedding_params", "layers", "hidden", "flops_per_token_6n")}
    for key in ("train_tokens", "step_seconds", "train_wall_seconds", "score_seconds", "init_seconds", "val_rows"):
        out[key] = sum(r[key] for r in runs)
    out["train_rows"] = int(round(np.mean([r["train_rows"] for r in runs])))  # per fold
    out["epochs"] = max(r["epochs"] for r in runs)
    out["tokens_per_second"] = out["train_tokens"] / out["step_seconds"] if out["step_seconds"] else None
    out["score_tokens_per_second"] = float(np.mean([r["score_tokens_per_second"] for r in runs]))
    out["mean_tokens_per_row"] = float(np.mean([r["mean_tokens_per_row"] for r in runs]))
    out["flops_per_token_exec"] = float(np.mean([r["flops_per_token_exec"] for r in runs]))
    out["kept"] = ", ".join(r["kept"] for r in runs)
    out["folds"] = [{k: v for k, v in r.items() if k != "q"} for r in runs]
    return out


# ------------------------------------------------------------------------------------------------
# Baselines and statistics
# ------------------------------------------------------------------------------------------------


def tfidf_baseline(train: Any, val: Any) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    def text(df):
        return [f"{s} ||| {a}" for s, a in zip(df["state_text"].to_list(), df["action_text"].to_list())]

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x = vec.fit_transform(text(train))
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(x, train["outcome"].to_numpy())
    return clf.predict_proba(vec.transform(text(val)))[:, 1]


def turn_rate_baseline(train: Any, val: Any) -> Any:
    import numpy as np

    y, t = train["outcome"].to_numpy(), train["turn_index"].to_numpy()
    rates = {int(k): float(y[t == k].mean()) for k in np.unique(t)}
    return np.array([rates.get(int(k), float(y.mean())) for k in val["turn_index"].to_numpy()])


def auc(y: Any, p: Any) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


def auc_by_ranks(y: Any, p: Any) -> float:
    """ROC-AUC of 0/1 labels as the Mann-Whitney U statistic (tied scores count half), which is what
    ``roc_auc_score`` returns, without its input checks: the bootstrap below calls it thousands of times, and those
    checks were 85% of a bench's wall time."""
    import numpy as np
    from scipy.stats import rankdata

    pos = np.asarray(y) == 1
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    return float((rankdata(p)[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def paired_auc_diff_ci(y: Any, a: Any, b: Any, clusters: Any = None, n_boot: int = 1000,
                       seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap CI of AUC(a) - AUC(b) on the same rows (0/1 labels).

    With ``clusters`` (one label per row) whole clusters are resampled: the turns of one conversation share
    its outcome, so resampling rows would treat them as independent evidence and give too narrow a CI.
    """
    import numpy as np

    y, a, b = np.asarray(y), np.asarray(a), np.asarray(b)
    if not set(np.unique(y).tolist()) <= {0, 1}:
        raise ValueError(f"paired_auc_diff_ci: labels {sorted(set(np.unique(y).tolist()))[:5]}: 0/1 expected")
    rng = np.random.default_rng(seed)
    if clusters is None:
        groups = [np.array([i]) for i in range(len(y))]
    else:
        _, inverse = np.unique(np.asarray(clusters), return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)
    diffs = []
    for _ in range(n_boot):
        i = np.concatenate([groups[k] for k in rng.integers(0, len(groups), len(groups))])
        if 0 < y[i].sum() < len(i):  # both classes drawn
            diffs.append(auc_by_ranks(y[i], a[i]) - auc_by_ranks(y[i], b[i]))
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


# ------------------------------------------------------------------------------------------------
# Compute
# ------------------------------------------------------------------------------------------------


class StepTimer:
    """A TrainerCallback summing the wall time of optimisation steps only (on a GPU, synchronised at both
    ends, so a step's queued kernels count in its own time and not in the evaluation's)."""

    def __new__(cls):
        import torch
        from transformers import TrainerCallback

        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        class _Timer(TrainerCallback):
            seconds = 0.0
            _t = 0.0

            def on_step_begin(self, args, state, control, **kw):
                sync()
                self._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                sync()
                self.seconds += time.perf_counter() - self._t

        return _Timer()


def flop_counts(model: Any) -> dict[str, int]:
    import torch

    clf = model.get_base_model()
    n = sum(m.weight.numel() for name, m in clf.named_modules()
            if isinstance(m, torch.nn.Linear) and "lora_" not in name and "modules_to_save" not in name)
    cfg = clf.config
    return {"non_embedding_params": int(n), "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size}


def train_and_score(params: Any, base: Path, tokenizer: Any, train: Any, val: Any, bf16: bool, eval_rows: int,
                    epochs: int) -> dict[str, Any]:
    """fit_q's model and trainer on ``train``; Q of ``val`` from the trained (fp32) weights; timing."""
    import numpy as np
    import torch

    from pipeline_steps import fit_q
    from pipeline_steps.common.q_model import encode, score_ids

    fq = params.fit_q.model_copy(update={"bf16": bf16, "epochs": epochs})
    pad = tokenizer.pad_token_id

    def enc(df):
        return [encode(tokenizer, s, a, fq.max_action_tokens) for s, a in zip(df["state_text"].to_list(), df["action_text"].to_list())]

    tr_ids, va_ids = enc(train), enc(val)
    t_init = time.perf_counter()
    model, init = fit_q.build_q_model(base, fq, pad, probe=(tr_ids, train["G"].to_numpy()), progress=True)
    init_s = time.perf_counter() - t_init
    counts = flop_counts(model)
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="bench_fit_q.") as work:
        t0 = time.perf_counter()
        run = fit_q.train_q(model, fit_q._Rows(tr_ids, train["G"].to_numpy()),  # epochs 0: the probe alone
                            fit_q._Rows(va_ids[:eval_rows], val["G"].to_numpy()[:eval_rows]),
                            fq, pad, Path(work), progress=True, callbacks=[timer])
        wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    q = score_ids(model, va_ids, pad, fq.eval_batch_size)
    score_s = time.perf_counter() - t1
    tokens = sum(map(len, tr_ids)) * run["epochs_run"]
    mean_len = float(np.mean([len(x) for x in tr_ids]))
    n, L, d = counts["non_embedding_params"], counts["layers"], counts["hidden"]
    attn_fwd = 4 * L * d * mean_len
    return {
        "q": q, "bf16": bf16, "init": init, "init_seconds": init_s, "train_rows": len(tr_ids), "val_rows": len(va_ids), "epochs": run["epochs_run"],
        "train_tokens": tokens, "step_seconds": timer.seconds, "train_wall_seconds": wall, "score_seconds": score_s,
        "score_tokens_per_second": sum(map(len, va_ids)) / score_s,
        "tokens_per_second": tokens / timer.seconds if timer.seconds else None, "mean_tokens_per_row": mean_len,
        "flops_per_token_6n": 6 * n, "flops_per_token_exec": 2 * (2 * n + attn_fwd), **counts,
        "learning_curve": fit_q.learning_curve(run["log_history"]),
        "kept": "probe (epoch 0)" if run["kept_initial"] else f"epoch {min((r for r in fit_q.learning_curve(run['log_history']) if r['eval_loss'] is not None), key=lambda r: r['eval_loss'])['epoch']}",
    }


def quality(y: Any, g: Any, q: Any, base_preds: dict[str, Any], selection_rows: int = 0,
            clusters: Any = None) -> dict[str, Any]:
    """Held-out quality of Q against the baselines on every validation row, and on the rows past the first
    ``selection_rows`` (those the Trainer evaluated to keep the best weights: the ``*_unselected`` keys
    are free of that selection). Margin CIs resample ``clusters`` (conversations); ``*_ci95_rows`` resample
    rows, as runs before the cluster bootstrap did."""
    import numpy as np
    from scipy.stats import spearmanr

    out = {"auc_q": auc(y, q), "spearman_q_g": float(spearmanr(q, g).statistic), "mse_q_g": float(np.mean((q - g) ** 2)),
           "q_error_p90": float(np.percentile(np.abs(q - g), 90)), "outcome_rate": float(y.mean())}
    for name, p in base_preds.items():
        out[f"auc_{name}"] = auc(y, p)
    best = max(base_preds, key=lambda k: out[f"auc_{k}"])
    out["best_baseline"] = best
    out["auc_margin"] = out["auc_q"] - out[f"auc_{best}"]
    out["auc_margin_ci95"] = paired_auc_diff_ci(y, q, base_preds[best], clusters)
    out["auc_margin_ci95_rows"] = paired_auc_diff_ci(y, q, base_preds[best])
    if clusters is not None:
        out["clusters"] = int(len(set(np.asarray(clusters).tolist())))
    rest = slice(selection_rows, None)
    if selection_rows and len(set(y[rest].tolist())) == 2:
        out["unselected_rows"] = int(len(y[rest]))
        out["auc_q_unselected"] = auc(y[rest], q[rest])
        best_rest = max(base_preds, key=lambda k: auc(y[rest], base_preds[k][rest]))
        out["auc_margin_unselected"] = out["auc_q_unselected"] - auc(y[rest], base_preds[best_rest][rest])
        out["auc_margin_unselected_ci95"] = paired_auc_diff_ci(
            y[rest], q[rest], base_preds[best_rest][rest], None if clusters is None else np.asarray(clusters)[rest])
    return out


def prediction_rows(task: str, val: Any, q: Any, base_preds: dict[str, Any]) -> Any:
    """Every scored validation row with its outcome, G, cluster and each model's score, so the statistics
    can be recomputed (another CI, another baseline) without training Q again."""
    import polars as pl

    return pl.DataFrame({"task": [task] * val.height, "row": list(range(val.height)),
                         "conversation_id": val["conversation_id"], "cluster": val["cluster"],
                         "turn_index": val["turn_index"], "outcome": val["outcome"], "G": val["G"],
                         "fold": val["fold"] if "fold" in val.columns else [None] * val.height,
                         "q": q, **{name: p for name, p in base_preds.items()}})


# ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--base-model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads; 0 = auto: 1 when the load average says the cores are shared, else torch's default")
    ap.add_argument("--max-prompt-tokens", type=int, default=256, help="state budget for both tasks (CPU time)")
    ap.add_argument("--dnd-train-rows", type=int, default=160)
    ap.add_argument("--dnd-val-rows", type=int, default=128)
    ap.add_argument("--dnd-state", choices=("dialogue", "dialogue+input"), default="dialogue",
                    help="Deal-or-No-Deal state: the dialogue, or also YOU's items and values in the system prompt")
    ap.add_argument("--dnd-extra-train", action="append", default=[], metavar="FILE",
                    help="a further Deal-or-No-Deal file (e.g. the corpus's test.txt) whose rows join every training "
                         "set and are never held out; repeatable. Dialogues also in the main file are dropped")
    ap.add_argument("--dnd-hold-out-all", action="store_true",
                    help="with --dnd-extra-train: train on the extra files' rows only and hold out every row of the "
                         "main file (the corpus's own split, e.g. train on test.txt, score every val.txt dialogue)")
    ap.add_argument("--dnd-folds-by-file", action="store_true",
                    help="with --dnd-extra-train: the files are the folds; each file's rows are scored by a Q trained "
                         "on the other files, pooled (the corpus's own split in both directions, in one run)")
    ap.add_argument("--world-per-strategy", type=int, default=40, help="conversations per scripted strategy")
    ap.add_argument("--world-logs", default=None,
                    help="conversation logs of the world to use instead of the scripted mix, e.g. the folder "
                         "`python -m pipeline_steps.collect --policy explore --out DIR` wrote")
    ap.add_argument("--world-train-rows", type=int, default=112)
    ap.add_argument("--world-val-rows", type=int, default=96)
    ap.add_argument("--eval-rows", type=int, default=24, help="validation rows the Trainer evaluates per epoch")
    ap.add_argument("--epochs", type=int, default=1, help="LoRA epochs of the quality runs (early stopping may end sooner); "
                    "0 = fit_q's probe head alone (fit_q.epochs: 0), forward passes only")
    ap.add_argument("--throughput-rows", type=int, default=160,
                    help="Deal-or-No-Deal train rows of the fp32-vs-bf16 runs (the first of the --dnd-train-rows sample)")
    ap.add_argument("--throughput-epochs", type=int, default=1)
    ap.add_argument("--lora-top-layers", type=int, default=None, help="fit_q.lora_top_layers (default: every layer)")
    ap.add_argument("--learning-rate", type=float, default=3e-4, help="fit_q.learning_rate's default")
    ap.add_argument("--batch-size", type=int, default=8,
                    help="fit_q.batch_size of every run (8 on CPU, where the learning rates were tuned; more fills a GPU)")
    ap.add_argument("--precision", choices=("measure", "fp32", "bf16"), default="measure",
                    help="measure: the fp32-vs-bf16 runs pick it (step 1); fp32/bf16: skip them (sweeps)")
    ap.add_argument("--tasks", default="dnd,world", help="comma-separated: dnd, world (sweeps may skip the world)")
    ap.add_argument("--folds", type=int, default=0,
                    help="cross-fit K folds of conversations: every conversation held out once (needs --precision fp32|bf16)")
    ap.add_argument("--gamma", type=float, default=None,
                    help="returns.gamma for both tasks (default: params.yaml's); near 1, G is the outcome itself")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/bench_fit_q.json")
    args = ap.parse_args()
    wanted = {t.strip() for t in args.tasks.split(",") if t.strip()}
    if not wanted or wanted - {"dnd", "world"}:
        ap.error(f"--tasks {args.tasks!r}: choose from dnd, world")
    if args.folds == 1 or args.folds < 0:
        ap.error(f"--folds {args.folds}: 0 (one split) or at least 2")
    if args.epochs < 0:
        ap.error(f"--epochs {args.epochs}: 0 (the probe alone) or more")
    if args.epochs == 0 and args.precision == "measure":
        ap.error("--epochs 0 trains nothing, so there is no precision to measure: give --precision fp32 or bf16")
    if args.folds and args.precision == "measure":
        ap.error("--folds trains K models per task: fix the precision with --precision fp32 or bf16")
    if args.dnd_hold_out_all and (not args.dnd_extra_train or args.folds or args.precision == "measure"):
        ap.error("--dnd-hold-out-all trains on --dnd-extra-train rows only: give --dnd-extra-train, no --folds, "
                 "and --precision fp32 or bf16")
    if (args.dnd_extra_train or args.dnd_hold_out_all or args.dnd_folds_by_file) and "dnd" not in wanted:
        ap.error("--dnd-extra-train, --dnd-hold-out-all and --dnd-folds-by-file apply to the dnd task: add it to --tasks")
    if args.dnd_folds_by_file and (not args.dnd_extra_train or args.folds or args.dnd_hold_out_all
                                   or args.precision == "measure"):
        ap.error("--dnd-folds-by-file makes the files the folds: give --dnd-extra-train, no --folds or "
                 "--dnd-hold-out-all, and --precision fp32 or bf16")

    import torch
    from rich.console import Console
    from rich.table import Table

    # Measured here: with other jobs on the 2 cores, 1 thread trains several times faster than 2.
    threads = args.threads or (1 if os.getloadavg()[0] > 1.5 else 0)
    if threads:
        torch.set_num_threads(threads)
    from pipeline_steps.common.base_model import bf16_autocast_pays, load_tokenizer, matmul_gflops, resolve_base_model
    from pipeline_steps.common.config import load_params

    t_start = time.perf_counter()
    params = load_params(args.params, {
        "base_model.name_or_path": args.base_model, "prompt.max_prompt_tokens": args.max_prompt_tokens,
        "returns.validation_fraction": 0.3, "fit_q.epochs": args.epochs, "fit_q.learning_rate": args.learning_rate,
        "fit_q.batch_size": args.batch_size, "fit_q.gradient_accumulation_steps": 1, "fit_q.warmup": 0.1, "fit_q.seed": args.seed,
        "fit_q.data_seed": args.seed, "fit_q.lora_top_layers": args.lora_top_layers,
        **({"returns.gamma": args.gamma} if args.gamma is not None else {}),
    })
    base = Path(resolve_base_model(params.base_model.name_or_path, params.base_model.cache_dir))
    tokenizer = load_tokenizer(base)
    console = Console(width=180)
    # The peak on the device the Trainer trains on (CUDA when there is one), at a size that fills it.
    device, n = ("cuda", 8192) if torch.cuda.is_available() else ("cpu", 1024)
    peak = {p: matmul_gflops(dt, n, device=device) for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    auto_bf16 = bf16_autocast_pays("auto")  # what fit_q.bf16: auto resolves to on this machine
    console.print(f"{gpu or 'CPU'}, threads {torch.get_num_threads()}, matmul peak fp32 {peak['fp32']:.0f} GFLOP/s, "
                  f"bf16 {peak['bf16']:.0f} GFLOP/s; fit_q.bf16 auto -> {str(auto_bf16).lower()}; "
                  f"load {os.getloadavg()[0]:.1f}")

    tasks: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    preds: list[Any] = []
    if "dnd" in wanted or args.precision == "measure":  # the precision runs are on Deal-or-No-Deal rows
        dnd, dnd_info = dnd_returns(params, tokenizer, 0.3, with_input=args.dnd_state == "dialogue+input")
        dnd_keys = dnd_info.pop("keys")
        dnd_info["state"] = args.dnd_state
    dnd_extra = None
    if args.dnd_extra_train and "dnd" in wanted:
        dnd_extra, dnd_info["extra_train"] = dnd_extra_train(params, tokenizer, args.dnd_extra_train, dnd_keys,
                                                             with_input=args.dnd_state == "dialogue+input")
        console.print(f"extra Deal-or-No-Deal training rows: {dnd_info['extra_train']['rows']} from "
                      + ", ".join(f"{f['file']} ({f['dialogues']} dialogues, {f['dialogues_dropped_as_in_the_main_file']} "
                                  "dropped as in the main file)" for f in dnd_info["extra_train"]["files"]))

    # 1. Precision: fp32 against bf16 autocast on the first --throughput-rows train rows (same rows, seed, budget).
    speedup = quality_cost = fp32 = bf16_run = None
    if args.precision == "measure":
        tr, va = sample(dnd, args.dnd_train_rows, args.dnd_val_rows, args.seed)  # the rows quality_run draws too
        y, g, clusters = va["outcome"].to_numpy(), va["G"].to_numpy(), va["cluster"].to_numpy()
        small = tr.head(args.throughput_rows)
        small_preds = {"tfidf_lr": tfidf_baseline(small, va), "turn_rate": turn_rate_baseline(small, va)}
        for bf16 in (False, True):
            name = f"dnd_{'bf16' if bf16 else 'fp32'}_{small.height}"
            runs[name] = train_and_score(params, base, tokenizer, small, va, bf16, args.eval_rows, args.throughput_epochs)
            tasks[name] = quality(y, g, runs[name]["q"], small_preds, args.eval_rows, clusters) | {"rows_total": dnd.height, **dnd_info}
            preds.append(prediction_rows(name, va, runs[name]["q"], small_preds))
            console.print(f"{name}: {tasks[name]['auc_q']:.3f} AUC, {runs[name]['tokens_per_second']:.0f} tok/s "
                          f"({time.perf_counter() - t_start:.0f}s elapsed)")
        fp32, bf16_run = (f"dnd_{p}_{small.height}" for p in ("fp32", "bf16"))
        speedup = runs[bf16_run]["tokens_per_second"] / runs[fp32]["tokens_per_second"]
        quality_cost = tasks[fp32]["mse_q_g"] and (tasks[bf16_run]["mse_q_g"] / tasks[fp32]["mse_q_g"] - 1)
        use_bf16 = speedup > 1.1 and quality_cost < 0.05 and tasks[bf16_run]["auc_q"] >= tasks[fp32]["auc_q"] - 0.02
        measured_all = small.height == tr.height and args.throughput_epochs == args.epochs and dnd_extra is None
    else:
        use_bf16, measured_all = args.precision == "bf16", False
    prec = "bf16" if use_bf16 else "fp32"

    def fit(tr: Any, va: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        base_preds = {"tfidf_lr": tfidf_baseline(tr, va), "turn_rate": turn_rate_baseline(tr, va)}
        run = train_and_score(params, base, tokenizer, tr, va, use_bf16, args.eval_rows, args.epochs)
        y_va = va["outcome"].to_numpy()
        run["held_out_auc"] = {"q": auc(y_va, run["q"]), **{k: auc(y_va, p) for k, p in base_preds.items()}}
        console.print(f"  {tr.height} train / {va.height} held-out rows: AUC Q {run['held_out_auc']['q']:.3f}, TF-IDF "
                      f"{run['held_out_auc']['tfidf_lr']:.3f} ({time.perf_counter() - t_start:.0f}s elapsed)")
        return run["q"], base_preds, run

    def quality_run(task: str, df: Any, info: dict[str, Any], n_train: int, n_val: int, extra: Any = None) -> None:
        """Q and the baselines on one split of ``df``, or cross-fitted over ``--folds`` folds; ``extra`` rows
        join every training set."""
        plus = f"_plus{extra.height}" if extra is not None else ""
        if args.folds:
            va, q, base_preds, fold_runs = cross_fit(df, args.folds, n_train, n_val, args.seed, args.eval_rows, fit, extra)
            name, run = f"{task}_{prec}_cv{args.folds}{plus}", combine_runs(fold_runs)
        elif extra is not None and args.dnd_folds_by_file:  # fold i = file i (0: the main file)
            import polars as pl

            df = pl.concat([df.with_columns(pl.lit(0).alias("source_file")), extra], how="diagonal_relaxed")
            k = df["source_file"].max() + 1
            va, q, base_preds, fold_runs = cross_fit(df, k, n_train, n_val, args.seed, args.eval_rows, fit,
                                                     folds=df["source_file"].to_list())
            name, run = f"{task}_{prec}_by_file{k}", combine_runs(fold_runs)
        elif extra is not None and args.dnd_hold_out_all:  # every main-file row held out, the extra rows train
            import polars as pl

            # One fold: every row held out by the one model (so ensemble/compare scripts take it as cross-fitted).
            va = df.with_columns(pl.lit("validation").alias("split"), pl.lit(0).alias("fold")).sample(
                min(n_val, df.height), seed=args.seed + 1, shuffle=True)
            q, base_preds, run = fit(extra.sample(fraction=1.0, seed=args.seed + 2, shuffle=True), va)
            name = f"{task}_{prec}_extra{extra.height}_all_held_out"
        else:
            tr, va = sample(df, n_train, n_val, args.seed)
            q, base_preds, run = fit(with_extra(tr, extra, args.seed), va)
            name = f"{task}_{prec}_{tr.height}{plus}"
        runs[name] = run
        n_folds = va["fold"].n_unique() if "fold" in va.columns else 1
        tasks[name] = quality(va["outcome"].to_numpy(), va["G"].to_numpy(), q, base_preds,
                              args.eval_rows * n_folds, va["cluster"].to_numpy()) | {"rows_total": df.height, **info}
        preds.append(prediction_rows(name, va, q, base_preds))
        console.print(f"{name}: {tasks[name]['auc_q']:.3f} AUC ({time.perf_counter() - t_start:.0f}s elapsed)")

    # 2. Deal-or-No-Deal at the full --dnd-train-rows and --epochs, with the faster precision that costs no quality.
    if "dnd" in wanted and not measured_all:
        quality_run("dnd", dnd, dnd_info, args.dnd_train_rows, args.dnd_val_rows, dnd_extra)

    # 3. World logs with the same precision and epochs.
    if "world" in wanted:
        world, world_info = (world_log_returns(params, tokenizer, args.world_logs) if args.world_logs
                             else world_returns(params, tokenizer, args.world_per_strategy))
        quality_run("world", world, world_info, args.world_train_rows, args.world_val_rows)

    # Tables.
    qt = Table(title="fit_q held-out quality (ROC-AUC of the final outcome; target: Q >= best baseline + 0.05)")
    for col in ("task", "train/val rows", "epochs", "outcome rate", "AUC Q", "AUC TF-IDF+LR", "AUC turn-rate",
                "Q - best [95% CI] (conversations)", "row CI", "Q - best, unselected rows", "Spearman(Q,G)", "MSE(Q,G)", "p90 |Q-G|",
                "kept weights"):
        qt.add_column(col, justify="right")
    for name, m in tasks.items():
        lo, hi = m["auc_margin_ci95"]
        unsel = (f"{m['auc_margin_unselected']:+.3f} (n={m['unselected_rows']})" if "auc_margin_unselected" in m else "-")
        qt.add_row(name, f"{runs[name]['train_rows']}/{runs[name]['val_rows']}", f"{runs[name]['epochs']:.0f}",
                   f"{m['outcome_rate']:.2f}",
                   f"{m['auc_q']:.3f}", f"{m['auc_tfidf_lr']:.3f}", f"{m['auc_turn_rate']:.3f}",
                   f"{m['auc_margin']:+.3f} [{lo:+.3f}, {hi:+.3f}] ({m.get('clusters', '-')})",
                   "[{:+.3f}, {:+.3f}]".format(*m["auc_margin_ci95_rows"]), unsel, f"{m['spearman_q_g']:.3f}",
                   f"{m['mse_q_g']:.4f}", f"{m['q_error_p90']:.3f}", runs[name]["kept"])
    console.print(qt)
    tt = Table(title=f"fit_q training throughput ({gpu or f'{torch.get_num_threads()} CPU threads'}, batch {args.batch_size}, "
                     "real tokens over timed optimiser steps)")
    for col in ("run", "precision", "tokens/row", "train tok/s", "MFU 6N", "MFU exec", "matmul peak GFLOP/s", "score tok/s"):
        tt.add_column(col, justify="right")
    for name, r in runs.items():
        prec = "bf16" if r["bf16"] else "fp32"
        p = peak[prec] * 1e9
        if r["tokens_per_second"] is None:  # --epochs 0: nothing was trained, only the probe's forward passes
            r["mfu_6n"] = r["mfu_exec"] = None
            tt.add_row(name, prec, f"{r['mean_tokens_per_row']:.0f}", "-", "-", "-", f"{peak[prec]:.0f}",
                       f"{r['score_tokens_per_second']:.0f}")
            continue
        r["mfu_6n"] = r["tokens_per_second"] * r["flops_per_token_6n"] / p
        r["mfu_exec"] = r["tokens_per_second"] * r["flops_per_token_exec"] / p
        tt.add_row(name, prec, f"{r['mean_tokens_per_row']:.0f}", f"{r['tokens_per_second']:.0f}", f"{r['mfu_6n']:.1%}",
                   f"{r['mfu_exec']:.1%}", f"{peak[prec]:.0f}", f"{r['score_tokens_per_second']:.0f}")
    console.print(tt)
    if speedup is not None:
        console.print(f"bf16 / fp32 training speed: {speedup:.2f}x; held-out MSE change with bf16: {quality_cost:+.1%}; "
                      f"AUC fp32 {tasks[fp32]['auc_q']:.3f} vs bf16 {tasks[bf16_run]['auc_q']:.3f} -> "
                      f"recommended fit_q.bf16: {str(use_bf16).lower()} ('auto' resolves to {str(auto_bf16).lower()} here)")
    total = time.perf_counter() - t_start
    maxrss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    console.print(f"total {total:.0f}s, peak RSS {maxrss_gb:.1f} GiB")

    out = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": gpu,
                    "torch": torch.__version__, "loadavg_end": os.getloadavg(), "maxrss_gib": maxrss_gb},
        "args": vars(args), "returns_gamma": params.returns.gamma, "matmul_peak_gflops": peak, "tasks": tasks,
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "q"} for k, v in runs.items()},
        "bf16_speedup": speedup, "bf16_mse_change": quality_cost,
        "recommended_bf16": use_bf16 if args.precision == "measure" else None,
        "auto_bf16": auto_bf16, "seconds": total,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=float) + "\n")
    rows_path = Path(args.out).with_suffix(".rows.parquet")
    if preds:
        import polars as pl

        pl.concat(preds, how="diagonal_relaxed").write_parquet(rows_path)
    console.print(f"wrote {args.out}" + (f" and the scored rows to {rows_path}" if preds else ""))


if __name__ == "__main__":
    main()
