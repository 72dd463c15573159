"""Fig. 2 of the REBEL paper on this machine: time per update, split into generation and policy update, and peak
memory of its seven methods in its order (ascending win rate): DPO, REINFORCE, RLOO (k = 2), Iterative DPO, PPO,
RLOO (k = 4) and REBEL, on the same models and the same number of prompts per update, each measured by running the
real script (dpo_tldr.py, rloo_tldr.py --k 1/2/4, iterative_dpo_tldr.py, ppo_tldr.py, rebel_tldr.py) as a subprocess
for a few updates and reading its metrics.jsonl. Prints a markdown table with each method's ratios to REBEL.

    python benchmarks/tldr_cost.py                      # tiny and 4 x 256 random models on CPU, a few minutes
    python benchmarks/tldr_cost.py --sizes tiny         # about a minute
    python benchmarks/tldr_cost.py --sft_model M --reward_model R --prompts 512 \\
        --extra="--lora_rank 1024 --lora_alpha 2048 --response_length 53 --per_device_train_batch_size 8"

The prompts are the synthetic --tiny ones (tokenized by the given model's tokenizer); DPO trains on pairs of the
synthetic preference data, as many pairs per update as the others have prompts. Time per update is the median over
the updates after the first (warm-up). Peak memory is the peak GPU memory allocated, or on CPU the peak resident
set size of the whole process (all models, optimizer, data). DPO generates nothing: its "generation" column is its
reference pass (ln pi_0 of both responses of every pair, once per batch).
"""
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dpo_tldr  # noqa: E402
import rebel_tldr  # noqa: E402
import tiny  # noqa: E402
from rebel_tldr_speed import write_models  # noqa: E402  (random GPT-NeoX policy and RM of a given size)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
SIZES = {  # name: (layers, hidden, prompts per update)
    "tiny": (2, 64, 32),
    "cpu-medium": (4, 256, 32),
}
METHODS = {  # Fig. 2's label: (script, flags)
    "DPO": ("dpo", []), "REINFORCE": ("rloo", ["--k", "1"]), "RLOO (k=2)": ("rloo", ["--k", "2"]),
    "Iterative DPO": ("iterative_dpo", []), "PPO": ("ppo", []), "RLOO (k=4)": ("rloo", ["--k", "4"]),
    "REBEL": ("rebel", []),
}


@dataclass
class Args:
    sizes: tuple[str, ...] = tuple(SIZES)
    """model sizes to measure (random models written by this benchmark), when no --sft_model is given"""
    sft_model: Optional[str] = None
    """measure this policy (hub ID or path) instead, with --reward_model"""
    reward_model: Optional[str] = None
    """the reward model (and PPO's value network initialisation) that goes with --sft_model"""
    prompts: int = 64
    """prompts per update (DPO: preference pairs) with --sft_model"""
    updates: int = 3
    """updates per run; the first is a warm-up and is left out of the medians"""
    extra: str = ""
    """further flags passed to all the scripts, e.g. "--lora_rank 1024 --response_length 53" """


def run_script(method, sft_model, reward_model, prompts, updates, extra):
    script, flags = METHODS[method]
    exp = f"cost_{script}_{int(time.time() * 1000)}"
    subprocess.run([sys.executable, f"{ROOT}/{script}_tldr.py", "--tiny", "--exp_name", exp, "--sft_model", sft_model,
                    "--reward_model", reward_model, "--batch_size", str(prompts), "--rollout_batch_size", str(prompts),
                    "--per_device_train_batch_size", str(prompts // 2), "--total_episodes", str(updates * prompts),
                    "--eval_every", str(updates), "--eval_samples", "8", *flags, *shlex.split(extra)],
                   env=ENV, check=True, capture_output=True)
    run_dir = [d for d in os.listdir("runs") if d.startswith(f"tldr__{exp}__")][0]
    with open(f"runs/{run_dir}/metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f][2:]  # drop the update-0 evaluation and the warm-up update
    return {"rollout": statistics.median(m["time/rollout_s"] for m in metrics),
            "update": statistics.median(m["time/update_s"] for m in metrics),
            "peak": max(m["memory/peak_gb"] for m in metrics)}


if __name__ == "__main__":
    args = tyro.cli(Args)
    tiny.write_tldr(rebel_tldr.Args(**rebel_tldr.TINY))
    tiny.write_tldr_preferences(dpo_tldr.Args(**dpo_tldr.TINY))
    if args.sft_model:
        setups = [(args.sft_model, "custom", args.sft_model, args.reward_model, args.prompts)]
    else:
        setups = []
        for name in args.sizes:
            layers, hidden, prompts = SIZES[name]
            folder = "runs/tiny" if name == "tiny" else write_models(name, layers, hidden)
            setups.append((name, f"{layers} x {hidden}", f"{folder}/sft", f"{folder}/reward", prompts))
    import torch
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads: {torch.get_num_threads()}, "
          f"{args.updates} updates per run\n")
    print("| size | layers x hidden | prompts/update | method | generation s/update | policy update s/update "
          "| total s/update | peak GB | time vs REBEL | peak memory vs REBEL |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, shape, sft_model, reward_model, prompts in setups:
        results = {m: run_script(m, sft_model, reward_model, prompts, args.updates, args.extra) for m in METHODS}
        base = results["REBEL"]
        for method, r in results.items():
            total = r["rollout"] + r["update"]
            ratio = "1" if method == "REBEL" else f"{total / (base['rollout'] + base['update']):.2f}"
            peak_ratio = "1" if method == "REBEL" else f"{r['peak'] / base['peak']:.2f}"
            print(f"| {name} | {shape} | {prompts} | {method} | {r['rollout']:.2f} | {r['update']:.2f} | "
                  f"{total:.2f} | {r['peak']:.2f} | {ratio} | {peak_ratio} |", flush=True)
