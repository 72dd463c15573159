# REBEL for a latent consistency model with the LAION aesthetic reward: Gao et al., "REBEL: Reinforcement Learning via
# Regressing Relative Rewards", NeurIPS 2024, Algorithm 1 and Eq. (1), Section 5.3, Appendix H.3. Single file, CleanRL
# style; the authors' implementation is Owen-Oertell/rlcm.
#   python rebel_lcm.py --tiny                                   # tiny random models, CPU, about a minute
#   torchrun --nproc_per_node 4 rebel_lcm.py --aesthetic_head_path sac+logos+ava1-l14-linearMSE.pth   # the paper's run
import contextlib
import itertools
import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from diffusers import LatentConsistencyModelPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (sampling seeds are offset by rank)"""
    track: bool = False
    """log to Weights and Biases (the same keys as metrics.jsonl, and the image grids)"""
    wandb_project: str = "rebel_lcm"
    """the wandb project"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    tiny: bool = False
    """tiny random models (tiny.py, written where the model flags point if missing), on CPU in about a minute: TINY's
    values (below Args) become the defaults; flags given still win"""

    # models and prompts (App. H.3.1-H.3.2); a hub ID or a local path
    model: str = "SimianLuo/LCM_Dreamshaper_v7"
    """the latent consistency model: a diffusers LatentConsistencyModelPipeline, its LCMScheduler predicting eps"""
    clip_model: str = "openai/clip-vit-large-patch14"
    """the CLIP whose image embedding the aesthetic head reads (its vision tower and image processor)"""
    aesthetic_head_path: str = "sac+logos+ava1-l14-linearMSE.pth"
    """a local file: the LAION aesthetic MLP's state dict (christophschuhmann/improved-aesthetic-predictor)"""
    prompts_file: Optional[str] = None
    """a text file with one prompt per line; by default the 45 animals of App. H.3.1"""
    resolution: int = 512
    """image height and width in pixels"""
    num_steps: int = 8
    """horizon: LCM sampling steps per image (App. H.3.3)"""
    timesteps: Literal["rlcm", "diffusers"] = "rlcm"
    """the sampler's timesteps (the paper does not say): the released code's (rlcm_timesteps) or diffusers' >= 0.24"""
    guidance_scale: float = 8.0
    """the guidance scale w fed to the LCM as its guidance embedding (w - 1), as in the released code"""

    # REBEL (Algorithm 1, App. H.3.3)
    eta: float = 1.0
    """eta of Eq. (1)"""
    num_epochs: int = 100
    """epochs; an epoch is `batches_per_epoch` updates and ends with an evaluation"""
    batches_per_epoch: int = 10
    """updates per epoch; each samples a batch, then takes one optimizer step on it"""
    sample_batch_size: int = 8
    """prompts per update on one device; each gets two images"""
    train_batch_size: int = 1
    """pairs per forward/backward; sample_batch_size / train_batch_size of them make one step (8, App. H.3.3)"""
    lr: float = 3e-4
    """AdamW learning rate (constant)"""
    adam_eps: float = 1e-8
    """AdamW epsilon"""
    weight_decay: float = 0.0
    """AdamW weight decay (Section 5 names AdamW, no value; the released code uses Adam, which is AdamW with 0)"""
    max_grad_norm: float = 5.0
    """clip the gradient norm to this before each step (App. H.3.3; the released code clips for PPO only); 0: never"""
    adv_clip_max: float = 10.0
    """clip the normalised rewards to [-adv_clip_max, adv_clip_max] (App. H.3.3, likewise)"""
    stat_buffer_size: int = 32
    """per-prompt reward normalisation: scores of each prompt kept in a rolling buffer of this size (App. H.3.3)"""
    stat_min_count: int = 16
    """a prompt is normalised by its own buffer once it holds this many scores, by the whole batch before"""
    lora_rank: int = 8
    """LoRA rank on the UNet's attention projections to_q, to_k, to_v, to_out.0"""
    lora_alpha: int = 8
    """LoRA alpha; the adapter's output is scaled by lora_alpha / lora_rank"""
    lora_init: Literal["gaussian", "default"] = "gaussian"
    """LoRA's A: N(0, 1/r^2) as the released code, or peft's Kaiming-uniform (B = 0: pi_theta starts as the LCM)"""

    # evaluation and saving
    eval_every: int = 1
    """evaluate every this many epochs, and always before the first update and after the last"""
    eval_prompts: int = 0
    """evaluate on the first this many prompts, one image each from fixed noise; 0 for all"""
    save_every: int = 10
    """write a resumable checkpoint to runs/{run_name}/checkpoint every this many updates (10: an epoch of the
    default --batches_per_epoch), so that a crash loses at most these; 0 for never"""
    resume_from: Optional[str] = None
    """a checkpoint folder to continue from, with the settings it was trained with, in its run's folder"""

    # computed at run time
    world_size: tyro.conf.Suppress[int] = 1
    gradient_accumulation_steps: tyro.conf.Suppress[int] = 0
    num_updates: tyro.conf.Suppress[int] = 0
    """iterations t of Algorithm 1"""


# --tiny: 32 px images, 4 steps, a learning rate that moves a tiny UNet in 30 updates
TINY = dict(model="runs/tiny_lcm/lcm", clip_model="runs/tiny_lcm/clip", aesthetic_head_path="runs/tiny_lcm/head.pth",
            resolution=32, num_steps=4, num_epochs=6, batches_per_epoch=5, sample_batch_size=8, train_batch_size=4,
            lr=2e-2, eval_every=2, eval_prompts=16)

# App. H.3.1: the 45 animal prompts
ANIMALS = ("cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf lizard "
           "beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck goose bee "
           "pig turkey fly llama camel bat gorilla hedgehog kangaroo").split()


def rlcm_timesteps(scheduler, num_steps):
    """The released code's timesteps (diffusers 0.23): of the S timesteps k - 1, ..., S k - 1 (k = 1000 // S) the LCM
    was distilled on, every (S // num_steps)-th from the last: 999, 879, ..., 159 for 8 steps (diffusers': 139)."""
    original_steps = scheduler.config.original_inference_steps
    if num_steps > original_steps:
        raise ValueError(f"--num_steps {num_steps}: more than the {original_steps} timesteps the LCM was distilled on")
    k = scheduler.config.num_train_timesteps // original_steps
    return [original_steps * k - 1 - i * k * (original_steps // num_steps) for i in range(num_steps)]


def encode_prompts(pipeline, prompts, device):
    ids = pipeline.tokenizer(prompts, padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
    return pipeline.text_encoder(ids.to(device))[0]


def lcm_step(unet, scheduler, latents, timesteps, next_timesteps, prompt_embeds, w_embedding):
    """One step of the LCM sampler (Luo et al. 2023, Alg. 3), each latent at its own timestep: the consistency output
    `denoised` and the (mean, std) of x_next ~ N(sqrt(abar_next) denoised, (1 - abar_next) I)."""
    eps = unet(latents, timesteps, timestep_cond=w_embedding, encoder_hidden_states=prompt_embeds).sample.float()
    abar = scheduler.alphas_cumprod.to(latents.device)[timesteps].view(-1, 1, 1, 1)
    abar_next = scheduler.alphas_cumprod.to(latents.device)[next_timesteps].view(-1, 1, 1, 1)
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(timesteps.view(-1, 1, 1, 1))
    x0 = (latents - (1 - abar).sqrt() * eps) / abar.sqrt()  # the UNet predicts epsilon
    denoised = c_out * x0 + c_skip * latents
    return denoised, abar_next.sqrt() * denoised, (1 - abar_next).sqrt()


def gaussian_logprob(x, mean, std):
    """ln N(x; mean, std^2 I), averaged over the latent dimensions (C x h x w), not summed: see `sample`."""
    logprob = -((x - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return logprob.mean(dim=(1, 2, 3))


def sample(unet, scheduler, prompt_embeds, w_embedding, shape, generator):
    """The LCM sampler as a policy: the latents (B, H, C, h, w), their log-probs (B, H - 1), the image's latent. The
    last step draws nothing (its `denoised` is the image; the released code's draw there is noise without reward), so
    ln pi(y|x) sums H - 1 steps, each averaged over the D = C h w dimensions as in the released code: Eq. (1) with
    eta times D, the scale at which the paper's eta = 1 was tuned, at any resolution."""
    timesteps = scheduler.timesteps.to(prompt_embeds.device)
    batch = [len(prompt_embeds)]
    x = randn_tensor(shape, generator=generator, device=prompt_embeds.device) * scheduler.init_noise_sigma
    latents, logprobs = [x], []
    for i, t in enumerate(timesteps):
        t_next = timesteps[min(i + 1, len(timesteps) - 1)]
        denoised, mean, std = lcm_step(unet, scheduler, x, t.repeat(batch), t_next.repeat(batch), prompt_embeds,
                                       w_embedding)
        if i == len(timesteps) - 1:
            break
        x = mean + std * randn_tensor(shape, generator=generator, device=prompt_embeds.device)
        latents.append(x)
        logprobs.append(gaussian_logprob(x, mean, std))
    return torch.stack(latents, 1), torch.stack(logprobs, 1), denoised


def decode(vae, denoised):
    images = vae.decode(denoised.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def trajectory_logprobs(unet, scheduler, latents, prompt_embeds, w_embedding):
    """ln pi_theta(x_i | x_{i-1}) of every recorded transition (B, H - 1), in ONE UNet pass over all of them."""
    num_transitions = latents.shape[1] - 1
    timesteps = scheduler.timesteps.to(latents.device)
    repeat = lambda x: x.repeat_interleave(num_transitions, 0)  # noqa: E731
    _, mean, std = lcm_step(unet, scheduler, latents[:, :-1].flatten(0, 1), timesteps[:-1].repeat(len(latents)),
                            timesteps[1:].repeat(len(latents)), repeat(prompt_embeds), repeat(w_embedding))
    return gaussian_logprob(latents[:, 1:].flatten(0, 1), mean, std).view(len(latents), num_transitions)


def normalize_rewards(scores, prompts, buffers, buffer_size, min_count):
    """(r - mean) / std over the last `buffer_size` scores of its prompt once it has `min_count`, over the batch before
    (App. H.3.3, from DDPO); `buffers` (prompt -> scores) is updated in place."""
    scores = scores.float()
    normalized = torch.empty_like(scores)
    for prompt in sorted(set(prompts)):
        mask = torch.tensor([p == prompt for p in prompts], device=scores.device)
        buffer = buffers.setdefault(prompt, [])
        buffer.extend(scores[mask].tolist())
        del buffer[:-buffer_size]
        reference = torch.tensor(buffer, device=scores.device) if len(buffer) >= min_count else scores
        normalized[mask] = (scores[mask] - reference.mean()) / (reference.std(correction=0) + 1e-6)
    return normalized


def rebel_loss(logprobs, old_logprobs, rewards, eta):
    """Eq. (1) times eta^2 for a batch of pairs: columns 0 and 1 hold y and y' (sequence log-probs, rewards).
      ( (1/eta) (ln pi_theta(y|x)/pi_t(y|x) - ln pi_theta(y'|x)/pi_t(y'|x)) - (r(x,y) - r(x,y')) )^2
    Multiplying by eta^2 gives the released code's form; the minimiser is the same."""
    ratios = logprobs - old_logprobs
    return ((ratios[:, 0] - ratios[:, 1]) - eta * (rewards[:, 0] - rewards[:, 1])).pow(2).mean()


# ---- infrastructure: the reward model, start-up checks, checkpoints, evaluation ----

def aesthetic_mlp():
    """The LAION aesthetic predictor's head: 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (dropout is off in eval mode)."""
    return nn.Sequential(nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1)).eval()


class AestheticScorer(nn.Module):
    """r(x, y): the LAION aesthetic score of images in [0, 1]: CLIP image embedding, L2-normalised, into the MLP."""

    def __init__(self, vision, processor, head):
        super().__init__()
        self.vision, self.head = vision, head
        self.size = (processor.crop_size["height"], processor.crop_size["width"])
        self.register_buffer("mean", torch.tensor(processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(processor.image_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images):
        # float32 also under bf16 autocast, as the released code: bf16's steps (1/32 between 4 and 8) are coarser than
        # the score differences Eq. (1) regresses on. CLIP's preprocessing of square images, batched on the device
        with torch.autocast(images.device.type, enabled=False):
            pixels = F.interpolate(images.float(), size=self.size, mode="bicubic", antialias=True).clamp(0, 1)
            embeds = self.vision(pixel_values=(pixels - self.mean) / self.std).image_embeds
            return self.head(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(-1)


def load_aesthetic_scorer(args):
    """The reward model in float32 (CLIP ViT-L/14's vision tower, 0.3B parameters, and the MLP)."""
    state = torch.load(args.aesthetic_head_path, map_location="cpu", weights_only=True)  # no pickled code runs
    head = aesthetic_mlp()
    head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    vision = CLIPVisionModelWithProjection.from_pretrained(args.clip_model, dtype=torch.float32)
    scorer = AestheticScorer(vision, CLIPImageProcessor.from_pretrained(args.clip_model), head)
    return scorer.eval().requires_grad_(False)


# flags that may be 0 (0 for none, never, all) and fields computed later; any other number must be positive
ZERO_ALLOWED = {"seed", "weight_decay", "max_grad_norm", "eval_prompts", "save_every", "gradient_accumulation_steps",
                "num_updates"}


def check_args(args):
    """Bad input fails at start-up, before any model loads, naming the flag or path."""
    for name, value in asdict(args).items():
        if type(value) in (int, float) and value <= 0 and (value < 0 or name not in ZERO_ALLOWED):
            raise ValueError(f"--{name} must be {'at least 0' if name in ZERO_ALLOWED else 'positive'}, got {value}")
        file = name in ("aesthetic_head_path", "prompts_file")  # local files; a model may be a hub ID, "owner/name"
        if (file or name.endswith("model")) and isinstance(value, str) and not os.path.exists(value) and (
                file or value.startswith((".", "/", "~")) or value.count("/") > 1):
            raise FileNotFoundError(f"--{name} {value}: no such local file or folder")
    if args.num_steps < 2:  # the last step is not trained: one step leaves nothing
        raise ValueError(f"--num_steps {args.num_steps}: the last sampling step is not trained, so at least 2")


def new_run_dir(name):
    """runs/{name}, or runs/{name}_2, ... when that exists (runs started in the same second): never another run's."""
    for i in itertools.count(1):
        with contextlib.suppress(FileExistsError):
            os.makedirs(run_dir := f"runs/{name}" + (f"_{i}" if i > 1 else ""))
            return run_dir


# what a resumed run may change: evaluation, saving, tracking, and num_epochs (the learning rate is constant: a run
# may be extended), with what is computed from them
RESUMABLE = {"exp_name", "track", "wandb_project", "wandb_entity", "tiny", "eval_every", "eval_prompts", "save_every",
             "resume_from", "num_epochs", "num_updates"}


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


def save_checkpoint(path, unet, optimizer, generator, update, args, rank, **extra):
    """The LoRA weights and one dict: update, arguments, optimizer, every rank's generator, `extra` (reward buffers).
    The new checkpoint is whole before the old one goes: at any instant, `path` or `path`.old holds a whole one."""
    rngs = [generator.get_state()] * args.world_size  # every rank's, for rank 0 to write
    if dist.is_initialized():
        dist.all_gather_object(rngs, generator.get_state())
    if rank == 0:
        shutil.rmtree(f"{path}.tmp", ignore_errors=True)
        os.makedirs(f"{path}.tmp")
        save_file({k: v.cpu().contiguous() for k, v in unet.state_dict().items() if "lora_" in k},
                  f"{path}.tmp/model.safetensors")
        torch.save(dict(update=update, args=asdict(args), optimizer=optimizer.state_dict(), rng=rngs, **extra),
                   f"{path}.tmp/state.pt")
        for file in os.listdir(f"{path}.tmp"):  # on disk before the renames, so that a power loss keeps one too
            with open(f"{path}.tmp/{file}", "rb") as f:
                os.fsync(f.fileno())
        if os.path.exists(path):
            shutil.rmtree(f"{path}.old", ignore_errors=True)
            os.rename(path, f"{path}.old")
        os.rename(f"{path}.tmp", path)
        shutil.rmtree(f"{path}.old", ignore_errors=True)


def load_checkpoint(path, unet, optimizer, generator, rank):
    """The inverse of save_checkpoint; returns the saved dict."""
    state = torch.load(f"{path}/state.pt", weights_only=True)
    weights, trainable = load_file(f"{path}/model.safetensors"), {k for k in unet.state_dict() if "lora_" in k}
    if set(weights) != trainable:
        raise ValueError(f"{path}/model.safetensors holds {len(set(weights) - trainable)} weights this model does "
                         f"not train and lacks {len(trainable - set(weights))} that it does")
    unet.load_state_dict(weights, strict=False)  # the LoRA weights alone (checked above)
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["rng"][rank])
    return state


def mean_over_ranks(metrics):
    """{name: scalar tensor} -> {name: float}, each averaged over the ranks, with one all_reduce for all of them."""
    values = torch.stack([v.float() for v in metrics.values()]) / (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_reduce(values)
    return dict(zip(metrics, values.tolist()))


def image_grid(rows, columns=8, width=192):
    """The evaluation images, each with its prompt and score (upscaled so that tiny images stay visible)."""
    size = max(width, rows[0]["image"].shape[1])
    columns = min(columns, len(rows))
    grid = Image.new("RGB", (columns * size, math.ceil(len(rows) / columns) * (size + 30)), "white")
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        x, y = i % columns * size, i // columns * (size + 30)
        grid.paste(Image.fromarray(row["image"]).resize((size, size), Image.NEAREST), (x, y))
        draw.text((x + 4, y + size + 2), f"{row['prompt'][:28]}\n{row['score']:.2f}", fill="black")
    return grid


def evaluate(pipeline, scorer, prompts, w_embedding, args, device, autocast):
    """One image per evaluation prompt from noise seeded by its index (the same at every evaluation, for any number of
    ranks), its aesthetic score, and the rows of the image grid."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    indices = list(range(rank, args.eval_prompts, args.world_size))
    rows = []
    with torch.no_grad(), autocast:
        for start in range(0, len(indices), 2 * args.sample_batch_size):
            chunk = indices[start: start + 2 * args.sample_batch_size]
            embeds = encode_prompts(pipeline, [prompts[i] for i in chunk], device)
            shape = (len(chunk), pipeline.unet.config.in_channels, *[args.resolution // pipeline.vae_scale_factor] * 2)
            _, _, denoised = sample(pipeline.unet, pipeline.scheduler, embeds, w_embedding[: len(chunk)], shape,
                                    [torch.Generator().manual_seed(args.seed + i) for i in chunk])
            images = decode(pipeline.vae, denoised)
            scores = scorer(images)
            pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            rows += [dict(index=i, prompt=prompts[i], score=s, image=p)
                     for i, s, p in zip(chunk, scores.tolist(), pixels)]
    if dist.is_initialized():
        gathered_rows = [None] * args.world_size
        dist.all_gather_object(gathered_rows, rows)
        rows = sorted(sum(gathered_rows, []), key=lambda r: r["index"])
    return {"eval/scores": float(np.mean([r["score"] for r in rows]))}, rows


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
    frozen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    # start-up checks, all before any model loads: flags, paths, the prompts, the checkpoint's settings
    if args.tiny and master:
        import tiny  # test scaffolding, next to this file
        tiny.write_lcm(args)
    if distributed:
        dist.barrier()
    check_args(args)
    args.num_updates = args.num_epochs * args.batches_per_epoch
    args.gradient_accumulation_steps = args.sample_batch_size // args.train_batch_size
    if args.gradient_accumulation_steps * args.train_batch_size != args.sample_batch_size:
        raise ValueError(f"--sample_batch_size {args.sample_batch_size} must be a multiple of --train_batch_size "
                         f"{args.train_batch_size}")
    prompts = ANIMALS
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts_file {args.prompts_file}: no prompt in it")
    args.eval_prompts = min(args.eval_prompts, len(prompts)) or len(prompts)  # 0 and more than all: all
    checkpoint_dir = find_checkpoint(args.resume_from, args) if args.resume_from else None

    if device.type == "cpu":  # denormal floats make small random models several times slower on CPU
        torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)  # the same LoRA initialisation on every rank
    # this rank's prompts and sampling noise, 100,003 (a prime) apart: runs whose seeds differ by less share none
    generator = torch.Generator().manual_seed(args.seed + 100_003 * rank)

    # models: the LCM pipeline pi_theta (LoRA on the UNet's attention, everything else frozen) and the reward model
    pipeline = LatentConsistencyModelPipeline.from_pretrained(args.model, dtype=frozen_dtype, safety_checker=None,
                                                              requires_safety_checker=False).to(device)
    scheduler, unet = pipeline.scheduler, pipeline.unet
    if scheduler.config.prediction_type != "epsilon" or scheduler.config.clip_sample or scheduler.config.thresholding:
        raise ValueError(f"--model {args.model}: the sampler here needs an epsilon-prediction LCMScheduler without "
                         f"clipping or thresholding; found {dict(scheduler.config)}")
    rlcm = rlcm_timesteps(scheduler, args.num_steps) if args.timesteps == "rlcm" else None
    scheduler.set_timesteps(None if rlcm else args.num_steps, timesteps=rlcm, device=device)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)  # read at every step: no copy to the GPU each time
    for module in [pipeline.unet, pipeline.vae, pipeline.text_encoder]:
        module.requires_grad_(False).eval()
    unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                                init_lora_weights="gaussian" if args.lora_init == "gaussian" else True,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    trainable = [p for p in unet.parameters() if p.requires_grad]  # the LoRA weights
    for p in trainable:  # in float32, the frozen weights in frozen_dtype
        p.data = p.data.float()
    # DDP's gradients are views into its all-reduce buckets, not a second copy of them
    ddp = dict(device_ids=[local_rank] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    policy = DDP(unet, **ddp) if distributed else unet
    scorer = load_aesthetic_scorer(args).to(device)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, eps=args.adam_eps, weight_decay=args.weight_decay)
    w_embedding = pipeline.get_guidance_scale_embedding(  # of w - 1 (diffusers' convention), the same for all images
        torch.full((2 * args.sample_batch_size,), args.guidance_scale - 1.0), unet.config.time_cond_proj_dim).to(device)
    latent_shape = (2 * args.sample_batch_size, unet.config.in_channels,
                    *[args.resolution // pipeline.vae_scale_factor] * 2)

    # the run folder, once everything has loaded: the checkpoint's, or a new one (rank 0's name on every rank)
    run_dir = [os.path.dirname(os.path.abspath(checkpoint_dir)) if checkpoint_dir else
               new_run_dir(f"lcm__{args.exp_name}__{args.seed}__{int(time.time())}") if master else None]
    if distributed:
        dist.broadcast_object_list(run_dir)
    run_dir = run_dir[0]
    if master:
        os.makedirs(f"{run_dir}/images", exist_ok=True)
        print(json.dumps(asdict(args), indent=1))
        with open(f"{run_dir}/args.json", "w") as f:  # what the run was started with, for plot_runs.py's grouping
            json.dump(asdict(args), f, indent=1)
        if args.track:
            import wandb
            wandb.init(project=args.wandb_project, entity=args.wandb_entity, config=asdict(args),
                       name=os.path.basename(run_dir), save_code=True)
    state = load_checkpoint(checkpoint_dir, unet, optimizer, generator, rank) if checkpoint_dir else {}
    start_update, buffers, metrics = state.get("update", 0), state.get("reward_buffers", {}), {}
    if checkpoint_dir and master:  # forget what the interrupted run logged after its checkpoint, and a torn last line
        with open(f"{run_dir}/metrics.jsonl") as f:
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["update"] <= start_update]
        with open(f"{run_dir}/metrics.jsonl.tmp", "w") as f:  # replaced whole: a crash here loses no line
            f.writelines(kept)
        os.replace(f"{run_dir}/metrics.jsonl.tmp", f"{run_dir}/metrics.jsonl")
        metrics = json.loads(kept[-1])  # the summary, if the loop has nothing left to do

    def log(metrics, rows=None):
        if not master:
            return
        with open(f"{run_dir}/metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if rows:
            grid = image_grid(rows)
            grid.save(f"{run_dir}/images/update{metrics['update']}.png")
        if args.track:
            images = {"eval/images": wandb.Image(grid, caption=f"update {metrics['update']}")} if rows else {}
            wandb.log({**metrics, **images}, step=metrics["update"])

    if start_update == 0:  # the LCM's evaluation, the "before" of the run
        eval_metrics, rows = evaluate(pipeline, scorer, prompts, w_embedding, args, device, autocast)
        log({"update": 0, "epoch": 0, "reward_queries": 0, **eval_metrics}, rows)

    progress = tqdm(range(start_update + 1, args.num_updates + 1), disable=not master, desc="updates")
    for update in progress:
        # 1. Collect D_t = {x, y, y'} with y, y' ~ pi_t(.|x) (Algorithm 1, line 5; mu = pi_t as in Section 5): two
        #    images per prompt with independent noise, rows 2i and 2i+1, sampled in one batch; then their scores.
        sampling_start = time.time()
        prompt_ids = torch.randint(len(prompts), (args.sample_batch_size,), generator=generator).repeat_interleave(2)
        with torch.no_grad(), autocast:
            prompt_embeds = encode_prompts(pipeline, [prompts[i] for i in prompt_ids], device)
            latents, logprobs, denoised = sample(unet, scheduler, prompt_embeds, w_embedding, latent_shape, generator)
            scores = scorer(decode(pipeline.vae, denoised))
        logprobs = logprobs.sum(1)  # ln pi_t(y|x): the sum over the stochastic steps
        sampling_time = time.time() - sampling_start

        # 2. r(x, y): the aesthetic score normalised per prompt over all ranks' samples (App. H.3.3), clipped
        # every rank's, in rank order, in one all_gather (prompt indices are exact in float32 below 2^24)
        scores_and_ids = torch.stack([scores.float(), prompt_ids.float().to(device)])
        if distributed:
            parts = [torch.empty_like(scores_and_ids) for _ in range(args.world_size)]
            dist.all_gather(parts, scores_and_ids)
            scores_and_ids = torch.cat(parts, 1)
        all_scores, all_ids = scores_and_ids[0], scores_and_ids[1].long()
        rewards = normalize_rewards(all_scores, [prompts[i] for i in all_ids.tolist()], buffers,
                                    args.stat_buffer_size, args.stat_min_count)
        rewards = rewards.view(args.world_size, -1)[rank].clamp(-args.adv_clip_max, args.adv_clip_max)

        # 3. Regress the log-ratio differences onto eta times the reward differences (Eq. 1): one optimizer step over
        #    the batch (App. H.3.3: one inner epoch). At theta = theta_t the ratios are 0, so the step is
        #    -2 eta^2 sum (r - r') grad(ln pi(y|x) - ln pi(y'|x)) of Eq. (1)
        training_start = time.time()
        losses = torch.zeros(args.gradient_accumulation_steps, device=device)
        for micro in range(args.gradient_accumulation_steps):
            seqs = slice(2 * micro * args.train_batch_size, 2 * (micro + 1) * args.train_batch_size)
            policy.require_backward_grad_sync = micro == args.gradient_accumulation_steps - 1  # DDP: sync at the end
            with autocast:
                new_logprobs = trajectory_logprobs(policy, scheduler, latents[seqs], prompt_embeds[seqs],
                                                   w_embedding[seqs]).sum(1)
            loss = rebel_loss(new_logprobs.view(-1, 2), logprobs[seqs].view(-1, 2), rewards[seqs].view(-1, 2),
                              args.eta)
            (loss / args.gradient_accumulation_steps).backward()
            losses[micro] = loss.detach()
        grad_norm = nn.utils.clip_grad_norm_(trainable, args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
        if not torch.isfinite(grad_norm):  # the same on every rank (DDP averages the gradients): no step on NaN
            raise FloatingPointError(f"update {update}: non-finite loss or gradient norm ({grad_norm.item()}); "
                                     "stopped before the step: start again with a lower --lr")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        training_time = time.time() - training_start

        # 4. Log (means over ranks), evaluate at the end of every `eval_every` epochs, checkpoint
        metrics = {"update": update, "epoch": update / args.batches_per_epoch,
                   "reward_queries": update * args.world_size * len(scores), **mean_over_ranks({
                       "objective/scores": scores.mean(), "objective/scores_std": all_scores.std(correction=0),
                       "rebel/loss": losses.mean(), "train/grad_norm": grad_norm.to(device)}),
                   "lr": optimizer.param_groups[0]["lr"], "time/sampling_s": sampling_time,
                   "time/training_s": training_time, "time/sampling_images_per_s": len(scores) / sampling_time,
                   "time/training_images_per_s": len(scores) / training_time,
                   "memory/peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else
                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        progress.set_postfix({k: f"{metrics[k]:.3f}" for k in ["objective/scores", "rebel/loss"]})
        rows = None
        if update % (args.batches_per_epoch * args.eval_every) == 0 or update == args.num_updates:
            eval_metrics, rows = evaluate(pipeline, scorer, prompts, w_embedding, args, device, autocast)
            metrics.update(eval_metrics)
        log(metrics, rows)

        if args.save_every and update % args.save_every == 0:
            save_checkpoint(f"{run_dir}/checkpoint", unet, optimizer, generator, update, args, rank,
                            reward_buffers=buffers)

    # the LoRA weights in diffusers format: pipeline.load_lora_weights(f"{run_dir}/lora") loads them
    if master:
        LatentConsistencyModelPipeline.save_lora_weights(  # with the LoraConfig, so that alpha / r is kept
            f"{run_dir}/lora", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
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
