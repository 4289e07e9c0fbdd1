"""fit_q: fit Q(s, a) ~ G on the returns rows (paper Observation 2; Algorithm 1, step 5).

    python -m pipeline_steps.fit_q --params params.yaml --input data/returns/returns.parquet \\
        --out data/fit_q/model --metrics metrics/fit_q.json --plots plots/fit_q
    python -m pipeline_steps.fit_q --base-model tiny-random --epochs 1 --no-mlflow   # a smoke run

SingleTurnFitReward with a scalar regression target: the base causal LM as a sequence classifier with one
output (``num_labels=1``), LoRA on every linear layer of the backbone and the ``score`` head trained in full,
regressing the Monte-Carlo return ``G`` of each logged ``(state, action)`` with a mean-squared error.

* **Input** = :func:`pipeline_steps.common.q_model.encode`: the rendered state followed by the action
  tokens (at most ``fit_q.max_action_tokens``), read the way TRL's PPOTrainer reads its reward model
  (:func:`pipeline_steps.common.q_model.q_forward`). PPO therefore optimises exactly the Q learned here.
* **Loss**: MSE on the raw head output. ``G`` lies in [0, 1] (0/1 rewards, discounted); a BCE loss would
  make the head a logit, and PPO would then be rewarded on the logit scale -- unbounded and stretched near
  0 and 1 -- instead of in units of expected discounted conversions, which is what Theorem 2's ``eps_Q``
  and the offline gate's ``q_error_p90`` are measured in. MSE's minimiser is E[G | s, a] = Q^pi(s, a).
  Measured on 1,024 Deal-or-No-Deal rows, BCE with a sigmoid link (Q = sigmoid(z)) fits G a little better
  (Spearman 0.661 vs 0.619) but ranks the final outcome no better (ROC-AUC 0.774 vs 0.789).
* **Training**: ``transformers.Trainer`` (TRL's RewardTrainer is pairwise only), gradient accumulation,
  evaluation every epoch on the ``validation`` split, early stopping with the best epoch restored, seeded
  (``fit_q.seed``, ``fit_q.data_seed``), optional bf16 autocast (``fit_q.bf16``). The Trainer reports to
  nothing; this step logs params, metrics, plots and the scorer to its own MLflow run ``fit_q``.
* **Outputs** (written into temp folders, renamed into place only when everything succeeded):
  ``<out>/adapter`` (the LoRA adapter, peft format), ``<out>/scorer`` (the merged model and tokenizer,
  loadable by ``AutoModelForSequenceClassification.from_pretrained``: PPO's ``reward_model`` and the
  initial value model), the held-out metrics JSON (MSE, Spearman with G, ROC-AUC of the final outcome,
  ``q_error_p90``/``q_error_mean`` = 90th percentile / mean of |Q - G| for the offline gate) and, under
  ``--plots``, ``calibration.png``/``calibration.csv`` (binned mean Q against mean G) and
  ``learning_curve.csv``/``.png`` (train and validation loss per epoch).

Bad input stops the step before any training, naming the file and the rule: an empty file, missing
columns, G outside [0, 1], no train or no validation rows, train G without variance, a returns file
rendered for another tokenizer or prompt version, a missing base model.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_steps.common.base_model import bf16_autocast_pays, sdpa_without_cudnn, to_gpu_if_any
from pipeline_steps.common.config import ConfigError, FitQParams, Params, load_params
from pipeline_steps.common.tracking import flat_metrics, step_run, write_json

STEP = "fit_q"
MANIFEST_FORMAT = "1"
REQUIRED_COLUMNS = ("state_text", "action_text", "G", "outcome", "conversation_id", "turn_index", "split")


class FitQError(ValueError):
    """Input the step cannot train on; the message names the file (or record) and the rule."""

    def __init__(self, where: str, rule: str, detail: str):
        self.where, self.rule, self.detail = where, rule, detail
        super().__init__(f"{where}: rule '{rule}' violated: {detail}")


# ------------------------------------------------------------------------------------------------
# Input checks (all before any model is loaded)
# ------------------------------------------------------------------------------------------------


def read_returns(path: str | Path) -> pa.Table:
    """The returns table, or a :class:`FitQError` naming the file."""
    try:
        return pq.read_table(str(path))
    except (OSError, pa.ArrowInvalid) as exc:
        raise FitQError(str(path), "parquet_readable", str(exc)) from exc


def check_rows(table: pa.Table, where: str) -> None:
    """Schema, target range and split rules of a returns table (not its metadata)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise FitQError(where, "schema", f"missing columns {missing} (expected the returns step's output)")
    if table.num_rows == 0:
        raise FitQError(where, "non_empty", "no rows: nothing to fit")
    g = table.column("G").to_numpy(zero_copy_only=False).astype(float)
    bad = np.flatnonzero(~np.isfinite(g) | (g < 0) | (g > 1))
    if bad.size:
        i = int(bad[0])
        raise FitQError(
            f"{where}: conversation {table.column('conversation_id')[i]} turn {table.column('turn_index')[i]}",
            "G_in_unit_interval", f"G = {g[i]!r}; returns of 0/1 rewards lie in [0, 1]",
        )
    outcome = table.column("outcome").to_numpy(zero_copy_only=False)
    if not np.isin(outcome, (0, 1)).all():
        raise FitQError(where, "outcome_binary", f"outcome values {sorted(set(outcome.tolist()) - {0, 1})} are not 0/1")
    split = np.asarray(table.column("split").to_pylist(), dtype=object)
    unknown = sorted(set(split.tolist()) - {"train", "validation"})
    if unknown:
        raise FitQError(where, "split_valid", f"split values {unknown}; expected 'train' or 'validation'")
    if not (split == "train").any():
        raise FitQError(where, "train_rows", "no 'train' rows")
    if not (split == "validation").any():
        raise FitQError(
            where, "validation_rows",
            "no 'validation' rows: early stopping and the held-out Q error need some (raise returns.validation_fraction)",
        )


SENT_RELATIONS = ("verbatim", "edited")


def target_values(table: pa.Table, target: str) -> np.ndarray:
    """The regression target of every row: G (``return``) or the immediate sent-or-not reward (``sent``)."""
    if target == "sent":
        relation = np.asarray(table.column("relation").to_pylist(), dtype=object)
        return np.isin(relation, SENT_RELATIONS).astype(float)
    return table.column("G").to_numpy(zero_copy_only=False).astype(float)


def check_target_varies(g: np.ndarray, where: str) -> None:
    """A constant target (e.g. no conversation converted) teaches Q nothing; refuse it."""
    if g.size and float(np.ptp(g)) == 0.0:
        raise FitQError(
            where, "G_varies",
            f"every train row has G = {float(g[0])}: a single-class training set, nothing to regress "
            "(collect more conversations, or some that convert)",
        )


def check_returns_metadata(path: str | Path, params: Params, tokenizer: Any, system_prompt: str) -> dict[str, str]:
    """Refuse a returns file rendered with another tokenizer, prompt version or budget than ``params``."""
    from pipeline_steps.returns import compat_diffs, read_metadata, returns_metadata

    found = read_metadata(str(path))
    diffs = compat_diffs(found, returns_metadata(params, tokenizer, system_prompt), "params give")
    if diffs:
        raise FitQError(
            str(path), "returns_compatible",
            "a returns file from a different tokenizer/prompt version than the configured base model "
            f"({params.base_model.name_or_path}) and prompt ({params.prompt.version}, state notes "
            f"{params.prompt.state_notes}); re-run the returns step. "
            + "; ".join(diffs),
        )
    return found


def sample_train(n: int, max_rows: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded sample of at most ``max_rows`` of ``n`` rows (all of them, in order, when None)."""
    if max_rows is None or max_rows >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))


def split_indices(table: pa.Table, fq: FitQParams, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the (sampled) train rows and of the validation rows; refuses a constant train target."""
    split = np.asarray(table.column("split").to_pylist(), dtype=object)
    train_idx = np.flatnonzero(split == "train")
    train_idx = train_idx[sample_train(len(train_idx), fq.max_train_rows, fq.data_seed)]
    check_target_varies(target_values(table, fq.target)[train_idx], where)
    return train_idx, np.flatnonzero(split == "validation")


# ------------------------------------------------------------------------------------------------
# Model and training
# ------------------------------------------------------------------------------------------------


def backbone_linear_names(model: Any) -> list[str]:
    """Suffixes of every ``nn.Linear`` in the backbone (q/k/v/o and MLP projections for Llama); not the head."""
    import torch

    backbone = getattr(model, model.base_model_prefix)
    return sorted({name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if isinstance(m, torch.nn.Linear)})


def probe_head(model: Any, seqs: Sequence[list[int]], g: np.ndarray, pad_token_id: int, fq: FitQParams,
               progress: bool = False) -> dict[str, Any]:
    """Set the head to a linear probe: ridge regression of G on the frozen model's last-token states.

    LP-FT (Kumar et al. 2022, "Fine-tuning can distort pretrained features"): fine-tuning starts from the best
    linear read-out of the pretrained features instead of a random or zero head. No intercept (the head has
    no bias; the states share a large common component that plays its part); the ridge penalty is chosen by
    efficient leave-one-out CV. Measured on Deal-or-No-Deal (128 train rows): the probe alone reaches held-out
    AUC 0.73 against 0.57 for one epoch of LoRA training from a zero head, at a third of the compute.
    """
    import torch
    from sklearn.linear_model import RidgeCV

    from pipeline_steps.common.q_model import hidden_ids

    take = sample_train(len(seqs), fq.probe_init_rows, fq.data_seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast_pays(fq.bf16) and not torch.cuda.is_available()):
        feats = hidden_ids(model, [seqs[i] for i in take], pad_token_id, fq.eval_batch_size, progress)
    ridge = RidgeCV(alphas=np.logspace(-2, 5, 30), fit_intercept=False).fit(feats, g[take])
    with torch.no_grad():
        model.score.weight.copy_(torch.as_tensor(ridge.coef_, dtype=model.score.weight.dtype)[None, :])
    return {"probe_rows": int(len(take)), "probe_alpha": float(ridge.alpha_)}


def build_q_model(
    base_path: str | Path,
    fq: FitQParams,
    pad_token_id: int,
    probe: tuple[Sequence[list[int]], np.ndarray] | None = None,
    progress: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """The base LM as a 1-output sequence classifier with LoRA on the backbone and a fully trained head.

    The head starts as a linear probe fitted on ``probe`` = (encoded train rows, their G) when
    ``fit_q.probe_init_rows`` is not 0 (null: every row), else at zero. Returns the PEFT model and facts about the init.

    Weights are fp32 whatever ``base_model.dtype`` (the policies' load dtype): peft keeps LoRA in fp32 anyway, but
    the fully trained head would be bf16 (8 mantissa bits: steps below ~0.4% of a weight are lost) and the probe's
    features pure bf16. Mixed precision is ``fit_q.bf16``'s autocast over fp32 weights.
    """
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(fq.seed)  # LoRA's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base_path), num_labels=1, dtype=torch.float32, local_files_only=Path(base_path).is_dir()
    )
    model.config.pad_token_id = pad_token_id
    model.config.problem_type = "regression"
    to_gpu_if_any(model)  # the probe's forward passes too, not only the Trainer's steps
    # Never the random init: a random head times a last hidden state of norm ~46 (SmolLM2) starts Q at
    # +-1 and the first steps only undo it. Zero (Q = 0 everywhere) or, better, the linear probe.
    # Measured on Deal-or-No-Deal (192 rows, 1 epoch): zero head AUC 0.69 / MSE 0.15, random 0.63 / 0.21.
    torch.nn.init.zeros_(model.score.weight)
    info: dict[str, Any] = {"probe_rows": 0, "probe_alpha": None}
    if probe is not None and fq.probe_init_rows != 0 and len(probe[0]):
        info = probe_head(model, probe[0], np.asarray(probe[1], dtype=float), pad_token_id, fq, progress)
    n_layers = model.config.num_hidden_layers
    if fq.lora_top_layers is not None and fq.lora_top_layers > n_layers:
        raise ValueError(f"fit_q.lora_top_layers = {fq.lora_top_layers} but {base_path} has {n_layers} layers")
    top = None if fq.lora_top_layers is None else list(range(n_layers - fq.lora_top_layers, n_layers))
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=fq.lora_r, lora_alpha=fq.lora_alpha, lora_dropout=fq.lora_dropout,
        target_modules=backbone_linear_names(model), modules_to_save=["score"],
        layers_to_transform=top, layers_pattern=None if top is None else "layers",
    )
    return get_peft_model(model, lora), info


class _Rows:
    """A map-style dataset of encoded rows (what the Trainer's sampler and collator read)."""

    def __init__(self, ids: Sequence[list[int]], g: Sequence[float]):
        self.ids, self.g = list(ids), [float(x) for x in g]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.g[i]}


def _collator(pad_token_id: int):
    import torch

    from pipeline_steps.common.q_model import pad_right

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids, lengths = pad_right([b["input_ids"] for b in batch], pad_token_id)
        return {"input_ids": input_ids, "lengths": lengths, "labels": torch.tensor([b["labels"] for b in batch])}

    return collate


def _trainer_class():
    import torch.nn.functional as F
    from transformers import Trainer

    from pipeline_steps.common.q_model import q_forward

    class QTrainer(Trainer):
        """Trainer whose loss is MSE(Q, G) with Q read exactly as PPO reads its reward model."""

        pad_token_id: int = 0
        head_learning_rate: float | None = None

        def create_optimizer(self, model=None):
            """The Trainer's AdamW, with the head's weights in their own group at ``fit_q.head_learning_rate``.

            Adam moves each weight by about its learning rate, so one step moves Q by up to lr x sum|h| through the
            head (0.64 at 1e-3 for SmolLM2's last hidden states) but far less through LoRA: one rate for both lets
            the head chase each batch (benchmarks/fit_q_start_gradients.py). The schedule scales both groups alike.
            """
            opt = super().create_optimizer(model)
            if self.head_learning_rate is None:
                return opt
            head = {id(p) for n, p in (model or self.model).named_parameters() if p.requires_grad and "score" in n}
            for group in list(opt.param_groups):
                moved = [p for p in group["params"] if id(p) in head]
                if moved:
                    group["params"] = [p for p in group["params"] if id(p) not in head]
                    opt.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": moved,
                                         "lr": self.head_learning_rate})
            opt.param_groups[:] = [g for g in opt.param_groups if g["params"]]
            return opt

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # q_forward calls the backbone and head directly, bypassing the autocast accelerate wraps around
            # model.forward, so mixed precision (fit_q.bf16) is entered here.
            with self.accelerator.autocast():
                q = q_forward(model, inputs["input_ids"], inputs["lengths"], self.pad_token_id)
            loss = F.mse_loss(q, inputs["labels"].to(q.dtype))
            return (loss, {"q": q.detach()}) if return_outputs else loss

    return QTrainer


def train_q(
    model: Any,
    train: _Rows,
    validation: _Rows,
    fq: FitQParams,
    pad_token_id: int,
    work_dir: Path,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train with early stopping on the validation MSE; the best epoch's weights are loaded at the end.

    The validation loss of the initial weights is epoch 0; when no epoch beats it, the initial weights are
    restored (``kept_initial``). Returns the log history and timing (``train_runtime``, tokens). ``callbacks`` are extra
    ``TrainerCallback``s (the benchmark times the optimisation steps with one). ``fq.epochs`` 0 keeps the
    initial head (the linear probe) without building a Trainer: its validation loss is left for the caller to score.
    """
    if not fq.epochs:
        return {"log_history": [{"epoch": 0.0, "eval_loss": None}], "kept_initial": True, "train_runtime": 0.0,
                "train_tokens": 0, "epochs_run": 0.0, "best_checkpoint": None, "best_eval_loss": None}
    import torch
    from transformers import EarlyStoppingCallback, TrainingArguments

    args = TrainingArguments(
        use_cpu=not torch.cuda.is_available(),  # bf16 autocast on CPU needs it said explicitly
        output_dir=str(work_dir),
        num_train_epochs=fq.epochs,
        per_device_train_batch_size=fq.batch_size,
        per_device_eval_batch_size=fq.eval_batch_size,
        gradient_accumulation_steps=fq.gradient_accumulation_steps,
        learning_rate=fq.learning_rate,
        weight_decay=fq.weight_decay,
        warmup_steps=fq.warmup,
        max_grad_norm=fq.max_grad_norm,
        lr_scheduler_type="linear",
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        save_only_model=True,
        save_total_limit=2,  # the best and the latest
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        train_sampling_strategy="group_by_length",  # less padding: long and short rows not mixed
        seed=fq.seed,
        data_seed=fq.data_seed,
        bf16=bf16_autocast_pays(fq.bf16),
        report_to="none",
        label_names=["labels"],
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        disable_tqdm=not progress,
    )
    trainer_cls = _trainer_class()
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=_collator(pad_token_id),
        callbacks=[EarlyStoppingCallback(fq.early_stopping_patience, fq.early_stopping_threshold), *callbacks],
    )
    trainer.pad_token_id = pad_token_id
    trainer.head_learning_rate = fq.head_learning_rate
    trainer.model_accepts_loss_kwargs = False  # our loss is a per-micro-batch mean; the Trainer scales for accumulation
    # Epoch 0: the initial head (the linear probe). The Trainer only restores saved epochs, so if no epoch
    # beats the start we restore the initial weights ourselves: training never makes Q worse than its init.
    with sdpa_without_cudnn():  # a new padded length every step: no per-length cuDNN plans
        initial_loss = float(trainer.evaluate()["eval_loss"])
        initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        result = trainer.train()
    best = trainer.state.best_metric
    kept_initial = best is None or initial_loss <= best
    if kept_initial:
        import torch

        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in initial:
                    p.copy_(initial[n])
    epochs_run = float(trainer.state.epoch or 0.0)
    tokens = sum(len(x) for x in train.ids) * epochs_run
    return {
        "log_history": [{"epoch": 0.0, "eval_loss": initial_loss}, *trainer.state.log_history],
        "kept_initial": kept_initial,
        "train_runtime": float(result.metrics.get("train_runtime", 0.0)),
        "train_tokens": tokens,
        "epochs_run": epochs_run,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_eval_loss": initial_loss if kept_initial else best,
    }


def learning_curve(log_history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per epoch: the epoch's mean training loss and the validation loss after it (epoch 0 = the init)."""
    rows: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if "epoch" not in entry:
            continue
        epoch = int(round(entry["epoch"]))
        row = rows.setdefault(epoch, {"epoch": epoch, "train_loss": None, "eval_loss": None})
        if "loss" in entry:
            row["train_loss"] = float(entry["loss"])
        if entry.get("eval_loss") is not None:  # None: the probe alone, not scored yet
            row["eval_loss"] = float(entry["eval_loss"])
    return [rows[k] for k in sorted(rows)]


# ------------------------------------------------------------------------------------------------
# Held-out metrics and plots
# ------------------------------------------------------------------------------------------------


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def calibration_bins(q: np.ndarray, g: np.ndarray, bins: int) -> list[dict[str, float]]:
    """Equal-count bins of Q (robust to Q piling up near 0): mean Q, mean G and size of each."""
    order = np.argsort(q, kind="stable")
    out = []
    for idx in np.array_split(order, min(bins, len(q))):
        if idx.size:
            out.append({"bin": len(out), "mean_q": float(q[idx].mean()), "mean_g": float(g[idx].mean()), "n": int(idx.size)})
    return out


def heldout_metrics(q: np.ndarray, g: np.ndarray, outcome: np.ndarray, train_g_mean: float) -> dict[str, Any]:
    """MSE (and a constant-predictor baseline), Spearman with G, ROC-AUC of the final outcome, |Q - G| stats.

    ``q_error_p90`` is the held-out estimate of Theorem 2's ``eps_Q`` that the offline gate checks.
    Undefined statistics (a constant vector, a single outcome class) are ``None``.
    """
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    err = np.abs(q - g)
    mse = float(np.mean((q - g) ** 2))
    mse_base = float(np.mean((train_g_mean - g) ** 2))
    spearman = spearmanr(q, g).statistic if np.ptp(q) > 0 and np.ptp(g) > 0 else float("nan")
    auc = roc_auc_score(outcome, q) if len(set(outcome.tolist())) == 2 else float("nan")
    return {
        "mse": mse,
        "mse_constant_baseline": mse_base,
        "r2_vs_constant": _finite_or_none(1.0 - mse / mse_base) if mse_base > 0 else None,
        "spearman": _finite_or_none(float(spearman)),
        "roc_auc_outcome": _finite_or_none(float(auc)),
        "q_error_mean": float(err.mean()),
        "q_error_p90": float(np.percentile(err, 90)),
        "q_mean": float(q.mean()),
        "g_mean": float(g.mean()),
    }


def plot_calibration(bins: list[dict[str, float]], metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    mq = [b["mean_q"] for b in bins]
    mg = [b["mean_g"] for b in bins]
    lo, hi = min(0.0, *mq, *mg), max(1.0, *mq, *mg)
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    ax.plot(mq, mg, marker="o", label="held-out bins (equal count)")
    ax.set_xlabel("mean predicted Q")
    ax.set_ylabel("mean Monte-Carlo return G")
    auc = metrics.get("roc_auc_outcome")
    rho = metrics.get("spearman")
    ax.set_title(
        f"fit_q reliability: MSE {metrics['mse']:.4f}, p90|Q-G| {metrics['q_error_p90']:.3f}\n"
        f"Spearman {'n/a' if rho is None else f'{rho:.3f}'}, outcome AUC {'n/a' if auc is None else f'{auc:.3f}'}",
        fontsize=9,
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def plot_learning_curve(curve: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (("train_loss", "train MSE"), ("eval_loss", "validation MSE")):
        pts = [(r["epoch"], r[key]) for r in curve if r[key] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE(Q, G)")
    ax.set_title("fit_q learning curve", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["epoch"])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})


# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------


def fit_q(
    table: pa.Table,
    params: Params,
    base_path: str | Path,
    tokenizer: Any,
    out_dir: Path,
    plots_dir: Path,
    where: str = "returns",
    returns_meta: dict[str, str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train Q on ``table`` and write ``out_dir/{adapter,scorer}`` and ``plots_dir`` atomically; return metrics.

    ``table`` must already pass :func:`check_rows`. Nothing appears under ``out_dir``/``plots_dir`` unless
    every part succeeded.
    """
    from pipeline_steps.common.parquet_io import staged_dir
    from pipeline_steps.common.q_model import MANIFEST, encode, score_ids

    fq = params.fit_q
    pad = tokenizer.pad_token_id
    train_idx, val_idx = split_indices(table, fq, where)
    g_all = target_values(table, fq.target)
    outcome_all = table.column("outcome").to_numpy(zero_copy_only=False).astype(int)

    states = table.column("state_text").to_pylist()
    actions = table.column("action_text").to_pylist()

    def encoded(idx: np.ndarray) -> list[list[int]]:
        return [encode(tokenizer, states[i], actions[i], fq.max_action_tokens) for i in idx]

    train_ids, val_ids = encoded(train_idx), encoded(val_idx)
    val_order = np.argsort([len(x) for x in val_ids], kind="stable")  # eval batches of similar length
    model, init = build_q_model(base_path, fq, pad, (train_ids, g_all[train_idx]), progress)  # fp32: see its docstring
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    out_dir, plots_dir = Path(out_dir), Path(plots_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.checkpoints.", dir=out_dir.parent))
    try:
        with staged_dir(out_dir) as stage, staged_dir(plots_dir) as plots:
            run = train_q(  # epochs 0: the linear probe alone; its validation loss is filled in below
                model,
                _Rows(train_ids, g_all[train_idx]),
                _Rows([val_ids[i] for i in val_order], g_all[val_idx][val_order]),
                fq, pad, work, progress,
            )
            # Scores of the adapter model (a few rows) to prove the merge changes nothing.
            check = val_ids[: min(32, len(val_ids))]
            q_adapter = score_ids(model, check, pad, fq.eval_batch_size)
            model.save_pretrained(str(stage / "adapter"))
            tokenizer.save_pretrained(str(stage / "adapter"))
            merged = model.merge_and_unload()
            merged.config.pad_token_id = pad
            q_val = score_ids(merged, val_ids, pad, fq.eval_batch_size, progress=progress)
            merge_diff = float(np.max(np.abs(q_val[: len(check)] - q_adapter))) if len(check) else 0.0
            merged.save_pretrained(str(stage / "scorer"))
            tokenizer.save_pretrained(str(stage / "scorer"))

            metrics = heldout_metrics(q_val, g_all[val_idx], outcome_all[val_idx], float(g_all[train_idx].mean()))
            if not fq.epochs:  # the scorer is the probe (LoRA still the identity): epoch 0's loss is its MSE
                run["log_history"][0]["eval_loss"] = metrics["mse"]
            curve = learning_curve(run["log_history"])
            best = min((r for r in curve if r["eval_loss"] is not None), key=lambda r: r["eval_loss"], default=None)
            metrics.update(
                rows_train=int(len(train_idx)),
                rows_validation=int(len(val_idx)),
                epochs_run=int(round(run["epochs_run"])),
                best_epoch=None if best is None else best["epoch"],
                best_eval_loss=None if best is None else best["eval_loss"],
                merge_max_abs_diff=merge_diff,
                bf16_autocast=bf16_autocast_pays(fq.bf16),  # what fit_q.bf16 (maybe 'auto') resolved to here
                **init,
            )
            manifest = {
                "format": MANIFEST_FORMAT,
                "target": ("G, the Monte-Carlo return (paper Observation 2); Q = the raw head output (MSE fit)"
                           if fq.target == "return" else
                           "sent: 1 if the business sent the suggestion (verbatim/edited), else 0 (myopic immediate reward)"),
                "base_model": params.base_model.name_or_path,
                "base_model_path": str(base_path),
                "max_action_tokens": fq.max_action_tokens,
                "pad_token_id": pad,
                "returns_metadata": returns_meta or {},
                "fit_q": fq.model_dump(),
            }
            for sub in ("adapter", "scorer"):
                write_json(stage / sub / MANIFEST, manifest)
            for f in stage.rglob("*"):  # safetensors writes 0600; the outputs are shared with other users
                f.chmod(0o755 if f.is_dir() else 0o644)

            bins = calibration_bins(q_val, g_all[val_idx], fq.calibration_bins)
            _write_csv(bins, plots / "calibration.csv")
            _write_csv(curve, plots / "learning_curve.csv")
            plot_calibration(bins, metrics, plots / "calibration.png")
            plot_learning_curve(curve, plots / "learning_curve.png")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "metrics": metrics,
        "learning_curve": curve,
        "train_runtime": run["train_runtime"],
        "train_tokens_per_second": run["train_tokens"] / run["train_runtime"] if run["train_runtime"] else 0.0,
        "trainable_params": trainable,
        "total_params": total,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline_steps.fit_q", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="params.yaml", help="params.yaml to read (sections fit_q, base_model, prompt, world).")
    p.add_argument("--input", default="data/returns/returns.parquet", help="Returns rows (returns step output).")
    p.add_argument("--out", default="data/fit_q/model", help="Folder for adapter/ and scorer/ (replaced atomically).")
    p.add_argument("--metrics", default="metrics/fit_q.json", help="Held-out metrics JSON (DVC metrics).")
    p.add_argument("--plots", default="plots/fit_q", help="Folder for the calibration and learning-curve plots.")
    p.add_argument("--base-model", help="Override base_model.name_or_path.")
    p.add_argument("--epochs", type=int, help="Override fit_q.epochs.")
    p.add_argument("--max-train-rows", type=int, help="Override fit_q.max_train_rows.")
    p.add_argument("--no-mlflow", action="store_true", help="Do not log to MLflow.")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {
        f"fit_q.{k}": v for k, v in {"epochs": args.epochs, "max_train_rows": args.max_train_rows}.items() if v is not None
    }
    if args.base_model:
        overrides["base_model.name_or_path"] = args.base_model
    try:
        params = load_params(args.params, overrides)
    except ConfigError as exc:
        raise SystemExit(f"fit_q: error: {exc}") from exc

    from pipeline_steps.common.base_model import BaseModelError, load_tokenizer, resolve_base_model
    from pipeline_steps.common.contract import system_prompt_for
    from pipeline_steps.world.simulator import load_vertical

    # Every check runs before the model is loaded: bad input costs seconds, not a training run.
    try:
        table = read_returns(args.input)
        check_rows(table, args.input)
        split_indices(table, params.fit_q, args.input)
        base_path = resolve_base_model(params.base_model.name_or_path, params.base_model.cache_dir)
        tokenizer = load_tokenizer(base_path)
        meta = check_returns_metadata(args.input, params, tokenizer, system_prompt_for(load_vertical(params.world.vertical)))
    except (FitQError, BaseModelError) as exc:
        raise SystemExit(f"fit_q: error: {exc}") from exc
    if params.base_model.num_threads:
        import torch

        torch.set_num_threads(params.base_model.num_threads)

    t0 = time.perf_counter()
    run_params = {"fit_q": params.fit_q.model_dump(), "base_model": params.base_model.name_or_path,
                  "returns": {k: meta.get(k) for k in ("tokenizer_sha256", "prompt_version", "gamma", "split_seed")}}
    with step_run(STEP, run_params, enabled=not args.no_mlflow) as run:
        try:
            result = fit_q(table, params, base_path, tokenizer, Path(args.out), Path(args.plots),
                           where=args.input, returns_meta=meta, progress=not args.no_progress)
        except FitQError as exc:
            raise SystemExit(f"fit_q: error: {exc}") from exc
        metrics = result["metrics"]
        if run is not None:
            import mlflow

            mlflow.log_metrics(flat_metrics({k: v for k, v in metrics.items() if v is not None}))
            mlflow.log_metrics({"train_tokens_per_second": result["train_tokens_per_second"],
                                "trainable_params": result["trainable_params"], "total_params": result["total_params"]})
            for row in result["learning_curve"]:
                for key in ("train_loss", "eval_loss"):
                    if row[key] is not None:
                        mlflow.log_metric(f"curve.{key}", row[key], step=row["epoch"])
            mlflow.log_artifacts(args.plots, "plots")
            mlflow.log_artifacts(str(Path(args.out) / "scorer"), "scorer")
            mlflow.set_tag("ippo.q_scorer", str(Path(args.out) / "scorer"))
        write_json(args.metrics, metrics)
        if run is not None:
            mlflow.log_artifact(args.metrics)
    auc = metrics["roc_auc_outcome"]
    print(
        f"fit_q: {metrics['rows_train']} train / {metrics['rows_validation']} validation rows, "
        f"{metrics['epochs_run']} epochs (best {metrics['best_epoch']}): held-out MSE {metrics['mse']:.4f} "
        f"(constant {metrics['mse_constant_baseline']:.4f}), Spearman {metrics['spearman']}, "
        f"outcome AUC {'n/a' if auc is None else f'{auc:.3f}'}, p90|Q-G| {metrics['q_error_p90']:.3f} "
        f"-> {args.out} ({time.perf_counter() - t0:.1f}s, {result['train_tokens_per_second']:.0f} train tokens/s)"
    )
    return metrics


if __name__ == "__main__":
    main()
