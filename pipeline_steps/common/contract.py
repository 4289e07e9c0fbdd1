"""The conversation log contract: one record per customer turn, the paper's state tuple (eq. 1).

A turn ``i`` of a conversation holds ``(c_i, o_i, a_i, m_i)`` and how ``m_i`` relates to ``a_i``:

* ``customer_message`` (c_i): ``None`` means the customer stopped (terminal).
* ``outcome`` (o_i in {0, 1}): the customer stated the desired behaviour in ``c_i`` (terminal).
* ``suggestion`` (a_i): the SR agent's suggestion; ``None`` means the agent abstained.
* ``business_message`` (m_i): what the business actually sent; ``None`` means the business stopped,
  so the next state is terminal and no further turn may follow.
* ``relation``: ``verbatim | edited | rejected | abstained``; ``None`` only on a terminal turn where
  no action was taken (``o_i = 1`` or ``c_i`` is none).

Terminal rules (paper section 2.1): the state ``s_i`` is terminal when ``o_i = 1`` or ``c_i`` is none
(no action is taken there, so it must be the last record), and ``s_{i+1}`` is terminal when ``m_i`` is
none (so that record must be the last one). Reward ``R(s_i) = o_i``.

Turns are numbered from 1 like the paper. Logs are Parquet (this schema); JSONL is accepted on input.
Every later step renders states with :func:`render_state`, the one place that decides what the policy
sees.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Iterable, Literal, Sequence

import pyarrow as pa

Relation = Literal["verbatim", "edited", "rejected", "abstained"]
RELATIONS: tuple[str, ...] = ("verbatim", "edited", "rejected", "abstained")
ABSTAIN_MARKER = "[ABSTAIN]"
CONTRACT_VERSION = "1"

LOG_SCHEMA = pa.schema(
    [
        pa.field("conversation_id", pa.string(), nullable=False),
        pa.field("turn_index", pa.int32(), nullable=False),
        pa.field("customer_message", pa.string()),
        pa.field("outcome", pa.int8(), nullable=False),
        pa.field("suggestion", pa.string()),
        pa.field("business_message", pa.string()),
        pa.field("relation", pa.string()),
        pa.field("policy_id", pa.string(), nullable=False),
        pa.field("policy_version", pa.string(), nullable=False),
        pa.field("variant", pa.string(), nullable=False),
        pa.field("customer_ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("business_ts", pa.timestamp("us", tz="UTC")),
        pa.field("behaviour", pa.string()),  # JSON object: behaviour-policy metadata (e.g. persona)
    ],
    metadata={"contract_version": CONTRACT_VERSION},
)
REQUIRED_FIELDS: tuple[str, ...] = tuple(f.name for f in LOG_SCHEMA if not f.nullable)


@dataclass
class Turn:
    """One record of the log: customer turn ``turn_index`` of ``conversation_id`` and the reply to it."""

    conversation_id: str
    turn_index: int
    customer_message: str | None
    outcome: int
    suggestion: str | None
    business_message: str | None
    relation: str | None
    policy_id: str
    policy_version: str
    variant: str
    customer_ts: datetime
    business_ts: datetime | None = None
    behaviour: dict[str, Any] | None = field(default=None)

    @property
    def is_terminal_state(self) -> bool:
        """``s_i`` is terminal: outcome reached or the customer stopped; no action is taken here."""
        return self.outcome == 1 or self.customer_message is None

    @property
    def ends_conversation(self) -> bool:
        """No record may follow this one."""
        return self.is_terminal_state or self.business_message is None

    def to_record(self) -> dict[str, Any]:
        rec = asdict(self)
        rec["behaviour"] = None if self.behaviour is None else json.dumps(self.behaviour, sort_keys=True)
        return rec


class ContractViolation(ValueError):
    """A record breaks a contract rule. ``record`` names it, ``rule`` says which rule."""

    def __init__(self, record: str, rule: str, detail: str):
        self.record, self.rule, self.detail = record, rule, detail
        super().__init__(f"{record}: rule '{rule}' violated: {detail}")


def turn_rule_violations(t: dict[str, Any]) -> list[tuple[str, str]]:
    """Row-level rules of one record, as ``(rule, detail)`` pairs (empty when the record is valid)."""
    out: list[tuple[str, str]] = []
    for name in REQUIRED_FIELDS:
        if t.get(name) is None:
            out.append(("required_field", f"'{name}' is missing or null"))
    if out:
        return out
    if t["outcome"] not in (0, 1):
        out.append(("outcome_binary", f"outcome must be 0 or 1, got {t['outcome']!r}"))
    if int(t["turn_index"]) < 1:
        out.append(("turn_index_positive", f"turn_index must be >= 1, got {t['turn_index']}"))
    terminal_state = t["outcome"] == 1 or t.get("customer_message") is None
    rel, sug, msg = t.get("relation"), t.get("suggestion"), t.get("business_message")
    if terminal_state:
        if sug is not None or msg is not None or rel is not None:
            out.append(
                ("no_action_in_terminal_state", "outcome=1 or customer stopped, yet a suggestion/message/relation is set")
            )
        return out
    if rel not in RELATIONS:
        out.append(("relation_valid", f"relation must be one of {RELATIONS}, got {rel!r}"))
        return out
    if rel == "abstained" and sug is not None:
        out.append(("relation_consistent", "relation 'abstained' but a suggestion is present"))
    if rel != "abstained" and sug is None:
        out.append(("relation_consistent", f"relation '{rel}' but the suggestion is null (abstain)"))
    if rel == "verbatim" and (msg is None or msg != sug):
        out.append(("verbatim_equal_text", "relation 'verbatim' but the business message differs from the suggestion"))
    if rel == "edited" and (msg is None or msg == sug):
        out.append(("relation_consistent", "relation 'edited' needs a sent message that differs from the suggestion"))
    return out


def conversation_rule_violations(turns: Sequence[dict[str, Any]]) -> list[tuple[int, str, str]]:
    """Conversation-level rules as ``(position, rule, detail)``; ``turns`` sorted by turn_index."""
    out: list[tuple[int, str, str]] = []
    for pos, t in enumerate(turns):
        expected = pos + 1
        if t["turn_index"] != expected:
            out.append((pos, "turn_index_contiguous", f"expected turn_index {expected}, got {t['turn_index']}"))
        ends = t["outcome"] == 1 or t.get("customer_message") is None or t.get("business_message") is None
        if ends and pos != len(turns) - 1:
            out.append((pos + 1, "nothing_after_terminal", f"turn {turns[pos + 1]['turn_index']} follows a terminal turn {t['turn_index']}"))
            break
    return out


def validate_conversation(turns: Sequence[Turn]) -> None:
    """Raise :class:`ContractViolation` for the first broken rule of one conversation."""
    recs = [t.to_record() for t in turns]
    for r in recs:
        for rule, detail in turn_rule_violations(r):
            raise ContractViolation(f"conversation {r['conversation_id']} turn {r['turn_index']}", rule, detail)
    for pos, rule, detail in conversation_rule_violations(recs):
        r = recs[min(pos, len(recs) - 1)]
        raise ContractViolation(f"conversation {r['conversation_id']} turn {r['turn_index']}", rule, detail)


def turns_to_table(turns: Iterable[Turn]) -> pa.Table:
    """Records in the contract's Arrow schema (ready for Parquet)."""
    return pa.Table.from_pylist([t.to_record() for t in turns], schema=LOG_SCHEMA)


# --------------------------------------------------------------------------------------------
# State rendering: the exact prompt text the policy sees for s_i (one function for every step).
# --------------------------------------------------------------------------------------------

SYSTEM_PROMPT_TEMPLATE = (
    "You are an assistant that suggests replies for {business_name}, {business_description}. "
    "You read a chat between a customer and the business and write the next message the business "
    "should send to the customer: one or two short sentences, friendly and professional, that move "
    "the customer toward a concrete next step. The business may send your suggestion as is, edit it, "
    "or write its own message; the chat shows what it actually sent. If you cannot help, reply "
    "exactly {abstain}."
)
INSTRUCTION = "Write the business's next message to the customer."
NOTES_LABEL = "Notes on the customer so far:"

_RELATION_NOTE = {
    "verbatim": "Business (sent your suggestion): {m}",
    "edited": "Business (edited your suggestion): {m}",
    "rejected": "Business (ignored your suggestion \"{a}\"): {m}",
    "abstained": "Business (you abstained): {m}",
}


@dataclass(frozen=True)
class HistoryTurn:
    """The part of a logged turn the policy may see: c_i, a_i, m_i and their relation."""

    customer_message: str
    suggestion: str | None = None
    business_message: str | None = None
    relation: str | None = None


def transcript_lines(history: Sequence[HistoryTurn]) -> list[str]:
    """One line per message: customer messages, and what the business sent with its relation to a_j."""
    lines: list[str] = []
    for j, turn in enumerate(history):
        lines.append(f"Customer: {turn.customer_message}")
        if j == len(history) - 1:
            break
        rel = turn.relation or ("abstained" if turn.suggestion is None else "rejected")
        sent = turn.business_message if turn.business_message is not None else "(nothing)"
        lines.append(_RELATION_NOTE[rel].format(m=sent, a=turn.suggestion or ""))
    return lines


def state_messages(history: Sequence[HistoryTurn], system_prompt: str, notes: str | None = None) -> list[dict[str, str]]:
    """Chat messages for state s_i: the system prompt and one user turn holding the transcript.

    The transcript carries every past suggestion a_j (verbatim/edited ones are what was sent; an
    ignored one is quoted) and every message m_j actually sent, as eq. (1) requires. One user turn
    (rather than alternating roles) keeps small instruction-tuned models from continuing the
    customer's side or repeating their own earlier turns. ``notes`` (``prompt.state_notes``) is a line
    about what the customer has said so far, read from the whole conversation, placed after the transcript.
    """
    body = "\n".join(transcript_lines(history))
    notes_block = f"{NOTES_LABEL} {notes}\n\n" if notes else ""
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": f"Chat so far:\n{body}\n\n{notes_block}{INSTRUCTION}"},
    ]


def system_prompt_for(vertical: dict[str, Any]) -> str:
    return SYSTEM_PROMPT_TEMPLATE.format(
        business_name=vertical["business_name"],
        business_description=vertical["business_description"],
        abstain=ABSTAIN_MARKER,
    )


def render_state(
    history: Sequence[HistoryTurn],
    tokenizer: Any,
    system_prompt: str,
    max_prompt_tokens: int,
    notes: str | None = None,
) -> str:
    """The exact prompt text (chat template applied, generation prompt added) the policy sees for s_i.

    ``history`` is the conversation up to and including the latest customer message ``c_i``. When the
    prompt exceeds ``max_prompt_tokens``, the oldest completed turns are dropped first; the system
    prompt, the ``notes`` (read from the whole history by the caller, so they remember dropped turns)
    and the latest customer message always stay. If those alone exceed the budget, the latest
    customer message is cut from the front (keeping its end, the part the reply answers).
    Deterministic: the same history, tokenizer and budget always give the same text.
    """
    if not history:
        raise ValueError("render_state needs at least the latest customer message")

    def text_for(hist: Sequence[HistoryTurn]) -> str:
        return tokenizer.apply_chat_template(state_messages(hist, system_prompt, notes), tokenize=False, add_generation_prompt=True)

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    start = 0
    text = text_for(history)
    # Cheap upper bound first: a token is at least one character in these tokenizers.
    if len(text) <= max_prompt_tokens:
        return text
    while n_tokens(text) > max_prompt_tokens and start < len(history) - 1:
        start += 1
        text = text_for(history[start:])
    if n_tokens(text) <= max_prompt_tokens:
        return text
    last = history[-1]
    ids = tokenizer(last.customer_message, add_special_tokens=False)["input_ids"]
    overflow = n_tokens(text) - max_prompt_tokens
    kept = tokenizer.decode(ids[overflow + 1 :]) if overflow + 1 < len(ids) else ""
    return text_for([HistoryTurn(customer_message="..." + kept)])


def history_from_records(records: Sequence[dict[str, Any]]) -> list[HistoryTurn]:
    """HistoryTurns from contract records of one conversation (sorted by turn_index)."""
    return [
        HistoryTurn(
            customer_message=r["customer_message"],
            suggestion=r.get("suggestion"),
            business_message=r.get("business_message"),
            relation=r.get("relation"),
        )
        for r in records
    ]
