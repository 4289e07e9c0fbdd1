"""The simulated world: seeded, text-grounded, multi-turn credit assignment matters, hard to game."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import fisher_exact

from pipeline_steps.common.config import ConfigError, load_params
from pipeline_steps.common.policies import Suggestion
from pipeline_steps.world.scripted import ScriptedPolicy
from pipeline_steps.world.simulator import World, conversations_to_turns, load_vertical
from pipeline_steps.common.contract import validate_conversation


def run(world, name, n, seed=7):
    return world.run(ScriptedPolicy(name, world.vertical), n, seed=seed, batch_size=64)


def test_same_seed_same_conversations(world):
    a = conversations_to_turns(run(world, "random", 30))
    b = conversations_to_turns(run(world, "random", 30))
    assert [t.to_record() for t in a] == [t.to_record() for t in b]
    c = conversations_to_turns(run(world, "random", 30, seed=8))
    assert [t.to_record() for t in a] != [t.to_record() for t in c]


def test_personas_are_paired_across_policies(world):
    """Conversation k meets the same customer whatever policy talks to it (common random numbers)."""
    a, b = run(world, "expert", 20), run(world, "premature_pitch", 20)
    assert [c.customer.persona for c in a] == [c.customer.persona for c in b]
    assert [c.records[0]["customer_message"] for c in a] == [c.records[0]["customer_message"] for c in b]


def test_logs_satisfy_the_contract(world):
    convs = run(world, "random", 50)
    turns = conversations_to_turns(convs)
    for conv in convs:
        validate_conversation([t for t in turns if t.conversation_id == conv.conversation_id])


def test_outcome_driven_expert_beats_weak_strategies(world):
    n = 300
    conv = {name: sum(c.converted for c in run(world, name, n, seed=11)) for name in ("expert", "friendly_generic", "premature_pitch")}
    for weak in ("friendly_generic", "premature_pitch"):
        _, p = fisher_exact([[conv["expert"], n - conv["expert"]], [conv[weak], n - conv[weak]]], alternative="greater")
        assert p < 1e-6, (conv, weak)
    assert conv["expert"] / n > 0.35


def test_greedy_immediate_signal_loses(world):
    """Friendly-generic wins the immediate signals (replies, acceptance) yet converts far less."""
    n = 200
    friendly, expert = run(world, "friendly_generic", n, seed=3), run(world, "expert", n, seed=3)

    def acceptance(convs):
        rel = [r["relation"] for c in convs for r in c.records if r["relation"]]
        return np.mean([r in ("verbatim", "edited") for r in rel])

    def turns(convs):
        return np.mean([len(c.records) for c in convs])

    assert acceptance(friendly) >= acceptance(expert) - 0.02
    assert turns(friendly) > turns(expert)
    assert np.mean([c.converted for c in friendly]) < 0.5 * np.mean([c.converted for c in expert])


@pytest.mark.parametrize(
    "gamed",
    [
        "book book book schedule appointment consultation book now book",
        "Would you like to book a visit? Would you like to book a visit? Would you like to book a visit?",
        "asdf qwer zxcv uiop",
        "We guarantee the lowest price, only $999 for a full kitchen, 100% free design!",
    ],
)
def test_gamed_messages_are_rejected_by_the_business(world, gamed):
    f = world.featurizer([gamed])[0]
    clean = world.featurizer(["Would you like to book a free in-home consultation this week?"])[0]
    assert world.send_probability(f) < 0.35 < world.send_probability(clean)


def test_business_mix_responds_to_suggestion_quality(world):
    good = ["What would you like to change in the kitchen, cabinets or the layout?"] * 50
    bad = ["Call now!!! $499 kitchens guaranteed, best deal ever 😀😀😀 " * 4] * 50

    def relations(texts):
        convs = world.new_conversations(seed=5, start=0, count=len(texts), start_time=__import__("datetime").datetime(2026, 1, 5))
        world.step(convs, [Suggestion(t) for t in texts], "test", "0", "control")
        return [c.records[0]["relation"] for c in convs]

    rg, rb = relations(good), relations(bad)
    sent = lambda rel: np.mean([r in ("verbatim", "edited") for r in rel])
    assert sent(rg) > 0.6 and sent(rb) < 0.2
    assert "edited" in rb or sent(rb) == 0  # what little gets through is edited (emoji, price removed)


def test_customer_reacts_to_words_not_to_template_identity(world):
    """A paraphrased probing question reveals a need like the template does."""
    conv = world.new_conversations(seed=9, start=0, count=1, start_time=__import__("datetime").datetime(2026, 1, 5))[0]
    before = len(conv.customer.revealed)
    world.step([conv], [Suggestion("Could you tell me how much you are planning to spend on this renovation?")], "t", "0", "c")
    assert len(conv.customer.revealed) == before + 1


def test_unknown_vertical_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="world.vertical"):
        load_vertical("no_such_vertical")
    bad = tmp_path / "v.yaml"
    bad.write_text("name: x\nbusiness_name: y\n")
    with pytest.raises(ConfigError, match="missing field 'business_description'"):
        load_vertical(str(bad))


def test_malformed_persona_config_names_file_and_field(tmp_path, repo_root):
    text = (repo_root / "params.yaml").read_text().replace("weight: 0.35", "weight: -1", 1)
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_params(p)
    assert str(p) in str(err.value) and "world.personas.researcher.weight" in str(err.value)
    p.write_text((repo_root / "params.yaml").read_text().replace("patience: {low: 6, high: 10}", "patience: {low: 10, high: 6}"))
    with pytest.raises(ConfigError, match="world.personas.researcher.patience"):
        load_params(p)
    p.write_text((repo_root / "params.yaml").read_text().replace("asks_questions: 0.35", "asks_questions: 0.35\n      shoe_size: 9"))
    with pytest.raises(ConfigError, match="shoe_size"):
        load_params(p)
