"""Scripted reference strategies (BRIEF 5.6): calibration points for the world, not learned policies.

They read only the public conversation text (like any policy) and write from the vertical's templates:

* ``expert``: outcome-driven: answer open questions, probe needs one by one, then propose a tailored
  visit once the customer has said enough (or says they are ready). The ceiling.
* ``friendly_generic``: pleasant, always accepted, never moves the conversation forward.
* ``premature_pitch``: proposes a visit or asks for contact details from the first message.
* ``random``: a random dialogue act's template every turn.
* ``abstain``: never suggests; the business writes everything itself (its habits alone).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from pipeline_steps.common.contract import HistoryTurn
from pipeline_steps.common.policies import Suggestion, stable_seed
from pipeline_steps.world.state_reader import CustomerState, CustomerStateReader

STRATEGIES = ("expert", "friendly_generic", "premature_pitch", "random", "abstain")


@dataclass
class ScriptedPolicy:
    """A hand-written strategy over the vertical's templates."""

    name: str
    vertical: dict[str, Any]
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(f"unknown scripted strategy '{self.name}'; choose one of {STRATEGIES}")
        self.policy_id = f"script:{self.name}"
        self.policy_version = "1"
        self.t = self.vertical["business_templates"]
        self.reader = CustomerStateReader(self.vertical)

    def suggest(self, histories: Sequence[Sequence[HistoryTurn]], keys: Sequence[str]) -> list[Suggestion]:
        out = []
        for h, key in zip(histories, keys):
            rng = random.Random(stable_seed(self.seed, self.name, key, len(h)))
            out.append(Suggestion(getattr(self, f"_{self.name}")(h, rng)))
        return out

    # --- strategies ---------------------------------------------------------------------------

    def _friendly_generic(self, h: Sequence[HistoryTurn], rng: random.Random) -> str:
        pool = self.t["greet"] if len(h) == 1 else self.t["friendly"] + self.t["generic_question"]
        return rng.choice(pool)

    def _premature_pitch(self, h: Sequence[HistoryTurn], rng: random.Random) -> str:
        return rng.choice(self.t["book"] + self.t["ask_contact"] + self.t["pitch"])

    def _random(self, h: Sequence[HistoryTurn], rng: random.Random) -> str:
        act = rng.choice([a for a in self.t if a != "tailored_book"])
        if act == "probe":
            return self._probe_text(self.reader.read(h)) or rng.choice(self.t["generic_question"])
        return rng.choice(self.t[act])

    def _abstain(self, h: Sequence[HistoryTurn], rng: random.Random) -> None:
        return None

    def _expert(self, h: Sequence[HistoryTurn], rng: random.Random) -> str:
        seen = self.reader.read(h)
        project, revealed, terms = seen.project, seen.revealed, seen.terms
        if seen.asked_question:
            return rng.choice(self.t["answer"])
        if seen.ready or not seen.unstated or (seen.declined and len(revealed) >= 2):
            term = terms[-1] if terms else project
            return rng.choice(self.t["tailored_book"]).format(project=project, term=term)
        probe = self._probe_text(seen)
        return probe or rng.choice(self.t["tailored_book"]).format(project=project, term=project)

    # --- reading the conversation -----------------------------------------------------------

    def _probe_text(self, seen: CustomerState) -> str | None:
        """The question about the first need of the project the customer has not stated yet."""
        for need in seen.unstated:
            return self.vertical["projects"][seen.project]["needs"][need]["ask"]
        return None
