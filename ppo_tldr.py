# PPO on TL;DR, REBEL's baseline (Gao et al., NeurIPS 2024, Section 5.1, Table 1, App. H.1.3-H.1.5), as in the ppo.py of
# summarize_from_feedback_details (Huang et al., 2024). rebel_tldr.py with another algorithm: `diff` the two.
#   python ppo_tldr.py --tiny                                    # tiny random models, CPU, about a minute
#   torchrun --nproc_per_node 8 ppo_tldr.py                      # the paper's 2.8B run
import contextlib
import csv
import glob
import itertools
import json
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from datasets import load_dataset
from huggingface_hub import snapshot_download
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
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer)
from transformers.modeling_layers import GradientCheckpointingLayer


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (sampling seeds are offset by rank)"""
    track: bool = False
    """log to Weights and Biases (the same keys as metrics.jsonl)"""
    wandb_project: str = "rebel_tldr"
    """the wandb project"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    tiny: bool = False
    """tiny models and data (tiny.py, in runs/tiny/), CPU, ~1 minute: TINY's values become defaults, given flags win"""

    # models and data (App. H.1.1-H.1.2); a hub ID or a local path
    sft_model: str = "vwxyzjn/EleutherAI_pythia-2.8b-deduped__sft__tldr"
    """the SFT policy; pi_0 and the initial pi_t"""
    reward_model: str = "vwxyzjn/EleutherAI_pythia-2.8b-deduped__reward__tldr"
    """the reward model: a backbone-plus-scalar-head checkpoint or an AutoModelForSequenceClassification one"""
    dataset: str = "vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144"
    """prompts: text columns `query` and `reference_response`, splits train and validation"""
    trust_remote_code: bool = False
    """allow models with custom code from the hub"""
    query_length: int = 512
    """longest prompt in tokens; longer prompts are dropped, and the count is printed"""
    response_length: int = 53
    """most tokens sampled per response (App. H.1.1); decoding stops early once every response has its EOS"""
    temperature: float = 0.7
    """sampling temperature: the released code's 0.7 (App. H.1.5's table says 0.1); log-probs use the same value"""
    eval_temperature: float = 0.01
    """near-greedy sampling for evaluation, as in the released code"""
    penalty_reward_value: float = -1.0
    """Gamma: the score of a response without EOS within `response_length` tokens (App. H.1.4)"""
    kl_coef: float = 0.05
    """gamma: r = RM(x, y) - gamma * (ln pi_t(y|x) - ln pi_0(y|x)) (Eq. 22)"""

    # PPO (Schulman et al., 2017; App. H.1.5)
    gamma: float = 1.0
    """discount factor of GAE"""
    lam: float = 0.95
    """lambda of GAE"""
    cliprange: float = 0.2
    """epsilon of the clipped policy objective"""
    cliprange_value: float = 0.2
    """how far a value prediction may move from the rollout's value before its loss is clipped"""
    vf_coef: float = 0.1
    """weight of the value loss in the loss"""
    total_episodes: int = 1_000_000
    """prompts to train on in total (the released code's value); updates = total_episodes // batch_size"""
    batch_size: int = 512
    """prompts per update across all ranks; each gets one response"""
    num_epochs: int = 4
    """PPO epochs over each batch"""
    num_minibatches: int = 1
    """optimizer steps per epoch; the released code accumulates over the whole batch, i.e. 1"""
    per_device_train_batch_size: int = 8
    """prompts per forward/backward on one device (gradient accumulation makes up the minibatch), also per no-grad pass"""
    rollout_batch_size: int = 16
    """prompts per generate call on one device; all responses to a prompt come from one call"""
    lr: float = 3e-6
    """AdamW learning rate, decayed linearly: lr (1 - (t - 1) / num_updates) at update t"""
    adam_eps: float = 1e-5
    """AdamW epsilon"""
    lora_rank: int = 1024
    """LoRA rank of the policy and the value network (paper: 1024 for 1.4B/2.8B); 0 trains all of both (paper: 6.9B)"""
    lora_alpha: int = 2048
    """LoRA alpha"""
    gradient_checkpointing: bool = False
    """recompute each layer's activations in the backward pass: less memory for full-parameter runs, more time"""

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
    """iterations t of Algorithm 1"""
    eos_token_id: tyro.conf.Suppress[int] = 0
    pad_token_id: tyro.conf.Suppress[int] = 0
    """filler after the EOS and left of the prompt, always masked: the tokenizer's pad, else EOS"""


# --tiny: a task small enough for a CPU, with a signal strong enough to see learning in ~20 updates
TINY = dict(sft_model="runs/tiny/sft", reward_model="runs/tiny/reward", dataset="runs/tiny/tldr", query_length=128,
            response_length=16, total_episodes=20 * 32, batch_size=32, per_device_train_batch_size=16,
            rollout_batch_size=32, lr=3e-3, lora_rank=8, lora_alpha=16, eval_every=10, eval_samples=64)
TINY.update(total_episodes=10 * 32, lr=6e-3, eval_every=5)  # PPO updates two networks: fewer, larger steps


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


def sample_and_score(model, ref_policy, ref_context, reward_model, queries, query_mask, num_samples,
                     sample_temperature, args):
    """Responses from one generate call at `sample_temperature`, ending at their first EOS; in no-grad micro-batches,
    their per-token log-probs under pi and pi_0 at the training temperature (whatever the sampler's), the sequence KL at
    it and at the sampling one (Table 1's KL of near-greedy samples), the RM score at the EOS, Gamma if none (H.1.4)."""
    context_length = queries.shape[1]
    query_responses, attention_mask = generate(model, queries, query_mask, num_samples, args, sample_temperature)
    eos_index = first_eos(query_responses[:, context_length:], args.eos_token_id)
    response_mask = torch.arange(args.response_length, device=queries.device) <= eos_index[:, None]
    temperatures = tuple(dict.fromkeys([args.temperature, sample_temperature]))  # the training one first, once
    logprobs, ref_logprobs, scores = [], [], []
    micro_batch = args.per_device_train_batch_size * num_samples
    for rows in [slice(i, i + micro_batch) for i in range(0, len(query_responses), micro_batch)]:
        logprobs.append(response_logprobs(model, query_responses[rows], attention_mask[rows], context_length,
                                          temperatures)[0])
        with ref_context():
            ref_logprobs.append(response_logprobs(ref_policy, query_responses[rows], attention_mask[rows],
                                                  context_length, temperatures)[0])
        scores.append(reward_model(query_responses[rows], attention_mask[rows])[:, context_length:])
    logprobs = torch.cat(logprobs, 1) * response_mask  # (temperatures, B, T)
    ref_logprobs = torch.cat(ref_logprobs, 1) * response_mask
    scores = torch.cat(scores).gather(1, eos_index.clamp(max=args.response_length - 1)[:, None]).squeeze(1)
    contains_eos = eos_index < args.response_length
    scores = torch.where(contains_eos, scores, args.penalty_reward_value)
    return dict(query_responses=query_responses, attention_mask=attention_mask, response_mask=response_mask,
                contains_eos=contains_eos, logprobs=logprobs[0], ref_logprobs=ref_logprobs[0], scores=scores,
                kl=(logprobs[0] - ref_logprobs[0]).sum(1), kl_at_sample_temperature=(logprobs[-1] - ref_logprobs[-1]).sum(1))


class PolicyAndValue(nn.Module):
    """The policy and the value network as one module, so that DDP, the optimizer and the checkpoint see one model."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, query_responses, attention_mask, context_length, temperature, with_entropy):
        """ln pi(y_h | x, y_<h) at every response token, as in the rollout, the entropy there if `with_entropy`, and
        the value V(x, y_<h)."""
        logprobs, entropy = response_logprobs(self.policy, query_responses, attention_mask, context_length,
                                              (temperature,), with_entropy)
        return logprobs[0], entropy, self.critic(query_responses, attention_mask)[:, context_length - 1: -1]


def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def masked_whiten(values, mask):
    """(A - mean) / std over the response tokens of the batch; 0 after the EOS."""
    mean = masked_mean(values, mask)
    return (values - mean) * torch.rsqrt(masked_mean((values - mean) ** 2, mask) + 1e-8) * mask


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation over the response tokens (Schulman et al., 2016):
      delta_h = r_h + gamma V(s_h+1) - V(s_h),   A_h = sum_l (gamma lam)^l delta_h+l,   returns = A_h + V(s_h)
    The episode ends at the EOS: rewards, values and advantages are 0 after it, so V(s_after EOS) = 0."""
    rewards, values = rewards * mask, values * mask
    advantages, last = torch.zeros_like(rewards), 0.0
    for h in reversed(range(rewards.shape[1])):
        next_values = values[:, h + 1] if h + 1 < rewards.shape[1] else 0.0
        last = rewards[:, h] + gamma * next_values - values[:, h] + gamma * lam * last
        advantages[:, h] = last
    return advantages * mask, (advantages + values) * mask


def ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, mask, args):
    """The clipped surrogate objective and the clipped value loss, per response token (Schulman et al., 2017):
      L_pi = -min(rho A, clip(rho, 1 - eps, 1 + eps) A),  rho = pi_theta(y_h|x, y_<h) / pi_t(y_h|x, y_<h)
      L_V  = 1/2 max((V - R)^2, (V_t + clip(V - V_t, -eps_V, eps_V) - R)^2)
    returns L_pi + vf_coef L_V averaged over the response tokens, and by name L_pi, L_V and the two clip fractions."""
    ratio = (logprobs - old_logprobs).exp()
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * ratio.clamp(1.0 - args.cliprange, 1.0 + args.cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)
    values_clipped = old_values + (values - old_values).clamp(-args.cliprange_value, args.cliprange_value)
    vf_losses, vf_losses_clipped = (values - returns) ** 2, (values_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), mask)
    clipfrac = masked_mean((pg_losses_clipped > pg_losses).float(), mask)
    vf_clipfrac = masked_mean((vf_losses_clipped > vf_losses).float(), mask)
    return pg_loss + args.vf_coef * vf_loss, dict(pg_loss=pg_loss, vf_loss=vf_loss, clipfrac=clipfrac, vf_clipfrac=vf_clipfrac)


# ---- infrastructure: models, sharding, data, start-up checks, checkpoints, evaluation ----

class ScalarRewardModel(nn.Module):
    """RM(x, y): a scalar head on the backbone's last hidden state, minus a constant bias, at every position."""

    def __init__(self, lm_backbone, scalar_head, bias):
        super().__init__()
        self.lm_backbone, self.scalar_head, self.bias = lm_backbone, scalar_head, bias

    def forward(self, input_ids, attention_mask):
        hidden = self.lm_backbone(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
        return self.scalar_head(hidden).squeeze(-1).float() - self.bias


def load_reward_model(name, dtype, trust_remote_code, meta=False):
    """The reward model `name` in `dtype` on the CPU; with `meta`, its structure alone on the meta device, for the ranks
    that receive the weights from rank 0 (shard_from_rank0)."""
    path = name if os.path.isdir(name) else snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.bin"])
    with open(f"{path}/config.json") as f:
        config = json.load(f)
    with torch.device("meta") if meta else contextlib.nullcontext():
        if "base_config" not in config:  # a standard sequence-classification checkpoint: its `score` head per token
            kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
            if meta:
                model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(
                    path, num_labels=1, trust_remote_code=trust_remote_code), **kwargs)
            else:
                model, loading = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs,
                                                                                     output_loading_info=True)
                if loading["missing_keys"]:  # from_pretrained would draw them at random, with a warning only
                    raise ValueError(f"--reward_model {name}: the checkpoint lacks {sorted(loading['missing_keys'])}")
            return ScalarRewardModel(model.base_model, model.score, 0.0)
        # summarize_from_feedback_details' layout (the paper's RMs): lm_backbone.* and scalar_head.*, config.bias
        backbone = AutoModel.from_config(AutoConfig.for_model(**config["base_config"]), dtype=dtype)
        model = ScalarRewardModel(backbone, nn.Linear(config["hidden_size"], 1, dtype=dtype), config["bias"])
    if not meta:
        state = {}
        for file in sorted(glob.glob(f"{path}/*.safetensors")) or sorted(glob.glob(f"{path}/*.bin")):
            state.update(load_file(file) if file.endswith(".safetensors") else torch.load(file, weights_only=True))
        model.load_state_dict(state)
    return model


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


def load_prompts(args, tokenizer, split, rank):
    try:
        dataset = load_dataset(args.dataset, split=split)
    except StopIteration:  # what datasets raises for an empty data file
        raise ValueError(f"--dataset {args.dataset}: the {split} split is empty") from None
    if missing := {"query", "reference_response"} - set(dataset.column_names):
        raise ValueError(f"dataset {args.dataset} ({split}) lacks column(s) {sorted(missing)}; "
                         f"found {dataset.column_names}")
    # numbers, not `args`, in the transforms: datasets reuses its cache only for what dill can hash, not a script's Args
    eos, response_length, query_length = tokenizer.eos_token_id, args.response_length, args.query_length

    def tokenize(batch):
        references = tokenizer(batch["reference_response"], add_special_tokens=False).input_ids
        return {"query_token": tokenizer(batch["query"], add_special_tokens=False).input_ids,
                "reference_token": [(r if eos in r else r + [eos])[:response_length] for r in references]}

    dataset = dataset.map(tokenize, batched=True)
    n = len(dataset)
    dataset = dataset.filter(lambda x: len(x["query_token"]) <= query_length)
    if len(dataset) == 0:
        raise ValueError(f"--dataset {args.dataset}: no {split} prompt of at most --query_length {query_length} tokens")
    if rank == 0 and len(dataset) < n:
        print(f"{split}: dropped {n - len(dataset)} of {n} prompts longer than --query_length {args.query_length}")
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


def evaluate(policy, ref_policy, ref_context, reward_model, tokenizer, dataset, args, device, autocast):
    """Near-greedy summaries of the validation prompts (split over ranks): RM score, Table 1's KL (at the evaluation
    temperature) and the training one's, win rate against the reference by RM score, EOS share, the sample table."""
    rows, values = [], []  # values: {metric: one per sample} per batch
    with torch.no_grad(), gathered(policy), autocast:
        for i in range(0, len(dataset), args.rollout_batch_size):
            batch = dataset[i: i + args.rollout_batch_size]
            queries, query_mask = pad(batch["query_token"], args.pad_token_id, device)
            out = sample_and_score(policy, ref_policy, ref_context, reward_model, queries, query_mask, 1,
                                   args.eval_temperature, args)
            references, reference_mask = pad(batch["reference_token"], args.pad_token_id, device, left=False)
            reference_scores = reward_model(torch.cat([queries, references], 1), torch.cat([query_mask, reference_mask], 1))
            reference_scores = reference_scores[range(len(queries)), queries.shape[1] + reference_mask.sum(1) - 1]
            values.append({"eval/scores": out["scores"], "eval/kl_at_eval_temperature": out["kl_at_sample_temperature"],
                           "eval/kl_at_train_temperature": out["kl"],
                           "eval/win_rate": out["scores"] > reference_scores, "eval/eos_share": out["contains_eos"]})
            texts = [tokenizer.batch_decode(t, skip_special_tokens=True)  # EOS and the padding after it are special
                     for t in [out["query_responses"][:, queries.shape[1]:], batch["reference_token"]]]
            numbers = torch.stack([out["scores"], reference_scores, out["kl_at_sample_temperature"]]).tolist()
            rows += [dict(query=q, response=r, reference=ref, score=s, reference_score=rs, kl=kl)  # kl: Table 1's, per sample
                     for q, r, ref, s, rs, kl in zip(batch["query"], *texts, *numbers)]
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
        tiny.write_tldr(args)
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
    tokenizer = AutoTokenizer.from_pretrained(args.sft_model, trust_remote_code=args.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--sft_model {args.sft_model}: its tokenizer has no EOS token, which ends every response")
    args.eos_token_id = tokenizer.eos_token_id
    args.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_data = load_prompts(args, tokenizer, "train", rank)
    eval_data = load_prompts(args, tokenizer, "validation", rank)
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

    # models: the policy pi_theta, the reference pi_0 and the reward model; eval() mode turns dropout off. `raw_policy`
    # is the policy itself, for generate and the no-grad passes; `policy` the policy and the value network (initialised
    # from the reward model, App. H.1.3) as trained (DDP or FSDP2)
    lora = args.lora_rank > 0
    fsdp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if distributed and not lora \
        else None  # full-parameter training under torchrun: the policy and pi_0 sharded with FSDP2
    raw_policy = load_policy(args.sft_model, compute_dtype if lora else torch.float32, args, device, rank, fsdp).eval()
    if lora:  # pi_0 is the same weights with the adapter disabled: no second copy
        raw_policy = get_peft_model(raw_policy, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                                                           lora_dropout=0.0))
        ref_policy, ref_context = raw_policy, raw_policy.disable_adapter
    else:
        ref_policy = load_policy(args.sft_model, compute_dtype, args, device, rank, fsdp).eval().requires_grad_(False)
        ref_context = contextlib.nullcontext
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(raw_policy)
    reward_model = load_reward_model(args.reward_model, compute_dtype, args.trust_remote_code,
                                     meta=fsdp is not None and rank > 0).requires_grad_(False).eval()
    # under FSDP2 sharded like pi_0, so that no rank holds a second whole model
    reward_model = shard_from_rank0(reward_model, fsdp, device, rank) if fsdp else reward_model.to(device)
    critic = load_reward_model(args.reward_model, compute_dtype if lora else torch.float32, args.trust_remote_code,
                               meta=fsdp is not None and rank > 0).eval()
    if lora:  # LoRA on the value network's backbone; its scalar head is trained in full, in float32
        critic.lm_backbone = get_peft_model(critic.lm_backbone, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                                                                           lora_dropout=0.0))
        critic.scalar_head.float()
    # under FSDP2 a root of its own, so that `raw_policy.generate` gathers the policy's parameters alone
    critic = shard_from_rank0(critic, fsdp, device, rank) if fsdp else critic.to(device)
    # DDP reduces the gradients on the last micro-step only; FSDP2 reduce-scatters them on every micro-step, since
    # skipping that would keep whole unsharded fp32 gradients on every rank (about 28 GB per GPU at 6.9B)
    # and DDP's gradients are views into its all-reduce buckets, not a second copy of them
    policy = PolicyAndValue(raw_policy, critic)
    ddp = dict(device_ids=[local_rank] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    policy = DDP(policy, **ddp) if distributed and lora else policy
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, eps=args.adam_eps)

    # the run folder, once everything has loaded: the checkpoint's, or a new one (rank 0's name on every rank)
    run_dir = [os.path.dirname(os.path.abspath(checkpoint_dir)) if checkpoint_dir else
               new_run_dir(f"tldr__{args.exp_name}__{args.seed}__{int(time.time())}") if master else None]
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
        if args.track:
            table = {"eval/samples": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])} if rows else {}
            wandb.log({**metrics, **table}, step=metrics["update"])

    metrics = json.loads(kept[-1]) if checkpoint_dir and master else {}  # the summary, if nothing is left to train
    if start_update == 0:  # the SFT policy's evaluation, the "before" of the run
        eval_metrics, rows = evaluate(raw_policy, ref_policy, ref_context, reward_model, tokenizer, eval_data, args,
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
        batch = train_data[order[start + rank * args.local_batch_size: start + (rank + 1) * args.local_batch_size].tolist()]
        queries, query_mask = pad(batch["query_token"], args.pad_token_id, device)
        context_length = queries.shape[1]

        # 1. One response y ~ pi_t(.|x) per prompt, with per-token log-probs under pi_t and pi_0, the RM score, and the
        #    value network's V(x, y_<h) before every response token h
        rollout_start = time.time()
        with torch.no_grad(), gathered(raw_policy), autocast:
            chunks = [sample_and_score(raw_policy, ref_policy, ref_context, reward_model,
                                       queries[i: i + args.rollout_batch_size], query_mask[i: i + args.rollout_batch_size],
                                       1, args.temperature, args)
                      for i in range(0, args.local_batch_size, args.rollout_batch_size)]
        rollout = {key: torch.cat([c[key] for c in chunks]) for key in chunks[0]}
        query_responses, attention_masks, response_masks, logprobs, scores = (rollout[k] for k in [
            "query_responses", "attention_mask", "response_mask", "logprobs", "scores"])
        with torch.no_grad(), autocast:
            values = torch.cat([critic(query_responses[i: i + args.per_device_train_batch_size],
                                       attention_masks[i: i + args.per_device_train_batch_size])[:, context_length - 1: -1]
                                for i in range(0, args.local_batch_size, args.per_device_train_batch_size)]) * response_masks
        # 2. Per-token rewards: -gamma (ln pi_t(y_h|.) - ln pi_0(y_h|.)) at every token (Eq. 22 spread over the tokens),
        #    plus RM(x, y) (Gamma without EOS) at the last one, the EOS; then GAE and whitened advantages
        kl = logprobs - rollout["ref_logprobs"]
        rewards = -args.kl_coef * kl
        rewards[torch.arange(len(rewards), device=device), response_masks.sum(1) - 1] += scores
        advantages, returns = gae(rewards, values, response_masks, args.gamma, args.lam)
        advantages = masked_whiten(advantages, response_masks)
        rollout_time = time.time() - rollout_start

        # 3. `num_epochs` PPO epochs of AdamW over shuffled minibatches, for the policy and the value network together
        update_start = time.time()
        stats = {k: torch.zeros(args.num_epochs, args.num_minibatches, args.gradient_accumulation_steps, device=device)
                 for k in ["pg_loss", "vf_loss", "clipfrac", "vf_clipfrac", "approxkl", "entropy"]}  # per micro-step
        grad_norms = torch.zeros(args.num_epochs, args.num_minibatches, device=device)
        for epoch in range(args.num_epochs):
            permutation = torch.randperm(args.local_batch_size, generator=shuffle_generator).to(device)
            for minibatch in range(args.num_minibatches):
                for micro in range(args.gradient_accumulation_steps):
                    first = minibatch * local_minibatch + micro * args.per_device_train_batch_size
                    seqs = permutation[first: first + args.per_device_train_batch_size]
                    policy.require_backward_grad_sync = micro == args.gradient_accumulation_steps - 1  # DDP (see above)
                    with autocast:
                        new_logprobs, entropy, new_values = policy(query_responses[seqs], attention_masks[seqs],
                                                                   context_length, args.temperature, epoch == 0)
                    loss, loss_stats = ppo_loss(new_logprobs, logprobs[seqs], advantages[seqs], new_values, values[seqs],
                                                returns[seqs], response_masks[seqs], args)
                    (loss / args.gradient_accumulation_steps).backward()
                    with torch.no_grad():
                        at = epoch, minibatch, micro
                        for key, value in loss_stats.items():
                            stats[key][at] = value
                        stats["approxkl"][at] = 0.5 * masked_mean((new_logprobs - logprobs[seqs]).pow(2), response_masks[seqs])
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
            "objective/scores": scores.mean(), "objective/kl": kl.sum(1).mean(), "objective/rewards": rewards.sum(1).mean(),
            "objective/eos_share": rollout["contains_eos"].float().mean(), "ppo/loss/policy": stats["pg_loss"].mean(),
            "ppo/loss/value": stats["vf_loss"].mean(), "ppo/policy/approxkl": stats["approxkl"].mean(),
            "ppo/policy/clipfrac": stats["clipfrac"].mean(), "ppo/val/clipfrac": stats["vf_clipfrac"].mean(),
            "policy/entropy": stats["entropy"][0].mean(), "ppo/val/mean": masked_mean(values, response_masks),
            "train/grad_norm": grad_norms.mean()}), "lr": optimizer.param_groups[0]["lr"],
            "time/rollout_s": rollout_time, "time/update_s": update_time,
            "episodes_per_s": (episode - start_update * args.batch_size) / (time.time() - start_time),
            "memory/peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        progress.set_postfix({k: f"{metrics[f'objective/{k}']:.3f}" for k in ["scores", "kl", "eos_share"]})
        rows = None
        if update % args.eval_every == 0 or update == args.num_updates:
            eval_metrics, rows = evaluate(raw_policy, ref_policy, ref_context, reward_model, tokenizer, eval_data, args,
                                          device, autocast)
            metrics.update(eval_metrics)
        log(metrics, rows)

        if args.save_every and update % args.save_every == 0:
            save_checkpoint(f"{run_dir}/checkpoint", policy, optimizer, shuffle_generator, update, args, rank)

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
