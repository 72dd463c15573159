"""Time and memory of rebel_tldr.py per update, on CPU or GPU, at two model sizes, and what batching both samples
of every pair into one `generate` call gains over two separate calls (as the released code does).

    python benchmarks/rebel_tldr_speed.py            # prints a markdown table; about 5 minutes on 2 CPU cores
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rebel_tldr  # noqa: E402
import tiny  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
SIZES = {  # name: (layers, hidden, prompts per update)
    "tiny": (2, 64, 32),
    "cpu-medium": (4, 256, 64),
}


def write_models(name, layers, hidden):
    """Random GPT-NeoX policy and backbone-plus-scalar-head RM of the given size, with the tiny byte tokenizer."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXModel
    folder = f"runs/bench_{name}"
    if os.path.exists(f"{folder}/reward/config.json"):
        return folder
    tokenizer = AutoTokenizer.from_pretrained("runs/tiny/sft")
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=8, intermediate_size=4 * hidden, max_position_embeddings=256,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    GPTNeoXForCausalLM(config).save_pretrained(f"{folder}/sft")
    tokenizer.save_pretrained(f"{folder}/sft")
    rm = rebel_tldr.ScalarRewardModel(GPTNeoXModel(config), torch.nn.Linear(hidden, 1), 0.0)
    os.makedirs(f"{folder}/reward")
    save_file({k: v.contiguous() for k, v in rm.state_dict().items()}, f"{folder}/reward/model.safetensors")
    with open(f"{folder}/reward/config.json", "w") as f:
        json.dump({"base_config": config.to_dict(), "hidden_size": hidden, "bias": 0.0}, f)
    return folder


def run_script(name, folder, prompts, updates=4):
    """Whole updates of the real script; medians over the updates after the first (warm-up)."""
    exp = f"bench_{name}_{int(time.time())}"
    subprocess.run([sys.executable, f"{ROOT}/rebel_tldr.py", "--tiny", "--exp_name", exp, "--sft_model",
                    f"{folder}/sft", "--reward_model", f"{folder}/reward", "--batch_size", str(prompts),
                    "--rollout_batch_size", str(prompts), "--per_device_train_batch_size", str(prompts // 2),
                    "--total_episodes", str(updates * prompts), "--eval_samples", "8"],
                   env=ENV, check=True, capture_output=True)
    run_dir = [d for d in os.listdir("runs") if d.startswith(f"tldr__{exp}")][0]
    with open(f"runs/{run_dir}/metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f][2:]
    return {key: statistics.median(m[key] for m in metrics) for key in ["time/rollout_s", "time/update_s"]} | \
        {"memory/peak_gb": max(m["memory/peak_gb"] for m in metrics)}


def rollout_only(folder, prompts, separate, repeats=3):
    """sample_and_score for one batch of pairs: one call with 2 samples per prompt, or two calls with 1 each.
    Runs in its own process (see main), so that the peak RSS is this variant's alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(f"{folder}/sft")
    policy = AutoModelForCausalLM.from_pretrained(f"{folder}/sft").eval()
    reward_model = rebel_tldr.load_reward_model(f"{folder}/reward", torch.float32, False).eval()
    args = rebel_tldr.Args(**rebel_tldr.TINY)
    args.eos_token_id, args.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    queries, query_mask = rebel_tldr.pad([list(range(3, 3 + 100))] * prompts, args.pad_token_id, "cpu")
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.time()
            for _ in range(2 if separate else 1):
                rebel_tldr.sample_and_score(policy, policy, lambda: torch.no_grad(), reward_model, queries, query_mask,
                                            1 if separate else 2, args.temperature, args)
            times.append(time.time() - start)
    return {"rollout_s": statistics.median(times), "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


if __name__ == "__main__":
    if len(sys.argv) > 1:  # a child process of rollout_only
        folder, prompts, separate = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "separate"
        print(json.dumps(rollout_only(folder, prompts, separate)))
        sys.exit()
    tiny.write_tldr(rebel_tldr.Args(**rebel_tldr.TINY))
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads: {torch.get_num_threads()}\n")
    print("| size | layers x hidden | prompts/update | rollout s/update | regression s/update | peak GB "
          "| rollout of one batch: 1 generate (2 samples) | 2 generates (1 sample each) | peak GB 1 vs 2 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (layers, hidden, prompts) in SIZES.items():
        folder = "runs/tiny" if name == "tiny" else write_models(name, layers, hidden)
        whole = run_script(name, folder, prompts)
        variants = {}
        for variant in ["batched", "separate"]:
            out = subprocess.run([sys.executable, __file__, folder, str(prompts), variant], env=ENV, check=True,
                                 capture_output=True, text=True).stdout
            variants[variant] = json.loads(out.strip().splitlines()[-1])
        print(f"| {name} | {layers} x {hidden} | {prompts} | {whole['time/rollout_s']:.2f} | "
              f"{whole['time/update_s']:.2f} | {whole['memory/peak_gb']:.2f} | "
              f"{variants['batched']['rollout_s']:.2f} s | {variants['separate']['rollout_s']:.2f} s | "
              f"{variants['batched']['peak_gb']:.2f} vs {variants['separate']['peak_gb']:.2f} |")
