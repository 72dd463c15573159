# A*-PO for math reasoning with a verifier's 0/1 reward, beside rebel_math.py: Brantley et al., "Accelerating RL for
# LLM Reasoning with Optimal Advantage Regression" (2025), as its authors' code runs it (ZhaolinGao/A-PO), on
# rebel_math.py's skeleton and settings: `diff rebel_math.py apo_math.py` is the algorithm. CleanRL style.
#   python apo_math.py --tiny                                    # tiny policy, synthetic word problems, CPU
#   torchrun --nproc_per_node 8 apo_math.py                      # Qwen2.5-1.5B on GSM8K
import contextlib
import csv
import itertools
import json
import math
import os
import re
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from fractions import Fraction
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributions import Categorical
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_layers import GradientCheckpointingLayer


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (sampling seeds are offset by rank)"""
    track: bool = False
    """log to Weights and Biases (the same keys as metrics.jsonl)"""
    wandb_project: str = "rebel_math"
    """the wandb project"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    tiny: bool = False
    """tiny models and data (tiny.py, in runs/tiny/), CPU, ~1 minute: TINY's values become defaults, given flags win"""

    # model and data (A*-PO's runs: the base model, no chat template); a hub ID or a local path
    model: str = "Qwen/Qwen2.5-1.5B"
    """the policy; pi_0 and the initial pi_t"""
    dataset: str = "openai/gsm8k"
    """GSM8K's format (`question`, `answer` ending in "#### N") or MATH's (`problem`, `solution` with \\boxed{})"""
    dataset_config: Optional[str] = "main"
    """the dataset's configuration (GSM8K: main; none for MATH copies)"""
    eval_dataset: Optional[str] = None
    """another dataset to evaluate on, in the same formats (MATH: HuggingFaceH4/MATH-500); by default `dataset`"""
    eval_split: str = "test"
    """the evaluation split (GSM8K test: 1,319 problems)"""
    trust_remote_code: bool = False
    """allow models with custom code from the hub"""
    query_length: int = 256
    """longest prompt in tokens (A*-PO's 256); longer prompts are dropped, and the count is printed"""
    response_length: int = 1024
    """most tokens sampled per response (A*-PO's 1,024); decoding stops early once every response has its EOS"""
    temperature: float = 1.0
    """sampling temperature (A*-PO's 1.0); log-probs use the same value"""
    eval_temperature: float = 0.01
    """near-greedy sampling for evaluation: pass@1"""
    penalty_reward_value: float = 0.0
    """Gamma: the reward of a response without EOS within `response_length` tokens (A*-PO's verifier scores it 0)"""
    kl_coef: float = 0.0
    """gamma: r = verifier(x, y) - gamma * (ln pi_t(y|x) - ln pi_0(y|x)); A*-PO's runs use none"""

    # A*-PO (the authors' scripts/apo_math.sh)
    beta1: float = 0.5
    """beta_1 of V*(x) = beta_1 ln E_{y ~ pi_0} exp(r(x, y) / beta_1), estimated once before training (A*-PO's 0.5)"""
    beta2: float = 1e-3
    """beta_2 of the regression of beta_2 ln pi_theta(y|x)/pi_0(y|x) on r(x, y) - V*(x) (A*-PO's 1e-3)"""
    num_value_samples: int = 8
    """responses of pi_0 per train prompt that estimate V* (A*-PO's 8)"""
    total_episodes: int = 25 * 7473
    """prompts to train on in total (A*-PO's 25 epochs of GSM8K's 7,473); updates = total_episodes // batch_size"""
    batch_size: int = 256
    """prompts per update across all ranks (A*-PO's 256); each gets one response"""
    num_epochs: int = 1
    """passes of the regression over each batch (A*-PO's 1)"""
    num_minibatches: int = 2
    """optimizer steps per epoch (A*-PO: minibatches of 128 prompts)"""
    per_device_train_batch_size: int = 16
    """prompts per forward/backward on one device (16 sequences, as rebel_math's 8 pairs), also per no-grad pass"""
    rollout_batch_size: int = 32
    """prompts per generate call on one device (a rank's whole share of 256 prompts on 8 GPUs); all responses to a
    prompt come from one call"""
    lr: float = 1e-6
    """AdamW learning rate (A*-PO's 1e-6), decayed linearly: lr (1 - (t - 1) / num_updates) at update t"""
    adam_eps: float = 1e-8
    """AdamW epsilon (torch's default, as in A*-PO's runs: beta_2 scales apo_math's gradients by 1e-3)"""
    lora_rank: int = 0
    """LoRA rank; 0 trains all parameters (A*-PO's runs), sharded with FSDP2 under torchrun"""
    lora_alpha: int = 2048
    """LoRA alpha"""
    gradient_checkpointing: bool = True
    """recompute each layer's activations in the backward pass, for more time: without it, a micro-batch of 16
    sequences of ~1,200 tokens keeps ~50 GB of activations at 1.5B (an estimate from Qwen2.5-1.5B's layer shapes)"""

    # evaluation and saving
    eval_every: int = 100
    """evaluate every this many updates, and always before the first and after the last"""
    eval_samples: int = 0
    """validation prompts to evaluate on; 0 for the whole split"""
    save_every: int = 100
    """write a resumable checkpoint to runs/{run_name}/checkpoint every this many updates, so that a crash
    loses at most these; 0 for never"""
    resume_from: Optional[str] = None
    """a checkpoint folder to continue from, with the settings it was trained with; the run goes on in its folder"""

    # computed at run time
    world_size: tyro.conf.Suppress[int] = 1
    local_batch_size: tyro.conf.Suppress[int] = 0
    gradient_accumulation_steps: tyro.conf.Suppress[int] = 0
    num_updates: tyro.conf.Suppress[int] = 0
    """policy updates"""
    eos_token_id: tyro.conf.Suppress[int] = 0
    pad_token_id: tyro.conf.Suppress[int] = 0
    """filler after the EOS and left of the prompt, always masked: the tokenizer's pad, else EOS"""


# --tiny: a task small enough for a CPU, with a signal strong enough to see learning in ~20 updates
TINY = dict(model="runs/tiny/math_policy", dataset="runs/tiny/gsm8k", dataset_config=None, query_length=192,
            response_length=24, total_episodes=20 * 32, batch_size=32, num_epochs=2, num_minibatches=1,
            per_device_train_batch_size=16, rollout_batch_size=32, lr=3e-3, lora_rank=8, lora_alpha=16, eval_every=10,
            eval_samples=128, gradient_checkpointing=False)


# A*-PO's prompt for MATH, here for both datasets: the question, then the instruction; a base model, no chat template
PROMPT = "{question} Let's think step by step and output the final answer within \\boxed{{}}."


def last_boxed(text):
    """What the last \\boxed{...} of `text` holds (nested braces balanced), or the token after a last "\\boxed " (a few
    MATH solutions end "$\\boxed 2$"); None if there is neither."""
    boxes = list(re.finditer(r"\\boxed(?: *\{| +([^\s${]+))", text))
    if not boxes:
        return None
    if boxes[-1].group(1):  # the brace-less "\boxed 2"
        return boxes[-1].group(1)
    start, depth = boxes[-1].end(), 1
    for end in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            return text[start: end]
    return None


def normalize(answer):
    """An answer in a canonical form, after lm-eval's MATH `strip_string` (A*-PO's verifier): a "\\text{ unit}" and a
    short "x =" prefix cut, spaces, \\$, $, \\left, \\right, \\!, \\%, degrees and a final period dropped, \\dfrac and
    \\tfrac read as \\frac, \\frac12 as \\frac{1}{2} and \\sqrt2 as \\sqrt{2}; a number, with thousands separators or
    not, as its exact value ("1,234.50" and "1234.5" alike), and so a \\frac of two integers ("\\frac12" and "0.5")."""
    answer = answer.replace("\u2212", "-").split("\\text{ ")[0]  # the unicode minus sign
    if len(sides := answer.split("=")) == 2 and len(sides[0]) <= 2:
        answer = sides[1]
    for text in [" ", "\\$", "$", "\\left", "\\right", "\\!", "\\%", "^{\\circ}", "^\\circ"]:
        answer = answer.replace(text, "")
    answer = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")
    answer = re.sub(r"\\(sqrt|frac)(\w)", r"\\\1{\2}", answer)  # an unbraced argument is one character
    answer = re.sub(r"(\\frac\{[^{}]*\})(\w)", r"\1{\2}", answer)
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d*)?", answer):
        answer = answer.replace(",", "")
    if fraction := re.fullmatch(r"([-+]?)\\frac\{(-?\d+)\}\{(\d+)\}", answer):
        answer = "{}{}/{}".format(*fraction.groups())
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)(/\d+)?", answer):  # digits alone: Fraction("1e9999999") takes minutes
        with contextlib.suppress(ValueError, ZeroDivisionError):  # 1/0, or more digits than Python converts
            return str(Fraction(answer))
    return answer


def verify(response, answer):
    """The verifier's reward: 1.0 when the response's final answer, its last \\boxed{}, equals the reference answer
    once both are normalized; 0.0 otherwise, also when it has none or an empty one."""
    found = normalize(last_boxed(response) or "")
    return float(found != "" and found == normalize(answer))


def pad(sequences, pad_id, device, left=True):
    """A batch of token lists and its attention mask; prompts are left-padded so that responses share columns."""
    width = max(len(s) for s in sequences)
    fill = [[pad_id] * (width - len(s)) for s in sequences]
    ids = [f + s if left else s + f for s, f in zip(sequences, fill)]
    mask = [[0] * len(f) + [1] * len(s) if left else [1] * len(s) + [0] * len(f) for s, f in zip(sequences, fill)]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def generate(model, queries, query_mask, num_samples, args, temperature):
    """`num_samples` responses per prompt in one batched call, padded after each first EOS. Under FSDP2 every rank steps
    until all are done (synced_gpus): the all-gathers need as many forward passes on every rank. Sampled from pi at
    `temperature`; top-k, top-p and repetition penalty are neutral, whatever the checkpoint's generation_config says."""
    queries, query_mask = queries.repeat_interleave(num_samples, 0), query_mask.repeat_interleave(num_samples, 0)
    query_responses = model.generate(input_ids=queries, attention_mask=query_mask, max_new_tokens=args.response_length,
                                     do_sample=True, temperature=temperature, top_k=0, top_p=1.0, repetition_penalty=1.0,
                                     eos_token_id=args.eos_token_id, pad_token_id=args.pad_token_id,
                                     synced_gpus=isinstance(model, FSDPModule))
    query_responses = F.pad(query_responses, (0, queries.shape[1] + args.response_length - query_responses.shape[1]),
                            value=args.pad_token_id)
    return query_responses, torch.cat([query_mask, torch.ones_like(query_responses[:, queries.shape[1]:])], 1)


def first_eos(responses, eos_id):
    """Index of each response's first EOS; response_length where there is none."""
    is_eos = responses == eos_id
    return torch.where(is_eos.any(-1), is_eos.int().argmax(-1), responses.shape[1])


def token_logprobs(logits, tokens, temperatures):
    """ln softmax(logits / t) at `tokens` for each t in `temperatures` (k, n, T), in fp32 for one chunk at a time."""
    return torch.stack([(logits.float() / t).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
                        for t in temperatures])


def response_logprobs(model, query_responses, attention_mask, context_length, temperatures, with_entropy=False):
    """ln pi(y_h | x, y_<h) of every response token at each of `temperatures` (k, B, T), and the entropy at the first
    if asked, from one forward pass. The LM head runs at the response positions only, the fp32 log-softmax one sequence
    at a time, recomputed in the backward pass: no fp32 [B x T x vocabulary] logits exist."""
    logits = model(input_ids=query_responses, attention_mask=attention_mask,
                   position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),  # real tokens only, as in generate()
                   logits_to_keep=torch.arange(context_length - 1, query_responses.shape[1] - 1,
                                               device=query_responses.device)).logits
    logprobs = torch.cat([checkpoint(token_logprobs, chunk, tokens, temperatures, use_reentrant=False) for chunk, tokens
                          in zip(logits.split(1), query_responses[:, context_length:].split(1))], 1)
    if not with_entropy:
        return logprobs, None
    with torch.no_grad():  # a metric, outside the log-softmax that the backward pass recomputes
        return logprobs, torch.cat([Categorical(logits=chunk.float() / temperatures[0], validate_args=False).entropy()
                                    for chunk in logits.split(1)])


def sample_and_score(model, ref_policy, ref_context, tokenizer, queries, query_mask, answers, num_samples,
                     sample_temperature, args):
    """Responses from one generate call at `sample_temperature`, ending at their first EOS; in no-grad micro-batches,
    their sequence log-probs under pi and pi_0 at the training temperature (the loss's ln pi_t, whatever the sampler's)
    and at the sampling one (the KL of near-greedy samples); the verifier's reward, Gamma without EOS."""
    context_length = queries.shape[1]
    query_responses, attention_mask = generate(model, queries, query_mask, num_samples, args, sample_temperature)
    eos_index = first_eos(query_responses[:, context_length:], args.eos_token_id)
    response_mask = torch.arange(args.response_length, device=queries.device) <= eos_index[:, None]
    temperatures = tuple(dict.fromkeys([args.temperature, sample_temperature]))  # the training one first, once
    logprobs, ref_logprobs = [], []
    micro_batch = args.per_device_train_batch_size * num_samples
    for rows in [slice(i, i + micro_batch) for i in range(0, len(query_responses), micro_batch)]:
        logprobs.append(response_logprobs(model, query_responses[rows], attention_mask[rows], context_length,
                                          temperatures)[0])
        with ref_context():
            ref_logprobs.append(response_logprobs(ref_policy, query_responses[rows], attention_mask[rows],
                                                  context_length, temperatures)[0])
    logprobs = (torch.cat(logprobs, 1) * response_mask).sum(-1)  # (temperatures, B)
    ref_logprobs = (torch.cat(ref_logprobs, 1) * response_mask).sum(-1)
    texts = tokenizer.batch_decode(query_responses[:, context_length:], skip_special_tokens=True)
    scores = torch.tensor([verify(t, a) for t, a in zip(texts, [a for a in answers for _ in range(num_samples)])],
                          device=queries.device)
    contains_eos = eos_index < args.response_length
    scores = torch.where(contains_eos, scores, args.penalty_reward_value)
    return dict(query_responses=query_responses, attention_mask=attention_mask, response_mask=response_mask,
                contains_eos=contains_eos, logprobs=logprobs[0], ref_logprobs=ref_logprobs[0], scores=scores,
                kl=logprobs[0] - ref_logprobs[0], kl_at_sample_temperature=logprobs[-1] - ref_logprobs[-1], texts=texts)


def optimal_values(scores, beta1):
    """A*-PO's stage 1 for rows of N rewards r(x, y_i), y_i ~ pi_0:
      V*(x) = beta_1 ln (1/N) sum_i exp(r(x, y_i) / beta_1)
    the value of the optimal policy pi*(y|x) ~ pi_0(y|x) exp(r(x, y) / beta_1), computed without overflow."""
    return beta1 * (torch.logsumexp(scores / beta1, 1) - math.log(scores.shape[1]))


def estimate_optimal_values(ref_policy, ref_context, tokenizer, dataset, prompts, args, device, autocast, rank):
    """V*(x) of the `prompts` (indices) of `dataset` from `num_value_samples` responses of pi_0 (Gamma without EOS), NaN
    for the others. Rank r samples for prompts[r], prompts[r + world_size], ... (as many generate calls on every rank,
    as FSDP2 needs), then gathers."""
    share = [prompts[(i * args.world_size + rank) % len(prompts)] for i in range(-(-len(prompts) // args.world_size))]
    values = []
    with torch.no_grad(), gathered(ref_policy), autocast, ref_context():
        for i in tqdm(range(0, len(share), args.rollout_batch_size), disable=rank != 0, desc="V*"):
            batch = dataset[share[i: i + args.rollout_batch_size]]
            queries, query_mask = pad(batch["query_token"], args.pad_token_id, device)
            responses = generate(ref_policy, queries, query_mask, args.num_value_samples, args,
                                 args.temperature)[0][:, queries.shape[1]:]
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            answers = [a for a in batch["answer"] for _ in range(args.num_value_samples)]
            scores = torch.tensor([verify(t, a) for t, a in zip(texts, answers)], device=device)
            scores = torch.where(first_eos(responses, args.eos_token_id) < args.response_length, scores,
                                 args.penalty_reward_value)
            values.append(optimal_values(scores.view(-1, args.num_value_samples), args.beta1))
    values = torch.cat(values)
    if dist.is_initialized():
        every = [torch.empty_like(values) for _ in range(args.world_size)]
        dist.all_gather(every, values)
        values = torch.stack(every, 1).flatten()  # prompts[i] was rank i % world_size's
    return torch.full((len(dataset),), torch.nan, device=device).index_put_(
        (torch.tensor(prompts, device=device),), values[: len(prompts)])


def apo_loss(logprobs, ref_logprobs, rewards, v_star, beta2):
    """A*-PO's stage 2 for one response y per prompt (sequence log-probs): the least-squares regression of the optimal
    advantage, averaged over prompts (the authors' core_algos.py):
      ( beta_2 ln pi_theta(y|x)/pi_0(y|x) - (r(x, y) - V*(x)) )^2"""
    return (beta2 * (logprobs - ref_logprobs) - (rewards - v_star)).pow(2).mean()


# ---- infrastructure: models, sharding, data, start-up checks, checkpoints, evaluation ----

def shard(model, mp_policy):
    """FSDP2: each decoder layer is a unit of its own (gathered for its forward, then freed), then the rest."""
    layers = {name for m in model.modules() for name in getattr(m, "_no_split_modules", None) or []}
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)


def shard_from_rank0(model, mp_policy, device, rank):
    """FSDP2 without a whole model on any device, nor in host memory on any rank but rank 0: rank 0's `model` holds the
    weights on the CPU, the others' is on the meta device; every rank shards it and rank 0 broadcasts the weights."""
    state, buffers = (model.state_dict(), [b.clone() for b in model.buffers()]) if rank == 0 else ({}, [])
    shard(model, mp_policy)
    model.to_empty(device=device)
    for i, buffer in enumerate(model.buffers()):  # buffers (e.g. rotary frequencies) are whole on every rank
        if rank == 0:
            buffer.copy_(buffers[i])
        dist.broadcast(buffer, 0)
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def load_policy(name, dtype, args, device, rank, mp_policy=None):
    """The causal LM `name` in `dtype` on `device`; with an FSDP2 `mp_policy`, read by rank 0 alone and sharded."""
    if mp_policy is None or rank == 0:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=args.trust_remote_code)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(
                name, trust_remote_code=args.trust_remote_code), dtype=dtype, trust_remote_code=args.trust_remote_code)
    return model.to(device) if mp_policy is None else shard_from_rank0(model, mp_policy, device, rank)


def enable_gradient_checkpointing(model):
    """Transformers recomputes activations in training mode only: set on the layers alone, so that dropout stays off."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer):
            layer.training = True


@contextlib.contextmanager
def gathered(model):
    """Under FSDP2, keep the parameters unsharded from the first forward until the block ends: a whole `generate` costs
    one all-gather instead of one per token. Nothing happens to an unsharded model."""
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp_modules:
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in fsdp_modules:
            m.reshard()
            m.set_reshard_after_forward(True)


def load_prompts(args, tokenizer, split, rank, flag="dataset"):
    """The problems of `--{flag}` (GSM8K's or MATH's format) as prompts, with each reference answer."""
    name = getattr(args, flag) or args.dataset
    try:
        dataset = load_dataset(name, args.dataset_config if name == args.dataset else None, split=split)
    except StopIteration:  # what datasets raises for an empty data file
        raise ValueError(f"--{flag} {name}: the {split} split is empty") from None
    except OSError as error:  # no such dataset: an unknown hub ID, or one not in the cache when offline
        raise ValueError(f"--{flag} {name}: {error}") from None
    if {"question", "answer"} <= set(dataset.column_names):  # GSM8K: the answer after "####"
        question, solution, extract = "question", "answer", lambda text: text.split("####")[-1].strip()
    elif {"problem", "solution"} <= set(dataset.column_names):  # MATH: the last \\boxed{} of the solution
        question, solution, extract = "problem", "solution", lambda text: last_boxed(text) or ""
    else:
        raise ValueError(f"--{flag} {name} ({split}): neither GSM8K's columns (question, answer) nor MATH's "
                         f"(problem, solution); found {dataset.column_names}")
    query_length, prompt = args.query_length, PROMPT  # not `args` in the transforms: datasets caches what it can hash

    def tokenize(batch):
        return {"question": batch[question], "answer": [extract(text) for text in batch[solution]],
                "query_token": tokenizer([prompt.format(question=q) for q in batch[question]],
                                         add_special_tokens=False).input_ids}

    dataset = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
    n = len(dataset)
    dataset = dataset.filter(lambda x: len(x["query_token"]) <= query_length and x["answer"] != "")
    if len(dataset) == 0:
        raise ValueError(f"--{flag} {name}: no {split} problem with a reference answer and a prompt of at most "
                         f"--query_length {query_length} tokens")
    if rank == 0 and len(dataset) < n:
        print(f"{split}: dropped {n - len(dataset)} of {n} problems without a reference answer or with a prompt longer "
              f"than --query_length {args.query_length}")
    return dataset


# flags that may be 0 (0 for all, never, none) and fields computed later; any other number must be positive
ZERO_ALLOWED = {"seed", "eval_samples", "eval_pairs", "save_every", "lora_rank", "kl_coef", "gamma", "lam",
                "local_batch_size", "gradient_accumulation_steps", "num_updates", "eos_token_id", "pad_token_id"}


def check_args(args):
    """Bad input fails at start-up, before any model loads, naming the flag or path."""
    for name, value in asdict(args).items():
        if type(value) in (int, float) and name != "penalty_reward_value" and value <= 0 and (
                value < 0 or name not in ZERO_ALLOWED):
            raise ValueError(f"--{name} must be {'at least 0' if name in ZERO_ALLOWED else 'positive'}, got {value}")
        if name.endswith(("model", "dataset")) and isinstance(value, str) and not os.path.exists(value) and (
                value.startswith((".", "/", "~")) or value.count("/") > 1):  # a hub ID is "name" or "owner/name"
            raise FileNotFoundError(f"--{name} {value}: no such local file or folder")


def new_run_dir(name):
    """runs/{name}, or runs/{name}_2, ... when that exists (runs started in the same second): never another run's."""
    for i in itertools.count(1):
        with contextlib.suppress(FileExistsError):
            os.makedirs(run_dir := f"runs/{name}" + (f"_{i}" if i > 1 else ""))
            return run_dir


# what a resumed run may change: settings that do not change what is trained, and sizes computed from compared flags
# (not the evaluation's: it samples from the rollouts' random stream, so another schedule draws other rollouts)
RESUMABLE = {"exp_name", "track", "wandb_project", "wandb_entity", "tiny", "save_every", "resume_from",
             "gradient_checkpointing", "local_batch_size", "gradient_accumulation_steps", "num_updates"}


def find_checkpoint(path, args):
    """The checkpoint at `path`, or at `path`.old after a crash between save_checkpoint's two renames. A resume that
    would change what is trained (RESUMABLE aside) is refused, listing each difference."""
    path = path.rstrip("/")
    found = next((p for p in [path, f"{path}.old"] if os.path.exists(f"{p}/state.pt")), None)
    if found is None:
        raise FileNotFoundError(f"--resume_from {path}: no checkpoint there (no state.pt)")
    if found != path:
        print(f"--resume_from {path}: missing after a crash between two renames; resuming from {found}")
    saved = torch.load(f"{found}/state.pt", mmap=True, weights_only=True)["args"]
    current = asdict(args)  # both sets of keys: another script's checkpoint has settings that this one lacks
    if changed := [f"{k} {saved.get(k)} -> {current.get(k)}" for k in {**saved, **current}
                   if k not in RESUMABLE and saved.get(k) != current.get(k)]:
        raise ValueError(f"--resume_from {found}: the checkpoint was trained with other settings; resuming with these "
                         f"would change what is trained: {', '.join(changed)}")
    return found


def save_checkpoint(path, policy, optimizer, shuffle_generator, update, args, rank, **extra):
    """The trainable weights (safetensors) and one dict: the update index (whence the lr and the data position), the
    arguments, the optimizer state, every rank's RNG states and `extra` (an algorithm's running state), written by rank
    0. The new checkpoint is whole before the old one goes: at any instant `path` or `path`.old holds a whole one."""
    model_state, optimizer_state = get_state_dict(policy, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    rng = {"torch": torch.get_rng_state(), "shuffle": shuffle_generator.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    rngs = [rng] * args.world_size  # every rank's, for rank 0 to write
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng)
    if rank == 0:
        shutil.rmtree(f"{path}.tmp", ignore_errors=True)
        os.makedirs(f"{path}.tmp")
        save_file({k: v.contiguous() for k, v in model_state.items()}, f"{path}.tmp/model.safetensors")
        torch.save(dict(update=update, args=asdict(args), optimizer=optimizer_state, rng=rngs, **extra),
                   f"{path}.tmp/state.pt")
        for file in os.listdir(f"{path}.tmp"):  # on disk before the renames, so that a power loss keeps one too
            with open(f"{path}.tmp/{file}", "rb") as f:
                os.fsync(f.fileno())
        if os.path.exists(path):
            shutil.rmtree(f"{path}.old", ignore_errors=True)
            os.rename(path, f"{path}.old")
        os.rename(f"{path}.tmp", path)
        shutil.rmtree(f"{path}.old", ignore_errors=True)


def load_checkpoint(path, policy, optimizer, shuffle_generator, rank):
    """The inverse of save_checkpoint; returns the saved dict. Under FSDP2 rank 0 reads the weights and optimizer state
    and broadcasts them (state.pt is memory-mapped: the other ranks read their RNG states only)."""
    sharded = any(isinstance(m, FSDPModule) for m in policy.modules())
    state = torch.load(f"{path}/state.pt", mmap=True, weights_only=True)
    model_state = load_file(f"{path}/model.safetensors") if rank == 0 or not sharded else {}
    if model_state and set(model_state) != (trainable := set(get_model_state_dict(
            policy, options=StateDictOptions(ignore_frozen_params=True)))):
        raise ValueError(f"{path}/model.safetensors holds {len(set(model_state) - trainable)} weights this model does "
                         f"not train and lacks {len(trainable - set(model_state))} that it does")
    # strict=False: the checkpoint holds the trainable weights only (checked above)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded, strict=False)
    set_model_state_dict(policy, model_state, options=options)
    set_optimizer_state_dict(policy, optimizer, state["optimizer"] if rank == 0 or not sharded else {}, options=options)
    rng = state["rng"][rank]
    torch.set_rng_state(rng["torch"])
    shuffle_generator.set_state(rng["shuffle"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    return state


def mean_over_ranks(metrics):
    """{name: scalar tensor} -> {name: float}, each averaged over the ranks, with one all_reduce for all of them."""
    values = torch.stack([v.float() for v in metrics.values()]) / (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_reduce(values)
    return dict(zip(metrics, values.tolist()))


def evaluate(policy, ref_policy, ref_context, tokenizer, dataset, args, device, autocast):
    """Pass@1 at the near-greedy temperature on the evaluation problems (split over ranks): accuracy, the KL to pi_0,
    mean response length in tokens, the share cut at the length limit, and the sample table."""
    rows, values = [], []  # values: {metric: one per sample} per batch
    with torch.no_grad(), gathered(policy), autocast:
        for i in range(0, len(dataset), args.rollout_batch_size):
            batch = dataset[i: i + args.rollout_batch_size]
            queries, query_mask = pad(batch["query_token"], args.pad_token_id, device)
            out = sample_and_score(policy, ref_policy, ref_context, tokenizer, queries, query_mask, batch["answer"], 1,
                                   args.eval_temperature, args)
            values.append({"eval/accuracy": out["scores"], "eval/kl": out["kl_at_sample_temperature"],
                           "eval/response_length": out["response_mask"].sum(1), "eval/truncated_share": ~out["contains_eos"]})
            numbers = torch.stack([out["scores"], out["kl_at_sample_temperature"]]).tolist()
            rows += [dict(question=q, response=r, answer=a, correct=c, kl=kl)
                     for q, r, a, c, kl in zip(batch["question"], out["texts"], batch["answer"], *numbers)]
    metrics = mean_over_ranks({k: torch.cat([v[k] for v in values]).float().mean() for k in values[0]})  # equal rows per rank
    if dist.is_initialized():
        gathered_rows = [None] * args.world_size
        dist.all_gather_object(gathered_rows, rows)
        rows = sum(gathered_rows, [])
    return metrics, rows


if __name__ == "__main__":
    args = tyro.cli(Args, default=Args(tiny=True, **TINY) if "--tiny" in sys.argv else None)

    # distributed setup (as nanoGPT): one process per device under torchrun, rank 0 logs and saves
    distributed = "RANK" in os.environ
    if distributed:
        # an hour, not NCCL's 10 minutes: the other ranks wait while rank 0 writes a full-parameter checkpoint alone
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=1))
    rank, args.world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    local_rank = int(os.environ["LOCAL_RANK"]) if distributed else 0
    master = rank == 0
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    # bf16 on GPU: the frozen weights, and the copies of trainable ones that FSDP2's forward and backward run in
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    # start-up checks, all before any model loads: flags, paths, the tokenizer, the data, the checkpoint's settings
    if args.tiny and master:
        import tiny  # test scaffolding, next to this file
        tiny.write_math(args)
    if distributed:
        dist.barrier()
    check_args(args)
    args.num_updates = args.total_episodes // args.batch_size
    args.local_batch_size = args.batch_size // args.world_size
    local_minibatch = args.local_batch_size // args.num_minibatches
    args.gradient_accumulation_steps = local_minibatch // args.per_device_train_batch_size
    if args.num_updates < 1 or args.gradient_accumulation_steps * args.per_device_train_batch_size \
            * args.num_minibatches * args.world_size != args.batch_size:
        raise ValueError(f"--batch_size {args.batch_size} must be a multiple of world size {args.world_size} x "
                         f"--num_minibatches {args.num_minibatches} x --per_device_train_batch_size "
                         f"{args.per_device_train_batch_size}, and at most --total_episodes {args.total_episodes}")
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--model {args.model}: its tokenizer has no EOS token, which ends every response")
    args.eos_token_id = tokenizer.eos_token_id
    args.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_data = load_prompts(args, tokenizer, "train", rank)
    eval_data = load_prompts(args, tokenizer, args.eval_split, rank, "eval_dataset")
    if args.eval_samples > len(eval_data) and master:
        print(f"--eval_samples {args.eval_samples}: the validation split holds {len(eval_data)} prompts, all evaluated")
    num_eval = min(args.eval_samples or len(eval_data), len(eval_data)) // args.world_size * args.world_size
    if num_eval == 0:
        raise ValueError(f"evaluation needs at least one validation prompt per rank: --eval_samples "
                         f"{args.eval_samples} of {len(eval_data)} prompts for world size {args.world_size}")
    eval_data = eval_data.select(range(rank, num_eval, args.world_size))
    args.eval_samples = num_eval
    usable = len(train_data) // args.batch_size * args.batch_size  # whole batches per pass over the data
    if usable == 0:
        raise ValueError(f"the train split holds {len(train_data)} prompts, fewer than --batch_size {args.batch_size}")
    checkpoint_dir = find_checkpoint(args.resume_from, args) if args.resume_from else None

    # every stream is seeded 100,003 (a prime) apart, as in summarize_from_feedback_details and the released REBEL
    # code: rank r's here, pass p's data order in the loop; runs whose seeds differ by less than that share none
    torch.manual_seed(args.seed + 100_003 * rank)
    shuffle_generator = torch.Generator().manual_seed(args.seed + 100_003 * rank)

    # models: the policy pi_theta and the reference pi_0; eval() mode turns dropout off. `raw_policy`
    # is the model itself, for generate and the no-grad passes; `policy` the same model as trained (DDP or FSDP2)
    lora = args.lora_rank > 0
    fsdp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if distributed and not lora \
        else None  # full-parameter training under torchrun: the policy and pi_0 sharded with FSDP2
    raw_policy = load_policy(args.model, compute_dtype if lora else torch.float32, args, device, rank, fsdp).eval()
    if lora:  # pi_0 is the same weights with the adapter disabled: no second copy
        raw_policy = get_peft_model(raw_policy, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                                                           lora_dropout=0.0))
        ref_policy, ref_context = raw_policy, raw_policy.disable_adapter
    else:
        ref_policy = load_policy(args.model, compute_dtype, args, device, rank, fsdp).eval().requires_grad_(False)
        ref_context = contextlib.nullcontext
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(raw_policy)
    # DDP reduces the gradients on the last micro-step only; FSDP2 reduce-scatters them on every micro-step, since
    # skipping that would keep whole unsharded fp32 gradients on every rank (about 28 GB per GPU at 6.9B)
    # and DDP's gradients are views into its all-reduce buckets, not a second copy of them
    ddp = dict(device_ids=[local_rank] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    policy = DDP(raw_policy, **ddp) if distributed and lora else raw_policy
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, eps=args.adam_eps)

    # the run folder, once everything has loaded: the checkpoint's, or a new one (rank 0's name on every rank)
    run_dir = [os.path.dirname(os.path.abspath(checkpoint_dir)) if checkpoint_dir else
               new_run_dir(f"math__{args.exp_name}__{args.seed}__{int(time.time())}") if master else None]
    if distributed:
        dist.broadcast_object_list(run_dir)
    run_dir = run_dir[0]
    if master:
        print(json.dumps(asdict(args), indent=1))
        with open(f"{run_dir}/args.json", "w") as f:  # what the run was started with, for plot_runs.py's grouping
            json.dump(asdict(args), f, indent=1)
        if args.track:
            import wandb
            wandb.init(project=args.wandb_project, entity=args.wandb_entity, config=asdict(args),
                       name=os.path.basename(run_dir), save_code=True)
    state = load_checkpoint(checkpoint_dir, policy, optimizer, shuffle_generator, rank) if checkpoint_dir else {}
    start_update = state.get("update", 0)
    if checkpoint_dir and master:  # forget what the interrupted run logged after its checkpoint, and a torn last line
        with open(f"{run_dir}/metrics.jsonl") as f:
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["update"] <= start_update]
        with open(f"{run_dir}/metrics.jsonl.tmp", "w") as f:  # replaced whole: a crash here loses no line
            f.writelines(kept)
        os.replace(f"{run_dir}/metrics.jsonl.tmp", f"{run_dir}/metrics.jsonl")

    def log(metrics, rows=None):
        if not master:
            return
        with open(f"{run_dir}/metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if rows:
            with open(f"{run_dir}/samples_update{metrics['update']}.csv", "w", newline="") as f:
                csv.writer(f).writerows([list(rows[0]), *(r.values() for r in rows)])
        if args.track:
            table = {"eval/samples": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])} if rows else {}
            wandb.log({**metrics, **table}, step=metrics["update"])

    # A*-PO's stage 1, once before the first update (a resumed run reads V* from its checkpoint), for the prompts that
    # the run trains on: pass p over the data takes the first `usable` of the loop's p-th shuffle, the last pass fewer
    episodes = args.num_updates * args.batch_size
    prompts = torch.cat([torch.randperm(len(train_data), generator=torch.Generator().manual_seed(
        args.seed + 100_003 * p))[: min(usable, episodes - p * usable)]
        for p in range(-(-episodes // usable))]).unique().tolist()
    v_star = state["v_star"].to(device) if checkpoint_dir else estimate_optimal_values(
        ref_policy, ref_context, tokenizer, train_data, prompts, args, device, autocast, rank)

    metrics = json.loads(kept[-1]) if checkpoint_dir and master else {}  # the summary, if nothing is left to train
    if start_update == 0:  # the SFT policy's evaluation, the "before" of the run
        eval_metrics, rows = evaluate(raw_policy, ref_policy, ref_context, tokenizer, eval_data, args,
                                      device, autocast)
        metrics = {"update": 0, "episode": 0, **eval_metrics}
        log(metrics, rows)

    start_time = time.time()
    progress = tqdm(range(start_update + 1, args.num_updates + 1), disable=not master, desc="updates")
    for update in progress:
        optimizer.param_groups[0]["lr"] = args.lr * (1.0 - (update - 1) / args.num_updates)
        episode = update * args.batch_size
        # this rank's prompts: a fixed shuffle of the train split per pass, so the data position is the update index
        start = (update - 1) * args.batch_size % usable
        order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(
            args.seed + 100_003 * ((update - 1) * args.batch_size // usable)))[:usable]
        indices = order[start + rank * args.local_batch_size: start + (rank + 1) * args.local_batch_size]
        batch, values = train_data[indices.tolist()], v_star[indices.to(device)]
        queries, query_mask = pad(batch["query_token"], args.pad_token_id, device)
        context_length = queries.shape[1]

        # 1. A*-PO's stage 2: one response y ~ pi_theta(.|x) per prompt
        rollout_start = time.time()
        with torch.no_grad(), gathered(raw_policy), autocast:
            chunks = [sample_and_score(raw_policy, ref_policy, ref_context, tokenizer,
                                       queries[i: i + args.rollout_batch_size], query_mask[i: i + args.rollout_batch_size],
                                       batch["answer"][i: i + args.rollout_batch_size], 1, args.temperature, args)
                      for i in range(0, args.local_batch_size, args.rollout_batch_size)]
        rollout = {key: torch.cat([c[key] for c in chunks]) for key in chunks[0] if key != "texts"}
        query_responses, attention_masks, response_masks, logprobs, ref_logprobs, scores = (rollout[k] for k in [
            "query_responses", "attention_mask", "response_mask", "logprobs", "ref_logprobs", "scores"])
        # 2. r(x, y) = verifier(x, y) - gamma (ln pi_t(y|x) - ln pi_0(y|x)), with Gamma for no EOS
        kl = logprobs - ref_logprobs
        rewards = scores - args.kl_coef * kl
        rollout_time = time.time() - rollout_start

        # 3. Solve the regression of r - V* by `num_epochs` passes of AdamW over shuffled minibatches
        update_start = time.time()
        stats = {k: torch.zeros(args.num_epochs, args.num_minibatches, args.gradient_accumulation_steps, device=device)
                 for k in ["loss", "approxkl", "entropy"]}  # per micro-step, read by name when logging
        grad_norms = torch.zeros(args.num_epochs, args.num_minibatches, device=device)
        for epoch in range(args.num_epochs):
            permutation = torch.randperm(args.local_batch_size, generator=shuffle_generator).to(device)
            for minibatch in range(args.num_minibatches):
                for micro in range(args.gradient_accumulation_steps):
                    first = minibatch * local_minibatch + micro * args.per_device_train_batch_size
                    seqs = permutation[first: first + args.per_device_train_batch_size]
                    policy.require_backward_grad_sync = micro == args.gradient_accumulation_steps - 1  # DDP (see above)
                    with autocast:
                        new_logprobs, entropy = response_logprobs(policy, query_responses[seqs], attention_masks[seqs],
                                                                  context_length, (args.temperature,), epoch == 0)
                    new_logprobs = (new_logprobs[0] * response_masks[seqs]).sum(1)
                    loss = apo_loss(new_logprobs, ref_logprobs[seqs], rewards[seqs], values[seqs], args.beta2)
                    (loss / args.gradient_accumulation_steps).backward()
                    with torch.no_grad():
                        at = epoch, minibatch, micro
                        stats["loss"][at] = loss
                        stats["approxkl"][at] = 0.5 * (new_logprobs - logprobs[seqs]).pow(2).mean()
                        if epoch == 0:  # a metric, first epoch only: pi_t's entropy when --num_minibatches is 1
                            stats["entropy"][at] = (entropy * response_masks[seqs]).sum() / response_masks[seqs].sum()
                grad_norm = nn.utils.clip_grad_norm_(trainable, float("inf"))  # measured, not clipped
                grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
                grad_norms[epoch, minibatch] = grad_norm
                if not torch.isfinite(grad_norm):  # the same on every rank (reduced gradients): no step on NaN
                    raise FloatingPointError(f"update {update}: non-finite loss or gradient norm ({grad_norm.item()}); "
                                             "stopped before the step: start again with a lower --lr")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        update_time = time.time() - update_start

        # 4. Log (means over ranks; one synchronisation per update), evaluate, checkpoint
        metrics = {"update": update, "episode": episode, **mean_over_ranks({
            "objective/scores": scores.mean(), "objective/kl": kl.mean(), "objective/rewards": rewards.mean(),
            "objective/eos_share": rollout["contains_eos"].float().mean(), "apo/loss": stats["loss"].mean(),
            "apo/approxkl": stats["approxkl"].mean(), "policy/entropy": stats["entropy"][0].mean(),
            "apo/loss_first_epoch": stats["loss"][0].mean(), "apo/loss_last_epoch": stats["loss"][-1].mean(),
            "apo/v_star": values.mean(), "apo/advantage": (rewards - values).mean(),
            "train/grad_norm": grad_norms.mean()}), "lr": optimizer.param_groups[0]["lr"],
            "time/rollout_s": rollout_time, "time/update_s": update_time,
            "episodes_per_s": (episode - start_update * args.batch_size) / (time.time() - start_time),
            "memory/peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        progress.set_postfix({k: f"{metrics[f'objective/{k}']:.3f}" for k in ["scores", "kl", "eos_share"]})
        rows = None
        if update % args.eval_every == 0 or update == args.num_updates:
            eval_metrics, rows = evaluate(raw_policy, ref_policy, ref_context, tokenizer, eval_data, args,
                                          device, autocast)
            metrics.update(eval_metrics)
        log(metrics, rows)

        if args.save_every and update % args.save_every == 0:
            save_checkpoint(f"{run_dir}/checkpoint", policy, optimizer, shuffle_generator, update, args, rank,
                            v_star=v_star.cpu())

    # the trained policy in Hugging Face format, loadable with AutoModelForCausalLM.from_pretrained: with LoRA, the
    # adapter (adapter/) and the weights with it merged in fp32 (model/); else the full weights, gathered from the shards
    if lora and master:
        raw_policy.save_pretrained(f"{run_dir}/adapter")
        raw_policy.to("cpu", torch.float32).merge_and_unload().to(compute_dtype).save_pretrained(f"{run_dir}/model")
    elif not lora:
        model_state = get_state_dict(raw_policy, [], options=StateDictOptions(full_state_dict=True, cpu_offload=True))[0]
        if master:
            with torch.device("meta"):  # save_pretrained writes the state dict it is given: a weightless model serves
                model = AutoModelForCausalLM.from_config(raw_policy.config)
            model.generation_config = raw_policy.generation_config  # rank 0's, read with the SFT checkpoint
            model.save_pretrained(f"{run_dir}/model", state_dict=model_state)
    if master:
        tokenizer.save_pretrained(f"{run_dir}/model")
        summary = {k: v for k, v in metrics.items() if k.startswith(("eval/", "objective/", "time/", "memory/"))}
        print(f"run folder {run_dir}\n" + json.dumps(summary, indent=1))
        if args.track:
            wandb.finish()
    if distributed:  # no rank leaves before rank 0 has saved: torchrun stops all ranks when one exits with an error
        dist.barrier()
        dist.destroy_process_group()
        # torch still references the process group (DDP, FSDP2's device mesh), so interpreter exit would destroy it,
        # and there gloo can abort a finished run (SIGABRT): leave without that clean-up
        sys.stdout.flush()
        os._exit(0)
