"""The three math scripts side by side on the tiny task (`--tiny`: GSM8K-format word problems, tiny Qwen2 policy, the
real verifier): held-out accuracy (pass@1, 128 test problems) before and after 20 updates of 32 prompts, responses
per prompt, time per update (median over the updates after the first) and peak memory, over several seeds. Each run
is the real script in a subprocess; the table is printed from their metrics.jsonl.

    python benchmarks/math_tiny.py                      # 3 methods x 3 seeds, about 5 minutes on 2 CPU cores
    python benchmarks/math_tiny.py --seeds 1 --extra="--model Qwen/Qwen2.5-1.5B ..."   # other settings, same table

"wall s" is the whole run from start to exit: imports, loading, evaluations and, for A*-PO, its V* stage (8 samples of
pi_0 for each train prompt the run trains on: 640 in the tiny run).
"""
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
METHODS = {"REBEL": ("rebel_math", lambda a: 2), "GRPO": ("grpo_math", lambda a: a["num_generations"]),
           "A*-PO": ("apo_math", lambda a: f"1 (+{a['num_value_samples']} of pi_0 once)")}


@dataclass
class Args:
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds to run each method with"""
    extra: str = ""
    """further flags passed to the three scripts"""


def run(script, seed, extra):
    exp = f"bench_{script}_{int(time.time() * 1000)}"
    start = time.time()
    subprocess.run([sys.executable, f"{ROOT}/{script}.py", "--tiny", "--exp_name", exp, "--seed", str(seed),
                    *shlex.split(extra)], env=ENV, check=True, capture_output=True)
    wall = time.time() - start
    run_dir = "runs/" + next(d for d in os.listdir("runs") if d.startswith(f"math__{exp}__"))
    with open(f"{run_dir}/metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    with open(f"{run_dir}/args.json") as f:
        args = json.load(f)
    return dict(before=metrics[0]["eval/accuracy"], after=metrics[-1]["eval/accuracy"], wall=wall, args=args,
                rollout=statistics.median(m["time/rollout_s"] for m in metrics[2:]),
                update=statistics.median(m["time/update_s"] for m in metrics[2:]),
                peak=max(m["memory/peak_gb"] for m in metrics[1:]))


def mean_sd(values, digits=3):
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values) if len(values) > 1 else 0:.{digits}f}"


if __name__ == "__main__":
    args = tyro.cli(Args)
    print(f"seeds {list(args.seeds)}; mean ± sd over seeds\n")
    print("| method | script | responses per prompt | accuracy, update 0 | accuracy, last update | sampling s/update "
          "| update s/update | wall s | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, (script, responses) in METHODS.items():
        runs = [run(script, seed, args.extra) for seed in args.seeds]
        print(f"| {method} | `{script}.py` | {responses(runs[0]['args'])} | {mean_sd([r['before'] for r in runs])} | "
              f"{mean_sd([r['after'] for r in runs])} | {mean_sd([r['rollout'] for r in runs], 2)} | "
              f"{mean_sd([r['update'] for r in runs], 2)} | {mean_sd([r['wall'] for r in runs], 1)} | "
              f"{max(r['peak'] for r in runs):.2f} |", flush=True)
