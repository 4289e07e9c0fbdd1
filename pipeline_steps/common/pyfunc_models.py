"""MLflow pyfunc wrappers, so a reviewer can load a registered version and try it.

* :class:`SuggestedResponseModel`: input a DataFrame with a ``conversation`` column (JSON list of
  turns ``{customer_message, suggestion, business_message, relation}``, the last one holding only
  the latest customer message); output the suggestion for each (``[ABSTAIN]`` when it abstains).
* :class:`QFunctionModel`: input ``state_text`` and ``action_text`` columns; output ``q``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

EXAMPLE_CONVERSATION = [
    {"customer_message": "Hi, we're thinking about updating the kitchen.", "suggestion": "Hi! What would you like to change?",
     "business_message": "Hi! What would you like to change?", "relation": "verbatim"},
    {"customer_message": "New cabinets and countertops, mostly."},
]


class SuggestedResponseModel(mlflow.pyfunc.PythonModel):
    """A registered SR policy: state -> suggestion, rendered exactly as in the pipeline."""

    def load_context(self, context: Any) -> None:
        from pipeline_steps.common.base_model import load_causal_lm, load_tokenizer
        from pipeline_steps.common.policies import LLMPolicy
        from pipeline_steps.world.state_reader import notes_reader

        cfg = json.loads(Path(context.artifacts["policy_config"]).read_text())
        path = context.artifacts["policy"]
        self.policy = LLMPolicy(
            model=load_causal_lm(path), tokenizer=load_tokenizer(path), system_prompt=cfg["system_prompt"],
            max_prompt_tokens=cfg["max_prompt_tokens"], max_new_tokens=cfg["max_new_tokens"],
            temperature=cfg.get("temperature", 0.0), top_p=cfg.get("top_p", 1.0),
            repetition_penalty=cfg.get("repetition_penalty", 1.0), policy_id=cfg.get("policy_id", "registered"),
            state_notes=notes_reader(cfg.get("state_notes", "none"), cfg.get("vertical") or {}),
        )

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from pipeline_steps.common.contract import ABSTAIN_MARKER, HistoryTurn

        histories = []
        for raw in model_input["conversation"]:
            turns = json.loads(raw) if isinstance(raw, str) else raw
            histories.append([HistoryTurn(t["customer_message"], t.get("suggestion"), t.get("business_message"), t.get("relation")) for t in turns])
        out = self.policy.suggest(histories, [str(i) for i in range(len(histories))])
        return pd.DataFrame({"suggestion": [s.text if s.text is not None else ABSTAIN_MARKER for s in out]})


class QFunctionModel(mlflow.pyfunc.PythonModel):
    """A registered Q-function: (rendered state, action) -> Q."""

    def load_context(self, context: Any) -> None:
        from pipeline_steps.common.q_model import load_scorer

        self.model, self.tokenizer = load_scorer(context.artifacts["scorer"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from pipeline_steps.common.q_model import score

        q = score(self.model, self.tokenizer, list(model_input["state_text"]), list(model_input["action_text"]))
        return pd.DataFrame({"q": q})
