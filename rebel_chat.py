# REBEL for general chat: Gao et al., "REBEL: Reinforcement Learning via Regressing Relative Rewards", NeurIPS 2024,
# Algorithm 1 and Eq. (1), Section 5.2 (Table 2), Section 5.2.1 (Table 3), Appendix H.2. Single file, CleanRL style;
# the skeleton is rebel_tldr.py, and `diff rebel_tldr.py rebel_chat.py` shows what chat needs.
#   python rebel_chat.py --tiny                                  # tiny random models, CPU, about a minute
#   torchrun --nproc_per_node 8 rebel_chat.py ...                # the paper's runs: see the README's command lines
import collections
import contextlib
import copy
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
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from datasets import load_dataset
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributions import Categorical
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          LlamaModel, LlamaPreTrainedModel)
from transformers.modeling_layers import GradientCheckpointingLayer


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (sampling seeds are offset by rank)"""
    track: bool = False
    """log to Weights and Biases (the same keys as metrics.jsonl)"""
    wandb_project: str = "rebel_chat"
    """the wandb project"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    tiny: bool = False
    """tiny random models and synthetic prompts (tiny.py, written to runs/tiny_chat/ where missing), on CPU in about a
    minute: TINY's values (below Args) become the defaults; flags given still win"""

    # models and data (Section 5.2, App. H.2.1-H.2.2); a hub ID or a local path
    sft_model: str = "openchat/openchat_3.5"
    """the chat policy; pi_0 and the initial pi_t. Its chat template formats the prompts"""
    reward_model: str = "sfairXC/FsfairX-LLaMA3-RM-v0.1"
    """the RM, with its own tokenizer and template: a sequence classifier, or ArmoRM (Section 5.2.1). The paper's
    Starling-RM-7B-alpha is a raw state dict for a custom head: this Llama-3 RM stands in"""
    dataset: str = "HuggingFaceH4/ultrafeedback_binarized"
    """prompts: a text column `prompt`, one user turn (UltraFeedback) or a 'Human: ... Assistant:' chat (Nectar)"""
    train_split: str = "train_prefs"
    """the split to train on (slices work: Nectar has only train, so `train[:-1000]`)"""
    eval_split: str = "test_prefs"
    """the held-out split to evaluate on (e.g. `train[-1000:]` for Nectar)"""
    trust_remote_code: bool = False
    """allow models with custom code from the hub"""
    max_prompt_length: int = 1024
    """longest chat-formatted prompt in policy tokens; longer prompts are dropped and counted (2.3% in App. H.2.2)"""
    max_new_tokens: int = 1024
    """longest response; generation stops earlier at the policy's end-of-turn token(s) (Table 5)"""
    num_samples: int = 2
    """N responses per prompt from pi_t; N = 2 gives the pair, N > 2 pairs the best with the worst (Section 5.2.1)"""
    temperature: float = 0.5
    """sampling temperature (no top-p/top-k: log-probs are the sampler's), the released code's 0.5; 0.8 in §5.2.1"""
    eval_temperature: float = 0.01
    """near-greedy sampling for evaluation, as in the released code"""
    penalty_reward_value: float = -4.0
    """Gamma: the score of a response without end-of-turn within `max_new_tokens` (App. H.2.3)"""
    drop_truncated: bool = False
    """leave pairs with a response that never ends its turn out of the regression, as the released Section 5.2.1 code
    does: with eta = 1e6 a Gamma-scored pair's target (~4e6) would dominate the loss"""
    kl_coef: float = 0.05
    """gamma: r = RM(x, y) - gamma (ln pi_t(y|x) - ln pi_0(y|x)) (Eq. 23); Section 5.2.1's 0 loads no pi_0 at all"""

    # REBEL (Algorithm 1, App. H.2.4)
    eta: tuple[float, ...] = (1.0,)
    """eta of Eq. (1): one value, or one per iteration (Section 5.2.1: 1e6 1e4 1e2)"""
    num_iterations: int = 0
    """iterations t of Algorithm 1, each on a fresh batch of prompts; 0 for one pass over the train split"""
    batch_size: int = 32
    """prompts per iteration across all ranks, |D_t|; 0 for the whole train split (Section 5.2.1)"""
    num_epochs: int = 4
    """passes of the regression over each batch (4 in Section 5.2, 1 in Section 5.2.1)"""
    minibatch_size: int = 0
    """pairs per optimizer step across all ranks; 0 for the whole batch (Section 5.2), 128 in Section 5.2.1"""
    per_device_train_batch_size: int = 2
    """pairs per forward/backward on one device (gradient accumulation makes up the minibatch), also per no-grad pass"""
    rollout_batch_size: int = 4
    """prompts per generate call on one device; all N responses come from one call"""
    lr: float = 1e-7
    """AdamW learning rate"""
    lr_schedule: Literal["linear", "cosine"] = "linear"
    """linear: decay to 0 over the run (Section 5.2); cosine: after a warmup, restarted per iteration with AdamW's
    state, each iteration a fresh regression as in the released pipeline's separate runs (Section 5.2.1)"""
    warmup_ratio: float = 0.0
    """share of each iteration's optimizer steps spent warming up (cosine only; 0.1 in Section 5.2.1)"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas: the released code's (the paper gives none)"""
    adam_eps: float = 1e-8
    """AdamW epsilon: the released code's"""
    weight_decay: float = 1e-6
    """AdamW weight decay: the released code's"""
    num_layers_unfrozen: int = 4
    """train the last K decoder layers and the head (App. H.2.2: 4 for OpenChat); 0 trains all (FSDP2 under torchrun)"""
    gradient_checkpointing: bool = False
    """recompute each layer's activations in the backward pass: less memory for full-parameter runs, more time"""

    # evaluation and saving
    eval_every: int = 100
    """evaluate every this many iterations, and always before the first and after the last"""
    eval_samples: int = 0
    """held-out prompts to evaluate on; 0 for the whole split"""
    save_every: int = 100
    """write a resumable checkpoint to runs/{run_name}/checkpoint every this many iterations, so that a crash
    loses at most these; 0 for never"""
    resume_from: Optional[str] = None
    """a checkpoint folder to continue from, with the settings it was trained with; the run goes on in its folder"""

    # computed at run time
    world_size: tyro.conf.Suppress[int] = 1
    local_batch_size: tyro.conf.Suppress[int] = 0
    num_minibatches: tyro.conf.Suppress[int] = 0
    gradient_accumulation_steps: tyro.conf.Suppress[int] = 0
    num_updates: tyro.conf.Suppress[int] = 0
    """iterations t of Algorithm 1"""
    eos_token_ids: tyro.conf.Suppress[tuple[int, ...]] = ()
    """the end-of-turn tokens that end a response: the tokenizer's EOS and the model's"""
    pad_token_id: tyro.conf.Suppress[int] = 0
    """filler after the end-of-turn and left of the prompt, always masked: the tokenizer's pad, else EOS"""


# --tiny: a task small enough for a CPU, with a signal strong enough to see learning in ~20 iterations
TINY = dict(sft_model="runs/tiny_chat/sft", reward_model="runs/tiny_chat/reward", dataset="runs/tiny_chat/prompts",
            max_prompt_length=64, max_new_tokens=24, num_iterations=20, batch_size=16, per_device_train_batch_size=8,
            rollout_batch_size=16, lr=1e-3, num_layers_unfrozen=2, eval_every=10, eval_samples=64)


def to_messages(prompt):
    """UltraFeedback's `prompt` is one user turn; Nectar's an Anthropic-HH transcript '\n\nHuman: ...\n\nAssistant:'."""
    if not prompt.lstrip().startswith("Human:"):  # a prompt that quotes a transcript stays one turn
        return [{"role": "user", "content": prompt}]
    parts = re.split(r"(?:^|\n\n)(Human|Assistant): ?", prompt.lstrip())[1:]
    messages = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
                for who, text in zip(parts[::2], parts[1::2])]
    return messages[:-1] if messages[-1] == {"role": "assistant", "content": ""} else messages


def pad(sequences, pad_id, device, left=True):
    """A batch of token lists and its attention mask; prompts are left-padded so that responses share columns."""
    width = max(len(s) for s in sequences)
    fill = [[pad_id] * (width - len(s)) for s in sequences]
    ids = [f + s if left else s + f for s, f in zip(sequences, fill)]
    mask = [[0] * len(f) + [1] * len(s) if left else [1] * len(s) + [0] * len(f) for s, f in zip(sequences, fill)]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def pack(queries, responses, pad_id, device):
    """Left-padded prompts followed by right-padded responses (the layout generate() makes): ids, attention mask,
    the prompts' width and the responses' mask."""
    queries, query_mask = pad(queries, pad_id, device)
    responses, response_mask = pad(responses, pad_id, device, left=False)
    query_responses, attention_mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
    return query_responses, attention_mask, queries.shape[1], response_mask


def first_eos(responses, eos_ids):
    """Index of each response's first end-of-turn token; the response length where there is none."""
    is_eos = torch.isin(responses, torch.tensor(eos_ids, device=responses.device))
    return torch.where(is_eos.any(-1), is_eos.int().argmax(-1), responses.shape[1]), is_eos.any(-1)


def generate(model, queries, query_mask, num_samples, args, temperature):
    """`num_samples` responses per prompt in one batched call, each ending at its first end-of-turn token. Under FSDP2
    every rank steps until all are done (synced_gpus): the all-gathers need as many forward passes on every rank.
    Sampled from pi at `temperature`; top-k, top-p and repetition penalty are neutral, whatever the checkpoint's
    generation_config says."""
    queries, query_mask = queries.repeat_interleave(num_samples, 0), query_mask.repeat_interleave(num_samples, 0)
    query_responses = model.generate(input_ids=queries, attention_mask=query_mask, max_new_tokens=args.max_new_tokens,
                                     do_sample=True, temperature=temperature, top_k=0, top_p=1.0, repetition_penalty=1.0,
                                     eos_token_id=list(args.eos_token_ids), pad_token_id=args.pad_token_id,
                                     synced_gpus=isinstance(model, FSDPModule))
    return query_responses[:, queries.shape[1]:]


def token_logprobs(logits, tokens, temperature):
    """ln softmax(logits / temperature) at `tokens`, from the logits of n sequences: these fp32 copies of the logits
    exist for one chunk of sequences at a time."""
    return (logits.float() / temperature).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)


def response_logprobs(model, query_responses, attention_mask, context_length, temperature, with_entropy=False):
    """ln pi(y_h | x, y_<h) of every response token (B, T), and the entropy if asked, from one forward pass. The LM
    head runs at the response positions only, and the fp32 log-softmax one sequence at a time, recomputed in the
    backward pass: no fp32 [B x T x vocabulary] logits exist. Positions count real tokens only, as generate() does."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=query_responses, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                   logits_to_keep=torch.arange(context_length - 1, query_responses.shape[1] - 1,
                                               device=query_responses.device)).logits
    logprobs = torch.cat([checkpoint(token_logprobs, chunk, tokens, temperature, use_reentrant=False) for chunk, tokens
                          in zip(logits.split(1), query_responses[:, context_length:].split(1))])  # split: one backward
    if not with_entropy:
        return logprobs, None
    with torch.no_grad():  # a metric: computed once, outside the log-softmax that the backward pass recomputes
        return logprobs, torch.cat([Categorical(logits=chunk.float() / temperature, validate_args=False).entropy()
                                    for chunk in logits.split(1)])


def sequence_logprobs(model, ref_policy, queries, responses, micro_batch, args, device):
    """ln pi_t(y|x) of the responses and ln pi_t(y|x) - ln pi_0(y|x) (0 without pi_0), in no-grad micro-batches; the
    shared-bottom pi_0 reuses the policy's pass."""
    logprobs, kl = [], []
    for rows in [slice(i, i + micro_batch) for i in range(0, len(responses), micro_batch)]:
        query_responses, attention_mask, context_length, response_mask = pack(queries[rows], responses[rows],
                                                                               args.pad_token_id, device)
        logprobs.append((response_logprobs(model, query_responses, attention_mask, context_length,
                                           args.temperature)[0] * response_mask).sum(1))
        ref_logprobs = logprobs[-1] if ref_policy is None else (response_logprobs(
            ref_policy, query_responses, attention_mask, context_length, args.temperature)[0] * response_mask).sum(1)
        kl.append(logprobs[-1] - ref_logprobs)
    return torch.cat(logprobs), torch.cat(kl)


def sample_and_score(model, ref_policy, reward_model, tokenizer, batch, num_samples, sample_temperature, args, device):
    """Responses sampled at `sample_temperature`, cut after the first end-of-turn; the RM scores of their text, Gamma
    without end-of-turn (App. H.2.3); with a pi_0 (gamma > 0), every response's ln pi_t and KL term at the training
    temperature (the regression's ln pi_t is the trained policy's); without, the caller computes ln pi_t for the pairs
    only. Also the seconds spent generating, on the RM and on log-probs."""
    tic = time.time()
    queries, query_mask = pad(batch["query_token"], args.pad_token_id, device)
    responses = generate(model, queries, query_mask, num_samples, args, sample_temperature)
    eos_index, contains_eos = first_eos(responses, args.eos_token_ids)
    lengths = torch.where(contains_eos, eos_index + 1, responses.shape[1]).tolist()
    responses = [r[:n] for r, n in zip(responses.tolist(), lengths)]
    queries = [q for q in batch["query_token"] for _ in range(num_samples)]
    seconds = {"generate": time.time() - tic}

    tic = time.time()
    texts = [tokenizer.decode(r[: n - 1] if eos else r, skip_special_tokens=True)
             for r, n, eos in zip(responses, lengths, contains_eos.tolist())]
    prompts = [p for p in batch["prompt"] for _ in range(num_samples)]
    conversations = [to_messages(p) + [{"role": "assistant", "content": t}] for p, t in zip(prompts, texts)]
    micro_batch = args.per_device_train_batch_size * num_samples
    scores = torch.cat([reward_model(conversations[i: i + micro_batch]) for i in range(0, len(texts), micro_batch)])
    scores = torch.where(contains_eos, scores, args.penalty_reward_value)
    seconds["reward"] = time.time() - tic

    tic = time.time()
    out = dict(queries=queries, responses=responses, prompts=prompts, texts=texts, scores=scores,
               contains_eos=contains_eos, lengths=torch.tensor(lengths, device=device, dtype=torch.float))
    if ref_policy is not None:
        out["logprobs"], out["kl"] = sequence_logprobs(model, ref_policy, queries, responses, micro_batch, args, device)
    seconds["logprobs"] = time.time() - tic
    return out | {"seconds": seconds}


def rebel_loss(logprobs, old_logprobs, rewards, eta):
    """Eq. (1) times eta^2 for each pair of a batch: columns 0 and 1 hold y and y' (sequence log-probs, rewards).
      ( (1/eta) (ln pi_theta(y|x)/pi_t(y|x) - ln pi_theta(y'|x)/pi_t(y'|x)) - (r(x,y) - r(x,y')) )^2
    Multiplying by eta^2 gives the released code's form; the minimiser is the same."""
    ratios = logprobs - old_logprobs
    return ((ratios[:, 0] - ratios[:, 1]) - eta * (rewards[:, 0] - rewards[:, 1])).pow(2)


def learning_rate(args, update, step):
    """The lr of step `step` (from 0) of iteration `update` (from 1), App. H.2.4: linear decay to 0 over the run, or a
    cosine after a warmup within each iteration (each a fresh regression problem of Algorithm 1)."""
    steps = args.num_epochs * args.num_minibatches
    if args.lr_schedule == "linear":
        return args.lr * (1.0 - ((update - 1) * steps + step) / (args.num_updates * steps))
    warmup = math.ceil(args.warmup_ratio * steps)
    if step < warmup:
        return args.lr * (step + 1) / (warmup + 1)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


# ---- infrastructure: models, sharding, data, start-up checks, checkpoints, evaluation ----


class ArmoRewardModel(LlamaPreTrainedModel):
    """ArmoRM (Section 5.2.1's RM) in its checkpoint's layout, without its remote code (which transformers 5 breaks):
    score = gating(hidden where the prompt ends) . (regression_layer(last hidden) @ reward_transform_matrix)."""
    gating_text = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"

    def __init__(self, config):
        super().__init__(config)
        sizes = [config.hidden_size] + [config.gating_hidden_dim] * config.gating_n_hidden + [config.num_objectives]
        self.model = LlamaModel(config)
        self.regression_layer = nn.Linear(config.hidden_size, config.num_objectives, bias=False)
        self.register_buffer("reward_transform_matrix", torch.eye(config.num_objectives))
        self.gating = nn.Module()
        self.gating.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.gating.logit_scale = nn.Parameter(torch.ones(1))
        self.post_init()

    def forward(self, input_ids, attention_mask, gating_index):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(len(hidden), device=hidden.device)
        objectives = self.regression_layer(hidden[rows, attention_mask.sum(1) - 1])
        x = hidden[rows, gating_index]
        for layer in self.gating.layers[:-1]:
            x = F.relu(layer(x))
        weights = F.softmax(self.gating.layers[-1](x) / self.config.gating_temperature, 1) * self.gating.logit_scale
        return (weights * (objectives @ self.reward_transform_matrix)).sum(1)


class ChatRewardModel(nn.Module):
    """RM(x, y) of conversations rendered as text with the RM's own template and tokenizer (the policy's may differ:
    token ids are never spliced across tokenizers), right-padded, the head read at each conversation's last token."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    def forward(self, conversations):
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
        ids = self.tokenizer(texts, add_special_tokens=False).input_ids  # the template writes BOS where it wants one
        input_ids, attention_mask = pad(ids, 0, next(self.model.parameters()).device, left=False)
        if isinstance(self.model, ArmoRewardModel):  # its gating reads the last occurrence of `gating_text`
            pattern = self.tokenizer.encode(ArmoRewardModel.gating_text, add_special_tokens=False)
            gating_index = [max(j for j in range(len(i)) if i[j: j + len(pattern)] == pattern) for i in ids]
            return self.model(input_ids, attention_mask, torch.tensor(gating_index, device=input_ids.device)).float()
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.model.score(hidden[torch.arange(len(ids)), attention_mask.sum(1) - 1])[:, 0].float()


def load_reward_model(name, dtype, trust_remote_code, meta=False):
    """The reward model `name` in `dtype`, on the CPU, with its tokenizer; with `meta`, its structure alone on the meta
    device (no memory), for the ranks that receive the weights from rank 0 (shard_from_rank0)."""
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    armo = config.architectures == ["LlamaForRewardModelWithGating"]  # ArmoRM
    if meta:  # built as from_pretrained builds it (buffers such as rotary frequencies keep their own dtype)
        with torch.device("meta"):
            model = ArmoRewardModel._from_config(config, dtype=dtype) if armo else \
                AutoModelForSequenceClassification.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    else:
        model, loading = ArmoRewardModel.from_pretrained(name, dtype=dtype, output_loading_info=True) if armo else \
            AutoModelForSequenceClassification.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code,
                                                               output_loading_info=True)
        if loading["missing_keys"]:  # from_pretrained would draw them at random, with a warning only
            raise ValueError(f"--reward_model {name}: the checkpoint lacks {sorted(loading['missing_keys'])}")
    return ChatRewardModel(model, tokenizer)


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
    """The causal LM `name` in `dtype` on `device`; with an FSDP2 `mp_policy`, read by rank 0 alone and sharded, with
    rank 0's generation config (its end-of-turn tokens, which a model built from config.json lacks)."""
    if mp_policy is None:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=args.trust_remote_code).to(device)
    if rank == 0:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=args.trust_remote_code)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(
                name, trust_remote_code=args.trust_remote_code), dtype=dtype, trust_remote_code=args.trust_remote_code)
    generation_config = [model.generation_config]
    dist.broadcast_object_list(generation_config)
    model.generation_config = generation_config[0]
    return shard_from_rank0(model, mp_policy, device, rank)


def enable_gradient_checkpointing(model):
    """Transformers recomputes activations in training mode only: set on the layers alone, so that dropout stays off.
    Non-reentrant checkpointing needs no gradient sent into a frozen bottom."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer):
            layer.training = True


class SharedBottomReference(nn.Module):
    """pi_0 when only the top K of L layers train (App. H.2.2): the frozen bottom gives pi_0 the policy's own hidden
    state entering layer L-K (saved by a hook), so only a frozen copy of the top K layers, the norm and the head is
    kept. Call it right after the policy's forward on the same batch. Llama-family layout (Llama, Mistral, Qwen2)."""

    def __init__(self, policy, num_layers_unfrozen, dtype):
        super().__init__()
        config = copy.deepcopy(policy.config)
        config.num_hidden_layers = num_layers_unfrozen
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[-num_layers_unfrozen:]
        with torch.device("meta"):
            self.top = type(policy)(config)
        self.top.model.embed_tokens = None  # the input is a hidden state, not tokens
        self.top.model.layers = copy.deepcopy(policy.model.layers[-num_layers_unfrozen:]).to(dtype)
        self.top.model.norm = copy.deepcopy(policy.model.norm).to(dtype)
        self.top.model.rotary_emb = copy.deepcopy(policy.model.rotary_emb)
        self.top.lm_head = copy.deepcopy(policy.lm_head).to(dtype)
        self.requires_grad_(False).eval()
        self.hidden = None
        policy.model.layers[-num_layers_unfrozen].register_forward_pre_hook(self.save_hidden)

    def save_hidden(self, module, args):
        self.hidden = args[0].detach()

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False, logits_to_keep=0):
        assert self.hidden.shape[:2] == input_ids.shape, "run the policy on the same batch first"
        return self.top(inputs_embeds=self.hidden, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=use_cache, logits_to_keep=logits_to_keep)


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


def load_prompts(args, tokenizer, split, rank):
    try:
        dataset = load_dataset(args.dataset, split=split)
    except StopIteration:  # what datasets raises for an empty data file
        raise ValueError(f"--dataset {args.dataset}: the {split} split is empty") from None
    if "prompt" not in dataset.column_names:
        raise ValueError(f"dataset {args.dataset} ({split}) lacks column 'prompt'; found {dataset.column_names}")

    # numbers, not `args`, in the transforms: datasets reuses its cache only for what dill can hash, not a script's Args
    max_prompt_length = args.max_prompt_length

    def tokenize(batch):  # the policy's chat template, ending with the assistant's turn header
        text = [tokenizer.apply_chat_template(to_messages(p), tokenize=False, add_generation_prompt=True)
                for p in batch["prompt"]]
        return {"query_token": tokenizer(text, add_special_tokens=False).input_ids}

    dataset = dataset.map(tokenize, batched=True, remove_columns=[c for c in dataset.column_names if c != "prompt"])
    n = len(dataset)
    dataset = dataset.filter(lambda x: len(x["query_token"]) <= max_prompt_length)
    if rank == 0 and len(dataset) < n:
        print(f"{split}: dropped {n - len(dataset)} of {n} prompts longer than --max_prompt_length "
              f"{args.max_prompt_length}")
    return dataset


# flags that may be 0 (0 for all, never, none) and fields computed later; any other number must be positive
ZERO_ALLOWED = {"seed", "eval_samples", "save_every", "num_iterations", "batch_size", "minibatch_size", "kl_coef",
                "warmup_ratio", "weight_decay", "num_layers_unfrozen", "local_batch_size", "num_minibatches",
                "gradient_accumulation_steps", "num_updates", "pad_token_id"}


def check_args(args):
    """Bad input fails at start-up, before any model loads, naming the flag or path."""
    for name, value in asdict(args).items():
        if any(type(v) in (int, float) and name != "penalty_reward_value" and v <= 0 and (
                v < 0 or name not in ZERO_ALLOWED) for v in (value if isinstance(value, tuple) else [value])):
            raise ValueError(f"--{name} must be {'at least 0' if name in ZERO_ALLOWED else 'positive'}, got {value}")
        if name.endswith(("model", "dataset")) and isinstance(value, str) and not os.path.exists(value) and (
                value.startswith((".", "/", "~")) or value.count("/") > 1):  # a hub ID is "name" or "owner/name"
            raise FileNotFoundError(f"--{name} {value}: no such local file or folder")
    if args.num_samples < 2:
        raise ValueError(f"--num_samples {args.num_samples}: a pair needs at least 2 responses per prompt")


def new_run_dir(name):
    """runs/{name}, or runs/{name}_2, ... when that exists (runs started in the same second): never another run's."""
    for i in itertools.count(1):
        with contextlib.suppress(FileExistsError):
            os.makedirs(run_dir := f"runs/{name}" + (f"_{i}" if i > 1 else ""))
            return run_dir


# what a resumed run may change: settings that do not change what is trained, and sizes computed from compared flags
# (not the evaluation's: it samples from the rollouts' random stream, so another schedule draws other rollouts)
RESUMABLE = {"exp_name", "track", "wandb_project", "wandb_entity", "tiny", "save_every", "resume_from",
             "gradient_checkpointing", "local_batch_size", "num_minibatches", "gradient_accumulation_steps",
             "num_updates", "eos_token_ids"}


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


def evaluate(policy, ref_policy, reward_model, tokenizer, dataset, args, device, autocast):
    """Near-greedy answers to the held-out prompts (split over ranks): RM score (Gamma without end-of-turn), KL to pi_0
    (if loaded), end-of-turn share, response length, and the sample table."""
    rows, values = [], []  # values: {metric: one per sample} per batch
    with torch.no_grad(), gathered(policy), autocast:
        for i in range(0, len(dataset), args.rollout_batch_size):
            out = sample_and_score(policy, ref_policy, reward_model, tokenizer, dataset[i: i + args.rollout_batch_size],
                                   1, args.eval_temperature, args, device)
            values.append({"eval/scores": out["scores"], **({"eval/kl": out["kl"]} if "kl" in out else {}),
                           "eval/eos_share": out["contains_eos"], "eval/response_length": out["lengths"]})
            rows += [dict(prompt=p, response=t, score=s) for p, t, s in zip(out["prompts"], out["texts"],
                                                                           out["scores"].tolist())]
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
        tiny.write_chat(args)
    if distributed:
        dist.barrier()
    check_args(args)
    # prompts, formatted with the policy's chat template; the batch sizes follow from the train split's size
    tokenizer = AutoTokenizer.from_pretrained(args.sft_model, trust_remote_code=args.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--sft_model {args.sft_model}: its tokenizer has no EOS token, which ends every response")
    layers = AutoConfig.from_pretrained(args.sft_model, trust_remote_code=args.trust_remote_code).num_hidden_layers
    if args.num_layers_unfrozen > layers:
        raise ValueError(f"--num_layers_unfrozen {args.num_layers_unfrozen}: --sft_model has {layers} decoder layers")
    args.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_data = load_prompts(args, tokenizer, args.train_split, rank)
    eval_data = load_prompts(args, tokenizer, args.eval_split, rank)
    if args.eval_samples > len(eval_data) and master:
        print(f"--eval_samples {args.eval_samples}: the held-out split holds {len(eval_data)} prompts, all evaluated")
    num_eval = min(args.eval_samples or len(eval_data), len(eval_data)) // args.world_size * args.world_size
    if num_eval == 0:
        raise ValueError(f"evaluation needs at least one held-out prompt per rank: --eval_samples "
                         f"{args.eval_samples} of {len(eval_data)} prompts for world size {args.world_size}")
    eval_data = eval_data.select(range(rank, num_eval, args.world_size))
    args.eval_samples = num_eval
    if args.batch_size == 0:  # Section 5.2.1: the whole dataset, in whole minibatches
        unit = args.minibatch_size or args.world_size * args.per_device_train_batch_size
        args.batch_size = len(train_data) // unit * unit
    args.minibatch_size = args.minibatch_size or args.batch_size
    args.num_minibatches = args.batch_size // args.minibatch_size
    args.local_batch_size = args.batch_size // args.world_size
    local_minibatch = args.minibatch_size // args.world_size
    args.gradient_accumulation_steps = local_minibatch // args.per_device_train_batch_size
    if args.batch_size < 1 or args.gradient_accumulation_steps * args.per_device_train_batch_size * args.world_size \
            * args.num_minibatches != args.batch_size or args.batch_size > len(train_data):
        raise ValueError(f"--batch_size {args.batch_size} must be a multiple of --minibatch_size "
                         f"{args.minibatch_size}, itself a multiple of world size {args.world_size} x "
                         f"--per_device_train_batch_size {args.per_device_train_batch_size}, and at most the "
                         f"{len(train_data)} train prompts")
    usable = len(train_data) // args.batch_size * args.batch_size  # whole batches per pass over the data
    args.num_updates = args.num_iterations or usable // args.batch_size
    if len(args.eta) not in (1, args.num_updates):
        raise ValueError(f"--eta takes one value or one per iteration ({args.num_updates}), got {len(args.eta)}")
    checkpoint_dir = find_checkpoint(args.resume_from, args) if args.resume_from else None

    # every stream is seeded 100,003 (a prime) apart, as in summarize_from_feedback_details and the released REBEL
    # code: rank r's here, pass p's data order in the loop; runs whose seeds differ by less than that share none
    torch.manual_seed(args.seed + 100_003 * rank)
    shuffle_generator = torch.Generator().manual_seed(args.seed + 100_003 * rank)

    # models: the policy pi_theta, the reference pi_0 (none if gamma = 0) and the reward model; eval() mode turns
    # dropout off. `raw_policy` is the model itself, for generate and the no-grad passes; `policy` the same model as
    # trained (DDP or FSDP2)
    frozen = args.num_layers_unfrozen > 0
    fsdp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if distributed and not frozen \
        else None  # full-parameter training under torchrun: the policy, pi_0 and the RM sharded with FSDP2
    raw_policy = load_policy(args.sft_model, compute_dtype if frozen else torch.float32, args, device, rank, fsdp).eval()
    eos = raw_policy.generation_config.eos_token_id  # the chat model's end-of-turn token(s), e.g. Llama-3's <|eot_id|>
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    args.eos_token_ids = tuple(sorted({tokenizer.eos_token_id, *eos}))
    if frozen:  # App. H.2.2: train the last K decoder layers, the final norm and an untied head, in float32
        raw_policy.requires_grad_(False)
        head = [raw_policy.lm_head] if raw_policy.lm_head.weight is not raw_policy.get_input_embeddings().weight else []
        for module in [*raw_policy.model.layers[-args.num_layers_unfrozen:], raw_policy.model.norm, *head]:
            module.float().requires_grad_(True)
    if args.kl_coef == 0:  # Section 5.2.1: no KL term, so no pi_0
        ref_policy = None
    elif frozen:  # the shared-bottom pi_0 (App. H.2.2)
        ref_policy = SharedBottomReference(raw_policy, args.num_layers_unfrozen, compute_dtype)
    else:  # the SFT model again, in the compute dtype (sharded like the policy)
        ref_policy = load_policy(args.sft_model, compute_dtype, args, device, rank, fsdp).eval().requires_grad_(False)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(raw_policy)
    reward_model = load_reward_model(args.reward_model, compute_dtype, args.trust_remote_code,
                                     meta=fsdp is not None and rank > 0).requires_grad_(False).eval()
    # under FSDP2 sharded like pi_0, so that no rank holds a second whole model
    reward_model = shard_from_rank0(reward_model, fsdp, device, rank) if fsdp else reward_model.to(device)
    # DDP reduces the gradients on the last micro-step only; FSDP2 reduce-scatters them on every micro-step, since
    # skipping that would keep whole unsharded fp32 gradients on every rank (about 30 GB per GPU at 8B)
    # and DDP's gradients are views into its all-reduce buckets, not a second copy of them
    ddp = dict(device_ids=[local_rank] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    policy = DDP(raw_policy, **ddp) if distributed and frozen else raw_policy
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=args.adam_betas, eps=args.adam_eps,
                                  weight_decay=args.weight_decay)

    # the run folder, once everything has loaded: the checkpoint's, or a new one (rank 0's name on every rank)
    run_dir = [os.path.dirname(os.path.abspath(checkpoint_dir)) if checkpoint_dir else
               new_run_dir(f"chat__{args.exp_name}__{args.seed}__{int(time.time())}") if master else None]
    if distributed:
        dist.broadcast_object_list(run_dir)
    run_dir = run_dir[0]
    if master:  # the run's arguments, complete once the end-of-turn tokens are known
        print(json.dumps(asdict(args), indent=1))
        with open(f"{run_dir}/args.json", "w") as f:  # what the run was started with, for plot_runs.py's grouping
            json.dump(asdict(args), f, indent=1)
        if args.track:
            import wandb
            wandb.init(project=args.wandb_project, entity=args.wandb_entity, config=asdict(args),
                       name=os.path.basename(run_dir), save_code=True)
    start_update = load_checkpoint(checkpoint_dir, policy, optimizer, shuffle_generator, rank)["update"] \
        if checkpoint_dir else 0
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
            with open(f"{run_dir}/alpaca_eval_update{metrics['update']}.json", "w") as f:  # AlpacaEval's model_outputs
                json.dump([dict(instruction=r["prompt"], output=r["response"], generator=os.path.basename(run_dir))
                           for r in rows], f, indent=1)
        if args.track:
            table = {"eval/samples": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])} if rows else {}
            wandb.log({**metrics, **table}, step=metrics["update"])

    metrics = json.loads(kept[-1]) if checkpoint_dir and master else {}  # the summary, if nothing is left to train
    if start_update == 0:  # the SFT policy's evaluation, the "before" of the run
        eval_metrics, rows = evaluate(raw_policy, ref_policy, reward_model, tokenizer, eval_data, args, device, autocast)
        metrics = {"update": 0, "episode": 0, **eval_metrics}
        log(metrics, rows)

    start_time = time.time()
    progress = tqdm(range(start_update + 1, args.num_updates + 1), disable=not master, desc="iterations")
    for update in progress:
        eta = args.eta[update - 1] if len(args.eta) > 1 else args.eta[0]
        episode = update * args.batch_size
        # this rank's prompts: a fixed shuffle of the train split per pass, so the data position is the update index
        start = (update - 1) * args.batch_size % usable
        order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(
            args.seed + 100_003 * ((update - 1) * args.batch_size // usable)))[:usable]
        batch = train_data[order[start + rank * args.local_batch_size: start + (rank + 1) * args.local_batch_size].tolist()]

        # 1. Collect D_t = {x, y, y'} with y, y' ~ pi_t(.|x) (Algorithm 1, line 5): N responses per prompt from one
        #    generate call, with their RM scores (Gamma without end-of-turn) and KL to pi_0. Only the pairs' tokens
        #    and log-probs under pi_t are kept, pair i in rows 2i and 2i+1 of what follows.
        rollout_start = time.time()
        queries, responses, samples, paired, logprobs, seconds = [], [], [], [], [], collections.Counter()
        with torch.no_grad(), gathered(raw_policy), autocast:
            for i in range(0, args.local_batch_size, args.rollout_batch_size):
                out = sample_and_score(raw_policy, ref_policy, reward_model, tokenizer,
                                       {k: v[i: i + args.rollout_batch_size] for k, v in batch.items()},
                                       args.num_samples, args.temperature, args, device)
                seconds.update(out["seconds"])
                # 2. r(x, y) = RM(x, y) - gamma (ln pi_t(y|x) - ln pi_0(y|x)) (Eq. 23), and the pair: with N = 2 the
                #    two samples, with N > 2 the best and the worst by r (Remark 1, Section 5.2.1)
                out["rewards"] = out["scores"] - args.kl_coef * out["kl"] if ref_policy is not None else out["scores"]
                reward = out["rewards"].view(-1, args.num_samples)
                picks = torch.stack([reward.argmax(1), reward.argmin(1)], 1) if args.num_samples > 2 else \
                    torch.tensor([[0, 1]], device=device).expand(len(reward), 2)
                pair = (picks + args.num_samples * torch.arange(len(reward), device=device)[:, None]).flatten()
                pair_queries, pair_responses = ([out[k][s] for s in pair.tolist()] for k in ["queries", "responses"])
                queries += pair_queries[::2]
                responses += pair_responses
                paired.append(pair + i * args.num_samples)
                # ln pi_t of the pair: with pi_0 computed above for every response; without (gamma = 0), r needed
                # none, and only the pair's 2 responses get a pass (2 of N)
                tic = time.time()
                logprobs.append(out["logprobs"][pair] if ref_policy is not None else sequence_logprobs(
                    raw_policy, None, pair_queries, pair_responses, 2 * args.per_device_train_batch_size, args,
                    device)[0])
                seconds["logprobs"] += time.time() - tic
                samples.append({k: out[k] for k in ["scores", "kl", "rewards", "contains_eos", "lengths"] if k in out})
        rollout = {k: torch.cat([s[k] for s in samples]) for k in samples[0]}
        paired, logprobs = torch.cat(paired), torch.cat(logprobs)
        rewards = rollout["rewards"][paired]
        # --drop_truncated: a pair with a response that never ends its turn is left out of the regression
        trained_on = rollout["contains_eos"][paired].view(-1, 2).all(1) if args.drop_truncated else \
            torch.ones(args.local_batch_size, dtype=torch.bool, device=device)
        rollout_time = time.time() - rollout_start

        # 3. Solve the regression of Eq. (1) by `num_epochs` passes of AdamW over shuffled minibatches of pairs
        update_start = time.time()
        if args.lr_schedule == "cosine":  # each iteration a fresh regression: no AdamW moments from the last one
            optimizer.state.clear()
        stats = {k: torch.zeros(args.num_epochs, args.num_minibatches, args.gradient_accumulation_steps, device=device)
                 for k in ["loss", "approxkl", "entropy"]}  # per micro-step, read by name when logging
        grad_norms = torch.zeros(args.num_epochs, args.num_minibatches, device=device)
        # on the CPU: the micro-batches are packed from token lists, and reading indices off a GPU would sync each time
        permutations = torch.stack([torch.randperm(args.local_batch_size, generator=shuffle_generator)
                                    for _ in range(args.num_epochs)])
        # the pairs trained on in each minibatch, over all ranks (one all_reduce): each minibatch's loss is their mean,
        # and a minibatch without any makes no optimizer step (AdamW would still move the weights: momentum, decay)
        num_trained_on = trained_on[permutations.to(device)].view(args.num_epochs, args.num_minibatches, -1).sum(-1)
        if distributed:
            dist.all_reduce(num_trained_on)
        ran, num_trained_on = num_trained_on > 0, num_trained_on.tolist()
        for epoch in range(args.num_epochs):
            for minibatch in range(args.num_minibatches):
                optimizer.param_groups[0]["lr"] = learning_rate(args, update, epoch * args.num_minibatches + minibatch)
                if num_trained_on[epoch][minibatch] == 0:
                    continue
                minibatch_pairs = permutations[epoch, minibatch * local_minibatch: (minibatch + 1) * local_minibatch]
                for micro in range(args.gradient_accumulation_steps):
                    first = micro * args.per_device_train_batch_size
                    pairs = minibatch_pairs[first: first + args.per_device_train_batch_size]
                    seqs = (2 * pairs[:, None] + torch.arange(2)).flatten()
                    policy.require_backward_grad_sync = micro == args.gradient_accumulation_steps - 1  # DDP (see above)
                    query_responses, attention_mask, context_length, response_mask = pack(
                        [queries[p] for p in pairs.tolist() for _ in range(2)], [responses[s] for s in seqs.tolist()],
                        args.pad_token_id, device)
                    with autocast:
                        new_logprobs, entropy = response_logprobs(policy, query_responses, attention_mask,
                                                                  context_length, args.temperature, epoch == 0)
                    new_logprobs = (new_logprobs * response_mask).sum(1)
                    losses = rebel_loss(new_logprobs.view(-1, 2), logprobs[seqs].view(-1, 2), rewards[seqs].view(-1, 2),
                                        eta)
                    # its share of the minibatch's mean (the ranks' gradients are averaged, hence the world size)
                    loss = (losses * trained_on[pairs]).sum() * args.world_size / num_trained_on[epoch][minibatch]
                    loss.backward()
                    with torch.no_grad():
                        at = epoch, minibatch, micro
                        stats["loss"][at] = loss
                        stats["approxkl"][at] = 0.5 * (new_logprobs - logprobs[seqs]).pow(2).mean()
                        if epoch == 0:  # a metric, first epoch only: pi_t's entropy when --num_minibatches is 1
                            stats["entropy"][at] = (entropy * response_mask).sum() / response_mask.sum()
                grad_norm = nn.utils.clip_grad_norm_(trainable, float("inf"))  # measured, not clipped
                grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
                grad_norms[epoch, minibatch] = grad_norm
                if not torch.isfinite(grad_norm):  # the same on every rank (reduced gradients): no step on NaN
                    raise FloatingPointError(f"update {update}: non-finite loss or gradient norm ({grad_norm.item()}); "
                                             "stopped before the step: start again with a lower --lr")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        update_time = time.time() - update_start

        # 4. Log (means over ranks; one synchronisation per iteration), evaluate, checkpoint
        gaps = rewards[0::2] - rewards[1::2]  # tied pairs are kept: their term pulls the two log-ratios together
        metrics = {"update": update, "episode": episode, **mean_over_ranks({
            "objective/scores": rollout["scores"].mean(),
            **({"objective/kl": rollout["kl"].mean()} if ref_policy is not None else {}),
            "objective/rewards": rewards.mean(),  # the pairs' (the regression's rows), not all N samples'
            "objective/eos_share": rollout["contains_eos"].float().mean(),
            "objective/response_length": rollout["lengths"].mean(), "objective/tied_share": (gaps == 0).float().mean(),
            "objective/reward_gap": gaps.abs().mean(), "objective/dropped_share": 1 - trained_on.float().mean(),
            # over the minibatches that ran (NaN if all pairs were dropped)
            "rebel/loss": stats["loss"].sum(-1)[ran].mean(), "rebel/approxkl": stats["approxkl"][ran].mean(),
            "policy/entropy": stats["entropy"][0][ran[0]].mean(),
            "rebel/loss_first_epoch": stats["loss"][0].sum(-1)[ran[0]].mean(),
            "rebel/loss_last_epoch": stats["loss"][-1].sum(-1)[ran[-1]].mean(),
            "perf/tokens_per_s": rollout["lengths"].sum() / seconds["generate"],
            "train/grad_norm": grad_norms[ran].mean()}),
            "lr": optimizer.param_groups[0]["lr"], "eta": eta,
            "time/rollout_s": rollout_time, "time/generate_s": seconds["generate"],
            "time/logprobs_s": seconds["logprobs"], "time/reward_s": seconds["reward"], "time/update_s": update_time,
            "episodes_per_s": (episode - start_update * args.batch_size) / (time.time() - start_time),
            "memory/peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        progress.set_postfix({k: f"{metrics[f'objective/{k}']:.3f}" for k in ["scores", "eos_share"]})
        rows = None
        if update % args.eval_every == 0 or update == args.num_updates:
            eval_metrics, rows = evaluate(raw_policy, ref_policy, reward_model, tokenizer, eval_data, args, device, autocast)
            metrics.update(eval_metrics)
        log(metrics, rows)

        if args.save_every and update % args.save_every == 0:
            save_checkpoint(f"{run_dir}/checkpoint", policy, optimizer, shuffle_generator, update, args, rank)

    # the trained policy in Hugging Face format, loadable with AutoModelForCausalLM.from_pretrained, with the SFT
    # model's generation config (its end-of-turn tokens): with frozen layers the model itself (DDP replicates it on
    # every rank); else the full weights, gathered from the shards
    if frozen and master:
        raw_policy.save_pretrained(f"{run_dir}/model")
    elif not frozen:
        model_state = get_state_dict(raw_policy, [], options=StateDictOptions(full_state_dict=True, cpu_offload=True))[0]
        if master:
            with torch.device("meta"):  # save_pretrained writes the state dict it is given: a weightless model serves
                model = AutoModelForCausalLM.from_config(raw_policy.config)
            model.generation_config = raw_policy.generation_config
            model.save_pretrained(f"{run_dir}/model", state_dict=model_state)
    if master:
        tokenizer.save_pretrained(f"{run_dir}/model")
        summary = {k: v for k, v in metrics.items()
                   if k.startswith(("eval/", "objective/", "time/", "memory/", "perf/"))}
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
