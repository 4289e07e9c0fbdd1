"""One policy interface for everything that suggests a business message.

A policy maps a batch of states (each the conversation history up to the latest customer message)
to suggestions; ``None`` text is the abstain action. Implementations:

* :class:`LLMPolicy`: a causal LM prompted with the state rendered by
  :func:`~pipeline_steps.common.contract.render_state` (pi_0 is the prompted base model; later
  policies are PPO-tuned checkpoints), batched generation.
* :class:`PersonaExplorationPolicy`: the behaviour policy of the paper's section 3.2: the same LM,
  with a randomly drawn style (tone, length, emoji, ...) added to its instructions, for action coverage.
* scripted reference strategies in :mod:`pipeline_steps.world.scripted`.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from pipeline_steps.common.contract import ABSTAIN_MARKER, HistoryTurn, render_state


@dataclass(frozen=True)
class Suggestion:
    """A policy's output for one state: the text (None = abstain) and behaviour-policy metadata."""

    text: str | None
    behaviour: dict[str, Any] | None = None


class Policy(Protocol):
    policy_id: str
    policy_version: str

    def suggest(self, histories: Sequence[Sequence[HistoryTurn]], keys: Sequence[str]) -> list[Suggestion]:
        """Suggestions for a batch of states; ``keys`` identify conversations (for seeded randomness)."""
        ...


def stable_seed(*parts: object) -> int:
    """A seed derived from values (not from Python's salted ``hash``), for reproducible sampling."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFF


_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_ROLE_PREFIX = re.compile(r"^\s*(assistant|business|agent|reply|suggested reply|suggestion)(\s*\([^)]*\))?\s*:\s*", re.I)


def clean_generation(text: str) -> str | None:
    """Post-process a raw generation into a suggestion: first paragraph, no role prefix or quotes."""
    if ABSTAIN_MARKER.lower() in text.lower():
        return None
    text = text.strip()
    text = text.split("\n\n")[0].strip()
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    text = _ROLE_PREFIX.sub("", text)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    # A generation cut by the token budget ends mid-sentence: keep the complete sentences.
    if text and text[-1] not in ".!?)\"'" and _SENTENCE_END.search(text):
        text = text[: [m.end() for m in _SENTENCE_END.finditer(text)][-1]].strip()
    return text or None


@dataclass
class GenerationStats:
    """Counters for throughput reporting."""

    new_tokens: int = 0
    generate_seconds: float = 0.0
    calls: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.generate_seconds if self.generate_seconds else 0.0


@dataclass
class LLMPolicy:
    """A causal LM that suggests the next business message for a rendered state."""

    model: Any
    tokenizer: Any
    system_prompt: str
    max_prompt_tokens: int
    max_new_tokens: int = 48
    temperature: float = 0.7
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int = 0
    policy_id: str = "pi0"
    policy_version: str = "0"
    stats: GenerationStats = field(default_factory=GenerationStats)
    state_notes: Callable[[Sequence[HistoryTurn]], str] | None = None  # prompt.state_notes (world.state_reader)

    def prompts(self, histories: Sequence[Sequence[HistoryTurn]], system_prompts: Sequence[str] | None = None) -> list[str]:
        sps = system_prompts or [self.system_prompt] * len(histories)
        notes = self.state_notes
        return [render_state(h, self.tokenizer, sp, self.max_prompt_tokens, notes(h) if notes is not None else None)
                for h, sp in zip(histories, sps)]

    def generate(self, prompts: list[str], seed: int, **generate_overrides: Any) -> list[str]:
        """Batched sampling of one response per prompt (left padding); returns the decoded new text.

        ``generate_overrides`` go to ``model.generate`` over the policy's settings (e.g. ``cache_implementation``):
        benchmarks/bench_generation.py times the variants on the prompts collect hands to this method.
        """
        import torch

        from pipeline_steps.common.base_model import sdpa_without_cudnn

        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        torch.manual_seed(seed)
        do_sample = self.temperature > 0
        settings = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": do_sample,
            "temperature": self.temperature if do_sample else None,
            "top_p": self.top_p if do_sample else None,
            "top_k": None,
            "repetition_penalty": self.repetition_penalty,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        t0 = time.perf_counter()
        with torch.inference_mode(), sdpa_without_cudnn():
            out = self.model.generate(**enc, **{**settings, **generate_overrides})
        self.stats.generate_seconds += time.perf_counter() - t0
        new = out[:, enc["input_ids"].shape[1] :]
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self.stats.new_tokens += int(((new != pad) & (new != eos)).sum()) + int((new == eos).any(dim=1).sum())
        self.stats.calls += 1
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    def suggest(self, histories: Sequence[Sequence[HistoryTurn]], keys: Sequence[str]) -> list[Suggestion]:
        prompts = self.prompts(histories)
        raw = self.generate(prompts, stable_seed(self.seed, *keys, *(len(h) for h in histories)))
        return [Suggestion(clean_generation(r)) for r in raw]


EXPLORATION_STYLES: dict[str, list[str]] = {
    "tone": ["warm and casual", "formal and precise", "enthusiastic", "calm and reassuring", "direct and brief"],
    "length": ["one short sentence", "two sentences", "three or four sentences"],
    "emoji": ["no emoji", "one emoji"],
    "focus": [
        "ask a specific question about their project",
        "answer their question with concrete facts",
        "propose a concrete next step such as a visit or a call",
        "show empathy and build rapport",
        "mention what makes the business a good fit",
    ],
}


@dataclass
class PersonaExplorationPolicy(LLMPolicy):
    """Behaviour policy for action coverage (paper 3.2): a random style per suggestion.

    The style is added to the system prompt for generation only; the logged state is the canonical
    rendering, and the drawn style is logged in the record's ``behaviour`` metadata.
    """

    policy_id: str = "explore"

    def suggest(self, histories: Sequence[Sequence[HistoryTurn]], keys: Sequence[str]) -> list[Suggestion]:
        import random

        styles = []
        for key, h in zip(keys, histories):
            r = random.Random(stable_seed(self.seed, key, len(h)))
            styles.append({k: r.choice(v) for k, v in EXPLORATION_STYLES.items()})
        sps = [
            f"{self.system_prompt} Style for this reply: {s['tone']}, {s['length']}, {s['emoji']}; {s['focus']}."
            for s in styles
        ]
        prompts = self.prompts(histories, sps)
        raw = self.generate(prompts, stable_seed(self.seed, *keys, *(len(h) for h in histories)))
        return [Suggestion(clean_generation(r), {"persona": s}) for r, s in zip(raw, styles)]


@dataclass
class BestOfNPolicy:
    """Inference-time improvement without training: ``n`` samples of a policy per turn, the one Q ranks highest.

    The baseline that asks how much of Iterative PPO's gain reranking by Q_0 alone gets (``ippo bench``).
    Q reads the state exactly as it was rendered for the policy (:func:`render_state`), so it scores the
    same (state, action) pairs it was fit on.
    """

    base: LLMPolicy
    q_model: Any
    q_tokenizer: Any
    n: int = 4
    max_action_tokens: int | None = None
    score_batch_size: int = 16

    def __post_init__(self) -> None:
        self.policy_id = f"best_of_{self.n}"
        self.policy_version = self.base.policy_version

    @property
    def stats(self) -> GenerationStats:
        return self.base.stats

    def suggest(self, histories: Sequence[Sequence[HistoryTurn]], keys: Sequence[str]) -> list[Suggestion]:
        from pipeline_steps.common.q_input import action_text
        from pipeline_steps.common.q_model import score

        prompts = self.base.prompts(histories)
        repeated = [p for p in prompts for _ in range(self.n)]
        raw = self.base.generate(repeated, stable_seed(self.base.seed, "best_of_n", *keys, *(len(h) for h in histories)))
        texts = [clean_generation(r) for r in raw]
        q = score(self.q_model, self.q_tokenizer, repeated, [action_text(t) for t in texts],
                  batch_size=self.score_batch_size, max_action_tokens=self.max_action_tokens)
        best = q.reshape(len(prompts), self.n).argmax(axis=1)
        return [Suggestion(texts[i * self.n + int(j)], {"best_of_n": {"n": self.n, "q": float(q[i * self.n + int(j)])}})
                for i, j in enumerate(best)]


def registered_policy_dir(uri: str) -> str:
    """Download a registered policy (``models:/<name>@<alias>`` or ``/<version>``) and return its HF folder.

    ``register`` logs the policy as a pyfunc model whose weights sit under ``artifacts/policy/``.
    """
    from pathlib import Path

    import mlflow

    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    for candidate in (root / "artifacts" / "policy", root):
        if (candidate / "config.json").is_file():
            return str(candidate)
    found = sorted(p.parent for p in root.rglob("config.json"))
    if not found:
        raise ValueError(f"{uri}: the registered model has no HF model folder (config.json) in its artifacts")
    return str(found[0])


def resolve_policy_dir(spec: str, params: Any) -> str:
    """A local HF folder for an LLM policy spec: 'pi0' (the base model), a folder, or a models:/ URI."""
    from pathlib import Path

    if spec in ("pi0", "explore"):
        from pipeline_steps.common.base_model import resolve_base_model

        return str(resolve_base_model(params.base_model.name_or_path, params.base_model.cache_dir))
    if spec.startswith("models:/"):
        return registered_policy_dir(spec)
    if not Path(spec).is_dir():
        raise ValueError(f"policy '{spec}' is not 'pi0', a models:/ URI or an existing model folder")
    return spec


def load_policy(spec: str, params: Any, vertical: dict[str, Any], seed: int = 0) -> Policy:
    """Build the policy a spec names (see ``collect.policy`` in params.yaml for the forms)."""
    from pipeline_steps.common.contract import system_prompt_for
    from pipeline_steps.world.state_reader import notes_reader

    c = params.collect
    if spec.startswith("script:"):
        from pipeline_steps.world.scripted import ScriptedPolicy

        return ScriptedPolicy(spec.split(":", 1)[1], vertical, seed=seed)
    if spec in ("pi0", "explore"):
        model_dir = None
        policy_id, version = spec, f"{params.base_model.name_or_path}"
    elif spec.startswith("models:/"):
        model_dir = registered_policy_dir(spec)
        policy_id, version = spec.split("/", 1)[1], spec
    else:
        from pathlib import Path

        if not Path(spec).is_dir():
            raise ValueError(
                f"collect.policy: '{spec}' is not 'pi0', 'explore', 'script:<name>', a models:/ URI "
                "or an existing model folder"
            )
        model_dir, policy_id, version = spec, Path(spec).name, spec
    from pipeline_steps.common.base_model import load_causal_lm, load_tokenizer, resolve_base_model

    if params.base_model.num_threads:
        import torch

        torch.set_num_threads(params.base_model.num_threads)
    path = model_dir or resolve_base_model(params.base_model.name_or_path, params.base_model.cache_dir)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, dtype=params.base_model.dtype)
    cls = PersonaExplorationPolicy if spec == "explore" else LLMPolicy
    return cls(
        model=model,
        tokenizer=tokenizer,
        system_prompt=system_prompt_for(vertical),
        max_prompt_tokens=params.prompt.max_prompt_tokens,
        max_new_tokens=c.max_new_tokens,
        temperature=c.temperature,
        top_p=c.top_p,
        repetition_penalty=c.repetition_penalty,
        seed=seed,
        policy_id=policy_id,
        policy_version=str(version),
        state_notes=notes_reader(params.prompt.state_notes, vertical),
    )


def _response_batches(tokenizer: Any, states: Sequence[str], responses: Sequence[Sequence[int]],
                      batch_size: int) -> Iterator[tuple[Any, Any, list[tuple[int, int]]]]:
    """Right-padded (ids, mask) batches of state + response, with each row's response span (start, end)."""
    import torch

    for lo in range(0, len(states), batch_size):
        seqs, spans = [], []
        for s, r in zip(states[lo : lo + batch_size], responses[lo : lo + batch_size]):
            q = tokenizer(s, add_special_tokens=False)["input_ids"]
            seqs.append(q + list(r))
            spans.append((len(q), len(q) + len(r)))
        ids = torch.full((len(seqs), max(len(x) for x in seqs)), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(seqs):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        yield ids, mask, spans


def _response_logit_rows(model: Any, ids: Any, mask: Any, spans: Sequence[tuple[int, int]],
                         temperature: float) -> list[Any]:
    """Log-softmax rows (at ``temperature``) that predict each response token of one batch."""
    import torch

    from pipeline_steps.common.base_model import sdpa_without_cudnn

    with torch.inference_mode(), sdpa_without_cudnn():
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        # only the response positions are kept (their vocabulary rows), on the model's device
        return [torch.log_softmax(logits[i, st - 1 : end - 1].float() / temperature, dim=-1)
                for i, (st, end) in enumerate(spans)]


def response_logprobs(model: Any, tokenizer: Any, states: Sequence[str], responses: Sequence[Sequence[int]],
                      temperature: float, batch_size: int) -> list[np.ndarray]:
    """Per-token log-probabilities (at ``temperature``) of each response given its state; right-padded batches."""
    out: list[np.ndarray] = []
    for ids, mask, spans in _response_batches(tokenizer, states, responses, batch_size):
        for i, ((st, end), row) in enumerate(zip(spans, _response_logit_rows(model, ids, mask, spans, temperature))):
            tokens = ids[i, st:end].to(row.device)
            out.append(row.gather(-1, tokens[:, None])[:, 0].cpu().numpy().astype(np.float64))
    return out


def response_token_kls(model: Any, reference_model: Any, tokenizer: Any, states: Sequence[str],
                       responses: Sequence[Sequence[int]], temperature: float, batch_size: int) -> list[np.ndarray]:
    """Exact ``KL(policy(.|prefix) || reference(.|prefix))`` over the vocabulary at each token of each response.

    Summed over a response sampled from ``policy`` at ``temperature`` alone, this is the Rao-Blackwellised estimate
    of the sequence KL (Amini et al., 2025, "Better Estimation of the KL Divergence Between Language Models"): the
    same expectation as the sampled log-ratio ``sum(log pi - log pi_ref)``, never negative and of lower variance,
    so a few held-out states give a usable number. Along replies of a sampler that also truncates (top-p) or
    penalises repeats, both compare the two temperature distributions along those replies instead. ``model``
    (the policy that sampled ``responses``) and ``reference_model`` are causal LMs sharing ``tokenizer``; each
    padded batch is built once and read by both.
    """
    import torch

    out: list[np.ndarray] = []
    for ids, mask, spans in _response_batches(tokenizer, states, responses, batch_size):
        rows_p = _response_logit_rows(model, ids, mask, spans, temperature)
        rows_r = _response_logit_rows(reference_model, ids, mask, spans, temperature)
        with torch.inference_mode():
            for a, b in zip(rows_p, rows_r):
                pa = a.exp()  # a token pi cannot emit adds nothing (0 * -inf would be NaN)
                kl = torch.where(pa > 0, pa * (a - b.to(a.device)), 0.0).sum(-1).clamp_min(0.0)  # clamp: round-off
                out.append(kl.cpu().numpy().astype(np.float64))
    return out


def kl_per_token(policy: Any, reference: Any, states: Sequence[str], responses: Sequence[Sequence[int]],
                 batch_size: int) -> float:
    """Per-token ``KL(policy || reference)`` along ``policy``'s own samples ``responses`` (exact over the
    vocabulary at each position, :func:`response_token_kls`) between the two next-token distributions at
    ``policy``'s sampling temperature (the deployed replies' top-p and repetition penalty are not applied to
    them). ``policy``/``reference`` are loaded policies (``.model``, ``.tokenizer``).
    """
    t = policy.temperature or 1.0
    kls = response_token_kls(policy.model, reference.model, policy.tokenizer, states, responses, t, batch_size)
    tokens = sum(len(x) for x in kls)
    return float(sum(float(x.sum()) for x in kls) / max(tokens, 1))
