"""The one definition of what the Q-function reads: the state prompt tokens followed by the action tokens.

PPO hands the reward model ``query_responses`` = the tokenised rendered state (the query) followed by
the generated response tokens, and reads the score at the last non-padding token. fit_q trains on
exactly the same ids (state and action tokenised separately, no special tokens added, no EOS: with
SmolLM2 the pad token *is* the EOS token, so TRL treats EOS as padding), so the Q values PPO
optimises are the ones fit_q learned.
"""

from __future__ import annotations

from typing import Any

from pipeline_steps.common.contract import ABSTAIN_MARKER


def action_text(suggestion: str | None) -> str:
    """The action as text: the suggestion, or the abstain marker (abstaining is an action too)."""
    return ABSTAIN_MARKER if suggestion is None else suggestion


def q_input_ids(tokenizer: Any, state_text: str, action: str, max_action_tokens: int | None = None) -> list[int]:
    """Token ids of (s, a) exactly as PPO's reward model sees them."""
    query = tokenizer(state_text, add_special_tokens=False)["input_ids"]
    response = tokenizer(action, add_special_tokens=False)["input_ids"]
    if max_action_tokens is not None:
        response = response[:max_action_tokens]
    return query + response
