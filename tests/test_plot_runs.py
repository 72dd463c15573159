"""plot_runs.py: the plotted data are the runs' numbers (read back from the figures), the ellipses are the per-sample
covariances, the KL bins are equal, Table 6 has one row per flag value; and on tiny runs of two methods, every figure."""
import csv
import glob
import json
import os
import runpy
import sys

import numpy as np
import pytest

import plot_runs
from conftest import ROOT, run_script


def write_run(path, args, metrics, samples=None, judged=None):
    """A run folder as the scripts write it: args.json, metrics.jsonl, samples_update{N}.csv ({update: [(score, kl)]}),
    and judge_tldr.py's judge_update{N}.json ({update: win rate})."""
    os.makedirs(path)
    with open(f"{path}/args.json", "w") as f:
        json.dump(args, f)
    with open(f"{path}/metrics.jsonl", "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in metrics)
    for update, points in (samples or {}).items():
        with open(f"{path}/samples_update{update}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["query", "response", "score", "kl"], *[["q", "r", s, k] for s, k in points]])
    for update, win_rate in (judged or {}).items():
        with open(f"{path}/judge_update{update}.json", "w") as f:
            json.dump({"win_rate": win_rate}, f)
    return plot_runs.read_run(str(path))


def test_learning_curves_are_the_mean_over_seeds_at_the_updates_all_logged(tmp_path):
    a = write_run(tmp_path / "a", {}, [{"update": u, "eval/scores": u + 1.0} for u in [0, 2, 4, 6]])
    b = write_run(tmp_path / "b", {}, [{"update": u, "eval/scores": 3.0 * u} for u in [0, 2, 4]])
    ax = plot_runs.learning_curve({"rebel": [a, b]}, "eval/scores", "update").axes[0]
    xs, ys = ax.lines[0].get_data()
    assert list(xs) == [0, 2, 4] and list(ys) == [0.5, 4.5, 8.5]
    error = np.std([[1, 3, 5], [0, 6, 12]], 0, ddof=1) / np.sqrt(2)
    shaded = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert np.allclose(sorted(set(shaded.round(9))), sorted(set(np.r_[ys - error, ys + error].round(9))))


def test_the_tradeoff_ellipses_are_two_standard_deviations_of_the_samples(tmp_path):
    g = np.random.default_rng(0)
    evaluations = {u: g.multivariate_normal([u, 2.0 * u], [[1.0, 0.6], [0.6, 0.5 + u]], 200) for u in [0, 1, 2]}
    run = write_run(tmp_path / "a", {}, [], {u: p.tolist() for u, p in evaluations.items()})
    ax = plot_runs.tradeoff({"rebel": [run]}).axes[0]
    assert np.allclose(np.array(ax.lines[0].get_data()).T, [evaluations[u].mean(0) for u in [0, 1, 2]])
    assert len(ax.patches) == 3  # one ellipse per evaluation
    for patch, u in zip(ax.patches, [0, 1, 2]):
        # the covariance that an ellipse of 2 standard deviations stands for: rotation x (half-axes / 2)^2 x rotation^T
        angle = np.radians(patch.angle)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        covariance = rotation @ np.diag([(patch.width / 4) ** 2, (patch.height / 4) ** 2]) @ rotation.T
        assert np.allclose(covariance, np.cov(evaluations[u].T)) and np.allclose(patch.center, evaluations[u].mean(0))


def test_the_kl_bins_hold_equal_counts_of_the_last_evaluation(tmp_path):
    g = np.random.default_rng(1)
    first, last = g.normal(size=(50, 2)), g.normal(size=(50, 2))
    run = write_run(tmp_path / "a", {}, [], {0: first.tolist(), 10: last.tolist()})
    points = np.array(plot_runs.kl_bins({"rebel": [run]}, 10).axes[0].lines[0].get_data()).T
    by_kl = last[np.argsort(last[:, 1])]
    assert np.allclose(points, [by_kl[5 * i: 5 * i + 5].mean(0) for i in range(10)])  # 10 bins of 5 samples


def test_the_regression_loss_and_its_moving_average(tmp_path):
    loss = np.random.default_rng(2).uniform(size=12)
    run = write_run(tmp_path / "a", {}, [{"update": 0, "eval/scores": 0}] +
                    [{"update": u + 1, "rebel/loss": float(v)} for u, v in enumerate(loss)])
    raw, average = plot_runs.regression_loss({"rebel": [run]}, 4).axes[0].lines
    assert list(raw.get_ydata()) == list(loss) and list(raw.get_xdata()) == list(range(1, 13))
    assert list(average.get_xdata()) == list(range(4, 13))
    assert np.allclose(average.get_ydata(), [loss[i - 3: i + 1].mean() for i in range(3, 12)])


def test_table6_has_one_row_per_flag_value_from_the_last_evaluation(tmp_path):
    """Means over the runs of each value; the judge's column over the runs judged (b, not c)."""
    def run(name, eta, win, score, judged=None):
        return write_run(tmp_path / name, {"eta": eta}, [
            {"update": 0, "eval/scores": 9.0, "eval/win_rate": 0.9, "eval/kl_at_eval_temperature": 9.0},
            {"update": 5, "objective/scores": 8.0},
            {"update": 10, "eval/scores": score, "eval/win_rate": win, "eval/kl_at_eval_temperature": 2 * score}],
            judged=judged and {10: judged})

    runs = [run("a", 2.0, 0.5, 1.0), run("b", 0.3, 0.6, 2.0, judged=0.25), run("c", 0.3, 0.8, 3.0)]
    with open(tmp_path / "c" / "judge_update10_vs_tldr__ppo.json", "w") as f:  # judge_tldr.py --against: not Table 6's
        json.dump({"win_rate": 0.99}, f)
    runs[2] = plot_runs.read_run(str(tmp_path / "c"))
    table = plot_runs.table6({"rebel": runs}, "eta").splitlines()
    assert table[2:] == ["| rebel | 0.3 | 2 | 70.0 | 25.0 | 2.50 | 5.0 |", "| rebel | 2.0 | 1 | 50.0 | - | 1.00 | 2.0 |"]
    with pytest.raises(ValueError, match="--flag lr: an argument of none of the runs"):
        plot_runs.table6({"rebel": runs}, "lr")


def test_every_figure_is_written_and_bad_input_is_named(tmp_path, monkeypatch, capsys):
    g = np.random.default_rng(3)
    for seed in [1, 2]:
        write_run(tmp_path / f"runs/rebel_{seed}", {"exp_name": "rebel", "eta": 1.0}, [
            {"update": u, "episode": 32 * u, "eval/scores": float(u), "eval/win_rate": 0.5, "eval/eos_share": 1.0,
             "eval/kl_at_eval_temperature": 1.0, "objective/scores": 1.0, "rebel/loss": 1.0} for u in range(3)],
            {u: g.normal(size=(20, 2)).tolist() for u in range(3)})
    monkeypatch.chdir(tmp_path)

    def plot(*flags):
        monkeypatch.setattr(sys, "argv", ["plot_runs.py", *flags])
        runpy.run_path(f"{ROOT}/plot_runs.py", run_name="__main__")

    plot("--runs", "runs/*", "--out", "figures")
    assert sorted(os.listdir("figures")) == sorted(
        ["curve_eval_scores.png", "curve_eval_kl_at_eval_temperature.png", "curve_eval_eos_share.png",
         "curve_objective_scores.png", "fig5_tradeoff.png", "fig5_kl_bins.png", "fig6_regression_loss.png", "table6.md"])
    assert "| rebel | 1.0 | 2 | 50.0 | - | 2.00 | 1.0 |" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="--runs nowhere/\\*: no run folder"):
        plot("--runs", "nowhere/*")
    with pytest.raises(ValueError, match="--group_by lr: not an argument of the run runs/rebel_1"):
        plot("--group_by", "lr", "--runs", "runs/*")
    # runs of other tasks: an LCM run logs no win rate (no Table 6), a math run's samples have no RM score (no Fig. 5)
    write_run(tmp_path / "other" / "lcm_1", {"exp_name": "lcm"}, [{"update": 0, "eval/scores": 5.0}])
    write_run(tmp_path / "other" / "math_1", {"exp_name": "math"}, [{"update": 0, "eval/accuracy": 0.5}])
    with open("other/math_1/samples_update0.csv", "w") as f:
        f.write("question,response,answer,correct,kl\nq,r,1,1,0.5\n")
    plot("--runs", "other/*", "--out", "other_figures", "--curves", "eval/scores", "eval/accuracy")
    assert sorted(os.listdir("other_figures")) == ["curve_eval_accuracy.png", "curve_eval_scores.png"]
    plot("--runs", "other/*", "--out", "other_figures", "--curves", "eval/acuracy")  # a misspelt key: said, not drawn
    assert "--curves: no run logs eval/acuracy, so no curve of it" in capsys.readouterr().out
    os.remove("runs/rebel_1/args.json")
    with pytest.raises(FileNotFoundError, match="runs/rebel_1: no args.json"):
        plot("--runs", "runs/*")


@pytest.mark.slow
def test_figures_from_tiny_runs_of_two_methods(workdir, monkeypatch):
    """Tiny rebel_tldr runs of two seeds and a ppo_tldr run: each run's args.json holds its arguments; each sample
    table's KL column averages to the logged eval/kl_at_eval_temperature (a sequence KL for both methods); the learning
    curve is the mean over the seeds; every figure is written."""
    flags = ["--total_episodes", "96", "--eval_every", "1", "--eval_samples", "20", "--exp_name"]
    for script, name, seed in [("rebel_tldr.py", "plot_rebel", 1), ("rebel_tldr.py", "plot_rebel", 2),
                               ("ppo_tldr.py", "plot_ppo", 1)]:
        run_script(script, workdir, *flags, name, "--seed", str(seed))
    runs = [plot_runs.read_run(p) for p in sorted(glob.glob(f"{workdir}/runs/tldr__plot_*"))]
    assert [(r["args"]["exp_name"], r["args"]["seed"]) for r in runs] == [("plot_ppo", 1), ("plot_rebel", 1),
                                                                          ("plot_rebel", 2)]
    assert runs[1]["metrics"][1]["objective/scores"] != runs[2]["metrics"][1]["objective/scores"]  # --seed samples
    for run in runs:
        evaluations = [m for m in run["metrics"] if "eval/scores" in m]
        assert [m["update"] for m in evaluations] == sorted(run["samples"]) == [0, 1, 2, 3]
        for m in evaluations:
            kl = [float(row["kl"]) for row in run["samples"][m["update"]]]
            assert len(kl) == 20 and np.mean(kl) == pytest.approx(m["eval/kl_at_eval_temperature"], rel=1e-4, abs=1e-5)
    ax = plot_runs.learning_curve({"rebel": runs[1:]}, "eval/scores", "update").axes[0]
    expected = np.mean([[m["eval/scores"] for m in r["metrics"] if "eval/scores" in m] for r in runs[1:]], 0)
    assert np.allclose(ax.lines[0].get_ydata(), expected)
    monkeypatch.setattr(sys, "argv", ["plot_runs.py", "--runs", f"{workdir}/runs/tldr__plot_*", "--out",
                                      f"{workdir}/figures"])
    runpy.run_path(f"{ROOT}/plot_runs.py", run_name="__main__")
    assert len(glob.glob(f"{workdir}/figures/*.png")) == 7 and os.path.exists(f"{workdir}/figures/table6.md")
