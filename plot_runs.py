# The paper's figures from your own runs, offline: learning curves (Fig. 3), the reward-KL trade-off (Fig. 5), the
# regression loss of Eq. (1) (Fig. 6) and the eta table (Table 6); Gao et al., NeurIPS 2024, Appendices J-L. Reads
# what every script writes into its run folder: args.json, metrics.jsonl and samples_update{N}.csv.
#   python plot_runs.py --runs "runs/tldr__*" --out figures               # runs grouped by --exp_name (method)
#   python plot_runs.py --runs "runs/tldr__rebel*" --group_by eta --flag eta
import csv
import glob
import json
import os
from collections import defaultdict
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import tyro
from matplotlib.patches import Ellipse


@dataclass
class Args:
    runs: tuple[str, ...] = ("runs/tldr__*",)
    """run folders, as globs"""
    group_by: str = "exp_name"
    """the argument (args.json) whose value makes a group: one line per method, its seeds averaged"""
    curves: tuple[str, ...] = ("eval/scores", "eval/kl_at_eval_temperature", "eval/eos_share", "objective/scores")
    """metrics (keys of metrics.jsonl) to draw learning curves of"""
    x: str = "update"
    """the learning curves' x axis: update or episode"""
    bins: int = 10
    """Fig. 5 right: bins of equal size"""
    window: int = 10
    """Fig. 6: updates in the moving average"""
    flag: str = "eta"
    """Table 6: the argument whose values are its rows"""
    out: str = "figures"
    """the folder for the PNG files and table6.md"""


def read_run(path):
    """A run folder's arguments, metrics, sample tables by update, and judge_tldr.py's win rates by update."""
    if not os.path.exists(f"{path}/args.json"):
        raise FileNotFoundError(f"{path}: no args.json, so not a run folder of these scripts")
    with open(f"{path}/args.json") as f:
        args = json.load(f)
    with open(f"{path}/metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f if line.endswith("\n")]
    samples, judged = {}, {}
    for file in glob.glob(f"{path}/samples_update*.csv"):
        with open(file, newline="") as f:
            samples[int(file[len(f"{path}/samples_update"): -len(".csv")])] = list(csv.DictReader(f))
    for file in glob.glob(f"{path}/judge_update*.json"):
        if (update := file[len(f"{path}/judge_update"): -len(".json")]).isdigit():  # not judge_update{N}_vs_{run}
            with open(file) as f:
                judged[int(update)] = json.load(f)["win_rate"]
    return dict(path=path, args=args, metrics=metrics, samples=samples, judged=judged)


def having(groups, keep):
    """The runs of each group for which keep(run) holds; the groups left empty dropped."""
    kept = {name: [run for run in runs if keep(run)] for name, runs in groups.items()}
    return {name: runs for name, runs in kept.items() if runs}


def score_and_kl(rows):
    """(samples, 2): each sample's RM score and its KL, ln pi(y|x)/pi_0(y|x) at the evaluation temperature."""
    return np.array([[float(row["score"]), float(row["kl"])] for row in rows])


def learning_curve(groups, key, x):
    """One line per group: the mean over its runs of `key` at each `x` that all of them logged, shaded +- one standard
    error over the runs."""
    fig, ax = plt.subplots()
    for name, runs in groups.items():
        series = [{m[x]: m[key] for m in run["metrics"] if key in m} for run in runs]
        xs = sorted(set.intersection(*(set(s) for s in series)))
        if xs:
            values = np.array([[s[v] for v in xs] for s in series])
            mean = values.mean(0)
            error = values.std(0, ddof=1) / np.sqrt(len(runs)) if len(runs) > 1 else np.zeros_like(mean)
            ax.plot(xs, mean, label=f"{name} ({len(runs)} runs)")
            ax.fill_between(xs, mean - error, mean + error, alpha=0.25)
    ax.set(xlabel=x, ylabel=key)
    ax.legend()
    return fig


def ellipse(points, n_std, color):
    """The ellipse of `n_std` standard deviations of 2-D points: its axes along the eigenvectors of their covariance."""
    variances, axes = np.linalg.eigh(np.cov(points.T))
    width, height = 2 * n_std * np.sqrt(variances.clip(min=0)[::-1])  # the major axis first
    angle = np.degrees(np.arctan2(axes[1, -1], axes[0, -1]))
    return Ellipse(points.mean(0), width, height, angle=angle, fill=False, color=color, alpha=0.5)


def tradeoff(groups):
    """Fig. 5 left: each evaluation of each run as a point (mean RM score, mean KL), joined in update order, inside the
    ellipse of two standard deviations of its samples."""
    fig, ax = plt.subplots()
    for (name, runs), color in zip(groups.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        for i, run in enumerate(runs):
            evaluations = [score_and_kl(run["samples"][u]) for u in sorted(run["samples"])]
            ax.plot(*np.array([e.mean(0) for e in evaluations]).T, "o-", color=color, label=None if i else name)
            for points in evaluations:
                ax.add_patch(ellipse(points, 2, color))
    ax.set(xlabel="RM score", ylabel="KL(pi || pi_ref)")
    ax.autoscale_view()
    ax.legend()
    return fig


def kl_bins(groups, bins):
    """Fig. 5 right: the samples of each run's last evaluation, pooled per group, sorted by KL and cut into `bins` bins
    of equal size (np.array_split: sizes differ by at most one); each bin at (mean RM score, mean KL)."""
    fig, ax = plt.subplots()
    for name, runs in groups.items():
        points = np.concatenate([score_and_kl(run["samples"][max(run["samples"])]) for run in runs])
        points = points[np.argsort(points[:, 1], kind="stable")]
        ax.plot(*np.array([b.mean(0) for b in np.array_split(points, bins)]).T, "o-", label=name)
    ax.set(xlabel="RM score (mean per KL bin)", ylabel="KL(pi || pi_ref) (mean per bin)")
    ax.legend()
    return fig


def regression_loss(groups, window):
    """Fig. 6: REBEL's regression loss per update, and its moving average over `window` updates, for each run. The
    scripts log eta^2 x Eq. (1) (the released code's form); at eta = 1 the two are the same."""
    fig, ax = plt.subplots()
    for (name, runs), color in zip(groups.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        for i, run in enumerate(runs):
            updates, loss = np.array([(m["update"], m["rebel/loss"]) for m in run["metrics"] if "rebel/loss" in m]).T
            w = min(window, len(loss))
            ax.plot(updates, loss, color=color, alpha=0.3)
            ax.plot(updates[w - 1:], np.convolve(loss, np.ones(w) / w, "valid"), color=color, label=None if i else name)
    ax.set(xlabel="update", ylabel="rebel/loss (eta^2 x Eq. (1))")
    ax.legend()
    return fig


def table6(groups, flag):
    """Table 6 in Markdown: one row per group and value of `flag`, the last evaluation's win rate against the references
    (by the RM, and by judge_tldr.py where it judged that evaluation's samples: the mean over the runs judged), RM score
    and KL, averaged over runs."""
    if not any(flag in run["args"] for runs in groups.values() for run in runs):
        raise ValueError(f"--flag {flag}: an argument of none of the runs")
    rows = defaultdict(list)
    for name, runs in groups.items():
        for run in runs:
            value = run["args"].get(flag, "-")
            last = [m for m in run["metrics"] if "eval/scores" in m][-1]
            rows[name, tuple(value) if isinstance(value, list) else value].append(
                (100 * last["eval/win_rate"], 100 * run["judged"].get(last["update"], np.nan), last["eval/scores"],
                 last["eval/kl_at_eval_temperature"]))
    lines = ["| run group | " + flag + " | runs | win rate, RM (%) | win rate, judge (%) | RM score | KL |",
             "|---|---|---|---|---|---|---|"]
    for name, value in sorted(rows, key=lambda k: (k[0], type(k[1]).__name__, k[1])):  # numbers in numeric order
        values = np.array(rows[name, value])
        win, _, score, kl = values.mean(0)
        judged = values[~np.isnan(values[:, 1]), 1]  # the runs whose last evaluation was judged
        lines.append(f"| {name} | {value} | {len(values)} | {win:.1f} | "
                     f"{f'{judged.mean():.1f}' if len(judged) else '-'} | {score:.2f} | {kl:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    args = tyro.cli(Args)
    args.out = os.path.expanduser(args.out)  # also in --out=~/x, which no shell expands
    paths = sorted({p.rstrip("/") for pattern in args.runs for p in glob.glob(os.path.expanduser(pattern))
                    if os.path.exists(f"{p}/metrics.jsonl")})
    if not paths:
        raise FileNotFoundError(f"--runs {' '.join(args.runs)}: no run folder (with metrics.jsonl) matches")
    runs = [read_run(p) for p in paths]
    groups = defaultdict(list)
    for run in runs:
        if args.group_by not in run["args"]:
            raise ValueError(f"--group_by {args.group_by}: not an argument of the run {run['path']}")
        groups[str(run["args"][args.group_by])].append(run)
    os.makedirs(args.out, exist_ok=True)
    figures = {f"curve_{key.replace('/', '_')}": learning_curve(logged, key, args.x) for key in args.curves
               if (logged := having(groups, lambda r: any(key in m for m in r["metrics"])))}
    if unlogged := [key for key in args.curves if f"curve_{key.replace('/', '_')}" not in figures]:
        print(f"--curves: no run logs {', '.join(unlogged)}, so no curve of it")
    if tldr := having(groups, lambda r: r["samples"] and {"score", "kl"} <= set(next(iter(r["samples"].values()))[0])):
        figures.update(fig5_tradeoff=tradeoff(tldr), fig5_kl_bins=kl_bins(tldr, args.bins))
    if rebel := having(groups, lambda r: any("rebel/loss" in m for m in r["metrics"])):
        figures["fig6_regression_loss"] = regression_loss(rebel, args.window)
    for name, fig in figures.items():
        fig.savefig(f"{args.out}/{name}.png", dpi=150, bbox_inches="tight")
        plt.close(fig)
    outputs, table = [f"{name}.png" for name in figures], ""
    if judged := having(groups, lambda r: any("eval/win_rate" in m for m in r["metrics"])):  # the TL;DR scripts' runs
        table = table6(judged, args.flag)
        with open(f"{args.out}/table6.md", "w") as f:
            f.write(table)
        outputs.append("table6.md")
    print(table + f"{len(runs)} runs in {len(groups)} groups; wrote {', '.join(outputs) or 'nothing'} in {args.out}/")
