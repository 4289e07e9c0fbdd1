"""benchmarks/world_q_ceiling.py: logged world conversations replay record for record, and the hidden-state oracle
is cross-fitted on the folds of a bench_fit_q rows file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.fixture(scope="module")
def world_logs(tmp_path_factory):
    """300 conversations of two scripted strategies, written by collect (PII and all, as the world writes them)."""
    from pipeline_steps import collect

    root = tmp_path_factory.mktemp("ceiling")
    logs = root / "raw"
    for k, strategy in enumerate(("expert", "friendly_generic")):
        collect.main(["--params", str(REPO / "params.yaml"), "--out", str(logs / strategy),
                      "--summary", str(root / f"{strategy}.json"), "--no-mlflow", "--no-progress",
                      "--policy", f"script:{strategy}", "--conversations", "150", "--seed", str(k)])
    return logs


@pytest.fixture(scope="module")
def base_tokenizer(params):
    """The tokenizer of params.yaml's base model, which renders the states the ranking scores."""
    from pipeline_steps.common.base_model import load_tokenizer, resolve_base_model

    return load_tokenizer(resolve_base_model(params.base_model.name_or_path, params.base_model.cache_dir))


@pytest.fixture(scope="module")
def action_values_json(world_logs, tmp_path_factory):
    """world_action_values.py on those logs: 12 states, 4 rollouts per candidate."""
    import world_action_values as av

    out = tmp_path_factory.mktemp("action_values") / "av.json"
    av.main([str(world_logs), "--params", str(REPO / "params.yaml"), "--states", "12", "--rollouts", "4",
             "--no-progress", "--out", str(out)])
    return out


def _rows_file(logs: Path, path: Path) -> Path:
    """A rows file as bench_fit_q --folds 2 writes it: one row per suggestion, the conversation's outcome, folds by
    conversation; Q and the baselines are noise here (the test is about the oracle's side)."""
    import numpy as np
    import polars as pl

    import bench_fit_q as bench

    canon = pl.from_arrow(bench.read_world_logs(str(logs)))
    final = canon.group_by("conversation_id").agg(pl.col("outcome").max())
    rows = (canon.filter(pl.col("suggestion").is_not_null()).select("conversation_id", "turn_index")
            .join(final, on="conversation_id").sort("conversation_id", "turn_index"))
    rng = np.random.default_rng(0)
    rows = rows.with_columns(cluster=pl.col("conversation_id"),
                             fold=pl.Series(bench.fold_of(rows["conversation_id"].to_list(), 2)),
                             q=pl.Series(rng.random(rows.height)), tfidf_lr=pl.Series(rng.random(rows.height)),
                             turn_rate=pl.Series(rng.random(rows.height)))
    rows.write_parquet(path)
    return path


def test_replay_reproduces_every_logged_conversation_and_the_hidden_state_ranks_outcomes(world_logs, tmp_path):
    import world_q_ceiling

    rows = _rows_file(world_logs, tmp_path / "rows.parquet")
    result = world_q_ceiling.main([str(world_logs), "--rows", str(rows), "--params", str(REPO / "params.yaml"),
                                   "--n-boot", "50", "--train-rows", "900", "--out", str(tmp_path / "ceiling.json")])
    assert result["replay"] == {"conversations": 300, "reproduced": 300, "ran_past_log": 0, "not_reproduced": []}
    assert result["rows_compared"] == result["scored_rows"] and result["conversions_compared"] > 10
    assert sum(f["rows"] for f in result["folds"]) == result["rows_compared"] and result["train_rows_per_fold"] == 900
    # Friendly small talk never reaches "understood"; the expert's customers do: the hidden state ranks outcomes
    # well, while the noise columns of the rows file stand near chance.
    assert result["auc"]["hidden_state"] > 0.7 and result["auc"]["q"] < 0.6
    assert result["paired"]["hidden_state - q"]["ci95"][0] > 0
    assert set(result["single_feature_auc"]) <= set(result["features"]["hidden_state"])
    assert set(result["fit_auc_on_training_rows"]) == {"hidden_state", "hidden_state_and_act",
                                                       "hidden_state_and_act_gated", "hidden_state_and_act_trees"}
    assert (tmp_path / "ceiling.json").exists()


def test_the_hidden_state_is_read_before_each_logged_suggestion(world_logs, world):
    """Turn alignment: at turn 1 nothing is revealed or proposed yet, and a probe the business sent verbatim shows
    up as one more revealed need at the next turn (while needs are left to reveal)."""
    import polars as pl

    import world_q_ceiling

    logs = world_q_ceiling.read_collected_logs(str(world_logs))
    states, counts = world_q_ceiling.replay(logs, world)
    assert counts["reproduced"] == 300
    first = states.filter(pl.col("turn_index") == 1)
    assert first.height == 300 and first["revealed"].sum() == 0 and first["proposals"].sum() == 0
    acts = world_q_ceiling.suggestion_acts(logs, world.featurizer)
    rows = (states.join(acts, on=["conversation_id", "turn_index"])
            .join(logs.select("conversation_id", "turn_index", "relation"), on=["conversation_id", "turn_index"])
            .sort("conversation_id", "turn_index")
            .with_columns(next_revealed=pl.col("revealed").shift(-1).over("conversation_id")))
    probes = rows.filter((pl.col("act") == "probe") & (pl.col("relation") == "verbatim")
                         & (pl.col("revealed") < pl.col("revealed").max().over("conversation_id"))
                         & pl.col("next_revealed").is_not_null())
    assert probes.height > 20
    assert (probes["next_revealed"] == probes["revealed"] + 1).all()


def test_a_conversation_that_does_not_replay_as_logged_is_left_out(world_logs, tmp_path):
    import polars as pl

    import world_q_ceiling

    raw = pl.read_parquet(sorted(world_logs.rglob("*.parquet")))
    first = raw.sort("conversation_id", "turn_index").row(0, named=True)
    edited = raw.with_columns(pl.when((pl.col("conversation_id") == first["conversation_id"]) & (pl.col("turn_index") == 2))
                              .then(pl.lit("A different customer message.")).otherwise(pl.col("customer_message"))
                              .alias("customer_message"))
    logs = tmp_path / "edited"
    logs.mkdir()
    edited.write_parquet(logs / "part-0.parquet")
    rows = _rows_file(logs, tmp_path / "rows.parquet")
    result = world_q_ceiling.ceiling(str(logs), str(rows), str(REPO / "params.yaml"), n_boot=20)
    assert result["replay"]["reproduced"] == 299 and result["replay"]["not_reproduced"] == [first["conversation_id"]]
    dropped = pl.read_parquet(rows).filter(pl.col("conversation_id") == first["conversation_id"]).height
    assert result["rows_compared"] == result["scored_rows"] - dropped


def test_rows_of_other_logs_and_logs_not_of_the_world_are_refused(world_logs, tmp_path):
    import polars as pl

    import world_q_ceiling

    rows = _rows_file(world_logs, tmp_path / "rows.parquet")
    frame = pl.read_parquet(rows)
    frame.with_columns(turn_index=pl.when(pl.int_range(pl.len()) == 0).then(99).otherwise(pl.col("turn_index"))
                       ).write_parquet(tmp_path / "other.parquet")
    with pytest.raises(SystemExit, match=r"1 scored rows have no logged suggestion .*turn 99\): the rows are of other logs"):
        world_q_ceiling.ceiling(str(world_logs), str(tmp_path / "other.parquet"), str(REPO / "params.yaml"), n_boot=20)
    frame.with_columns(fold=pl.when(pl.int_range(pl.len()) < 5).then(None).otherwise(pl.col("fold"))
                       ).write_parquet(tmp_path / "nofold.parquet")
    with pytest.raises(SystemExit, match="5 rows without a fold"):
        world_q_ceiling.ceiling(str(world_logs), str(tmp_path / "nofold.parquet"), str(REPO / "params.yaml"), n_boot=20)
    frame.drop("fold").write_parquet(tmp_path / "single.parquet")
    with pytest.raises(SystemExit, match=r"no column\(s\) \['fold'\]"):
        world_q_ceiling.ceiling(str(world_logs), str(tmp_path / "single.parquet"), str(REPO / "params.yaml"), n_boot=20)
    with pytest.raises(SystemExit, match="conversation_id 'chat-17': not an id the world wrote"):
        world_q_ceiling.world_ids(["c1-000001", "chat-17"])


def test_branching_replays_start_every_candidate_from_the_same_state_and_seeds(world_logs, action_values_json, world):
    """world_action_values: the snapshot is the conversation just before the logged turn's suggestion; rollout r of
    every candidate starts from the same seed (one text sent under two names gives the same conversations, record
    for record, while rollouts differ); the snapshot is left as it was; every drawn state is summarised."""
    import polars as pl

    import world_action_values as av
    import world_q_ceiling
    from pipeline_steps.world.scripted import ScriptedPolicy

    logs = world_q_ceiling.read_collected_logs(str(world_logs))
    key = tuple(logs.filter(pl.col("turn_index") == 2).sort("conversation_id").select("conversation_id", "turn_index").row(0))
    states, counts = world_q_ceiling.replay(logs, world, snapshot={key})
    snap = counts["snapshots"][key]
    assert snap.records[-1]["turn_index"] == key[1] and snap.records[-1]["suggestion"] is None and not snap.done
    state = states.filter((pl.col("conversation_id") == key[0]) & (pl.col("turn_index") == key[1])).row(0, named=True)
    assert world_q_ceiling.hidden_state(snap.customer, list(world.params.personas)).items() <= state.items()
    before = len(snap.records)
    probe = world.vertical["business_templates"]["probe"][0]
    out = av.rollouts(world, snap, {"a": probe, "b": probe, "none": None}, 16, ScriptedPolicy("abstain", world.vertical),
                      seed=0, state_index=0)
    assert out["names"] == ["a", "b", "none"] and out["converted"].shape == (3, 16)
    runs = [[(r["customer_message"], r["business_message"], r["outcome"]) for r in cv.records] for cv in out["conversations"]]
    assert runs[:16] == runs[16:32]  # "a" and "b": the same seeds, the same conversations
    assert len({tuple(r) for r in runs[:16]}) > 1  # and the rollouts' futures differ
    assert len(snap.records) == before and not snap.done

    result = json.loads(action_values_json.read_text())
    assert result["states"] == 12 and {"logged", "expert", "no_suggestion", "book", "probe"} <= set(result["candidates"])
    assert abs(sum(result["summary"]["all"]["best_action_share"].values()) - 1) < 1e-9  # ties share a state
    coverage = result["logged_coverage"]
    assert sum(c["logged_decisions"] for c in coverage) == logs.filter(pl.col("suggestion").is_not_null()).height
    with pytest.raises(SystemExit, match="an even number"):
        av.action_values(str(world_logs), str(REPO / "params.yaml"), n_states=2, n_rollouts=3)


def test_best_action_gain_is_chosen_on_one_half_of_the_rollouts_and_scored_on_the_other():
    import numpy as np

    import world_action_values as av

    names = ["book", "probe", "logged"]
    same = np.tile([1.0, 0.0, 1.0, 0.0], (3, 1))
    assert av.cross_validated_gain(same, names) == 0.0  # all tie: the logged suggestion is kept, no gain
    dominant = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=float)
    assert av.cross_validated_gain(dominant, names) == 0.75  # book on both halves: 1 - 0 on evens, 1 - 0.5 on odds
    lucky = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0]], dtype=float)
    # book wins the even half and scores 0 on the odd one; probe the reverse: choosing on the outcomes it is scored on
    # would report +1, the cross-validated gain is 0
    assert av.cross_validated_gain(lucky, names) == 0.0
    assert av.best_choice(np.array([0.5, 0.2, 0.5]), names) == 2 and av.best_choice(np.array([0.5, 0.7, 0.5]), names) == 1


def test_action_ranking_scores_learners_at_the_measured_states_without_training_on_them(world_logs, action_values_json,
                                                                                       tmp_path, params, world,
                                                                                       base_tokenizer):
    """world_action_ranking: every learner scores every candidate at every measured state; conversations holding an
    evaluated state are dropped from training; the fixed choices' gains are the world's Q differences themselves."""
    import world_action_ranking as ar

    values = json.loads(action_values_json.read_text())
    exported = tmp_path / "train_returns.parquet"
    result = ar.main(["--values", str(action_values_json), "--train", f"scripted={world_logs}",
                      "--export-train", f"scripted={exported}",
                      "--params", str(REPO / "params.yaml"), "--out", str(tmp_path / "ranking.json")])
    evaluated = {s["conversation_id"] for s in values["per_state"]}
    info = result["training_logs"]["scripted"]
    assert info["conversations_evaluated_dropped"] == len(evaluated) and info["conversations_used"] == 300 - len(evaluated)
    # --export-train: the learners' training rows as a returns file that fit_q accepts under the same params
    from pipeline_steps import fit_q
    from pipeline_steps.common.contract import system_prompt_for

    table = fit_q.read_returns(exported)
    fit_q.check_rows(table, str(exported))
    fit_q.check_returns_metadata(exported, params, base_tokenizer, system_prompt_for(world.vertical))
    assert table.num_rows == info["rows"] == info["exported"]["rows"]
    assert not evaluated & set(table.column("conversation_id").to_pylist())
    assert info["exported"]["train_rows"] + info["exported"]["validation_rows"] == table.num_rows
    with pytest.raises(SystemExit, match="--export-train other: no --train with that label"):
        ar.main(["--values", str(action_values_json), "--train", f"scripted={world_logs}",
                 "--export-train", f"other={exported}", "--params", str(REPO / "params.yaml")])
    assert info["conversations_not_reproduced"] == 0
    # the coverage counts only what the learners saw: every logged suggestion of the conversations kept
    import polars as pl

    import world_q_ceiling

    logs = world_q_ceiling.read_collected_logs(str(world_logs))
    kept = logs.filter(~pl.col("conversation_id").is_in(list(evaluated)) & pl.col("suggestion").is_not_null())
    assert sum(c["logged_decisions"] for c in info["coverage"]) == kept.height
    assert set(result["learners"]) == {f"scripted / {name}" for name in ar.LEARNERS}
    for r in result["learners"].values():
        assert r["all"]["states"] == 12 and abs(sum(r["all"]["top_share"].values()) - 1) < 1e-9
    book = [s["q_book"] - s["q_logged"] for s in values["per_state"]]
    assert abs(result["fixed_choices"]["always a booking"]["all"]["gain_over_logged"][0] - sum(book) / len(book)) < 1e-9
    assert json.loads((tmp_path / "ranking.json").read_text())["states"] == 12

    # the pairs: per_state order, then the candidates' order; acts as the world's featuriser reads the replies
    from pipeline_steps.common.contract import ABSTAIN_MARKER

    keys = {(s["conversation_id"], s["turn_index"]) for s in values["per_state"]}
    loaded = ar.state_rows(params, base_tokenizer, world, str(world_logs), keys)
    pairs, per_state, names = ar.evaluation_pairs(values, loaded, world)
    assert pairs["candidate"].to_list() == names * 12
    assert pairs["conversation_id"].to_list()[:: len(names)] == per_state["conversation_id"].to_list()
    book = pairs.filter(pl.col("candidate") == "book")
    assert set(book["act"].to_list()) == {world.featurizer([book["action_text"][0]])[0].act}
    assert pairs.filter(pl.col("candidate") == "no_suggestion")["act"].null_count() == 12
    assert set(pairs.filter(pl.col("candidate") == "no_suggestion")["action_text"].to_list()) == {ABSTAIN_MARKER}
    logged = pairs.filter(pl.col("candidate") == "logged").join(
        loaded["rows"].select("conversation_id", "turn_index", pl.col("action_text").alias("logged_text"),
                              pl.col("act").alias("logged_act")), on=["conversation_id", "turn_index"])
    assert logged.height == 12 and (logged["action_text"] == logged["logged_text"]).all()


def test_ranking_reads_the_world_q_of_the_top_scored_candidate_and_the_within_state_order():
    import numpy as np
    import polars as pl

    import world_action_ranking as ar

    names = ["book", "probe", "logged"]
    per_state = pl.DataFrame({"conversation_id": ["c1-0", "c1-1", "c1-2"], "understood": [True, False, False],
                              "q_book": [0.5, 0.1, 0.2], "q_probe": [0.2, 0.4, 0.3], "q_logged": [0.1, 0.2, 0.1]})
    q = per_state.select([f"q_{n}" for n in names]).to_numpy()
    agree = ar.ranking(per_state, names, q.ravel(), seed=0)
    assert agree["all"]["spearman"][0] == 1.0
    assert np.isclose(agree["all"]["gain_over_logged"][0], np.mean([0.4, 0.2, 0.2]))
    assert agree["needs understood"]["top_share"] == {"book": 1.0}
    # all tied: the pick is shared, so the gain is the mean over the candidates (a random tie-break's expected value)
    tied = ar.ranking(per_state, names, np.zeros(q.size), seed=0, acts=[["book", "probe", "probe"]] * 3)
    assert np.isclose(tied["all"]["gain_over_logged"][0], np.mean(q.mean(axis=1) - q[:, 2]))
    assert tied["all"]["tied_top_states"] == 3 and np.isclose(tied["all"]["top_share"]["book"], 1 / 3)
    assert np.isclose(tied["all"]["top_act_share"]["probe"], 2 / 3) and tied["all"]["spearman"] is None
    reverse = ar.ranking(per_state, names, -q.ravel(), seed=0)
    # the lowest: logged (0.1 - 0.1), book (0.1 - 0.2), logged (0.1 - 0.1)
    assert reverse["all"]["spearman"][0] == -1.0 and np.isclose(reverse["all"]["gain_over_logged"][0], -0.1 / 3)


def test_action_ranking_refuses_bad_arguments(world_logs, action_values_json, tmp_path):
    import world_action_ranking as ar

    with pytest.raises(SystemExit, match="LABEL=DIR"):
        ar.parse_labelled(["data/logs"])
    with pytest.raises(SystemExit, match="given twice"):
        ar.parse_labelled(["a=x", "a=y"])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"auc": {}}))
    with pytest.raises(SystemExit, match="world_action_values.py result"):
        ar.read_values(str(other))
    values = json.loads(action_values_json.read_text())
    values["per_state"][0]["conversation_id"] = "c1-999999"
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(values))
    with pytest.raises(SystemExit, match="measured on other logs"):
        ar.action_ranking(str(moved), {"scripted": str(world_logs)}, str(REPO / "params.yaml"))


def test_text_state_reads_what_the_expert_acted_on(world_logs, world):
    """world_action_ranking.text_state: at every turn where the scripted expert answered, the customer had asked a
    question; where it proposed a tailored visit, the customer had stated every need, given a ready cue or declined."""
    import polars as pl

    import world_action_ranking as ar
    import world_q_ceiling
    vertical = world.vertical
    logs = world_q_ceiling.read_collected_logs(str(world_logs / "expert"))
    frame = logs.join(ar.text_state(logs, vertical), on=["conversation_id", "turn_index"], how="inner")
    assert frame.height == logs.filter(pl.col("customer_message").is_not_null()).height
    answers = set(vertical["business_templates"]["answer"])
    answered = frame.filter(pl.col("suggestion").is_in(list(answers)))
    assert answered.height > 0 and answered["asked_question"].min() == 1.0
    prefixes = [t.split("{")[0] for t in vertical["business_templates"]["tailored_book"]]
    booked = frame.filter(pl.any_horizontal([pl.col("suggestion").str.starts_with(p) for p in prefixes]))
    assert booked.height > 0
    assert booked.filter((pl.col("all_stated") == 0) & (pl.col("ready_cue") == 0) & (pl.col("declined") == 0)).height == 0
    assert ((frame["project_needs"] - frame["stated_needs"]) == frame["needs_unstated"]).all()


def test_action_ranking_scores_a_trained_q_and_refuses_one_fitted_under_other_params(action_values_json, tiny_model_dir,
                                                                                   tmp_path, capsys, params, world,
                                                                                   base_tokenizer):
    """--q-model: a scorer folder with fit_q's manifest scores every candidate at every state; one whose returns
    metadata (tokenizer, prompt, base model) differs from the params the states are rendered under is refused."""
    from transformers import AutoModelForSequenceClassification

    import world_action_ranking as ar
    from pipeline_steps.common.base_model import load_tokenizer
    from pipeline_steps.common.contract import system_prompt_for
    from pipeline_steps.common.q_model import MANIFEST
    from pipeline_steps.common.tracking import write_json
    from pipeline_steps.returns import returns_metadata

    tokenizer = base_tokenizer
    scorer = tmp_path / "scorer"
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(scorer)
    load_tokenizer(tiny_model_dir).save_pretrained(scorer)
    trained_on = returns_metadata(params, tokenizer, system_prompt_for(world.vertical))
    write_json(scorer / MANIFEST, {"returns_metadata": trained_on, "max_action_tokens": 64, "target": "a test scorer"})
    args = ["--values", str(action_values_json), "--q-model", f"tiny={scorer}", "--params", str(REPO / "params.yaml")]
    result = ar.main([*args, "--q-cache", str(tmp_path / "cache")])
    assert set(result["learners"]) == {"tiny / q"} and result["q_models"]["tiny"]["target"] == "a test scorer"
    assert result["learners"]["tiny / q"]["all"]["states"] == 12
    # --q-cache: the same weights and pairs are scored once; other weights are scored anew
    again = ar.main([*args, "--q-cache", str(tmp_path / "cache")])
    assert again["q_models"]["tiny"]["score_seconds"] == 0.0 < result["q_models"]["tiny"]["score_seconds"]
    assert again["learners"] == result["learners"]
    # --drop-candidate: the abstain marker is left out of every pick; the logged reply (the reference) cannot be
    dropped = ar.main([*args, "--q-cache", str(tmp_path / "cache"), "--drop-candidate", "no_suggestion"])
    picks = dropped["learners"]["tiny / q"]["all"]
    assert "no_suggestion" not in picks["top_share"] and abs(sum(picks["top_share"].values()) - 1) < 1e-9
    assert "no suggestion" not in dropped["fixed_choices"] and dropped["dropped_candidates"] == ["no_suggestion"]
    with pytest.raises(SystemExit, match="--drop-candidate logged"):
        ar.main([*args, "--drop-candidate", "logged"])
    import torch

    with torch.no_grad():
        model.score.weight.add_(1.0)
    model.save_pretrained(scorer)
    changed = ar.main([*args, "--q-cache", str(tmp_path / "cache")])
    assert changed["q_models"]["tiny"]["score_seconds"] > 0 and changed["q_models"]["tiny"]["cache"] != result["q_models"]["tiny"]["cache"]
    write_json(scorer / MANIFEST, {"returns_metadata": {**trained_on, "prompt_version": "v0"}})
    with pytest.raises(SystemExit, match="returns_compatible.*prompt_version"):
        ar.main(args)
    with pytest.raises(SystemExit) as exit_info:
        ar.main(["--values", str(action_values_json)])
    assert exit_info.value.code == 2 and "nothing to score" in capsys.readouterr().err


def _tiny_scorer(tiny_model_dir: Path, folder: Path, params, world, tokenizer) -> Path:
    """A randomly initialised scorer with fit_q's manifest, fitted (so it says) under ``params``."""
    from transformers import AutoModelForSequenceClassification

    from pipeline_steps.common.base_model import load_tokenizer
    from pipeline_steps.common.contract import system_prompt_for
    from pipeline_steps.common.q_model import MANIFEST
    from pipeline_steps.common.tracking import write_json
    from pipeline_steps.returns import returns_metadata

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    load_tokenizer(tiny_model_dir).save_pretrained(folder)
    write_json(folder / MANIFEST, {"returns_metadata": returns_metadata(params, tokenizer, system_prompt_for(world.vertical)),
                                   "max_action_tokens": 64, "target": "a test scorer"})
    return folder


def test_policy_values_branch_each_policy_sample_at_the_action_values_states(world_logs, action_values_json, tiny_model_dir,
                                                                           tmp_path, params, world, base_tokenizer):
    """world_policy_values.py starts from world_action_values' states: the logged suggestion's branched value is the
    same state for state; two copies of one policy draw the same samples (the paired difference is exactly 0); a Q
    scores every sample; bad arguments are refused before any work."""
    import world_policy_values as pv

    scorer = _tiny_scorer(tiny_model_dir, tmp_path / "scorer", params, world, base_tokenizer)
    args = [str(world_logs), "--params", str(REPO / "params.yaml"), "--states", "12", "--rollouts", "4", "--samples", "3",
            "--batch-size", "5", "--no-progress"]
    result = pv.main([*args, "--policy", f"a={tiny_model_dir}", "--policy", f"b={tiny_model_dir}", "--q-model", f"q={scorer}",
                      "--out", str(tmp_path / "pv.json")])
    values = json.loads(action_values_json.read_text())
    assert result["states"] == values["states"] == 12
    for group, summary in values["summary"].items():
        assert result["summary"][group]["logged"] == summary["q"]["logged"]  # same states, seeds and rollouts
    s = result["summary"]["all"]
    assert s["b: minus a"] == [0.0, 0.0, 0.0] and s["a: value"] == s["b: value"]
    assert s["a: minus logged"][0] == pytest.approx(s["a: value"][0] - s["logged"][0])
    assert 0 <= s["a: best of 2 by q"][0] <= 1 and s["a: mean q"] == pytest.approx(s["b: mean q"], abs=1e-6)  # batch padding
    frontier = result["best_of_k_frontier"]["a"]  # best-of-k for k = 2 and 3 of the 3 samples, by the oracle and by Q
    assert [row["k"] for row in frontier] == [2, 3] and set(frontier[0]) == {"k", "kl_bound_nats_per_reply", "oracle gain",
                                                                             "q gain"}
    assert frontier[1]["oracle gain"][0] == pytest.approx(s["a: oracle best of 3"][0] - s["a: value"][0])
    assert frontier[0]["q gain"][0] == pytest.approx(s["a: best of 2 by q"][0] - s["a: value"][0])
    assert result["q_models"]["q"]["target"] == "a test scorer" and set(result["abstain_share"]) == {"a", "b"}
    assert json.loads((tmp_path / "pv.json").read_text())["summary"] == result["summary"]

    with pytest.raises(SystemExit, match="--rollouts 3"):
        pv.main([*args[:5], "--rollouts", "3", "--policy", f"a={tiny_model_dir}"])
    with pytest.raises(SystemExit, match="at least one --policy"):
        pv.main(args)
    with pytest.raises(SystemExit, match="an LLM policy is expected"):
        pv.main([*args, "--policy", "s=script:expert"])


def test_policy_samples_come_back_in_history_order_on_batch_seeds_shared_by_policies():
    """Prompts are batched by length; each history gets its own samples back, and batch b is sampled from seed + b
    whichever policy samples (a stand-in policy echoes its prompt and seed)."""
    import world_policy_values as pv

    class Echo:
        def prompts(self, histories):
            return [str(h) for h in histories]

        def generate(self, prompts, seed):
            return [f"{p}|{seed}" for p in prompts]

    histories = ["a" * n for n in (5, 1, 3, 2)]
    prompts, texts = pv.sample_suggestions(Echo(), histories, 2, 3, 10, progress=False)
    assert prompts == histories
    for h, row in zip(histories, texts):
        assert [t.split("|")[0] for t in row] == [h, h]
    seeds = {t.split("|")[1] for row in texts for t in row}
    assert seeds == {"10", "11", "12"}  # 8 samples in batches of 3, shortest prompts first
    assert texts[1] == ["a|10", "a|10"]
    assert pv.sample_suggestions(Echo(), histories, 2, 3, 10, progress=False)[1] == texts


def test_best_of_n_reads_the_true_value_of_the_top_scored_sample_ties_shared():
    import numpy as np

    import world_policy_values as pv

    assert pv.best_by(np.array([0.1, 0.9, 0.2]), np.array([0.0, 0.5, 1.0])) == 0.5
    assert pv.best_by(np.array([0.9, 0.9, 0.2]), np.array([0.0, 0.5, 1.0])) == 0.25
    # the oracle chooses on one half of the rollouts and scores on the other: no gain from noise alone
    converted = np.array([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=float)
    assert pv.oracle_best(converted) == 0.0
    assert pv.oracle_best(np.array([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=float)) == 1.0


def test_best_of_k_is_the_exact_mean_over_every_k_subset_ties_included():
    from itertools import combinations

    import numpy as np

    import world_policy_values as pv

    rng = np.random.default_rng(3)
    scores = rng.integers(0, 3, size=7).astype(float)  # few levels: many ties, as the oracle's rollout means have
    values = rng.random(7)
    for k in range(1, 8):
        brute = np.mean([pv.best_by(scores[list(s)], values[list(s)]) for s in combinations(range(7), k)])
        assert abs(pv.best_by(scores, values, k) - brute) < 1e-12
    assert pv.best_by(scores, values, 1) == pytest.approx(values.mean())  # one random sample: the policy's value
    assert pv.best_by(scores, values, 7) == pv.best_by(scores, values)
    converted = rng.integers(0, 2, size=(5, 8)).astype(float)
    assert pv.oracle_best(converted, 5) == pv.oracle_best(converted)
    assert pv.best_of_k_sizes(8) == [2, 4, 8] and pv.best_of_k_sizes(6) == [2, 4, 6] and pv.best_of_k_sizes(1) == [1]
    assert pv.best_of_k_kl_bound(1) == 0.0 and abs(pv.best_of_k_kl_bound(2) - (np.log(2) - 0.5)) < 1e-12
    try:
        pv.best_by(scores, values, 8)
    except ValueError as e:
        assert "k=8 among 7" in str(e)
    else:
        raise AssertionError("k above the number of candidates must be refused")
