"""REBEL, PPO and DPO at the paper's scale (Section 5.1, Fig. 2): random-weight Pythia-shaped GPT-NeoX policies and
reward models with a 50,304-token byte-level BPE vocabulary (built offline from Python objects, no download), prompts
of a given length range in the real dataset's format, and the paper's settings (53 new tokens, LoRA r = 1024). Each
method runs as its real script in a subprocess for a few updates; the table gives the medians after the first update.

    python benchmarks/tldr_scale.py --model_size 1.4b 2.8b               # one GPU: the issue's H100 table
    python benchmarks/tldr_scale.py --model_size proxy --compare HEAD~1  # the CPU proxy (2 x 128), old vs new code
    python benchmarks/tldr_scale.py --estimate                            # per-GPU memory of the 6.9B FSDP2 run

`--compare REV` also runs the scripts as they are at git revision REV (extracted to a temporary folder), side by
side, so that a change is measured in one run on the same machine. Peak memory is the peak GPU memory allocated, or
on CPU the process's peak resident set size.
"""
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
SHAPES = {  # name: (layers, hidden, attention heads), Pythia's (Biderman et al., 2023)
    "proxy": (2, 128, 4), "1.4b": (24, 2048, 16), "2.8b": (32, 2560, 32), "6.9b": (32, 4096, 32),
}
VOCAB = 50_304
WORDS = ("my boyfriend girlfriend friend job boss rent apartment school college money parents sister brother car "
         "dog cat wedding date move city work week month year told said asked really think feel want need help "
         "because about after before never always still just").split()


@dataclass
class Args:
    model_size: tuple[str, ...] = ("1.4b", "2.8b")
    """Pythia shapes to measure: proxy (2 x 128), 1.4b, 2.8b, 6.9b"""
    methods: tuple[str, ...] = ("rebel", "ppo", "dpo")
    """which scripts to run"""
    prompts: int = 64
    """prompts per update (DPO: preference pairs)"""
    prompt_tokens: tuple[int, int] = (250, 500)
    """range of prompt lengths in tokens"""
    updates: int = 3
    """updates per run; the first is a warm-up and is left out of the medians"""
    extra: str = ("--rollout_batch_size 64 --per_device_train_batch_size 8 --lora_rank 1024 --lora_alpha 2048 "
                  "--response_length 53")
    """flags passed to every script (the issue's H100 settings by default)"""
    compare: str = ""
    """a git revision whose scripts are measured too, side by side"""
    estimate: bool = False
    """print the per-GPU memory estimate of the README's 6.9B FSDP2 command on 8 GPUs, and exit"""


def bpe_tokenizer():
    """A byte-level BPE tokenizer with VOCAB tokens: the 256 byte symbols, merges that build the WORDS with and
    without a leading space, then merges of random pairs of tokens up to the vocabulary size; EOS = <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab, merges, g = {c: i for i, c in enumerate(sorted(alphabet))}, [], random.Random(0)

    def merge(a, b):
        if a + b not in vocab:
            merges.append((a, b))
            vocab[a + b] = len(vocab)
    for word in WORDS:
        for text in [word, "Ġ" + word]:
            for i in range(1, len(text)):
                merge(text[:i], text[i])
    tokens = list(vocab)
    while len(vocab) < VOCAB - 1:
        a, b = g.choice(tokens), g.choice(tokens[:300])
        if a + b not in vocab:
            merge(a, b)
            tokens.append(a + b)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def write_assets(folder, size, args):
    """The tokenizer, a random policy and RM of `size` (RM in the paper's backbone + scalar head layout), and a
    synthetic TL;DR dataset and preference dataset whose prompts have `prompt_tokens` tokens."""
    import torch
    from safetensors.torch import save_file
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXModel
    if os.path.exists(f"{folder}/reward/config.json"):
        return
    tokenizer, g = bpe_tokenizer(), random.Random(0)
    for split in ["train", "validation"]:
        rows = []
        for _ in range(2 * args.prompts * args.updates if split == "train" else 64):
            length = g.randint(*args.prompt_tokens)
            post = " ".join(g.choice(WORDS) for _ in range(length))
            head = f"SUBREDDIT: r/{g.choice(WORDS)}\n\nTITLE: {g.choice(WORDS)}?\n\nPOST: "
            ids = tokenizer(head + post, add_special_tokens=False).input_ids[: length - 5]
            query = tokenizer.decode(ids) + "\n\nTL;DR:"
            summaries = [" " + " ".join(g.choice(WORDS) for _ in range(g.randint(10, 30))) + "<|endoftext|>"
                         for _ in range(2)]
            rows.append({"query": query, "reference_response": summaries[0], "chosen": summaries[0],
                         "rejected": summaries[1]})
        for name in ["tldr", "preference"]:
            os.makedirs(f"{folder}/{name}", exist_ok=True)
            with open(f"{folder}/{name}/{split}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    layers, hidden, heads = SHAPES[size]
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=4 * hidden, rotary_pct=0.25, max_position_embeddings=2048,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           dtype="float16", tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        GPTNeoXForCausalLM(config).half().save_pretrained(f"{folder}/sft")
        backbone = GPTNeoXModel(config).half()
    tokenizer.save_pretrained(f"{folder}/sft")
    os.makedirs(f"{folder}/reward", exist_ok=True)
    state = {f"lm_backbone.{k}": v.cpu().contiguous() for k, v in backbone.state_dict().items()}
    state.update({"scalar_head.weight": torch.randn(1, hidden, dtype=torch.float16) / hidden**0.5,
                  "scalar_head.bias": torch.zeros(1, dtype=torch.float16)})
    save_file(state, f"{folder}/reward/model.safetensors")
    with open(f"{folder}/reward/config.json", "w") as f:
        json.dump({"base_model": "random", "base_config": config.to_dict(), "hidden_size": hidden, "bias": 0.0}, f)
    tokenizer.save_pretrained(f"{folder}/reward")


def run(code, method, folder, args):
    """`updates` updates of `code`/{method}_tldr.py on the assets in `folder`; medians over all but the first."""
    exp = f"scale_{method}_{int(time.time() * 1000)}"
    data = ["--preference_dataset", f"{folder}/preference"] if method == "dpo" else []
    proc = subprocess.run([sys.executable, f"{code}/{method}_tldr.py", "--exp_name", exp, "--sft_model",
                           f"{folder}/sft", "--reward_model", f"{folder}/reward", "--dataset", f"{folder}/tldr", *data,
                           "--query_length", str(args.prompt_tokens[1] + 64), "--batch_size", str(args.prompts),
                           "--total_episodes", str(args.updates * args.prompts), "--eval_every", "1000",
                           "--eval_samples", "8", "--lr", "1e-6", *shlex.split(args.extra)],
                          env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} ({code}) failed:\n{proc.stderr[-3000:]}")
    (run_dir,) = [d for d in os.listdir("runs") if d.startswith(f"tldr__{exp}__")]
    with open(f"runs/{run_dir}/metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f][2:]  # the update-0 evaluation and the warm-up update left out
    rollout = statistics.median(m["time/rollout_s"] for m in metrics)
    update = statistics.median(m["time/update_s"] for m in metrics)
    return rollout, update, max(m["memory/peak_gb"] for m in metrics)


def estimate(gpus=8, per_device_pairs=4, rollout_prompts=8, prompt_tokens=512, response_tokens=53):
    """Per-GPU memory in GB of `torchrun --nproc_per_node 8 rebel_tldr.py --lora_rank 0` at 6.9B (README command)."""
    layers, hidden, _ = SHAPES["6.9b"]
    params = 12 * layers * hidden**2 + 2 * VOCAB * hidden
    tokens = prompt_tokens + response_tokens
    sequences = 2 * per_device_pairs
    gb = 2**30
    rows = [
        ("policy parameters, fp32, sharded", 4 * params / gpus),
        ("gradients, fp32, sharded (reduce-scattered every micro-step)", 4 * params / gpus),
        ("AdamW states, fp32, sharded", 8 * params / gpus),
        ("pi_0, bf16, sharded", 2 * params / gpus),
        ("reward model, bf16, sharded", 2 * params / gpus),
        ("policy gathered in bf16 for the rollout (generate), then freed", 2 * params),
        ("KV cache of one generate call (2 samples per prompt)", 2 * 2 * layers * hidden * 2 * rollout_prompts * tokens),
        ("activations of one training micro-batch, no checkpointing (~34 bytes x tokens x hidden per layer)",
         34 * sequences * tokens * hidden * layers),
        ("activations with --gradient_checkpointing (layer inputs + one layer)",
         2 * sequences * tokens * hidden * layers + 34 * sequences * tokens * hidden),
        ("logits at the response positions (bf16) + one fp32 sequence", (2 * sequences + 4) * response_tokens * VOCAB),
    ]
    print(f"6.9B ({params / 1e9:.2f}B parameters), {gpus} GPUs, --per_device_train_batch_size {per_device_pairs}, "
          f"--rollout_batch_size {rollout_prompts}, {tokens} tokens per sequence\n")
    print("| what | GB per GPU |\n|---|---|")
    for name, size in rows:
        print(f"| {name} | {size / gb:.1f} |")
    steady = sum(size for name, size in rows[:5]) / gb
    rollout = steady + (rows[5][1] + rows[6][1]) / gb
    print(f"\nsteady state (the policy's states, pi_0, RM): {steady:.1f} GB; during the rollout: {rollout:.1f} GB; during the "
          f"regression: {steady + (rows[7][1] + rows[9][1]) / gb:.1f} GB, or "
          f"{steady + (rows[8][1] + rows[9][1]) / gb:.1f} GB with --gradient_checkpointing (plus one layer's "
          "all-gathered bf16 parameters and allocator slack)")


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.estimate:
        estimate()
        sys.exit()
    import torch
    old = None
    if args.compare:
        old = tempfile.mkdtemp()
        for method in args.methods:
            with open(f"{old}/{method}_tldr.py", "w") as f:
                f.write(subprocess.run(["git", "show", f"{args.compare}:{method}_tldr.py"], cwd=ROOT, check=True,
                                       capture_output=True, text=True).stdout)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"{device}; {args.prompts} prompts/update, prompts of {args.prompt_tokens[0]}-{args.prompt_tokens[1]} "
          f"tokens, vocabulary {VOCAB}; {args.extra}\n")
    print("| model | code | method | rollout s | regression s | total s/update | peak GB | new tokens/s "
          "| vs REBEL (time) | vs REBEL (memory) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    new_tokens = 2 * args.prompts * int(dict(zip(*[iter(shlex.split(args.extra))] * 2)).get("--response_length", 53))
    for size in args.model_size:
        folder = f"runs/scale_{size}"
        write_assets(folder, size, args)
        layers, hidden, _ = SHAPES[size]
        for code, label in [(old, args.compare), (ROOT, "this")] if old else [(ROOT, "this")]:
            results = {m: run(code, m, folder, args) for m in args.methods}
            base = results.get("rebel")
            for method, (rollout, update, peak) in results.items():
                vs = (f"{(rollout + update) / sum(base[:2]):.2f} | {peak / base[2]:.2f}" if base else "- | -")
                tokens = new_tokens // (2 if method == "ppo" else 1) / rollout if method != "dpo" else float("nan")
                print(f"| {size} ({layers} x {hidden}) | {label} | {method.upper()} | {rollout:.2f} | {update:.2f} | "
                      f"{rollout + update:.2f} | {peak:.2f} | {tokens:.0f} | {vs} |", flush=True)
