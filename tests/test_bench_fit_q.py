"""benchmarks/bench_fit_q.py end to end on the tiny model: every section runs and the JSON holds its numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_fit_q_prints_and_saves_quality_and_throughput(tmp_path, tiny_model_dir, dealornodeal_file):
    out = tmp_path / "bench_fit_q.json"
    args = [sys.executable, str(REPO / "benchmarks" / "bench_fit_q.py"), "--base-model", str(tiny_model_dir),
            "--threads", "1", "--max-prompt-tokens", "96", "--dnd-train-rows", "48", "--dnd-val-rows", "40",
            "--throughput-rows", "24", "--world-per-strategy", "6", "--world-train-rows", "40", "--world-val-rows", "40",
            "--eval-rows", "8", "--epochs", "2", "--lora-top-layers", "1", "--out", str(out)]
    env = {**os.environ, "IPPO_DND_FILE": str(dealornodeal_file), "COLUMNS": "200"}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fit_q held-out quality" in proc.stdout and "recommended fit_q.bf16" in proc.stdout

    result = json.loads(out.read_text())
    tasks, runs = result["tasks"], result["runs"]
    prec = "bf16" if result["recommended_bf16"] else "fp32"
    # fp32 and bf16 on the small slice, then the full Deal-or-No-Deal sample and the world with the chosen precision.
    assert list(tasks) == ["dnd_fp32_24", "dnd_bf16_24", f"dnd_{prec}_48", f"world_{prec}_40"]
    assert [runs[k]["train_rows"] for k in tasks] == [24, 24, 48, 40]
    assert result["args"]["lora_top_layers"] == 1
    for name, task in tasks.items():
        assert 0.0 <= task["auc_q"] <= 1.0 and 0.0 <= task["auc_tfidf_lr"] <= 1.0, name
        lo, hi = task["auc_margin_ci95"]
        assert lo <= task["auc_margin"] <= hi, name
        assert runs[name]["tokens_per_second"] > 0 and runs[name]["mfu_exec"] > 0, name
        assert 1 <= runs[name]["epochs"] <= 2, name
        # The margin again on the validation rows the Trainer did not evaluate to keep its best weights.
        assert task["unselected_rows"] == runs[name]["val_rows"] - 8, name
        assert 0.0 <= task["auc_q_unselected"] <= 1.0, name
    assert result["bf16_speedup"] > 0 and result["matmul_peak_gflops"]["fp32"] > 0
    assert isinstance(result["auto_bf16"], bool) and result["machine"]["maxrss_gib"] > 0


def test_bench_fit_q_sweep_mode_skips_the_precision_runs_and_the_other_task(tmp_path, tiny_model_dir, dealornodeal_file):
    """--precision fixed and --tasks: one run of the named task at the given learning rate, nothing else."""
    out = tmp_path / "sweep.json"

    def cmd(tasks: str, *extra: str) -> list[str]:
        return [sys.executable, str(REPO / "benchmarks" / "bench_fit_q.py"), "--base-model", str(tiny_model_dir),
                "--threads", "1", "--max-prompt-tokens", "96", "--dnd-train-rows", "32", "--dnd-val-rows", "40",
                "--world-per-strategy", "6", "--world-train-rows", "24", "--world-val-rows", "40",
                "--eval-rows", "8", "--lora-top-layers", "1", "--precision", "fp32", "--tasks", tasks,
                "--learning-rate", "1e-3", "--out", str(out), *extra]

    env = {**os.environ, "IPPO_DND_FILE": str(dealornodeal_file), "COLUMNS": "200"}
    proc = subprocess.run(cmd("dnd", "--gamma", "0.99", "--batch-size", "4"), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["tasks"]) == ["dnd_fp32_32"]
    # --gamma sets returns.gamma: a deal's G is 0.99^k (k turns before its end), where params.yaml's 0.9 gives 0.9^k.
    assert result["returns_gamma"] == 0.99
    import numpy as np
    import polars as pl
    rows = pl.read_parquet(out.with_suffix(".rows.parquet"))
    g = rows.filter(pl.col("outcome") == 1)["G"].to_numpy()
    k = np.log(g) / np.log(0.99)
    assert len(g) and np.allclose(k, np.round(k), atol=1e-6) and (g < 1).any()
    assert result["runs"]["dnd_fp32_32"]["bf16"] is False
    assert result["bf16_speedup"] is None and result["recommended_bf16"] is None
    assert result["args"]["learning_rate"] == 1e-3 and result["args"]["batch_size"] == 4
    assert result["machine"]["gpu"] is None and "batch 4" in proc.stdout  # the throughput table's title
    # The across-seed summary reads what the bench wrote (one run: no interval yet).
    summary = _summariser().main([str(out), "--out", str(tmp_path / "summary.json")])
    assert summary["runs"] == 1 and summary["auc_margin"]["ci95"] is None
    assert summary["auc_margin"]["mean"] == result["tasks"]["dnd_fp32_32"]["auc_margin"]

    # A world-only point does not read Deal-or-No-Deal at all (the file may be absent).
    no_dnd = {**env, "IPPO_DND_FILE": str(tmp_path / "absent.txt")}
    proc = subprocess.run(cmd("world"), cwd=REPO, env=no_dnd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    world = json.loads(out.read_text())
    from pipeline_steps.common.config import load_params
    assert list(world["tasks"]) == ["world_fp32_24"]
    assert world["returns_gamma"] == load_params(REPO / "params.yaml").returns.gamma != 0.99  # params.yaml's

    bad = subprocess.run(cmd("dnd,chess"), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--tasks 'dnd,chess'" in bad.stderr


def test_bench_fit_q_world_from_collected_logs_saves_every_scored_row(tmp_path, tiny_model_dir, tiny_params_file):
    """--world-logs reads a collect run's logs instead of the scripted mix; the scored rows land beside the JSON
    with their conversation, so the statistics can be recomputed without training again."""
    import polars as pl

    from pipeline_steps import collect

    logs = tmp_path / "raw"
    collect.main(["--params", str(tiny_params_file), "--out", str(logs), "--summary", str(tmp_path / "c.json"),
                  "--no-mlflow", "--no-progress", "--policy", "script:expert", "--conversations", "60"])
    out = tmp_path / "world.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_fit_q.py"), "--base-model", str(tiny_model_dir), "--threads", "1",
         "--max-prompt-tokens", "96", "--world-logs", str(logs), "--world-train-rows", "40", "--world-val-rows", "60",
         "--eval-rows", "8", "--lora-top-layers", "1", "--precision", "fp32", "--tasks", "world", "--out", str(out)],
        cwd=REPO, env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (name, task), = result["tasks"].items()
    assert task["source"] == f"logs {logs}" and task["conversations"] == 60
    rows = pl.read_parquet(out.with_suffix(".rows.parquet"))
    assert rows.height == result["runs"][name]["val_rows"] and set(rows["task"]) == {name}
    assert task["clusters"] == rows["conversation_id"].n_unique() < rows.height  # several turns per conversation
    assert {"q", "tfidf_lr", "turn_rate", "outcome", "G"} <= set(rows.columns)
    lo, hi = task["auc_margin_ci95"]
    assert lo <= task["auc_margin"] <= hi


def test_bench_fit_q_epochs_zero_scores_the_probe_alone(tmp_path, tiny_model_dir):
    """--epochs 0 is fit_q.epochs 0: the probe head fitted on the train rows scores the held-out rows, nothing is
    trained (no throughput to report), and the baselines are scored beside it as in any run."""
    out = tmp_path / "probe.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_fit_q.py"), "--base-model", str(tiny_model_dir),
           "--threads", "1", "--max-prompt-tokens", "96", "--world-per-strategy", "6", "--world-train-rows", "40",
           "--world-val-rows", "40", "--eval-rows", "8", "--tasks", "world", "--epochs", "0", "--out", str(out)]
    env = {**os.environ, "COLUMNS": "200"}
    refused = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--epochs 0 trains nothing" in refused.stderr and not out.exists()
    proc = subprocess.run(cmd + ["--precision", "fp32"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (name, task), = result["tasks"].items()
    run = result["runs"][name]
    assert run["epochs"] == 0 and run["kept"] == "probe (epoch 0)" and run["train_tokens"] == 0
    assert run["tokens_per_second"] is None and run["mfu_exec"] is None and run["score_tokens_per_second"] > 0
    assert run["init"]["probe_rows"] == run["train_rows"] == 40  # fit_q.probe_init_rows: null, every train row
    lo, hi = task["auc_margin_ci95"]
    assert lo <= task["auc_margin"] <= hi and 0.0 <= task["auc_q"] <= 1.0


def test_cross_fitting_holds_out_every_conversation_once(tmp_path, tiny_model_dir, dealornodeal_file):
    """--folds 3: each Deal-or-No-Deal row is scored once, by a Q (and baselines) trained on the other folds; a
    dialogue's two copies share a fold; the pooled margin's CI resamples every dialogue of the corpus.
    --dnd-extra-train: another file's rows join every fold's training set and are never held out; its dialogues
    that are also in the main file are dropped."""
    import polars as pl

    lines = dealornodeal_file.read_text().splitlines(keepends=True)
    dnd, extra = tmp_path / "dnd.txt", tmp_path / "extra.txt"
    dnd.write_text("".join(lines[:150]))
    extra.write_text("".join(lines[150:162] + lines[:1]))  # 12 new lines and one already held out
    out = tmp_path / "cv.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_fit_q.py"), "--base-model", str(tiny_model_dir),
           "--threads", "1", "--max-prompt-tokens", "96", "--dnd-train-rows", "24", "--dnd-val-rows", "100000",
           "--eval-rows", "8", "--lora-top-layers", "1", "--precision", "fp32", "--tasks", "dnd", "--folds", "3",
           "--out", str(out)]
    env = {**os.environ, "IPPO_DND_FILE": str(dnd), "COLUMNS": "200"}
    proc = subprocess.run(cmd + ["--dnd-extra-train", str(extra)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (name, task), = result["tasks"].items()
    run = result["runs"][name]
    (extra_file,) = task["extra_train"]["files"]
    assert extra_file["conversations"] == 13 and extra_file["dialogues_dropped_as_in_the_main_file"] == 1
    n_extra = task["extra_train"]["rows"]
    assert n_extra == extra_file["rows"] > 12  # the 12 new conversations' turns, not the dropped one's
    assert name == f"dnd_fp32_cv3_plus{n_extra}" and len(run["folds"]) == 3
    assert [f["train_rows"] for f in run["folds"]] == [24 + n_extra] * 3 and run["train_rows"] == 24 + n_extra

    rows = pl.read_parquet(out.with_suffix(".rows.parquet"))
    assert rows.height == run["val_rows"] == task["rows_total"]  # every row of the main file held out, once
    assert not rows["conversation_id"].str.starts_with("dnd-extra-").any()  # the extra rows only ever train
    assert rows.select("conversation_id", "turn_index").is_unique().all()
    assert sorted(rows["fold"].unique().to_list()) == [0, 1, 2]
    assert (rows.group_by("cluster").agg(pl.col("fold").n_unique())["fold"] == 1).all()  # both copies, one fold
    assert task["clusters"] == rows["cluster"].n_unique() == task["dialogues"]
    assert rows["conversation_id"].n_unique() == task["conversations"]
    assert task["unselected_rows"] == rows.height - 3 * 8  # each fold's selection rows left out
    lo, hi = task["auc_margin_ci95"]
    assert lo <= task["auc_margin"] <= hi
    for fold in run["folds"]:
        assert 0.0 <= fold["held_out_auc"]["q"] <= 1.0 and fold["tokens_per_second"] > 0

    # --dnd-hold-out-all: one Q (and baselines) trained on the extra file's rows only scores every main-file row.
    single = cmd[:cmd.index("--folds")] + cmd[cmd.index("--folds") + 2:]
    proc = subprocess.run(single + ["--dnd-extra-train", str(extra), "--dnd-hold-out-all"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (name, task), = result["tasks"].items()
    assert name == f"dnd_fp32_extra{n_extra}_all_held_out" and result["runs"][name]["train_rows"] == n_extra
    held_out = pl.read_parquet(out.with_suffix(".rows.parquet"))
    assert held_out.height == task["rows_total"] == rows.height and (held_out["fold"] == 0).all()
    assert held_out.sort("conversation_id", "turn_index").select("conversation_id", "turn_index").equals(
        rows.sort("conversation_id", "turn_index").select("conversation_id", "turn_index"))

    # --dnd-folds-by-file: the files are the folds; every row of both files is held out once, each file's rows by a
    # Q trained on the other file (capped at --dnd-train-rows), and the margin is computed on the pooled rows.
    proc = subprocess.run(single + ["--dnd-extra-train", str(extra), "--dnd-folds-by-file"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (name, task), = result["tasks"].items()
    run = result["runs"][name]
    assert name == "dnd_fp32_by_file2" and [f["train_rows"] for f in run["folds"]] == [min(24, n_extra), 24]
    by_file = pl.read_parquet(out.with_suffix(".rows.parquet"))
    assert by_file.height == task["rows_total"] == rows.height + n_extra == sum(f["val_rows"] for f in run["folds"])
    assert by_file.select("conversation_id", "turn_index").is_unique().all()
    from_extra = by_file["conversation_id"].str.starts_with("dnd-extra-")
    assert (by_file.filter(from_extra)["fold"] == 1).all() and (by_file.filter(~from_extra)["fold"] == 0).all()
    assert by_file.filter(from_extra).height == n_extra
    assert task["unselected_rows"] == by_file.height - 2 * 8
    lo, hi = task["auc_margin_ci95"]
    assert lo <= task["auc_margin"] <= hi

    for bad, message in ((["--folds", "1"], "--folds 1"), (["--precision", "measure"], "fix the precision"),
                         (["--dnd-hold-out-all"], "--dnd-hold-out-all trains on --dnd-extra-train rows only"),
                         (["--dnd-extra-train", str(extra), "--dnd-folds-by-file"], "--dnd-folds-by-file makes the files"),
                         (["--dnd-extra-train", str(extra), "--tasks", "world"], "apply to the dnd task")):
        proc = subprocess.run(cmd + bad, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr


def test_folds_follow_the_conversation_not_the_row_order():
    import numpy as np

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_fit_q import fold_of

    clusters = [f"c{i}" for i in range(2000) for _ in range(3)]
    folds = fold_of(clusters, 5)
    assert np.array_equal(fold_of(clusters[::-1], 5), folds[::-1])
    assert all(len(set(folds[i:i + 3])) == 1 for i in range(0, len(clusters), 3))
    counts = np.bincount(folds, minlength=5) / 3
    assert counts.min() > 330 and counts.max() < 470  # ~400 conversations each


def test_dnd_input_becomes_a_sentence_of_yous_items_and_values():
    """--dnd-state dialogue+input: the <input> numbers (count, value) x (book, hat, ball) in words; bad input named."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_fit_q import dnd_input_sentence

    assert dnd_input_sentence("1 6 3 0 2 2") == (
        "YOU's items: 1 book worth 6 each to YOU, 3 hats worth 0 each to YOU, 2 balls worth 2 each to YOU.")
    with pytest.raises(ValueError, match="'1 6 3': expected 6 numbers"):
        dnd_input_sentence("1 6 3")


def test_auc_ci_resamples_whole_conversations():
    """Copying every conversation's rows 6 times adds no evidence: the conversation bootstrap keeps the CI's
    width, the row bootstrap (earlier runs) shrinks it by about sqrt(6)."""
    import numpy as np

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_fit_q import paired_auc_diff_ci

    rng = np.random.default_rng(3)
    n = 80
    y = np.arange(n) % 2
    a, b = y + rng.normal(0, 1.0, n), y + rng.normal(0, 1.5, n)
    one = paired_auc_diff_ci(y, a, b, clusters=None, n_boot=400)
    assert paired_auc_diff_ci(y, a, b, clusters=np.arange(n), n_boot=400) == one  # singletons = the row bootstrap
    rep = np.repeat(np.arange(n), 6)
    by_conv = paired_auc_diff_ci(y[rep], a[rep], b[rep], clusters=rep, n_boot=400)
    by_row = paired_auc_diff_ci(y[rep], a[rep], b[rep], clusters=None, n_boot=400)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert 0.75 < width(by_conv) / width(one) < 1.33
    assert width(by_row) < 0.6 * width(by_conv)


def _summariser():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import summarise_bench_fit_q

    return summarise_bench_fit_q


def test_seed_summary_is_the_mean_margin_with_a_t_interval(tmp_path):
    """Three seeds' margins +0.06, +0.04, +0.05: mean +0.05, t interval 0.05 -+ t(0.975, 2) * 0.01 / sqrt(3)."""
    import math


    mod = _summariser()
    files = []
    for seed, margin in enumerate((0.06, 0.04, 0.05)):
        task = {"auc_q": 0.8 + margin, "auc_tfidf_lr": 0.8, "auc_turn_rate": 0.7, "auc_margin": margin,
                "auc_margin_ci95": [margin - 0.05, margin + 0.05], "clusters": 150, "auc_margin_unselected": margin - 0.01}
        result = {"args": {"seed": seed, "learning_rate": 1e-3}, "seconds": 900.0,
                  "tasks": {"dnd_bf16_2323": task, "world_bf16_300": {**task, "auc_margin": -0.03}},
                  "runs": {"dnd_bf16_2323": {"train_rows": 2323, "val_rows": 512, "kept": "epoch 1"},
                           "world_bf16_300": {"train_rows": 300, "val_rows": 192, "kept": "probe (epoch 0)"}}}
        files.append(tmp_path / f"seed{seed}.json")
        files[-1].write_text(json.dumps(result))
    s = mod.main([str(f) for f in files])
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert s["runs"] == 3 and s["runs_meeting_target"] == 2
    assert s["auc_margin"]["mean"] == pytest.approx(0.05)
    assert s["auc_margin"]["ci95"] == pytest.approx([0.05 - half, 0.05 + half], abs=1e-6)
    assert s["auc_margin_unselected"]["mean"] == pytest.approx(0.04)
    assert mod.main([str(files[0]), "--task", "world_"])["auc_margin"]["mean"] == pytest.approx(-0.03)
    with pytest.raises(SystemExit, match="no task named chess_"):
        mod.main([str(files[0]), "--task", "chess_"])


def test_paired_comparison_of_two_runs_on_the_same_rows(tmp_path):
    """Run b's Q is run a's plus noise on fold 1 only: fold 0 is unchanged, the pooled difference is negative with
    a CI over the 60 conversations; rows in another order are refused with exit 2, nothing written."""
    import numpy as np
    import polars as pl

    sys.path.insert(0, str(REPO / "benchmarks"))
    import compare_bench_fit_q_rows as mod

    rng = np.random.default_rng(0)
    conv = np.repeat(np.arange(60), 4)
    y = np.repeat(rng.integers(0, 2, 60), 4)
    q = y * 0.3 + rng.uniform(0, 1, conv.size)
    fold = conv % 2
    rows = pl.DataFrame({"task": ["dnd_bf16_cv2"] * conv.size, "row": np.arange(conv.size),
                         "conversation_id": [f"c{c}" for c in conv], "cluster": [f"k{c}" for c in conv],
                         "turn_index": np.tile(np.arange(4), 60), "outcome": y, "G": y * 0.9, "fold": fold, "q": q})
    a, b = tmp_path / "a.rows.parquet", tmp_path / "b.rows.parquet"
    rows.write_parquet(a)
    rows.with_columns(q=pl.Series(np.where(fold == 1, q + rng.normal(0, 2, conv.size), q))).write_parquet(b)

    result = mod.main([str(a), str(b), "--out", str(tmp_path / "cmp.json")])
    assert [f["fold"] for f in result["folds"]] == [0, 1] and result["clusters"] == 60
    assert result["folds"][0]["auc_b"] == result["folds"][0]["auc_a"]
    assert result["folds"][1]["auc_b"] < result["folds"][1]["auc_a"]
    lo, hi = result["auc_diff_ci95"]
    assert result["auc_diff"] < 0 and lo <= result["auc_diff"] <= hi
    assert json.loads((tmp_path / "cmp.json").read_text())["auc_diff"] == result["auc_diff"]

    shuffled = tmp_path / "shuffled.rows.parquet"
    rows.sample(fraction=1.0, shuffle=True, seed=1).write_parquet(shuffled)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare_bench_fit_q_rows.py"), str(a),
                           str(shuffled), "--out", str(tmp_path / "bad.json")], capture_output=True, text=True)
    assert proc.returncode == 2 and "not paired" in proc.stderr and not (tmp_path / "bad.json").exists()

    # --align pairs the same rows in another order (another --folds): b's per-row Qs, the folds not compared
    other = rows.with_columns(q=pl.Series(np.where(fold == 1, q + rng.normal(0, 2, conv.size), q)), fold=conv % 3,
                              task=pl.lit("dnd_fp32_cv3")).sample(fraction=1.0, shuffle=True, seed=2)
    other.write_parquet(shuffled)
    aligned = mod.compare(str(a), str(shuffled), align=True)
    assert aligned["aligned"] and aligned["folds"] == [] and aligned["rows"] == 240
    assert aligned["auc_a"] == result["auc_a"] and aligned["auc_diff"] < 0
    other.drop("fold").write_parquet(shuffled)  # a single-split run's rows file has no fold column
    assert mod.compare(str(a), str(shuffled), align=True)["auc_diff"] == aligned["auc_diff"]
    pl.concat([other.drop("fold"), rows.with_columns(task=pl.lit("world_bf16_2"))], how="diagonal").write_parquet(shuffled)
    picked = mod.compare(str(a), str(shuffled), align=True, task_b="dnd_fp32_cv3")  # one run of a multi-run file
    assert picked["auc_diff"] == aligned["auc_diff"] and picked["task_b"] == "dnd_fp32_cv3"
    with pytest.raises(ValueError, match="no task 'chess'"):
        mod.compare(str(a), str(shuffled), align=True, task_b="chess")
    rows.head(200).write_parquet(shuffled)  # a different row set is still refused
    with pytest.raises(ValueError, match="not paired"):
        mod.compare(str(a), str(shuffled), align=True)


def test_ensemble_of_cross_fitted_runs_averages_q_and_the_baselines(tmp_path):
    """Three runs whose Qs are the signal plus independent noise on different scales: their rank mean ranks the
    outcome better than any one, the baselines are averaged alike; shuffled rows are aligned; another row set, a
    run without folds or a file of two data sets is refused."""
    import numpy as np
    import polars as pl

    sys.path.insert(0, str(REPO / "benchmarks"))
    import ensemble_bench_fit_q_rows as mod

    rng = np.random.default_rng(0)
    conv = np.repeat(np.arange(80), 4)
    y = np.repeat(rng.integers(0, 2, 80), 4)
    base = pl.DataFrame({"task": ["dnd_bf16_cv3"] * conv.size, "row": np.arange(conv.size),
                         "conversation_id": [f"c{c}" for c in conv], "cluster": [f"k{c}" for c in conv],
                         "turn_index": np.tile(np.arange(4), 80), "outcome": y, "G": y * 0.9, "fold": conv % 3})
    paths = []
    for k in range(3):
        run = base.with_columns(q=pl.Series((y + rng.normal(0, 1.2, conv.size)) * 1000.0 ** k),  # scales: ranks
                                tfidf_lr=pl.Series(y + rng.normal(0, 2.0, conv.size) + k),
                                turn_rate=pl.Series(rng.uniform(0, 1, conv.size)))
        paths.append(tmp_path / f"run{k}.rows.parquet")
        run.sample(fraction=1.0, shuffle=True, seed=k).write_parquet(paths[-1])  # each run its own row order
    result = mod.main([str(p) for p in paths] + ["--n-boot", "300", "--out", str(tmp_path / "ens.json")])
    singles = [r["auc_q"] for r in result["runs"]]
    assert result["rows"] == 320 and result["clusters"] == 80 and len(singles) == 3
    assert result["auc_q_ensemble"] > max(singles) + 0.05  # a raw mean would be the 1e6-scaled run alone
    assert result["q_ensemble_minus_best_single_q"] == pytest.approx(result["auc_q_ensemble"] - max(singles))
    assert result["best_baseline"] == "tfidf_lr"
    assert result["auc_baselines_ensemble"]["tfidf_lr"] > max(r["auc_tfidf_lr"] for r in result["runs"])
    lo, hi = result["q_ensemble_minus_best_baseline_ci95"]
    assert lo <= result["q_ensemble_minus_best_baseline"] <= hi
    assert json.loads((tmp_path / "ens.json").read_text())["auc_q_ensemble"] == result["auc_q_ensemble"]

    bad = tmp_path / "bad.rows.parquet"
    pl.read_parquet(paths[0]).head(300).write_parquet(bad)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ensemble_bench_fit_q_rows.py"), str(paths[0]),
                           str(bad), "--out", str(tmp_path / "no.json")], capture_output=True, text=True)
    assert proc.returncode == 2 and "no ensemble" in proc.stderr and not (tmp_path / "no.json").exists()
    pl.read_parquet(paths[1]).drop("fold").write_parquet(bad)  # a single-split run: its Q saw other runs' held-out rows
    with pytest.raises(ValueError, match="not cross-fitted"):
        mod.ensemble([str(paths[0]), str(bad)])
    with pytest.raises(ValueError, match="at least two"):
        mod.ensemble([str(paths[0])])
    two = pl.read_parquet(paths[1])
    pl.concat([two, two.with_columns(task=pl.lit("world_bf16_cv3"), conversation_id=pl.lit("w") + pl.col(
        "conversation_id"))]).write_parquet(bad)
    with pytest.raises(ValueError, match="several data sets"):
        mod.ensemble([str(paths[0]), str(bad)])


def test_pooling_disjoint_held_out_runs_scores_every_row_once(tmp_path):
    """Two runs that held out disjoint conversations (each file of a corpus scored by a Q trained on the other)
    pool into one held-out set whose statistics equal bench_fit_q.quality on the concatenated rows; overlapping
    rows or conversations, and a run with rows no model held out, are refused."""
    import numpy as np
    import polars as pl

    sys.path.insert(0, str(REPO / "benchmarks"))
    import pool_bench_fit_q_rows as mod
    from bench_fit_q import quality

    rng = np.random.default_rng(1)
    frames, paths = [], []
    for k, (name, n) in enumerate((("val", 60), ("test", 40))):
        conv = np.repeat(np.arange(n), 3)
        y = np.repeat(rng.integers(0, 2, n), 3)
        frames.append(pl.DataFrame({
            "task": [f"dnd_bf16_extra{n}_all_held_out"] * conv.size, "row": np.arange(conv.size),
            "conversation_id": [f"dnd-{name}-{c:05d}" for c in conv], "cluster": [f"{name}{c}" for c in conv],
            "turn_index": np.tile(np.arange(3), n), "outcome": y, "G": y * 0.9, "fold": [0] * conv.size,
            "q": y + rng.normal(0, 0.8 + k, conv.size), "tfidf_lr": y + rng.normal(0, 1.5, conv.size),
            "turn_rate": rng.uniform(0, 1, conv.size)}))
        paths.append(tmp_path / f"{name}.rows.parquet")
        frames[-1].write_parquet(paths[-1])
    result = mod.main([str(p) for p in paths] + ["--out", str(tmp_path / "pooled.json")])
    both = pl.concat(frames)
    expected = quality(both["outcome"].to_numpy(), both["G"].to_numpy(), both["q"].to_numpy(),
                       {b: both[b].to_numpy() for b in ("tfidf_lr", "turn_rate")}, 0, both["cluster"].to_numpy())
    pooled = result["pooled"]
    assert result["rows"] == 300 and result["rows_per_run"] == [180, 120] and pooled["clusters"] == 100
    assert pooled["auc_q"] == pytest.approx(expected["auc_q"]) and pooled["auc_margin"] == pytest.approx(expected["auc_margin"])
    assert pooled["auc_margin_ci95"] == pytest.approx(expected["auc_margin_ci95"])
    assert [r["rows"] for r in result["runs"]] == [180, 120] and result["runs"][0]["auc_q"] > result["runs"][1]["auc_q"]
    assert json.loads((tmp_path / "pooled.json").read_text())["pooled"]["auc_q"] == pooled["auc_q"]

    bad = tmp_path / "bad.rows.parquet"
    with pytest.raises(ValueError, match="held out by two runs"):
        mod.pool([str(paths[0]), str(paths[0])])
    frames[1].with_columns(cluster=pl.lit("val0")).write_parquet(bad)  # another row of a conversation of run 1
    with pytest.raises(ValueError, match="conversations .* held out by two runs"):
        mod.pool([str(paths[0]), str(bad)])
    frames[1].with_columns(fold=pl.lit(None, dtype=pl.Int64)).write_parquet(bad)
    with pytest.raises(ValueError, match="a row without a fold"):
        mod.pool([str(paths[0]), str(bad)])
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pool_bench_fit_q_rows.py"), str(paths[0])],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "at least two" in proc.stderr


def test_baselines_across_files_hold_out_every_row_of_each_file(tmp_path, tiny_model_dir, dealornodeal_file):
    """Both baselines on two corpus files: within a file (cross-fitted), trained on the other file, and both; the
    'other file' AUC is the baseline fitted on the whole other file; files sharing a dialogue are refused."""
    import numpy as np

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_fit_q as bench
    import dnd_baselines_across_files as mod

    lines = dealornodeal_file.read_text().splitlines(keepends=True)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("".join(lines[:120]))
    b.write_text("".join(lines[120:220]))
    common = [str(a), str(b), "--base-model", str(tiny_model_dir), "--max-prompt-tokens", "96",
              "--params", str(REPO / "params.yaml")]
    result = mod.main(common + ["--out", str(tmp_path / "across.json")])
    assert [f["conversations"] for f in result["files"]] == [120, 100]
    for key in ("a", "b"):
        assert set(result["held_out"][key]) == {"within", "other file", "within + other file"}
        for aucs in result["held_out"][key].values():
            assert 0.0 <= aucs["tfidf_lr"] <= 1.0 and 0.0 <= aucs["turn_rate"] <= 1.0

    from pipeline_steps.common.base_model import load_tokenizer
    from pipeline_steps.common.config import load_params

    params = load_params(str(REPO / "params.yaml"), {"prompt.max_prompt_tokens": 96})
    tok = load_tokenizer(tiny_model_dir)
    rows_a, _ = bench.dnd_returns(params, tok, 0.0, path=str(a))
    rows_b, _ = bench.dnd_returns(params, tok, 0.0, path=str(b))
    y = rows_a["outcome"].to_numpy()
    assert result["held_out"]["a"]["other file"]["tfidf_lr"] == pytest.approx(
        bench.auc(y, bench.tfidf_baseline(rows_b, rows_a)))
    assert result["held_out"]["a"]["other file"]["turn_rate"] == pytest.approx(
        bench.auc(y, bench.turn_rate_baseline(rows_b, rows_a)))
    assert not np.isclose(result["held_out"]["a"]["within"]["tfidf_lr"], result["held_out"]["a"]["other file"]["tfidf_lr"])

    b.write_text("".join(lines[100:220]))  # 20 dialogues of a.txt again
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dnd_baselines_across_files.py"), *common],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "dialogues are in both files" in proc.stderr


def test_attention_backend_bench_prints_every_case_side_by_side(tmp_path):
    """The GPU attention-kernel bench runs anywhere with --device cpu (a smoke run) and saves each case's speed."""
    out = tmp_path / "attention.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_attention_backends.py"), "--device", "cpu", "--layers", "1",
           "--steps", "1", "--batch-size", "2", "--min-len", "8", "--max-len", "12", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["precision"], r["attention"]) for r in rows] == [
        ("fp32", "default"), ("bf16 autocast", "default"), ("bf16 autocast", "default"),
        ("bf16 autocast", "no cuDNN"), ("fp32", "no cuDNN"), ("bf16 autocast", "default, repeat")]
    assert all(r["tokens_per_second"] > 0 for r in rows) and "vs fp32 default" in proc.stdout
    if not __import__("torch").cuda.is_available():
        refused = subprocess.run(cmd[:2] + ["--layers", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and "no CUDA device" in refused.stderr


def test_probe_of_frozen_states_reads_out_every_held_out_row_and_caches_the_states(tmp_path, tiny_model_dir):
    """probe_q_features.py: three linear read-outs of the frozen states, cross-fitted on bench_fit_q's folds, each
    against the same baselines; the states are computed once and reused from the cache by a second run."""
    import polars as pl

    out = tmp_path / "probe.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "probe_q_features.py"), "--base-model", str(tiny_model_dir),
           "--threads", "1", "--max-prompt-tokens", "96", "--world-per-strategy", "10", "--folds", "2", "--out", str(out)]
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Linear read-outs" in proc.stdout and "logistic_all" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["readouts"]) == {"ridge_G_probe_rows", "ridge_G_all", "logistic_all", "tfidf_state_only",
                                      "tfidf_action_only"}
    rows = pl.read_parquet(out.with_suffix(".rows.parquet"))
    # Every row held out exactly once, by the fold of its conversation, with every read-out and baseline scored.
    assert rows.height == result["rows"] == sum(f["val_rows"] for f in result["folds"])
    assert rows.group_by("conversation_id").agg(pl.col("fold").n_unique())["fold"].max() == 1
    assert set(rows["fold"].unique().to_list()) == {0, 1}
    for name, m in result["readouts"].items():
        assert 0.0 <= m["auc_q"] <= 1.0 and m["clusters"] == result["info"]["conversations"] == 40, name
        lo, hi = m["auc_margin_ci95"]
        assert lo <= m["auc_margin"] <= hi, name
    # fit_q's probe (params.yaml: null, every train row) is the same ridge as the one on all rows.
    assert result["probe_init_rows"] is None
    assert rows["ridge_G_probe_rows"].to_list() == rows["ridge_G_all"].to_list()
    assert rows["logistic_all"].to_list() != rows["ridge_G_all"].to_list()
    # The second run reads the cached states instead of running the model again.
    states = out.with_suffix(".states.npy")
    stamp = states.stat().st_mtime_ns
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert states.stat().st_mtime_ns == stamp
    assert json.loads(out.read_text())["readouts"]["logistic_all"]["auc_q"] == result["readouts"]["logistic_all"]["auc_q"]
    # Other token ids (a longer prompt budget keeps more turns) are other states: the cache is not reused.
    longer = [("400" if a == "96" else a) for a in cmd]
    proc = subprocess.run(longer, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert states.stat().st_mtime_ns != stamp


def test_world_log_acts_labels_each_suggestion_and_its_conversation_outcome():
    """world_log_acts.act_table: every suggestion gets its own text's act (repeated texts included), and each act's
    conversion is that of the conversations its rows belong to."""
    import polars as pl

    sys.path.insert(0, str(REPO / "benchmarks"))
    from world_log_acts import act_table

    class FirstWord:  # stands in for the world's featuriser: the act is the text's first word
        def __call__(self, texts):
            return [type("F", (), {"act": t.split()[0]})() for t in texts]

    rows = [  # conversation, turn, suggestion, sent message, relation, outcome of the turn
        ("a", 0, "book a visit", "book a visit", "verbatim", 0), ("a", 1, "probe needs", "probe needs", "verbatim", 1),
        ("b", 0, "book a visit", "greet hello", "rejected", 0), ("b", 1, "greet hi", "greet hi", "verbatim", 0),
        ("c", 0, "greet hi", "greet hi there", "edited", 0), ("c", 1, "greet hi", None, "abstained", 0),
    ]
    logs = pl.DataFrame(rows, schema=["conversation_id", "turn_index", "suggestion", "business_message", "relation",
                                      "outcome"], orient="row")
    table, info = act_table(logs, FirstWord())
    by_act = {r["suggestion_act"]: r for r in table.iter_rows(named=True)}
    assert info["conversations"] == 3 and info["conversions"] == 1 and info["rows"] == 6
    assert {a: r["rows"] for a, r in by_act.items()} == {"book": 2, "probe": 1, "greet": 3}
    assert by_act["book"]["conversion_of_their_conversations"] == 0.5  # a converted, b did not
    assert by_act["probe"]["conversion_of_their_conversations"] == 1.0 and by_act["greet"]["conversion_of_their_conversations"] == 0.0
    assert by_act["book"]["sent_verbatim"] == 0.5 and by_act["greet"]["sent_verbatim"] == 1 / 3
    assert by_act["probe"]["one_act_auc"] > 0.5 > by_act["greet"]["one_act_auc"]
    assert info["sent_act_by_relation"] == {"book": {"verbatim": 1}, "probe": {"verbatim": 1},
                                            "greet": {"edited": 1, "rejected": 1, "verbatim": 1}}


def test_auc_by_ranks_is_roc_auc_with_ties_and_the_bootstrap_refuses_other_labels():
    """The bootstrap's fast AUC (Mann-Whitney U) gives scikit-learn's ROC-AUC, ties counted half; labels other than
    0/1 are refused instead of being read as 'not 1'."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_fit_q

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.round(rng.random(500) + 0.2 * y, 1)  # many ties
    assert abs(bench_fit_q.auc_by_ranks(y, p) - roc_auc_score(y, p)) < 1e-12
    assert bench_fit_q.auc_by_ranks(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    with pytest.raises(ValueError, match="0/1 expected"):
        bench_fit_q.paired_auc_diff_ci(np.array([1, 2, 1, 2]), p[:4], p[:4])
