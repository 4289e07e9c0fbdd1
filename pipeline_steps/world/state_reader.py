"""What a customer's messages show of their state, read with the business profile's own words.

One reader for two users:

* the scripted ``expert`` strategy (:mod:`pipeline_steps.world.scripted`) decides from it what to send;
* ``prompt.state_notes: customer_needs`` writes it into every rendered state, as a line after the transcript
  (:func:`pipeline_steps.common.contract.render_state`), so that pi and Q read what the customer has said so far
  without having to find it in the transcript. Q fitted on the LLM logs without these notes did not read the state
  from the text (README, "fit_q on world logs"), while a learner given exactly this reading ranked the replies.

The reading uses only public text (the customer's messages) and the business profile (the vertical YAML: its
projects, each need's terms and typical phrasings, the ready cues and declines a customer uses), as a business's
own slot-filling (a CRM form, a regex intake) would. It never sees the world's hidden customer state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, get_args

from pipeline_steps.common.config import PromptParams
from pipeline_steps.common.contract import HistoryTurn
from pipeline_steps.world.featurizer import mentioned_terms

STATE_NOTES = get_args(PromptParams.model_fields["state_notes"].annotation)  # the kinds params.yaml accepts


@dataclass(frozen=True)
class CustomerState:
    """The reading of one state: the project, the needs stated (of how many the project has), the terms the customer
    used, and what the last message does (a ready cue, a decline, a question)."""

    project: str
    project_mentioned: bool
    revealed: tuple[str, ...]
    terms: tuple[str, ...]
    project_needs: tuple[str, ...]
    ready: bool
    declined: bool
    asked_question: bool

    @property
    def unstated(self) -> tuple[str, ...]:
        return tuple(n for n in self.project_needs if n not in self.revealed)


class CustomerStateReader:
    """Reads :class:`CustomerState` from a history with a vertical's projects, needs and cues."""

    def __init__(self, vertical: dict[str, Any]) -> None:
        self.projects = vertical["projects"]
        self._ready = [c.lower() for c in vertical["customer"]["ready_cues"]]
        self._declines = [c.lower() for c in vertical["customer"]["declines"]]

    def read(self, history: Sequence[HistoryTurn]) -> CustomerState:
        if not history:
            raise ValueError("a state needs at least the latest customer message")
        text = " ".join(t.customer_message for t in history).lower()
        last = history[-1].customer_message.lower()
        names = list(self.projects)
        # The project talked about most; ties (and no mention at all) go to the profile's first project.
        project = max(names, key=lambda p: (text.count(p), -names.index(p)))
        revealed, terms = [], []
        for need, spec in self.projects[project]["needs"].items():
            hit = [t for t in mentioned_terms(text, spec["terms"]) if t not in ("budget",)]
            if hit or any(r.lower() in text for r in spec["reveal"]):
                revealed.append(need)
                terms.extend(str(t) for t in hit[:1])
        ready = any(cue in last for cue in self._ready)
        return CustomerState(
            project=project, project_mentioned=project in text, revealed=tuple(revealed), terms=tuple(terms),
            project_needs=tuple(self.projects[project]["needs"]), ready=ready,
            declined=any(d in last for d in self._declines), asked_question="?" in last and not ready,
        )

    def notes(self, history: Sequence[HistoryTurn]) -> str:
        """The reading as one line of the prompt, e.g. ``Project: kitchen. Needs stated: scope, budget (2 of 3). Not
        yet stated: timeline. Last message: asks a question.``"""
        s = self.read(history)
        if not s.project_mentioned:
            return "Project: not named yet. Needs stated: none yet. Last message: " + self._last(s) + "."
        stated = ", ".join(s.revealed) if s.revealed else "none yet"
        parts = [f"Project: {s.project}.", f"Needs stated: {stated} ({len(s.revealed)} of {len(s.project_needs)})."]
        parts.append(f"Not yet stated: {', '.join(s.unstated)}." if s.unstated else "All needs stated.")
        parts.append(f"Last message: {self._last(s)}.")
        return " ".join(parts)

    @staticmethod
    def _last(s: CustomerState) -> str:
        if s.ready:
            return "says they are ready for the next step"
        if s.declined:
            return "declines for now"
        if s.asked_question:
            return "asks a question"
        return "answers or comments"


def notes_reader(kind: str, vertical: dict[str, Any]) -> Callable[[Sequence[HistoryTurn]], str] | None:
    """The function that writes ``prompt.state_notes`` of kind ``kind`` for a history (None for ``none``)."""
    if kind == "none":
        return None
    if kind == "customer_needs":
        return CustomerStateReader(vertical).notes
    raise ValueError(f"prompt.state_notes: unknown kind {kind!r}; choose one of {STATE_NOTES}")


def prompt_notes(params: Any) -> Callable[[Sequence[HistoryTurn]], str] | None:
    """The notes function ``params`` configure (``prompt.state_notes`` with the vertical of ``world.vertical``)."""
    if params.prompt.state_notes == "none":
        return None
    from pipeline_steps.world.simulator import load_vertical

    return notes_reader(params.prompt.state_notes, load_vertical(params.world.vertical))
