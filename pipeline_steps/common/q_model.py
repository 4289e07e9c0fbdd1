"""Scoring with the learned Q-function: the one forward pass shared by fit_q, ppo_tune and evaluate.

A Q model is a ``*ForSequenceClassification`` causal LM with one output (``num_labels=1``), saved by
fit_q as a merged folder (``<out>/scorer``; what TRL's ``PPOTrainer`` takes as ``reward_model`` and
what initialises its value model) and as a LoRA adapter (``<out>/adapter``).

**Exactly what TRL computes.** TRL 1.12's ``trl.experimental.utils.get_reward`` scores
``query_responses`` (left-padded query ids + response ids, right-padded with ``pad_token_id``) like this:

* ``attention_mask = query_responses != pad_token_id`` -- *every* pad-id token is masked, not only
  padding. With SmolLM2 ``pad == eos == <|im_end|>`` (id 2), so the ``<|im_end|>`` tokens that the chat
  template puts inside the rendered state are masked too (and replaced by id 0);
* ``position_ids = cumsum(attention_mask) - 1`` (masked tokens do not advance the position);
* the score head on the backbone's last hidden state, read at the last response token (the token before
  the first pad id in the response; the last query token if the response is empty).

:func:`q_forward` does the same arithmetic, for right-padded batches with explicit lengths, so fit_q
trains on exactly the values PPO will read and :func:`score` equals TRL's reward for the same
``(state, action)`` (``tests/test_fit_q.py`` proves it on rendered world states).

**The pad = eos ambiguity.** ``LlamaForSequenceClassification.forward`` pools at the last token whose id
is not ``pad_token_id``; a sequence that legitimately ended in id 2 would be pooled one token early. We
never rely on that pooling (the position is explicit here and in TRL), and :func:`encode` cuts the action
at its first pad-id token the way TRL cuts a generated response at EOS, so the two always agree. Call
:func:`score` rather than ``model(...)`` to get Q values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from pipeline_steps.common.q_input import q_input_ids

if TYPE_CHECKING:
    import torch

MANIFEST = "q_manifest.json"


def encode(tokenizer: Any, state_text: str, action: str, max_action_tokens: int | None = None) -> list[int]:
    """Token ids of ``(s, a)`` as PPO's reward model reads them.

    :func:`q_input_ids` (query tokens + at most ``max_action_tokens`` action tokens, no special tokens),
    with the action cut before its first pad-id token (TRL ends a response there).
    """
    ids = q_input_ids(tokenizer, state_text, action, max_action_tokens)
    n_action = len(q_input_ids(tokenizer, "", action, max_action_tokens))  # "" tokenises to no ids
    return ids[: len(ids) - n_action] + response_ids(tokenizer, action, max_action_tokens)


def response_ids(tokenizer: Any, action: str, max_action_tokens: int | None = None) -> list[int]:
    """The action's part of :func:`encode`: its ids (at most ``max_action_tokens``), cut before the first pad id."""
    response = q_input_ids(tokenizer, "", action, max_action_tokens)
    pad = tokenizer.pad_token_id
    return response[: response.index(pad)] if pad in response else response


def pad_right(seqs: Sequence[Sequence[int]], pad_token_id: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Right-padded ``input_ids`` and the true ``lengths`` of a batch of id lists."""
    import torch

    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = torch.full((len(seqs), int(lengths.max())), pad_token_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out, lengths


def _classifier(model: Any) -> Any:
    """The ``*ForSequenceClassification`` module under an optional PEFT wrapper (LoRA layers stay active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def last_hidden(model: Any, input_ids: "torch.Tensor", lengths: "torch.Tensor", pad_token_id: int) -> "torch.Tensor":
    """The backbone's last hidden state at each row's last token (what the score head reads), shape (batch, d)."""
    import torch

    clf = _classifier(model)
    attention_mask = input_ids != pad_token_id
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    backbone = getattr(clf, clf.base_model_prefix)
    out = backbone(
        input_ids=torch.masked_fill(input_ids, ~attention_mask, 0),
        attention_mask=attention_mask,
        position_ids=position_ids,
        return_dict=True,
        output_hidden_states=True,
        use_cache=False,
    )
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return out.hidden_states[-1][rows, lengths.to(input_ids.device) - 1]


def q_forward(model: Any, input_ids: "torch.Tensor", lengths: "torch.Tensor", pad_token_id: int) -> "torch.Tensor":
    """Q for each row of a right-padded batch: TRL ``get_reward``'s arithmetic, read at ``lengths - 1``.

    (TRL applies the linear head to every position and then picks one; picking first is the same number.)
    Differentiable (fit_q trains through it); returns a float tensor of shape ``(batch,)``.
    """
    return _classifier(model).score(last_hidden(model, input_ids, lengths, pad_token_id))[:, 0].float()


def score(
    model: Any,
    tokenizer: Any,
    states: Sequence[str],
    actions: Sequence[str],
    batch_size: int = 16,
    max_action_tokens: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """``Q(s, a)`` for each pair, as float64, in input order (batched by length to waste little padding).

    ``max_action_tokens`` caps the action like fit_q did in training (``read_manifest(path)`` has the value);
    None scores the whole action, as TRL scores whatever response it generated.
    """
    if len(states) != len(actions):
        raise ValueError(f"score: {len(states)} states but {len(actions)} actions")
    seqs = [encode(tokenizer, s, a, max_action_tokens) for s, a in zip(states, actions)]
    return score_ids(model, seqs, tokenizer.pad_token_id, batch_size, progress)


def score_by_state(
    model: Any,
    tokenizer: Any,
    states: Sequence[str],
    actions: Sequence[str],
    batch_size: int = 16,
    max_action_tokens: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """:func:`score` for pairs that share states (candidates, best-of-n samples): each distinct state's tokens run
    through the model once, and its actions run on the cached keys and values, with the same mask, positions and
    read-out as :func:`q_forward` (``tests/test_fit_q.py`` checks the values against :func:`score`). Pairs with an
    empty action are scored by :func:`score`. On a CPU this is faster by about the share of state tokens; on a GPU,
    where a 135M model's forward is bound by kernel launches, whole pairs batched by :func:`score` may be faster."""
    import copy

    import torch
    from tqdm.auto import tqdm

    from pipeline_steps.common.base_model import sdpa_without_cudnn

    if len(states) != len(actions):
        raise ValueError(f"score_by_state: {len(states)} states but {len(actions)} actions")
    pad = tokenizer.pad_token_id
    query_of = {s: tokenizer(s, add_special_tokens=False)["input_ids"] for s in dict.fromkeys(states)}
    responses = [response_ids(tokenizer, a, max_action_tokens) for a in actions]
    out = np.empty(len(states), dtype=np.float64)
    empty = [i for i, r in enumerate(responses) if not r]
    if empty:
        out[empty] = score(model, tokenizer, [states[i] for i in empty], [actions[i] for i in empty], batch_size,
                           max_action_tokens)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(states):
        if responses[i]:
            groups.setdefault(s, []).append(i)
    clf = _classifier(model)
    backbone = getattr(clf, clf.base_model_prefix)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), sdpa_without_cudnn(), tqdm(total=len(states) - len(empty), desc="Q scores",
                                                                 unit="row", disable=not progress) as bar:
            for state, rows in groups.items():
                query = torch.tensor([query_of[state]], dtype=torch.long, device=device)
                q_mask = query != pad  # every pad-id token masked, positions not advanced (as q_forward, TRL)
                prefix = backbone(input_ids=torch.masked_fill(query, ~q_mask, 0), attention_mask=q_mask,
                                  position_ids=q_mask.cumsum(1) - q_mask.long(), use_cache=True, return_dict=True)
                start = int(q_mask.sum())
                for b in range(0, len(rows), batch_size):
                    idx = rows[b : b + batch_size]
                    ids, lengths = pad_right([responses[i] for i in idx], pad)
                    ids, lengths = ids.to(device), lengths.to(device)
                    a_mask = torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]
                    cache = copy.deepcopy(prefix.cache)
                    cache.batch_repeat_interleave(len(idx))
                    res = backbone(input_ids=torch.masked_fill(ids, ~a_mask, 0),
                                   attention_mask=torch.cat([q_mask.expand(len(idx), -1), a_mask], dim=1),
                                   position_ids=start + torch.arange(ids.shape[1], device=device)[None, :].expand(len(idx), -1),
                                   cache=cache, use_cache=True, output_hidden_states=True, return_dict=True)
                    last = res.hidden_states[-1][torch.arange(len(idx), device=device), lengths - 1]
                    out[idx] = clf.score(last)[:, 0].float().cpu().numpy()
                    bar.update(len(idx))
    finally:
        model.train(was_training)
    return out


def score_ids(
    model: Any, seqs: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 16, progress: bool = False
) -> np.ndarray:
    """:func:`score` for already encoded sequences."""
    return _batched(q_forward, model, seqs, pad_token_id, batch_size, progress, "Q scores")


def hidden_ids(
    model: Any, seqs: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 16, progress: bool = False
) -> np.ndarray:
    """:func:`last_hidden` of encoded sequences, as a float64 array (rows, d)."""
    return _batched(last_hidden, model, seqs, pad_token_id, batch_size, progress, "last-token states")


def _batched(fn: Any, model: Any, seqs: Sequence[Sequence[int]], pad_token_id: int, batch_size: int,
             progress: bool, desc: str) -> np.ndarray:
    import torch
    from tqdm.auto import tqdm

    from pipeline_steps.common.base_model import sdpa_without_cudnn

    order = np.argsort([len(s) for s in seqs], kind="stable")
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), sdpa_without_cudnn(), tqdm(total=len(seqs), desc=desc, unit="row", disable=not progress) as bar:
            device = next(model.parameters()).device
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                input_ids, lengths = pad_right([seqs[i] for i in idx], pad_token_id)
                parts.append((idx, fn(model, input_ids.to(device), lengths, pad_token_id).float().cpu().numpy()))
                bar.update(len(idx))
    finally:
        model.train(was_training)
    if not parts:
        return np.zeros(0, dtype=np.float64)
    out = np.empty((len(seqs), *parts[0][1].shape[1:]), dtype=np.float64)
    for idx, values in parts:
        out[idx] = values
    return out


def load_scorer(path: str | Path, dtype: str = "float32", base_model: str | Path | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a saved Q model, in eval mode.

    ``path`` is a merged scorer folder (``<fit_q out>/scorer``) or a LoRA adapter folder (``adapter/``,
    recognised by ``adapter_config.json``; its base model is ``base_model`` or else the one recorded in that
    file, a path relative to the working directory fit_q ran in).
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    from pipeline_steps.common.base_model import load_tokenizer, to_gpu_if_any

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no Q model folder here (expected fit_q's scorer/ or adapter/)")
    torch_dtype = getattr(torch, dtype)
    if (path / "adapter_config.json").is_file():
        from peft import PeftConfig, PeftModel

        base_path = str(base_model or PeftConfig.from_pretrained(str(path)).base_model_name_or_path)
        base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=torch_dtype)
        model = PeftModel.from_pretrained(base, str(path))
        tok_path = path if (path / "tokenizer_config.json").is_file() else base_path
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch_dtype)
        tok_path = path
    tokenizer = load_tokenizer(tok_path)
    _classifier(model).config.pad_token_id = tokenizer.pad_token_id
    return to_gpu_if_any(model).eval(), tokenizer  # scorers read the model's device (score, rewards, best-of-n)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """What a Q model was trained on (returns metadata, ``max_action_tokens``, ...); {} when absent."""
    f = Path(path) / MANIFEST
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
