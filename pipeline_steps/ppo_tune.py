"""ppo_tune: improve pi_i into pi_{i+1} by single-turn RL with Q_i as the reward (Algorithm 1, steps 6-7).

    python -m pipeline_steps.ppo_tune --params params.yaml --returns data/returns/returns.parquet \\
        --q-model data/fit_q/model/scorer --out data/ppo_tune/model \\
        --metrics metrics/ppo_tune.json --curve plots/ppo_tune/training_curve.csv
    python -m pipeline_steps.ppo_tune ... --policy <pi_i model folder> --algorithm grpo

* **Prompts** (D_single, step 6): the rendered states pi_i was prompted with in the logged conversations,
  i.e. the ``state_text`` column of the returns rows, de-duplicated. The ``train`` split is trained on; the
  ``validation`` split (other conversations; states also seen in train removed) is held out for the check.
* **Improver** (step 7), ``ppo_tune.algorithm``:
  ``ppo``: ``trl.experimental.ppo.PPOTrainer`` with ``reward_model`` = Q_i (fit_q's merged scorer) and a
  value model initialised from the same scorer; ``rloo``/``grpo``: ``trl.RLOOTrainer``/``trl.GRPOTrainer``
  with Q_i wrapped as a reward function. Theorem 1 only needs *a* single-turn improvement, so any of them
  is a valid step 7. The policy gets a fresh LoRA adapter (peft) on top of pi_i; the KL reference is pi_i
  itself: with ``peft_config`` and no ``ref_model``, TRL computes reference log-probs with the adapter
  disabled (PPOTrainer.null_ref_context / RLOO and GRPO's ``disable_adapter``), i.e. exactly pi_i.
  The abstain action needs nothing special: "[ABSTAIN]" is text the policy may emit and Q has a value for.
* **Outputs** (staged in a temp folder, renamed into place only when everything succeeded):
  ``<out>/adapter`` (the LoRA adapter), ``<out>/policy`` (merged model + pi_i's tokenizer and generation
  config: ``collect --policy <out>/policy`` deploys it), ``<out>/samples.csv|.md`` (held-out generations of
  pi_i and pi_{i+1} with their Q values); ``--curve``: TRL's training metrics per update (CSV, a DVC
  plot); ``--metrics``: the Theorem 1 check. MLflow run ``ppo_tune``: params, every TRL log line (a
  callback forwards ``on_log``; TRL itself reports to nothing), the check, the tables.
* **Theorem 1 check** on held-out states: ``eval_samples_per_state`` responses per state from pi_i and
  from pi_{i+1}, sampled from the distribution PPO optimises (temperature ``ppo_tune.temperature``, no
  top-k/top-p, at most ``response_length`` tokens, EOS ends a response), scored by Q_i on the same token
  ids PPO's reward model reads. ``improvement`` = mean over states of (mean Q of pi_{i+1}'s responses -
  mean Q of pi_i's), with a paired bootstrap 95% CI (``scipy.stats.bootstrap``, resampling states);
  ``kl_per_token`` = sum over pi_{i+1}'s response tokens of the exact KL(pi_{i+1} || pi_i) over the
  vocabulary at that prefix (both at the sampling temperature), divided by the number of tokens: the
  Rao-Blackwellised Monte-Carlo estimate of KL(pi_{i+1} || pi_i) per token (same expectation as the sampled
  ``log pi_{i+1} - log pi_i``, never negative, lower variance), and ``kl_per_response`` per response. The
  evaluate step repeats the comparison with the *deployed* generation settings (top-p, repetition penalty,
  clean-up) and the A/B test.

**Pad tokens (why PPO gets its own).** SmolLM2's pad token *is* its EOS ``<|im_end|>``, and TRL's PPO
derives every attention mask as ``ids != pad_token_id``. With pad = EOS it would (a) mask the two
``<|im_end|>`` tokens the chat template puts inside every rendered state, so rollouts would condition on a
different context than ``collect`` deploys (where the tokenizer's attention mask keeps them), and (b) mask
the response's own EOS out of the PPO loss, so the policy could never learn when to stop. For the
duration of training PPOTrainer therefore sees the tokenizer with its pad switched to a token absent from
every prompt (``<|endoftext|>`` for SmolLM2; the saved policy keeps pi_i's tokenizer). Q_i was fit by
:mod:`pipeline_steps.common.q_model` with the pad = EOS convention, so the reward model handed to PPO is
:func:`PPORewardModel`: it feeds the scorer exactly the mask and positions ``q_model.q_forward`` uses and
reads Q at the last action token (never at the EOS), so PPO's reward for a response equals
``q_model.score_ids`` of (state ids + response ids) -- ``tests/test_ppo_tune.py`` checks this. RLOO and GRPO build proper attention masks themselves and train on the EOS; they get the
tokenizer unchanged.

**TRL pin.** ``trl==1.12.0``: TRL 1.13 removed ``PPOTrainer``; 1.12.0 is the last release that ships it
(as ``trl.experimental.ppo.PPOTrainer``/``PPOConfig``). API facts relied on (read from its source):
``PPOTrainer(args, processing_class, model, ref_model, reward_model, train_dataset, value_model,
data_collator, eval_dataset, optimizers, callbacks, peft_config)``; the dataset holds tokenised
``input_ids`` (left-padded by ``DataCollatorWithPadding``); ``stop_token="eos"`` truncates responses after
EOS and fills the rest with pad; ``missing_eos_penalty`` is subtracted from the score of responses without
EOS; rewards are read by ``trl.experimental.utils.get_reward`` (``model.base_model_prefix`` backbone +
``model.score``, at the token before the first pad of the response); ``total_episodes`` /
(``per_device_train_batch_size`` x ``gradient_accumulation_steps``) updates, each of ``num_ppo_epochs`` x
``num_mini_batches`` optimiser steps; ``PPOConfig`` defaults ``bf16=True`` and
``gradient_checkpointing=True`` (both set explicitly here). RLOO/GRPO: reward functions are called as
``f(prompts=, completions=, completion_ids=, **columns)`` and return one float per completion; ``beta`` is
the KL coefficient (GRPO's default is 0, i.e. no reference model).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import gc
import io
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from pipeline_steps.common.base_model import sdpa_without_cudnn
from pipeline_steps.common.config import ConfigError, Params, PPOTuneParams, load_params
from pipeline_steps.common.policies import response_token_kls
from pipeline_steps.common.stats import paired_bootstrap
from pipeline_steps.common.tracking import flat_metrics, step_run, write_json

if TYPE_CHECKING:
    import torch

STEP = "ppo_tune"
REQUIRED_COLUMNS = ("state_text", "action_text", "G", "outcome", "conversation_id", "turn_index", "split")
TRAIN_SPLIT, HELDOUT_SPLIT = "train", "validation"
# Tokens PPOTrainer may use as padding, in order of preference, when the tokenizer's pad is its EOS.
PPO_PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "<unk>")


class PPOTuneError(ValueError):
    """Input the step cannot train on; the message names the file/folder and the rule."""

    def __init__(self, where: str, rule: str, detail: str):
        self.where, self.rule, self.detail = where, rule, detail
        super().__init__(f"{where}: rule '{rule}' violated: {detail}")


# ------------------------------------------------------------------------------------------------
# D_single: the single-turn prompts (Algorithm 1, step 6)
# ------------------------------------------------------------------------------------------------


@dataclass
class PromptSets:
    """De-duplicated rendered states: ``train`` to optimise on, ``heldout`` for the Theorem 1 check."""

    train: list[str]
    heldout: list[str]
    info: dict[str, int] = field(default_factory=dict)
    heldout_conversations: list[str] = field(default_factory=list)  # of each held-out state: the CI's resampling unit


def single_turn_prompts(rows: Any, where: str, max_heldout: int, seed: int) -> PromptSets:
    """D_single from returns rows (a polars DataFrame): distinct ``state_text`` per split, in log order.

    Held-out states that also occur in the train split (e.g. identical openings of two conversations) are
    dropped from the held-out set, so it stays unseen. At most ``max_heldout`` held-out states are kept
    (a seeded sample, in log order).
    """
    import polars as pl

    missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        raise PPOTuneError(where, "schema", f"missing columns {missing} (expected the returns step's output)")
    ordered = rows.sort(["conversation_id", "turn_index"], maintain_order=True)

    def distinct(split: str) -> dict[str, str]:
        """Each distinct state of ``split`` with the conversation it first occurs in."""
        part = ordered.filter(pl.col("split") == split)
        states, conversations = part["state_text"].to_list(), part["conversation_id"].cast(pl.String).to_list()
        out: dict[str, str] = {}
        for s, c in zip(states, conversations):
            if s:
                out.setdefault(s, c)
        return out

    train = list(distinct(TRAIN_SPLIT))
    seen = set(train)
    heldout_all = distinct(HELDOUT_SPLIT)
    heldout = [s for s in heldout_all if s not in seen]
    if not train:
        raise PPOTuneError(where, "non_empty_prompts", f"no '{TRAIN_SPLIT}' states to train on ({rows.height} rows)")
    if not heldout:
        raise PPOTuneError(
            where, "non_empty_heldout",
            f"no '{HELDOUT_SPLIT}' states unseen in training ({len(heldout_all)} validation states, all also in "
            "train); the Theorem 1 check needs held-out states (returns.validation_fraction > 0)",
        )
    if len(heldout) > max_heldout:
        keep = np.sort(np.random.default_rng(seed).choice(len(heldout), size=max_heldout, replace=False))
        heldout = [heldout[i] for i in keep]
    conversations = [heldout_all[s] for s in heldout]
    info = dict(rows=rows.height, train_states=len(train), heldout_states_available=len(heldout_all),
                heldout_states_overlapping_train=len(heldout_all) - sum(s not in seen for s in heldout_all),
                heldout_states=len(heldout))
    return PromptSets(train, heldout, info, conversations)


def read_returns(path: str | Path) -> Any:
    """The returns rows as a polars DataFrame, or a :class:`PPOTuneError` naming the file."""
    import polars as pl

    try:
        return pl.read_parquet(str(path))
    except Exception as exc:  # polars raises several exception types for missing/corrupt files
        raise PPOTuneError(str(path), "parquet_readable", str(exc).splitlines()[0]) from exc


# ------------------------------------------------------------------------------------------------
# Input checks: tokenizers, pad token
# ------------------------------------------------------------------------------------------------


def vocab_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of what maps text to ids: the tokenizer model (vocab, merges) and the added/special tokens.

    Unlike :func:`pipeline_steps.returns.tokenizer_fingerprint` it ignores the chat template and the
    padding/truncation state, which do not change the ids a scorer reads.
    """
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        body = json.dumps([spec.get("model"), spec.get("added_tokens"), spec.get("normalizer"),
                           spec.get("pre_tokenizer")], sort_keys=True)
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(body.encode()).hexdigest()


def check_same_tokenizer(policy_tok: Any, q_tok: Any, q_where: str) -> None:
    """Q reads the policy's token ids, so both must tokenise identically."""
    fp_p, fp_q = vocab_fingerprint(policy_tok), vocab_fingerprint(q_tok)
    if fp_p != fp_q:
        vp, vq = policy_tok.get_vocab(), q_tok.get_vocab()
        differing = sorted(set(vp.items()) ^ set(vq.items()), key=lambda kv: kv[1])[:5]
        raise PPOTuneError(
            q_where, "same_tokenizer",
            f"the Q scorer's tokenizer differs from the policy's (vocab sizes {len(vq)} vs {len(vp)}, fingerprints "
            f"{fp_q[:12]} vs {fp_p[:12]}; first differing entries {differing}): Q would read other ids than the "
            "policy writes; fit Q on this policy's base model",
        )


def ppo_pad_token(tokenizer: Any, prompt_ids: Sequence[Sequence[int]]) -> str:
    """A pad token for PPOTrainer that is not EOS and occurs in no prompt (see the module docstring)."""
    eos = tokenizer.eos_token_id
    vocab = tokenizer.get_vocab()
    candidates = []
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != eos:
        candidates.append(tokenizer.pad_token)
    candidates += [t for t in (tokenizer.unk_token, *PPO_PAD_CANDIDATES) if t]
    used = set().union(*map(set, prompt_ids)) if prompt_ids else set()
    for tok in dict.fromkeys(candidates):
        tid = vocab.get(tok)
        if tid is not None and tid != eos and tid != tokenizer.bos_token_id and tid not in used:
            return tok
    raise PPOTuneError(
        "tokenizer", "ppo_pad_token",
        f"no token usable as PPO padding (tried {list(dict.fromkeys(candidates))}): each is missing, equals EOS/BOS "
        "or occurs in a prompt",
    )


# ------------------------------------------------------------------------------------------------
# Q as PPO's reward model and as a reward function
# ------------------------------------------------------------------------------------------------


def _build_reward_model_class():
    import torch
    from torch import nn

    class _QBackbone(nn.Module):
        """Runs the Q scorer the way ``q_model.q_forward`` does; returns Q per position, forward-filled."""

        def __init__(self, scorer: nn.Module, q_pad_id: int, ppo_pad_id: int, eos_id: int):
            super().__init__()
            from pipeline_steps.common.q_model import _classifier

            self.clf = _classifier(scorer)
            self.q_pad_id, self.ppo_pad_id, self.eos_id = q_pad_id, ppo_pad_id, eos_id

        def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
            from types import SimpleNamespace

            # q_forward's convention: every q-pad id (= EOS for SmolLM2) is masked and does not advance
            # the position; PPO's own padding is masked as well.
            attend = (input_ids != self.q_pad_id) & (input_ids != self.ppo_pad_id)
            position_ids = attend.cumsum(1) - attend.long()
            backbone = getattr(self.clf, self.clf.base_model_prefix)
            out = backbone(input_ids=torch.masked_fill(input_ids, ~attend, 0), attention_mask=attend,
                           position_ids=position_ids, return_dict=True, output_hidden_states=True, use_cache=False)
            q = self.clf.score(out.hidden_states[-1])  # (batch, seq, 1)
            # TRL reads the score at the response's EOS (the token before its first pad); Q was fit without
            # EOS, so every position reports Q at the last attended non-EOS token at or before it.
            readable = attend & (input_ids != self.eos_id)
            steps = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            last = torch.cummax(torch.where(readable, steps, torch.zeros_like(steps)), dim=1).values
            return SimpleNamespace(hidden_states=(q.gather(1, last.unsqueeze(-1).expand(-1, -1, q.shape[-1])),))

    class PPORewardModel(nn.Module):
        """Q_i in the shape ``trl.experimental.utils.get_reward`` expects (``base_model_prefix`` + ``score``)."""

        base_model_prefix = "backbone"

        def __init__(self, scorer: nn.Module, q_pad_id: int, ppo_pad_id: int, eos_id: int):
            super().__init__()
            self.backbone = _QBackbone(scorer, q_pad_id, ppo_pad_id, eos_id)
            self.score = nn.Identity()  # the backbone already returns Q

    return PPORewardModel


def PPORewardModel(scorer: Any, q_pad_id: int, ppo_pad_id: int, eos_id: int) -> Any:  # noqa: N802 - a class factory
    """Wrap a Q scorer as PPOTrainer's ``reward_model`` (torch is imported lazily, hence the factory)."""
    return _build_reward_model_class()(scorer, q_pad_id, ppo_pad_id, eos_id)


def response_q_ids(query_ids: Sequence[int], response_ids: Sequence[int], eos_id: int, q_pad_id: int,
                   max_action_tokens: int | None) -> list[int]:
    """The ids Q reads for a generated response: the query, then the response cut before EOS/pad."""
    resp = list(response_ids)
    for stop in (eos_id, q_pad_id):
        if stop in resp:
            resp = resp[: resp.index(stop)]
    if max_action_tokens is not None:
        resp = resp[:max_action_tokens]
    return list(query_ids) + resp


class QRewardFunction:
    """Q_i as an RLOO/GRPO reward function: Q of (prompt ids + completion ids), minus the missing-EOS penalty."""

    __name__ = "q_reward"  # TRL names the reward column after it

    def __init__(self, scorer: Any, tokenizer: Any, batch_size: int, missing_eos_penalty: float | None,
                 max_action_tokens: int | None):
        self.scorer, self.tokenizer, self.batch_size = scorer, tokenizer, batch_size
        self.penalty, self.max_action_tokens = missing_eos_penalty, max_action_tokens
        self._query_cache: dict[str, list[int]] = {}

    def query_ids(self, prompt: str) -> list[int]:
        from pipeline_steps.common.q_input import q_input_ids

        if prompt not in self._query_cache:
            self._query_cache[prompt] = q_input_ids(self.tokenizer, prompt, "")
        return self._query_cache[prompt]

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]],
                 **_: Any) -> list[float]:
        from pipeline_steps.common.q_model import score_ids

        tok = self.tokenizer
        seqs = [response_q_ids(self.query_ids(p), ids, tok.eos_token_id, tok.pad_token_id, self.max_action_tokens)
                for p, ids in zip(prompts, completion_ids)]
        q = score_ids(self.scorer, seqs, tok.pad_token_id, self.batch_size)
        if self.penalty:
            q = q - self.penalty * np.array([tok.eos_token_id not in ids for ids in completion_ids], dtype=float)
        return [float(v) for v in q]


# ------------------------------------------------------------------------------------------------
# Training metrics: TRL's log lines -> MLflow + the training curve
# ------------------------------------------------------------------------------------------------

# The mean Q reward of each rollout batch (missing-EOS penalty included), under one name for all algorithms.
REWARD_KEYS = ("objective/scores", "rewards/q_reward/mean", "reward")


def _curve_callback(episodes_per_step: float):
    from transformers import TrainerCallback

    class CurveCallback(TrainerCallback):
        """Collects every ``on_log`` line (one per update) and forwards it to the active MLflow run."""

        def __init__(self) -> None:
            self.rows: list[dict[str, float]] = []
            self.summary: dict[str, float] = {}

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
            numeric = {k: float(v) for k, v in (logs or {}).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
            if not numeric:
                return
            if "train_runtime" in numeric:  # the Trainer's end-of-training summary line
                self.summary.update(numeric)
                return
            row = {"step": float(state.global_step), "episode": numeric.pop("episode", state.global_step * episodes_per_step)}
            reward = next((numeric[k] for k in REWARD_KEYS if k in numeric), None)
            if reward is not None:
                row["q_reward"] = reward
            row.update(numeric)
            self.rows.append(row)
            mlflow = sys.modules.get("mlflow")  # imported by step_run when tracking is on; never imported here
            if mlflow is not None and mlflow.active_run() is not None:
                mlflow.log_metrics({f"train/{k}": v for k, v in row.items() if k != "step"}, step=int(state.global_step))

    return CurveCallback()


def write_curve(rows: Sequence[dict[str, float]], path: str | Path) -> Path:
    """The training curve as CSV (one row per update, columns in first-seen order), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns or ["step"], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def lora_config(p: PPOTuneParams) -> Any:
    from peft import LoraConfig

    targets: Any = p.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")


def _common_args(p: PPOTuneParams, output_dir: Path, progress: bool) -> dict[str, Any]:
    import torch

    return dict(
        # transformers refuses bf16 without a GPU unless told to run on the CPU (bf16 autocast works there).
        use_cpu=bool(p.bf16 and not torch.cuda.is_available()),
        output_dir=str(output_dir), learning_rate=p.learning_rate, per_device_train_batch_size=p.per_device_train_batch_size,
        gradient_accumulation_steps=p.gradient_accumulation_steps, temperature=p.temperature, seed=p.seed,
        bf16=p.bf16, gradient_checkpointing=p.gradient_checkpointing, report_to="none", logging_steps=1,
        save_strategy="no", disable_tqdm=not progress,
    )


def fill_rollout_batch(prompts: list[Any], batch: int) -> list[Any]:
    """The prompts, repeated whole until they fill one rollout batch.

    TRL's PPO dataloader drops an incomplete last batch and cycles forever, so fewer prompts than one batch
    would spin without yielding a single rollout; repeating keeps every prompt equally weighted.
    """
    return prompts * math.ceil(batch / len(prompts)) if 0 < len(prompts) < batch else prompts


def train_ppo(p: PPOTuneParams, policy: Any, tokenizer: Any, scorer: Any, q_path: str | Path, train_prompts: list[str],
              heldout_prompts: list[str], work_dir: Path, callback: Any, progress: bool) -> Any:
    """TRL's PPOTrainer on the prompts; returns the trained policy (a PeftModel)."""
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    prompt_ids = fill_rollout_batch([tokenizer(s, add_special_tokens=False)["input_ids"] for s in train_prompts],
                                    p.per_device_train_batch_size * p.gradient_accumulation_steps)
    heldout_ids = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in heldout_prompts]
    pad_token = ppo_pad_token(tokenizer, prompt_ids + heldout_ids)
    args = PPOConfig(
        **_common_args(p, work_dir, progress),
        total_episodes=p.total_episodes, num_mini_batches=p.num_mini_batches, num_ppo_epochs=p.num_ppo_epochs,
        local_rollout_forward_batch_size=p.local_rollout_forward_batch_size, response_length=p.response_length,
        stop_token="eos", missing_eos_penalty=p.missing_eos_penalty, kl_coef=p.kl_coef, kl_estimator=p.kl_estimator,
        cliprange=p.cliprange, vf_coef=p.vf_coef, cliprange_value=p.cliprange_value, gamma=1.0, lam=p.lam,
        whiten_rewards=p.whiten_rewards, num_sample_generations=0,
    )
    transformers.set_seed(p.seed)  # LoRA init happens inside the constructor, before TRL seeds anything
    # fp32 whatever the policy's dtype: the value model is trained in full (not LoRA), and AdamW steps on bf16
    # weights below ~0.4% of a weight are lost; ppo_tune.bf16 (autocast) is the mixed-precision switch, as in fit_q.
    value_model = AutoModelForSequenceClassification.from_pretrained(str(q_path), num_labels=1, dtype=torch.float32)
    if p.gradient_checkpointing:
        # PPOConfig takes the flag but TRL's PPO loop never enables it: switch it on for both trained models.
        for model in (policy, value_model):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    q_pad_id = tokenizer.pad_token_id
    with _pad_token(tokenizer, pad_token):  # PPOTrainer's processing_class: same vocabulary, its own pad
        reward_model = PPORewardModel(scorer, q_pad_id, tokenizer.pad_token_id, tokenizer.eos_token_id)
        trainer = PPOTrainer(
            args=args, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward_model,
            train_dataset=Dataset.from_dict({"input_ids": prompt_ids}), value_model=value_model,
            eval_dataset=Dataset.from_dict({"input_ids": heldout_ids}), callbacks=[callback], peft_config=lora_config(p),
        )
        _quiet(trainer, progress)
        with sdpa_without_cudnn():  # rollouts and updates: a new sequence length every batch
            trainer.train()
    return trainer.accelerator.unwrap_model(trainer.model).policy


@contextlib.contextmanager
def _pad_token(tokenizer: Any, token: str) -> Iterator[None]:
    """Use ``token`` as the tokenizer's pad token inside the block (restored after: pi_{i+1} ships pi_i's)."""
    previous = tokenizer.pad_token
    tokenizer.pad_token = token
    try:
        yield
    finally:
        tokenizer.pad_token = previous


def train_rloo_grpo(p: PPOTuneParams, policy: Any, tokenizer: Any, scorer: Any, train_prompts: list[str], work_dir: Path,
                    callback: Any, progress: bool, max_action_tokens: int | None) -> Any:
    """TRL's RLOOTrainer / GRPOTrainer with Q as the reward function; returns the trained PeftModel."""
    import transformers
    from datasets import Dataset

    if p.algorithm == "rloo":
        from trl import RLOOConfig as Config, RLOOTrainer as Trainer
    else:
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer
    episodes_per_step = p.per_device_train_batch_size * p.gradient_accumulation_steps
    args = Config(
        **_common_args(p, work_dir, progress),
        num_generations=p.num_generations, max_completion_length=p.response_length, beta=p.kl_coef,
        epsilon=p.cliprange, num_iterations=p.num_ppo_epochs, top_p=1.0, top_k=0,
        max_steps=math.ceil(p.total_episodes / episodes_per_step) * p.num_ppo_epochs,
    )
    reward = QRewardFunction(scorer, tokenizer, p.eval_batch_size, p.missing_eos_penalty, max_action_tokens)
    transformers.set_seed(p.seed)
    trainer = Trainer(model=policy, reward_funcs=reward, args=args,
                      train_dataset=Dataset.from_dict({"prompt": train_prompts}), processing_class=tokenizer,
                      callbacks=[callback], peft_config=lora_config(p))
    _quiet(trainer, progress)
    with sdpa_without_cudnn():
        trainer.train()
    return trainer.accelerator.unwrap_model(trainer.model)


def _quiet(trainer: Any, progress: bool) -> None:
    """Without progress bars the Trainer prints every log dict instead; our curve and summary replace that."""
    if not progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)


def save_policy(peft_model: Any, tokenizer: Any, generation_config: Any, stage: Path,
                policy_path: str | None = None, dtype: str = "float32") -> None:
    """``stage/adapter`` (LoRA) and ``stage/policy`` (merged weights, pi_i's tokenizer and generation config).

    The merged weights are fp32 whatever ``dtype`` pi_i was trained in. Merged into bf16 weights, a PPO update
    is mostly lost: pi_i's bf16 weights are on the bf16 grid, and W + dW rounds back to W wherever dW is under
    half a bf16 step (~0.2% of the weight). Measured on one CPU iteration with ``base_model.dtype: bfloat16``:
    79% of the LoRA delta's entries were that small, the merged bf16 policy differed from pi_i's bf16 weights in
    11.4% of its entries, and the Theorem 1 check's KL(pi_{i+1} || pi_i) was -0.0003 per token against 0.0100 in
    fp32 (the sampled log-ratio estimate the check used then). So for a bf16 pi_i the adapter is merged into
    pi_i reloaded in fp32 (``policy_path``). Loading that in bf16 later rounds W + dW from off the grid, which keeps the update on average (a flip of one bf16 step with
    probability |dW| / step): rerun on the same inputs, pi_{i+1} rounded to bf16 differed in 17.5% of its entries
    and the KL was 0.0016 (README, "A whole CPU iteration in bf16").
    """
    peft_model.save_pretrained(str(stage / "adapter"))
    tokenizer.save_pretrained(str(stage / "adapter"))
    if dtype != "float32" and policy_path is not None:
        from peft import PeftModel

        from pipeline_steps.common.base_model import load_causal_lm

        base = load_causal_lm(policy_path, dtype="float32")
        merged = PeftModel.from_pretrained(base, str(stage / "adapter")).merge_and_unload()
    else:
        merged = peft_model.merge_and_unload()
    # TRL rewrites generation settings for its rollouts (top_k=0, its temperature, stop token); deploy
    # pi_{i+1} with pi_i's generation defaults so collect/evaluate treat both policies alike.
    merged.generation_config = generation_config
    merged.save_pretrained(str(stage / "policy"))
    tokenizer.save_pretrained(str(stage / "policy"))


# ------------------------------------------------------------------------------------------------
# The Theorem 1 check on held-out states
# ------------------------------------------------------------------------------------------------


def sample_responses(model: Any, tokenizer: Any, states: Sequence[str], p: PPOTuneParams, seed: int,
                     progress: bool = False, desc: str = "sample") -> list[list[int]]:
    """``p.eval_samples_per_state`` responses per state (state-major), sampled as in PPO's rollouts.

    Pure temperature sampling (no top-k/top-p), at most ``response_length`` tokens; a response keeps its
    EOS when it produced one. Batches are seeded by position, so two policies get the same random stream.
    """
    import torch
    from tqdm.auto import tqdm

    rep = [s for s in states for _ in range(p.eval_samples_per_state)]
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    for lo in tqdm(range(0, len(rep), p.eval_batch_size), desc=desc, unit="batch", disable=not progress):
        enc = tokenizer(rep[lo : lo + p.eval_batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        torch.manual_seed(seed + lo)
        with torch.inference_mode(), sdpa_without_cudnn():
            gen = model.generate(**enc, do_sample=True, temperature=p.temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=p.response_length, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)
        for row in gen[:, enc["input_ids"].shape[1] :].tolist():
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def theorem1_check(old: Any, new: Any, tokenizer: Any, scorer: Any, q_tok: Any, states: Sequence[str], p: PPOTuneParams,
                   max_action_tokens: int | None, progress: bool,
                   conversations: Sequence[str] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """E_{pi_{i+1}}[Q] - E_{pi_i}[Q] on held-out states (paired bootstrap CI, resampling whole ``conversations``
    when given: the states of one share its history) and KL(pi_{i+1} || pi_i) per token."""
    from pipeline_steps.common.q_input import q_input_ids
    from pipeline_steps.common.q_model import score_ids

    k = p.eval_samples_per_state
    seed = p.seed + 1_000_003
    resp_old = sample_responses(old, tokenizer, states, p, seed, progress, "sample pi_i")
    resp_new = sample_responses(new, tokenizer, states, p, seed, progress, "sample pi_i+1")
    rep = [s for s in states for _ in range(k)]
    queries = {s: q_input_ids(q_tok, s, "") for s in states}

    def q_of(responses: list[list[int]]) -> np.ndarray:
        seqs = [response_q_ids(queries[s], r, q_tok.eos_token_id, q_tok.pad_token_id, max_action_tokens)
                for s, r in zip(rep, responses)]
        return score_ids(scorer, seqs, q_tok.pad_token_id, p.eval_batch_size)

    q_old, q_new = q_of(resp_old), q_of(resp_new)
    token_kls = response_token_kls(new, old, tokenizer, rep, resp_new, p.temperature, p.eval_batch_size)
    per_response = np.array([float(x.sum()) for x in token_kls])
    tokens = int(sum(len(x) for x in token_kls))
    state_new, state_old = q_new.reshape(-1, k).mean(1), q_old.reshape(-1, k).mean(1)
    eos = tokenizer.eos_token_id
    metrics = {
        "heldout_states": len(states),
        "samples_per_state": k,
        "q_pi_i_mean": float(q_old.mean()),
        "q_pi_next_mean": float(q_new.mean()),
        "improvement": paired_bootstrap(state_new, state_old, p.bootstrap_resamples, p.seed, groups=conversations),
        "kl_per_token": float(per_response.sum() / max(tokens, 1)),
        "kl_per_response": float(per_response.mean()),
        "beta_kl_per_response": float(p.kl_coef * per_response.mean()),
        "response_tokens_pi_next_mean": tokens / len(resp_new),
        "eos_rate": {"pi_i": float(np.mean([eos in r for r in resp_old])), "pi_next": float(np.mean([eos in r for r in resp_new]))},
    }

    def text(r: list[int]) -> str:
        return tokenizer.decode([t for t in r if t != eos], skip_special_tokens=True).strip()

    samples = []
    for j, s in enumerate(states[: p.sample_rows]):
        i = j * k
        samples.append({"state": s, "state_tail": _last_customer_line(s), "pi_i": text(resp_old[i]), "q_pi_i": float(q_old[i]),
                        "pi_next": text(resp_new[i]), "q_pi_next": float(q_new[i])})
    return metrics, samples


def _last_customer_line(state: str) -> str:
    lines = [ln for ln in state.splitlines() if ln.startswith("Customer:")]
    return (lines[-1] if lines else state[-200:]).strip()


def write_samples(samples: Sequence[dict[str, Any]], stage: Path) -> list[Path]:
    """The before/after generations as CSV (full states) and Markdown (last customer line only)."""
    import pandas as pd

    df = pd.DataFrame(list(samples), columns=["state_tail", "pi_i", "q_pi_i", "pi_next", "q_pi_next", "state"])
    csv_path, md_path = stage / "samples.csv", stage / "samples.md"
    df.to_csv(csv_path, index=False, float_format="%.4f")

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|").replace("\n", " ")[:240]

    header = ["customer (last message)", "pi_i response", "Q(pi_i)", "pi_i+1 response", "Q(pi_i+1)"]
    lines = ["# Held-out generations before (pi_i) and after (pi_i+1) policy improvement", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in samples:
        lines.append("| " + " | ".join(cell(r[k]) for k in ("state_tail", "pi_i", "q_pi_i", "pi_next", "q_pi_next")) + " |")
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [csv_path, md_path]


# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """Everything loaded and checked before training starts."""

    prompts: PromptSets
    policy_path: str
    policy: Any
    tokenizer: Any
    scorer: Any
    q_tokenizer: Any
    max_action_tokens: int | None


def load_inputs(params: Params, returns_path: str | Path, q_path: str | Path, policy_path: str | Path | None) -> Inputs:
    """Read and check every input; any problem is a :class:`PPOTuneError` raised before training."""
    from pipeline_steps.common.base_model import BaseModelError, load_causal_lm, load_tokenizer, resolve_base_model
    from pipeline_steps.common.contract import system_prompt_for
    from pipeline_steps.common.q_model import load_scorer, read_manifest
    from pipeline_steps.returns import ReturnsError, check_compatible, read_metadata, returns_metadata
    from pipeline_steps.world.simulator import load_vertical

    p = params.ppo_tune
    prompts = single_turn_prompts(read_returns(returns_path), str(returns_path), p.eval_states, p.seed)

    # pi_i: the policy to improve and the KL reference.
    # Same forms as collect.policy: 'pi0' (the base model), a model folder, or models:/<name>@<alias>.
    if policy_path is None or str(policy_path) in ("pi0", "explore"):
        try:
            policy_path = resolve_base_model(params.base_model.name_or_path, params.base_model.cache_dir)
        except BaseModelError as exc:
            raise PPOTuneError("--policy", "policy_loads", str(exc)) from exc
    elif str(policy_path).startswith("models:/"):
        from pipeline_steps.common.policies import registered_policy_dir

        try:
            policy_path = registered_policy_dir(str(policy_path))
        except Exception as exc:
            raise PPOTuneError(str(policy_path), "policy_loads", f"registered pi_i could not be downloaded: {exc}") from exc
    where = str(policy_path)
    if not Path(where).is_dir() or not (Path(where) / "config.json").is_file():
        raise PPOTuneError(where, "policy_loads", "not a model folder (no config.json): pi_i, the reference policy, "
                                                  "cannot be loaded")
    try:
        tokenizer = load_tokenizer(where)
        policy = load_causal_lm(where, dtype=params.base_model.dtype)
    except Exception as exc:
        raise PPOTuneError(where, "policy_loads", f"pi_i (the reference policy) failed to load: {exc}") from exc

    # The prompts must be what this policy saw: same tokenizer, chat template and prompt version.
    system_prompt = system_prompt_for(load_vertical(params.world.vertical))
    try:
        check_compatible(read_metadata(str(returns_path)), returns_metadata(params, tokenizer, system_prompt),
                         str(returns_path))
    except ReturnsError as exc:
        raise PPOTuneError(str(returns_path), "returns_compatible", str(exc)) from exc

    # Q_i: the reward model; it must read the policy's ids.
    q_where = str(q_path)
    try:
        scorer, q_tok = load_scorer(q_path)
    except Exception as exc:
        raise PPOTuneError(q_where, "q_model_loads", f"the Q scorer failed to load: {exc}") from exc
    check_same_tokenizer(tokenizer, q_tok, q_where)
    manifest = read_manifest(q_path)
    max_action_tokens = manifest.get("max_action_tokens")
    if max_action_tokens is not None and p.response_length > int(max_action_tokens):
        raise PPOTuneError(
            q_where, "response_length_within_q",
            f"ppo_tune.response_length ({p.response_length}) exceeds the {max_action_tokens} action tokens Q was fit "
            "on (fit_q.max_action_tokens): Q would score text it never saw",
        )
    return Inputs(prompts, where, policy, tokenizer, scorer, q_tok, max_action_tokens)


def tune(params: Params, returns_path: str | Path, q_path: str | Path, out_dir: str | Path,
         policy_path: str | Path | None = None, progress: bool = True) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Train pi_{i+1}, write ``out_dir`` atomically; returns (metrics, training-curve rows)."""
    from pipeline_steps.common.base_model import load_causal_lm

    p = params.ppo_tune
    t0 = time.perf_counter()
    inputs = load_inputs(params, returns_path, q_path, policy_path)
    generation_config = copy.deepcopy(inputs.policy.generation_config)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    episodes_per_step = p.per_device_train_batch_size * p.gradient_accumulation_steps
    callback = _curve_callback(episodes_per_step / (1 if p.algorithm == "ppo" else p.num_ppo_epochs))
    try:
        work = stage / "trainer"
        t_train, cpu_train = time.perf_counter(), time.process_time()
        if p.algorithm == "ppo":
            trained = train_ppo(p, inputs.policy, inputs.tokenizer, inputs.scorer, q_path, inputs.prompts.train,
                                inputs.prompts.heldout, work, callback, progress)
        else:
            trained = train_rloo_grpo(p, inputs.policy, inputs.tokenizer, inputs.scorer, inputs.prompts.train, work,
                                      callback, progress, inputs.max_action_tokens)
        train_seconds, train_cpu_seconds = time.perf_counter() - t_train, time.process_time() - cpu_train
        save_policy(trained, inputs.tokenizer, generation_config, stage, inputs.policy_path, params.base_model.dtype)
        del trained, inputs.policy
        gc.collect()
        shutil.rmtree(work, ignore_errors=True)

        # Theorem 1 check on the saved artifacts: the folders collect will deploy.
        old = load_causal_lm(inputs.policy_path, dtype=params.base_model.dtype)
        new = load_causal_lm(stage / "policy", dtype=params.base_model.dtype)
        check, samples = theorem1_check(old, new, inputs.tokenizer, inputs.scorer, inputs.q_tokenizer,
                                        inputs.prompts.heldout, p, inputs.max_action_tokens, progress,
                                        inputs.prompts.heldout_conversations)
        write_samples(samples, stage)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        stage.rename(out_dir)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    last = callback.rows[-1] if callback.rows else {}
    metrics = {
        "algorithm": p.algorithm,
        "policy": inputs.policy_path,
        "q_model": str(q_path),
        "prompts": inputs.prompts.info,
        "theorem1": check,
        "training": {
            "updates": len(callback.rows),
            "episodes": int(last.get("episode", 0)),
            "final_q_reward": last.get("q_reward"),
            "train_seconds": train_seconds,
            "train_cpu_seconds": train_cpu_seconds,  # CPU time of this process: less sensitive to other load
            "episodes_per_second": (last.get("episode", 0) / train_seconds) if train_seconds else 0.0,
        },
        "wall_seconds": time.perf_counter() - t0,
    }
    return metrics, callback.rows


def print_summary(metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    c, imp = metrics["theorem1"], metrics["theorem1"]["improvement"]
    table = Table(title=f"ppo_tune ({metrics['algorithm']}): held-out Theorem 1 check")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("held-out states x samples", f"{c['heldout_states']} x {c['samples_per_state']}")
    table.add_row("E[Q] under pi_i", f"{c['q_pi_i_mean']:.4f}")
    table.add_row("E[Q] under pi_i+1", f"{c['q_pi_next_mean']:.4f}")
    table.add_row("improvement (95% CI)", f"{imp['mean']:+.4f} [{imp['ci_low']:+.4f}, {imp['ci_high']:+.4f}]")
    table.add_row("CI resamples", f"{imp.get('n_groups', imp['n_states'])} {'conversations' if 'n_groups' in imp else 'states'}")
    table.add_row("KL(pi_i+1 || pi_i) per token", f"{c['kl_per_token']:.4f}")
    table.add_row("KL per response", f"{c['kl_per_response']:.4f}")
    t = metrics["training"]
    table.add_row("updates / episodes", f"{t['updates']} / {t['episodes']}")
    table.add_row("training episodes/s", f"{t['episodes_per_second']:.2f}")
    table.add_row("wall time (s)", f"{metrics['wall_seconds']:.1f}")
    Console().print(table)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline_steps.ppo_tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="params.yaml", help="params.yaml to read (sections ppo_tune, base_model, prompt, world).")
    p.add_argument("--returns", default="data/returns/returns.parquet", help="Returns rows: the single-turn prompts (state_text).")
    p.add_argument("--q-model", default="data/fit_q/model/scorer", help="Q_i: fit_q's merged scorer folder (the reward model).")
    p.add_argument("--policy", help="pi_i: pi0 (base_model.name_or_path, the default), a model folder, "
                   "or models:/<name>@<alias> (e.g. the registry champion).")
    p.add_argument("--out", default="data/ppo_tune/model", help="Folder for adapter/, policy/ and samples (replaced atomically).")
    p.add_argument("--metrics", default="metrics/ppo_tune.json", help="Theorem 1 check and training summary (DVC metrics).")
    p.add_argument("--curve", default="plots/ppo_tune/training_curve.csv", help="Training metrics per update (DVC plots).")
    p.add_argument("--algorithm", choices=["ppo", "rloo", "grpo"], help="Override ppo_tune.algorithm.")
    p.add_argument("--total-episodes", type=int, help="Override ppo_tune.total_episodes.")
    p.add_argument("--base-model", help="Override base_model.name_or_path.")
    p.add_argument("--no-mlflow", action="store_true", help="Do not log to MLflow.")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {f"ppo_tune.{k}": v for k, v in
                                 {"algorithm": args.algorithm, "total_episodes": args.total_episodes}.items() if v is not None}
    if args.base_model:
        overrides["base_model.name_or_path"] = args.base_model
    try:
        params = load_params(args.params, overrides)
    except ConfigError as exc:
        raise SystemExit(f"ppo_tune: error: {exc}") from exc
    if params.base_model.num_threads:
        import torch

        torch.set_num_threads(params.base_model.num_threads)
    run_params = {**params.ppo_tune.model_dump(), "policy": args.policy or params.base_model.name_or_path,
                  "q_model": args.q_model, "returns": args.returns}
    with step_run(STEP, run_params, enabled=not args.no_mlflow) as run:
        try:
            metrics, curve = tune(params, args.returns, args.q_model, args.out, args.policy, progress=not args.no_progress)
        except PPOTuneError as exc:
            raise SystemExit(f"ppo_tune: error: {exc}") from exc
        write_curve(curve, args.curve)
        if run is not None:
            import mlflow

            mlflow.log_metrics(flat_metrics({"theorem1": metrics["theorem1"], "training": metrics["training"],
                                             "prompts": metrics["prompts"]}))
            mlflow.set_tag("ippo.algorithm", metrics["algorithm"])
            for name in ("samples.csv", "samples.md"):
                mlflow.log_artifact(str(Path(args.out) / name), artifact_path="samples")
            mlflow.log_artifact(args.curve, artifact_path="training")
    write_json(args.metrics, metrics)
    print_summary(metrics)
    return metrics


if __name__ == "__main__":
    main()
