"""The MLflow model registry as the promotion workflow: gates, reviewer approval, champion alias, rollback.

A policy version moves through these states, all recorded on the model version itself (tags and
aliases), so the MLflow UI shows them and any reviewer can act from the UI or with ``ippo``:

1. ``register`` logs it with its evidence and applies the **offline** and **A/B gates**
   (``ippo.gates = passed | failed``, reasons in ``ippo.gate_reasons``). Passing versions get the
   ``challenger`` alias; failing ones are kept, tagged, and never aliased.
2. A named reviewer **approves** (``ippo.approval = approved``, ``ippo.reviewer = <name>``) or
   **rejects** it: ``ippo approve`` / ``ippo reject``, or by setting those two tags in the MLflow UI.
3. **promote** moves the ``champion`` alias, only for a version that passed both gates and is
   approved. The registered model's ``ippo.champion_history`` tag keeps the order of champions, so
   **rollback** moves ``champion`` back to the previous approved one.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

CHAMPION, CHALLENGER = "champion", "challenger"
TAG_GATES, TAG_REASONS = "ippo.gates", "ippo.gate_reasons"
TAG_APPROVAL, TAG_REVIEWER = "ippo.approval", "ippo.reviewer"
TAG_HISTORY = "ippo.champion_history"


class RegistryError(RuntimeError):
    """A registry action that is not allowed or cannot be done; the message says which rule."""


@dataclass
class GateResult:
    """The outcome of one gate with the checks that failed (empty = passed)."""

    name: str
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks.values())

    @property
    def reasons(self) -> list[str]:
        return [f"{self.name}.{k}: {c['value']!r} {c['rule']}" for k, c in self.checks.items() if not c["passed"]]

    def check(self, key: str, value: Any, op: str, bound: float, note: str = "") -> None:
        """``value op bound``; an undefined value (None or NaN, e.g. AUC with one class) fails closed."""
        defined = value is not None and not (isinstance(value, float) and math.isnan(value))
        ok = defined and {">=": operator.ge, "<=": operator.le, "<": operator.lt}[op](value, bound)
        rule = f"{op} {bound}" + (f" {note}" if note else "") + ("" if defined else " (undefined value)")
        self.checks[key] = {"value": value, "passed": bool(ok), "rule": rule}


def offline_gate(metrics: dict[str, Any], gate: Any) -> GateResult:
    """Theorem 1/2 evidence from ``evaluate``'s offline metrics against ``register.offline_gate``."""
    g = GateResult("offline")
    off = metrics["offline"]
    g.check("improvement_ci_low", off["improvement"]["ci_low"], ">=", gate.min_improvement_ci_low)
    g.check("kl", off["kl_per_token"], "<=", gate.max_kl)
    if off.get("q_error_p90") is not None:
        g.check("q_error_p90", off["q_error_p90"], "<=", gate.max_q_error_p90)
    gr = off["guardrails"]["candidate"]
    g.check("acceptance", gr["acceptance"], ">=", gate.min_acceptance)
    g.check("mean_words", gr["mean_words"], "<=", gate.max_mean_words)
    g.check("abstain_rate", gr["abstain_rate"], "<=", gate.max_abstain_rate)
    return g


def ab_gate(metrics: dict[str, Any], gate: Any) -> GateResult:
    """A/B evidence: the lift over the champion, not significantly negative (or significantly positive)."""
    g = GateResult("ab")
    ab = metrics["ab"]
    g.check("lift", ab["lift_abs"], ">=", gate.min_lift)
    if gate.require_significant:
        g.check("p_value_better", ab["p_value_better"], "<", gate.alpha)
    else:
        g.check("p_value_worse", ab["p_value_worse"], ">=", gate.alpha, "(not significantly worse)")
    return g


def _client(tracking_uri: str | None = None):
    from mlflow import MlflowClient

    from pipeline_steps.common.tracking import tracking_uri as resolve

    return MlflowClient(tracking_uri=resolve(tracking_uri), registry_uri=resolve(tracking_uri))


def _version(client, name: str, version: str | int):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(f"model '{name}' has no version {version}: {exc.message}") from exc


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def approve(name: str, version: str | int, reviewer: str, note: str = "", tracking_uri: str | None = None) -> None:
    """Record a reviewer's approval; only versions that passed both gates can be approved."""
    if not reviewer.strip():
        raise RegistryError("approval needs the reviewer's name")
    client = _client(tracking_uri)
    mv = _version(client, name, version)
    if mv.tags.get(TAG_GATES) != "passed":
        raise RegistryError(
            f"{name} v{version} cannot be approved: gates are '{mv.tags.get(TAG_GATES, 'missing')}' "
            f"({mv.tags.get(TAG_REASONS, 'no evidence')})"
        )
    for k, v in {TAG_APPROVAL: "approved", TAG_REVIEWER: reviewer, "ippo.reviewed_at": _now(), "ippo.review_note": note}.items():
        client.set_model_version_tag(name, str(version), k, v)


def reject(name: str, version: str | int, reviewer: str, note: str = "", tracking_uri: str | None = None) -> None:
    """Record a reviewer's rejection; a rejected version is never promoted."""
    client = _client(tracking_uri)
    _version(client, name, version)
    for k, v in {TAG_APPROVAL: "rejected", TAG_REVIEWER: reviewer, "ippo.reviewed_at": _now(), "ippo.review_note": note}.items():
        client.set_model_version_tag(name, str(version), k, v)
    try:
        if client.get_model_version_by_alias(name, CHALLENGER).version == str(version):
            client.delete_registered_model_alias(name, CHALLENGER)
    except Exception:
        pass


def promotion_blockers(mv) -> list[str]:
    """Why a version may not become champion (empty = it may)."""
    out = []
    if mv.tags.get(TAG_GATES) != "passed":
        out.append(f"gates are '{mv.tags.get(TAG_GATES, 'missing')}'")
    if mv.tags.get(TAG_APPROVAL) != "approved" or not mv.tags.get(TAG_REVIEWER):
        out.append(f"no reviewer approval (ippo.approval='{mv.tags.get(TAG_APPROVAL, 'missing')}')")
    return out


def _history(client, name: str) -> list[str]:
    rm = client.get_registered_model(name)
    return json.loads(rm.tags.get(TAG_HISTORY, "[]"))


def promote(name: str, version: str | int, tracking_uri: str | None = None) -> str | None:
    """Move ``champion`` to an approved version that passed both gates; returns the previous champion."""
    client = _client(tracking_uri)
    mv = _version(client, name, version)
    blockers = promotion_blockers(mv)
    if blockers:
        raise RegistryError(f"{name} v{version} cannot be promoted: " + "; ".join(blockers))
    previous = current_champion(name, tracking_uri)
    history = _history(client, name)
    history = [v for v in history if v != str(version)] + [str(version)]
    client.set_registered_model_tag(name, TAG_HISTORY, json.dumps(history))
    client.set_model_version_tag(name, str(version), "ippo.promoted_at", _now())
    client.set_registered_model_alias(name, CHAMPION, str(version))
    try:
        if client.get_model_version_by_alias(name, CHALLENGER).version == str(version):
            client.delete_registered_model_alias(name, CHALLENGER)
    except Exception:
        pass
    return previous


def rollback(name: str, tracking_uri: str | None = None) -> str:
    """Move ``champion`` back to the previous approved champion; returns that version."""
    client = _client(tracking_uri)
    history = _history(client, name)
    current = current_champion(name, tracking_uri)
    if current is None or len(history) < 2:
        raise RegistryError(f"{name}: no previous champion to roll back to (history {history})")
    if history[-1] != current:
        history = [v for v in history if v != current] + [current]
    rolled_back = history.pop()
    target = history[-1]
    mv = _version(client, name, target)
    blockers = promotion_blockers(mv)
    if blockers:
        raise RegistryError(f"{name}: previous champion v{target} is no longer promotable: " + "; ".join(blockers))
    client.set_registered_model_tag(name, TAG_HISTORY, json.dumps(history))
    client.set_model_version_tag(name, rolled_back, "ippo.rolled_back_at", _now())
    client.set_registered_model_alias(name, CHAMPION, target)
    return target


def current_champion(name: str, tracking_uri: str | None = None) -> str | None:
    client = _client(tracking_uri)
    try:
        return client.get_model_version_by_alias(name, CHAMPION).version
    except Exception:
        return None


def status(name: str, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """One row per version: aliases, gates, approval, iteration."""
    client = _client(tracking_uri)
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException as exc:
        raise RegistryError(f"no registered model '{name}': {exc.message}") from exc
    by_version: dict[str, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(str(v), []).append(alias)
    rows = []
    for mv in sorted(client.search_model_versions(f"name='{name}'"), key=lambda m: int(m.version)):
        rows.append(
            {
                "version": mv.version,
                "aliases": ",".join(sorted(by_version.get(str(mv.version), []))),
                "gates": mv.tags.get(TAG_GATES, ""),
                "approval": mv.tags.get(TAG_APPROVAL, ""),
                "reviewer": mv.tags.get(TAG_REVIEWER, ""),
                "iteration": mv.tags.get("ippo.iteration", ""),
                "reasons": mv.tags.get(TAG_REASONS, ""),
            }
        )
    return rows
