"""The world's dynamics: a hidden customer state that evolves with the words the business sends.

One conversation, turn by turn (paper eq. 2):

1. the customer sends ``c_i`` (or leaves), possibly stating the outcome (``o_i = 1``, terminal);
2. the SR agent suggests ``a_i`` (or abstains);
3. the business sends it verbatim, edits it, or rejects it and sends its own habitual message
   (``P(m_i | s_i, a_i)``: depends on length, tone, invented prices/promises, relevance), or stops;
4. the customer reacts to ``m_i`` (``P(s_{i+1} | s_i, a_i, m_i)``): needs get revealed by specific
   questions, trust grows with answers and tailored messages, annoyance grows with pushy, repetitive,
   overlong, off-topic or garbled messages; a concrete proposal (book a visit, share contact) converts
   only once enough needs are understood, and hurts when premature. Generic friendliness keeps the
   chat alive but never converts, so a policy that maximises immediate replies or acceptance loses to
   the outcome-driven sequence: understand the need, tailor, then propose a next step.

Everything random is drawn from per-conversation streams of a seeded ``numpy`` generator: conversation
``k`` of seed ``s`` meets the same persona whatever policy talks to it (common random numbers for A/B
tests), and the same seed gives the same conversations.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import yaml

from pipeline_steps.common.config import ConfigError, WorldParams
from pipeline_steps.common.contract import HistoryTurn, Turn
from pipeline_steps.common.policies import Policy, Suggestion
from pipeline_steps.world.featurizer import EMOJI_RE, MONEY_RE, Featurizer, MessageFeatures, mentioned_terms

VERTICALS_DIR = Path(__file__).parent / "verticals"
REQUIRED_VERTICAL_KEYS = (
    "name",
    "business_name",
    "business_description",
    "acts",
    "call_to_action_acts",
    "on_topic_reference",
    "projects",
    "customer",
    "business_templates",
)
REQUIRED_CUSTOMER_KEYS = (
    "questions",
    "ready_cues",
    "acknowledgements",
    "friendly_replies",
    "premature",
    "declines",
    "repeated",
    "confused",
    "ignored_question",
    "conversions",
    "first_names",
)


def load_vertical(name_or_path: str) -> dict[str, Any]:
    """Load and check a vertical file (a name in ``verticals/`` or a path); errors name file and field."""
    path = Path(name_or_path)
    if not path.suffix:
        path = VERTICALS_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in VERTICALS_DIR.glob("*.yaml"))
        raise ConfigError(f"{path}: unknown vertical '{name_or_path}' (field 'world.vertical'); known: {known}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a vertical must be a mapping")
    for key in REQUIRED_VERTICAL_KEYS:
        if key not in data:
            raise ConfigError(f"{path}: missing field '{key}'")
    for key in REQUIRED_CUSTOMER_KEYS:
        if not data["customer"].get(key):
            raise ConfigError(f"{path}: missing or empty field 'customer.{key}'")
    for act, spec in data["acts"].items():
        if not isinstance(spec, dict) or not spec.get("prototypes"):
            raise ConfigError(f"{path}: field 'acts.{act}.prototypes' must be a non-empty list")
    for act in data["call_to_action_acts"]:
        if act not in data["acts"]:
            raise ConfigError(f"{path}: field 'call_to_action_acts' names unknown act '{act}'")
    for name, proj in data["projects"].items():
        if not proj.get("openings") or not proj.get("needs"):
            raise ConfigError(f"{path}: field 'projects.{name}' needs 'openings' and 'needs'")
        for need, spec in proj["needs"].items():
            for key in ("ask", "reveal", "terms"):
                if not spec.get(key):
                    raise ConfigError(f"{path}: missing field 'projects.{name}.needs.{need}.{key}'")
            spec["terms"] = [str(t) for t in spec["terms"]]
    for act in data["business_templates"]:
        if act not in data["acts"] and act != "tailored_book":
            raise ConfigError(f"{path}: field 'business_templates.{act}' is not an act of this vertical")
    data["_path"] = str(path)
    return data


# ------------------------------------------------------------------------------------------------
# Hidden customer state
# ------------------------------------------------------------------------------------------------


@dataclass
class Customer:
    """The hidden state of one simulated customer (never shown to the policy)."""

    persona: str
    project: str
    needs: list[str]  # in the order they tend to come up
    required: int  # needs that must be understood before a proposal can convert
    patience: float  # turns left before the customer gives up
    trust: float
    readiness: float
    likes_emoji: bool
    max_words: float
    asks_questions: float
    annoyance: float = 0.0
    revealed: list[str] = field(default_factory=list)
    pending_question: str | None = None
    ready_cue_given: bool = False
    friendly_count: int = 0
    proposals: int = 0
    name: str = "alex"
    phone: str = "(415) 555-0100"
    email: str = "alex@example.com"

    @property
    def understood(self) -> bool:
        return len(self.revealed) >= self.required


def _draw(rng: np.random.Generator, r) -> float:
    return float(rng.uniform(r.low, r.high))


def sample_customer(params: WorldParams, vertical: dict[str, Any], rng: np.random.Generator) -> Customer:
    names = list(params.personas)
    weights = np.array([params.personas[n].weight for n in names], dtype=float)
    persona_name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    p = params.personas[persona_name]
    projects = list(vertical["projects"])
    project = projects[int(rng.integers(len(projects)))]
    needs = list(vertical["projects"][project]["needs"])
    rng.shuffle(needs)
    required = int(round(_draw(rng, p.needs_to_reveal)))
    first = vertical["customer"]["first_names"][int(rng.integers(len(vertical["customer"]["first_names"])))]
    return Customer(
        persona=persona_name,
        project=project,
        needs=needs,
        required=max(0, min(required, len(needs))),
        patience=_draw(rng, p.patience),
        trust=_draw(rng, p.trust),
        readiness=_draw(rng, p.readiness),
        likes_emoji=bool(rng.random() < p.likes_emoji),
        max_words=_draw(rng, p.max_words),
        asks_questions=p.asks_questions,
        name=first,
        phone=f"({int(rng.integers(201, 989))}) 555-01{int(rng.integers(0, 100)):02d}",
        email=f"{first}.{int(rng.integers(10, 99))}@example.com",
    )


# ------------------------------------------------------------------------------------------------
# Conversations
# ------------------------------------------------------------------------------------------------


@dataclass
class Conversation:
    """One conversation in progress: the public history and the hidden customer."""

    conversation_id: str
    index: int
    customer: Customer
    rng: np.random.Generator
    clock: datetime
    history: list[HistoryTurn] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    last_sent: list[str] = field(default_factory=list)
    last_acts: list[str] = field(default_factory=list)
    done: bool = False
    converted: bool = False



def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _pick(rng: np.random.Generator, items: Sequence[str]) -> str:
    return items[int(rng.integers(len(items)))]


SENTENCE_RE = re.compile(r"(?<=[.!?])\s+")


class World:
    """Simulated customers and a business that react to the words of each message (BRIEF section 5)."""

    def __init__(self, params: WorldParams, vertical: dict[str, Any] | None = None, featurizer: Featurizer | None = None):
        self.params = params
        self.vertical = vertical or load_vertical(params.vertical)
        self.featurizer = featurizer or Featurizer(self.vertical)
        self.cta_acts = set(self.vertical["call_to_action_acts"])
        self.c = self.vertical["customer"]
        habit = params.business.habit_mix
        unknown = [a for a in habit if a not in self.vertical["business_templates"]]
        if unknown:
            raise ConfigError(f"world.business.habit_mix: acts {unknown} have no business_templates in the vertical")
        self._habit_acts = list(habit)
        w = np.array([habit[a] for a in self._habit_acts], dtype=float)
        self._habit_p = w / w.sum()

    # --- starting ---------------------------------------------------------------------------

    def new_conversations(self, seed: int, start: int, count: int, start_time: datetime, id_prefix: str = "c") -> list[Conversation]:
        """Conversations ``start .. start+count-1`` of ``seed``; each has its own random streams."""
        convs = []
        for k in range(start, start + count):
            persona_rng, dyn_rng = (np.random.default_rng(s) for s in np.random.SeedSequence([seed, k]).spawn(2))
            customer = sample_customer(self.params, self.vertical, persona_rng)
            clock = start_time + timedelta(minutes=int(persona_rng.integers(0, 7 * 24 * 60)))
            conv = Conversation(f"{id_prefix}{seed}-{k:06d}", k, customer, dyn_rng, clock)
            opening = _pick(persona_rng, self.vertical["projects"][customer.project]["openings"])
            self._customer_says(conv, opening, outcome=0)
            convs.append(conv)
        return convs

    # --- one step for a batch ---------------------------------------------------------------

    def step(self, convs: list[Conversation], suggestions: list[Suggestion], policy_id: str, policy_version: str, variant: str) -> None:
        """Advance each (not done) conversation by one business message and the customer's reaction."""
        assert len(convs) == len(suggestions)
        texts = [s.text for s in suggestions if s.text is not None]
        feats = dict(zip(texts, self.featurizer(texts))) if texts else {}
        sent: list[tuple[str | None, str]] = []
        for conv, sug in zip(convs, suggestions):
            sent.append(self._business_decides(conv, sug.text, feats.get(sug.text) if sug.text else None))
        sent_texts = [m for m, _ in sent if m is not None]
        sent_feats = dict(zip(sent_texts, self.featurizer(sent_texts))) if sent_texts else {}
        for conv, sug, (msg, relation) in zip(convs, suggestions, sent):
            rec = conv.records[-1]
            conv.clock += timedelta(seconds=int(conv.rng.integers(20, 300)))
            rec.update(
                suggestion=sug.text,
                business_message=msg,
                relation=relation,
                policy_id=policy_id,
                policy_version=policy_version,
                variant=variant,
                business_ts=conv.clock,
                behaviour=sug.behaviour,
            )
            h = conv.history[-1]
            conv.history[-1] = HistoryTurn(h.customer_message, sug.text, msg, relation)
            if msg is None:
                conv.done = True
                continue
            self._customer_reacts(conv, msg, sent_feats[msg])

    # --- the business (eq. 2: P(m | s, a)) ----------------------------------------------------

    def _habitual_message(self, conv: Conversation) -> str:
        act = self._habit_acts[int(conv.rng.choice(len(self._habit_acts), p=self._habit_p))]
        return _pick(conv.rng, self.vertical["business_templates"][act])

    def send_probability(self, f: MessageFeatures, conv: Conversation | None = None) -> float:
        """How likely the business sends a suggestion (verbatim or edited) rather than its own message."""
        b = self.params.business
        logit = b.accept_bias + 2.0 * min(f.relevance, 0.0)  # clearly unrelated text is less welcome
        if f.invented_price:
            logit -= 3.0
        if f.promise:
            logit -= 2.0
        if f.degenerate:
            logit -= 3.5
        if f.words > b.max_words:
            logit -= 2.0 * (f.words - b.max_words) / b.max_words + 0.5
        logit -= 0.4 * min(f.emoji, 4)
        if conv is not None and f.act in self.cta_acts and not conv.customer.revealed:
            logit -= 1.0  # "misaligned with their typical method of engaging leads" (paper, Fig. 2)
        return _sigmoid(logit)

    def _edit(self, text: str, f: MessageFeatures, rng: np.random.Generator) -> str:
        b = self.params.business
        out = EMOJI_RE.sub("", text)
        sentences = [s for s in SENTENCE_RE.split(out) if s.strip()]
        sentences = [s for s in sentences if not MONEY_RE.search(s)] or sentences[:1]
        kept, n = [], 0
        for s in sentences:
            w = len(s.split())
            if kept and n + w > b.max_words:
                break
            kept.append(s)
            n += w
        out = " ".join(" ".join(kept).split())
        if out == text and rng.random() < b.edit_rate:
            out = out + " Thanks!" if not out.endswith("Thanks!") else "Hi! " + out
        return out.strip() or text

    def _business_decides(self, conv: Conversation, suggestion: str | None, f: MessageFeatures | None) -> tuple[str | None, str]:
        rng = conv.rng
        if rng.random() < self.params.business.stop_rate:
            return None, ("abstained" if suggestion is None else "rejected")
        if suggestion is None:
            return self._habitual_message(conv), "abstained"
        assert f is not None
        if rng.random() < self.send_probability(f, conv):
            sent = self._edit(suggestion, f, rng)
            return sent, ("verbatim" if sent == suggestion else "edited")
        return self._habitual_message(conv), "rejected"

    # --- the customer (P(s_{i+1} | s_i, a_i, m_i)) -------------------------------------------

    def _customer_says(self, conv: Conversation, text: str | None, outcome: int) -> None:
        conv.clock += timedelta(seconds=int(conv.rng.integers(30, 900)))
        conv.records.append(
            dict(
                conversation_id=conv.conversation_id,
                turn_index=len(conv.records) + 1,
                customer_message=text,
                outcome=outcome,
                suggestion=None,
                business_message=None,
                relation=None,
                customer_ts=conv.clock,
                business_ts=None,
                behaviour=None,
            )
        )
        if text is not None:
            conv.history.append(HistoryTurn(text))
        if outcome == 1 or text is None:
            conv.done = True
            conv.converted = outcome == 1

    def _customer_reacts(self, conv: Conversation, msg: str, f: MessageFeatures) -> None:
        cu, rng, c = conv.customer, conv.rng, self.c
        parts: list[str] = []
        annoy = 0.0
        terms = self._revealed_terms(cu)
        tailored = len(mentioned_terms(msg, terms)) if terms else 0
        repeated = msg in conv.last_sent[-3:]

        # Message quality, whatever the act.
        if f.degenerate:
            annoy += 0.35
            cu.trust -= 0.1
            parts.append(_pick(rng, c["confused"]))
        if f.words > cu.max_words:
            annoy += 0.12 + 0.25 * min(1.0, (f.words - cu.max_words) / cu.max_words)
        if f.emoji and not cu.likes_emoji:
            annoy += 0.04 * min(f.emoji, 3)
        if repeated:
            annoy += 0.3
            parts.append(_pick(rng, c["repeated"]))

        # Did the business answer the customer's question?
        answered = ignored = False
        if cu.pending_question is not None:
            answered = f.act == "answer" or (f.act_scores.get("answer", 0) > 0.45 and not f.is_question)
            if answered:
                cu.trust += 0.1
            else:
                ignored = True
                annoy += 0.1
                cu.trust -= 0.03
            cu.pending_question = None

        converted = False
        act = f.act if not f.degenerate else "off_topic"
        if act == "probe":
            unrevealed = [n for n in cu.needs if n not in cu.revealed]
            if unrevealed:
                need = self._need_asked(cu, msg, unrevealed)
                cu.revealed.append(need)
                cu.trust += 0.08
                parts.append(_pick(rng, self.vertical["projects"][cu.project]["needs"][need]["reveal"]))
            else:
                annoy += 0.15
                parts.append(_pick(rng, c["repeated"]))
        elif act in ("greet", "friendly", "generic_question"):
            cu.friendly_count += 1
            if cu.friendly_count <= 2:
                cu.trust += 0.03
                cu.patience += 0.5  # pleasantries keep the chat alive...
            elif conv.last_acts[-1:] == [act]:
                annoy += 0.08  # ...but not forever
            if act == "generic_question" and rng.random() < 0.3:
                unrevealed = [n for n in cu.needs if n not in cu.revealed]
                if unrevealed:  # some customers volunteer a need when asked openly
                    cu.revealed.append(unrevealed[0])
                    parts.append(_pick(rng, self.vertical["projects"][cu.project]["needs"][unrevealed[0]]["reveal"]))
            if not parts:
                parts.append(_pick(rng, c["friendly_replies"] if act != "generic_question" else c["acknowledgements"]))
        elif act in self.cta_acts:
            cu.proposals += 1
            if not cu.understood:
                annoy += 0.25
                cu.trust -= 0.1
                p = 0.08 * cu.readiness
                if rng.random() >= p:
                    parts.append(_pick(rng, c["premature"]))
                else:
                    converted = True
            else:
                tailoring = min(tailored, 2) / 2.0
                p = cu.readiness * (0.3 + 0.7 * min(max(cu.trust, 0.0), 1.0)) * (0.7 + 0.3 * tailoring)
                p *= max(0.0, 1.0 - cu.annoyance)
                if cu.proposals > 2:
                    p *= 0.5  # nagging
                if rng.random() < p:
                    converted = True
                else:
                    annoy += 0.08
                    parts.append(_pick(rng, c["declines"]))
        elif act in ("pitch", "discount"):
            if not cu.understood:
                annoy += 0.12
                parts.append(_pick(rng, c["premature"]))
            else:
                cu.trust += 0.03 + (0.04 if cu.persona == "price_sensitive" and act == "discount" else 0.0)
                parts.append(_pick(rng, c["acknowledgements"]))
        elif act == "answer":
            if not answered:
                cu.trust += 0.02
            parts.append(_pick(rng, c["acknowledgements"]))
        if tailored and cu.revealed and not f.degenerate:
            cu.trust += 0.06 * min(tailored, 2)
        if ignored and not parts:
            parts.append(_pick(rng, c["ignored_question"]))

        conv.last_sent.append(msg)
        conv.last_acts.append(act)
        cu.trust = min(1.0, max(0.0, cu.trust))
        cu.annoyance = min(1.0, 0.85 * cu.annoyance + annoy)
        cu.patience -= 1.0

        if converted:
            text = _pick(rng, c["conversions"]).format(phone=cu.phone, email=cu.email, name=cu.name)
            self._customer_says(conv, text, outcome=1)
            return
        p_leave = 0.02 + 0.85 * cu.annoyance**1.5
        if cu.patience <= 0 or rng.random() < p_leave or len(conv.records) >= self.params.max_turns:
            self._customer_says(conv, None, outcome=0)
            return
        if cu.understood and not cu.ready_cue_given and act not in self.cta_acts:
            cu.ready_cue_given = True
            parts.append(_pick(rng, c["ready_cues"]))
        elif rng.random() < cu.asks_questions:
            q = _pick(rng, c["questions"])
            cu.pending_question = q
            parts.append(q)
        if not parts:
            parts.append(_pick(rng, c["acknowledgements"]))
        self._customer_says(conv, " ".join(parts), outcome=0)

    def _revealed_terms(self, cu: Customer) -> list[str]:
        needs = self.vertical["projects"][cu.project]["needs"]
        terms = [cu.project]
        for n in cu.revealed:
            terms.extend(needs[n]["terms"])
        return terms

    def _need_asked(self, cu: Customer, msg: str, unrevealed: list[str]) -> str:
        """The need a probing question is about: the best lexical/semantic match, else the next one."""
        needs = self.vertical["projects"][cu.project]["needs"]
        asks = [needs[n]["ask"] for n in unrevealed]
        emb = self.featurizer.embed([msg, *asks])
        sims = emb[1:] @ emb[0]
        best = int(np.argmax(sims))
        return unrevealed[best] if sims[best] > 0.55 else unrevealed[0]

    # --- running a policy ---------------------------------------------------------------------

    def run(
        self,
        policy: Policy,
        n_conversations: int,
        seed: int,
        batch_size: int,
        variant: str = "control",
        start_time: datetime | None = None,
        first_index: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> list[Conversation]:
        """Simulate conversations ``first_index ..`` with a policy, ``batch_size`` at a time."""
        start_time = start_time or datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)
        finished: list[Conversation] = []
        for lo in range(first_index, first_index + n_conversations, batch_size):
            count = min(batch_size, first_index + n_conversations - lo)
            convs = self.new_conversations(seed, lo, count, start_time)
            while True:
                active = [cv for cv in convs if not cv.done]
                if not active:
                    break
                suggestions = policy.suggest([cv.history for cv in active], [cv.conversation_id for cv in active])
                self.step(active, suggestions, policy.policy_id, policy.policy_version, variant)
            finished.extend(convs)
            if progress:
                progress(count)
        return finished


def conversations_to_turns(convs: Iterable[Conversation]) -> list[Turn]:
    """Log records (the contract) of finished conversations."""
    out = []
    for conv in convs:
        for r in conv.records:
            out.append(
                Turn(
                    conversation_id=r["conversation_id"],
                    turn_index=r["turn_index"],
                    customer_message=r["customer_message"],
                    outcome=r["outcome"],
                    suggestion=r["suggestion"],
                    business_message=r["business_message"],
                    relation=r["relation"],
                    policy_id=r.get("policy_id") or conv.records[0].get("policy_id") or "unknown",
                    policy_version=r.get("policy_version") or conv.records[0].get("policy_version") or "0",
                    variant=r.get("variant") or conv.records[0].get("variant") or "control",
                    customer_ts=r["customer_ts"],
                    business_ts=r["business_ts"],
                    behaviour=r["behaviour"],
                )
            )
    return out
