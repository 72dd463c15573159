# REBEL for a latent consistency model with the LAION aesthetic reward: Gao et al., "REBEL: Reinforcement Learning via
# Regressing Relative Rewards", NeurIPS 2024, Algorithm 1 and Eq. (1), Section 5.3, Appendix H.3. Single file, CleanRL
# style; the authors' implementation is Owen-Oertell/rlcm.
#   python rebel_lcm.py --tiny                                   # tiny random models, CPU, about a minute
#   torchrun --nproc_per_node 4 rebel_lcm.py --aesthetic_head_path sac+logos+ava1-l14-linearMSE.pth   # the paper's run
import contextlib
import json
import math
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass
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

# App. H.3.1: the 45 animal prompts
ANIMALS = ("cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf lizard "
           "beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck goose bee "
           "pig turkey fly llama camel bat gorilla hedgehog kangaroo").split()


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
    """write a tiny random-weight LCM pipeline, CLIP vision tower and aesthetic head to runs/tiny_lcm/ (unless they
    exist at --model, --clip_model, --aesthetic_head_path) and train on them, on CPU in about a minute: the TINY
    defaults replace every paper default that no flag changed"""

    # models and prompts (App. H.3.1-H.3.2); a hub ID or a local path
    model: str = "SimianLuo/LCM_Dreamshaper_v7"
    """the latent consistency model: a diffusers LatentConsistencyModelPipeline folder (UNet, VAE, CLIP text encoder,
    tokenizer, LCMScheduler)"""
    clip_model: str = "openai/clip-vit-large-patch14"
    """the CLIP whose image embedding the aesthetic head reads (its vision tower and image processor)"""
    aesthetic_head_path: str = "sac+logos+ava1-l14-linearMSE.pth"
    """the LAION aesthetic predictor's MLP weights (christophschuhmann/improved-aesthetic-predictor), a torch.save
    state dict; loaded with weights_only=True"""
    prompts_file: Optional[str] = None
    """a text file with one prompt per line; by default the 45 animals of App. H.3.1"""
    resolution: int = 512
    """image height and width in pixels"""
    num_steps: int = 8
    """horizon: LCM sampling steps per image (App. H.3.3)"""
    timesteps: Literal["rlcm", "diffusers"] = "rlcm"
    """which `num_steps` timesteps of the LCM's distillation schedule the sampler visits (the paper does not say):
    "rlcm" takes every (50 // num_steps)-th of the 50 counting down from 999, as the released code (999, 879, ...,
    279, 159 for 8 steps); "diffusers" spreads them evenly, as diffusers' LCMScheduler since 0.24 (..., 259, 139)"""
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
    """prompts per update on one device; each gets two images, so 16 reward queries per device per update"""
    train_batch_size: int = 1
    """pairs per forward/backward; gradients accumulate over sample_batch_size / train_batch_size micro-batches
    (8 for the paper's values, App. H.3.3), so that each update is one optimizer step"""
    lr: float = 3e-4
    """AdamW learning rate (constant)"""
    adam_eps: float = 1e-8
    """AdamW epsilon"""
    weight_decay: float = 0.0
    """AdamW weight decay (Section 5 names AdamW, no value; the released code uses Adam, which is AdamW with 0)"""
    max_grad_norm: float = 5.0
    """clip the gradient norm to this before each step (App. H.3.3 lists it for REBEL; the released code uses it only
    for PPO); 0 for no clipping"""
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
    """LoRA initialisation of A (B starts at 0, so the policy starts as the LCM either way): "gaussian" N(0, 1/r^2),
    as the released code; "default" peft's Kaiming-uniform"""

    # evaluation and saving
    eval_every: int = 1
    """evaluate every this many epochs, and always before the first update and after the last"""
    eval_prompts: int = 0
    """evaluate on the first this many prompts, one image each from fixed noise; 0 for all"""
    save_every: int = 0
    """write a resumable checkpoint to runs/{run_name}/checkpoint every this many updates; 0 for never"""
    resume_from: Optional[str] = None
    """a checkpoint folder to continue from; the run goes on in that run's folder"""

    # computed at run time
    world_size: tyro.conf.Suppress[int] = 1
    """number of processes (computed at run time)"""
    gradient_accumulation_steps: tyro.conf.Suppress[int] = 0
    """micro-batches per optimizer step, sample_batch_size / train_batch_size (computed at run time)"""
    num_updates: tyro.conf.Suppress[int] = 0
    """num_epochs * batches_per_epoch (computed at run time)"""

    def __post_init__(self):  # --tiny: TINY's values replace the defaults that no flag changed (to another value)
        for name in [name for name in TINY if self.tiny and getattr(self, name) == getattr(Args, name)]:
            setattr(self, name, TINY[name])


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
        # in float32 also inside the policy's bf16 autocast, as the released code: bf16 has steps of 1/32 between 4
        # and 8, where the scores lie, coarser than the score differences of a pair that Eq. (1) regresses on
        with torch.autocast(images.device.type, enabled=False):
            # CLIP's preprocessing for square images (bicubic resize to the crop size, normalise), batched on the device
            pixels = F.interpolate(images.float(), size=self.size, mode="bicubic", antialias=True).clamp(0, 1)
            embeds = self.vision(pixel_values=(pixels - self.mean) / self.std).image_embeds
            return self.head(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(-1)


def load_aesthetic_scorer(args):
    """The reward model in float32 (CLIP ViT-L/14's vision tower, 0.3B parameters, and the MLP)."""
    if not os.path.isfile(args.aesthetic_head_path):
        raise FileNotFoundError(
            f"aesthetic head weights not found at --aesthetic_head_path {args.aesthetic_head_path}; download "
            "sac+logos+ava1-l14-linearMSE.pth from https://github.com/christophschuhmann/improved-aesthetic-predictor")
    state = torch.load(args.aesthetic_head_path, map_location="cpu", weights_only=True)  # no pickled code runs
    head = aesthetic_mlp()
    head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    vision = CLIPVisionModelWithProjection.from_pretrained(args.clip_model, dtype=torch.float32)
    scorer = AestheticScorer(vision, CLIPImageProcessor.from_pretrained(args.clip_model), head)
    return scorer.eval().requires_grad_(False)


def rlcm_timesteps(scheduler, num_steps):
    """The released code's sampling timesteps (its LCMScheduler, from diffusers 0.23): the LCM was distilled on the
    S = original_inference_steps timesteps k - 1, 2k - 1, ..., S k - 1 (k = 1000 // S); sampling takes every
    (S // num_steps)-th of them counting down from the last: 999, 879, 759, 639, 519, 399, 279, 159 for S = 50 and 8
    steps. diffusers 0.24 (PR #5836) spread them evenly instead, which ends lower (..., 379, 259, 139)."""
    original_steps = scheduler.config.original_inference_steps
    k = scheduler.config.num_train_timesteps // original_steps
    return [original_steps * k - 1 - i * k * (original_steps // num_steps) for i in range(num_steps)]


def encode_prompts(pipeline, prompts, device):
    ids = pipeline.tokenizer(prompts, padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
    return pipeline.text_encoder(ids.to(device))[0]


def lcm_step(unet, scheduler, latents, timesteps, next_timesteps, prompt_embeds, w_embedding):
    """One step of the LCM multistep sampler (Luo et al. 2023, Alg. 3; diffusers' LCMScheduler.step) for a batch of
    latents, each at its own timestep: the consistency function's output `denoised` (the image if this is the last
    step), and the Gaussian the next latent is drawn from, x_next ~ N(sqrt(abar_next) denoised, (1 - abar_next) I)."""
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
    """The LCM sampler as a policy, one batched UNet pass per step for all images. Returns the latents of every step
    (B, H, C, h, w): the start noise x_0 and the H - 1 sampled latents; their log-probabilities (B, H - 1); and the
    last step's `denoised`, which the VAE decodes into the image.
    Which steps carry a log-probability: steps 1..H-1 draw x_i ~ N(sqrt(abar) denoised, (1 - abar) I) and feed x_i to
    the next UNet call. The last step draws nothing: the image is its `denoised`, a deterministic function of x_{H-1}
    (the released code draws a noisy sample there anyway, which never reaches the image, and counts its log-prob;
    that term carries no reward signal, only noise, so we leave it out). ln pi(y|x) is the sum over the H - 1 steps.
    How each step's log-density is reduced: the released code averages it over the latent dimensions, which is the
    exact log-density divided by D = C h w (16384 at 512 px). We follow it: Eq. (1) with the per-dimension average
    is Eq. (1) with the exact log-density and eta multiplied by D, so the paper's eta = 1 was tuned with it, and it
    keeps eta's meaning independent of the resolution."""
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


def trajectory_logprobs(unet, scheduler, latents, prompt_embeds, w_embedding):
    """ln pi_theta(x_i | x_{i-1}) of every recorded transition (B, H - 1), from ONE batched UNet pass over all
    (trajectory, step) pairs (the released code calls the UNet per step and the scheduler per sample)."""
    num_transitions = latents.shape[1] - 1
    timesteps = scheduler.timesteps.to(latents.device)
    repeat = lambda x: x.repeat_interleave(num_transitions, 0)  # noqa: E731
    _, mean, std = lcm_step(unet, scheduler, latents[:, :-1].flatten(0, 1), timesteps[:-1].repeat(len(latents)),
                            timesteps[1:].repeat(len(latents)), repeat(prompt_embeds), repeat(w_embedding))
    return gaussian_logprob(latents[:, 1:].flatten(0, 1), mean, std).view(len(latents), num_transitions)


def decode(vae, denoised):
    images = vae.decode(denoised.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def normalize_rewards(scores, prompts, buffers, buffer_size, min_count):
    """Per-prompt reward normalisation with a rolling buffer (App. H.3.3, from DDPO): a score becomes
    (r - mean) / std over the last `buffer_size` scores of its prompt once the prompt has `min_count` of them, over
    the whole batch before that. `buffers` maps prompt -> list of scores and is updated in place."""
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


def mean_over_ranks(metrics):
    """{name: scalar tensor} -> {name: float}, each averaged over the ranks, with one all_reduce for all of them."""
    values = torch.stack([v.float() for v in metrics.values()]) / (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_reduce(values)
    return dict(zip(metrics, values.tolist()))


def image_grid(rows, columns=8, width=192):
    """The evaluation images in a grid, each with its prompt and score under it (nearest-neighbour upscaled to at
    least `width` pixels so that tiny images stay visible)."""
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
    """One image per evaluation prompt from fixed noise (a generator per image, seeded by its index, so the same
    images at every evaluation and for any number of ranks), its aesthetic score, and the rows of the image grid."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    indices = list(range(rank, min(args.eval_prompts, len(prompts)) or len(prompts), args.world_size))
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
            rows += [dict(index=i, prompt=prompts[i], score=s, image=p) for i, s, p in zip(chunk, scores.tolist(), pixels)]
    if dist.is_initialized():
        gathered_rows = [None] * args.world_size
        dist.all_gather_object(gathered_rows, rows)
        rows = sorted(sum(gathered_rows, []), key=lambda r: r["index"])
    return {"eval/scores": float(np.mean([r["score"] for r in rows]))}, rows


def lora_state_dict(unet):
    return {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items() if "lora_" in k}


def save_checkpoint(path, unet, optimizer, generator, buffers, update, rank):
    """LoRA weights (safetensors), optimizer state, every rank's generator state, the reward buffers and the update
    index. Written beside the last checkpoint, then swapped in: a crash while writing leaves the previous one whole."""
    rng = {"generator": generator.get_state()}
    rngs = [rng] * (dist.get_world_size() if dist.is_initialized() else 1)  # every rank's, for rank 0 to write
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng)
    if rank == 0:
        shutil.rmtree(f"{path}.tmp", ignore_errors=True)
        os.makedirs(f"{path}.tmp")
        save_file(lora_state_dict(unet), f"{path}.tmp/model.safetensors")
        torch.save(optimizer.state_dict(), f"{path}.tmp/optimizer.pt")
        torch.save(rngs, f"{path}.tmp/rng.pt")
        with open(f"{path}.tmp/state.json", "w") as f:
            json.dump({"update": update, "reward_buffers": buffers}, f)
        shutil.rmtree(path, ignore_errors=True)
        os.rename(f"{path}.tmp", path)


def load_checkpoint(path, unet, optimizer, generator, rank):
    missing, unexpected = unet.load_state_dict(load_file(f"{path}/model.safetensors"), strict=False)
    assert not unexpected and not any("lora_" in k for k in missing), (unexpected, missing)
    optimizer.load_state_dict(torch.load(f"{path}/optimizer.pt", weights_only=True))
    generator.set_state(torch.load(f"{path}/rng.pt", weights_only=True)[rank]["generator"])
    with open(f"{path}/state.json") as f:
        state = json.load(f)
    return state["update"], state["reward_buffers"]


# --tiny defaults: 32 px images, 4 steps, a learning rate that moves a tiny UNet in 30 updates
TINY = dict(model="runs/tiny_lcm/lcm", clip_model="runs/tiny_lcm/clip", aesthetic_head_path="runs/tiny_lcm/head.pth",
            resolution=32, num_steps=4, num_epochs=6, batches_per_epoch=5, sample_batch_size=8, train_batch_size=4,
            lr=2e-2, eval_every=2, eval_prompts=16)


def write_tiny_assets(args):
    """A tiny LCM pipeline (UNet, VAE, CLIP text encoder, a character-level CLIPTokenizer built from Python objects,
    LCMScheduler), a tiny CLIP vision tower and a random aesthetic head, written with save_pretrained / torch.save and
    read back by the same code as the real models. 32 px images are 4 x 4 latents (VAE factor 8, as in Stable
    Diffusion). Skipped if all three exist (the head is written last)."""
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig
    if all(map(os.path.exists, [f"{args.model}/model_index.json", f"{args.clip_model}/config.json",
                                args.aesthetic_head_path])):
        return
    torch.manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(letters)},
             **{c + "</w>": 28 + i for i, c in enumerate(letters)}}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=args.resolution // 8, block_out_channels=(16, 32), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8, time_cond_proj_dim=32)
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                        sample_size=args.resolution)
    # a mild noise schedule (abar >= 0.85): with Stable Diffusion's (abar down to 0.005) an untrained UNet's x0
    # prediction would be 1/sqrt(abar) ~ 15 times too large at the first step
    scheduler = LCMScheduler(beta_start=1e-4, beta_end=4e-3, beta_schedule="linear")
    LatentConsistencyModelPipeline(vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False).save_pretrained(args.model)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                            num_attention_heads=4, image_size=32, patch_size=8,
                                                            projection_dim=768))
    vision.save_pretrained(args.clip_model)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(args.clip_model)
    pipeline = LatentConsistencyModelPipeline.from_pretrained(args.model)
    scorer = AestheticScorer(vision, CLIPImageProcessor.from_pretrained(args.clip_model), aesthetic_mlp())
    head = scorer.head
    with torch.no_grad():  # the random head rescaled so that the tiny model's images score 5 +- 1, the real range
        images = pipeline(list(ANIMALS[:32]), num_inference_steps=args.num_steps, guidance_scale=args.guidance_scale,
                          output_type="pt").images
        scores = scorer(images)
        head[-1].weight.div_(scores.std())
        head[-1].bias.sub_(scores.mean()).div_(scores.std()).add_(5.0)
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, args.aesthetic_head_path)


if __name__ == "__main__":
    args = tyro.cli(Args)

    # distributed setup (as nanoGPT): one process per device under torchrun, rank 0 logs and saves
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, args.world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    local_rank = int(os.environ["LOCAL_RANK"]) if distributed else 0
    master = rank == 0
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    frozen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    args.num_updates = args.num_epochs * args.batches_per_epoch
    args.gradient_accumulation_steps = args.sample_batch_size // args.train_batch_size
    if args.gradient_accumulation_steps * args.train_batch_size != args.sample_batch_size:
        raise ValueError(f"--sample_batch_size {args.sample_batch_size} must be a multiple of --train_batch_size "
                         f"{args.train_batch_size}")

    run_dir = os.path.dirname(os.path.abspath(args.resume_from)) if args.resume_from else \
        f"runs/lcm__{args.exp_name}__{args.seed}__{int(time.time())}"
    if distributed:  # one run name on every rank (their messages name it): rank 0's
        run_dir = [run_dir]
        dist.broadcast_object_list(run_dir)
        run_dir = run_dir[0]
    run_name = os.path.basename(run_dir)
    if args.tiny and master:
        write_tiny_assets(args)
    if distributed:
        dist.barrier()
    if master:
        os.makedirs(f"{run_dir}/images", exist_ok=True)
        print(json.dumps(asdict(args), indent=1))
        if args.track:
            import wandb
            wandb.init(project=args.wandb_project, entity=args.wandb_entity, config=asdict(args), name=run_name,
                       save_code=True)

    if device.type == "cpu":  # denormal floats make small random models several times slower on CPU
        torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)  # the same LoRA initialisation on every rank
    generator = torch.Generator().manual_seed(args.seed + rank)  # this rank's prompts and sampling noise

    # models: the LCM pipeline pi_theta (LoRA on the UNet's attention, everything else frozen) and the reward model
    pipeline = LatentConsistencyModelPipeline.from_pretrained(args.model, torch_dtype=frozen_dtype, safety_checker=None,
                                                              requires_safety_checker=False).to(device)
    pipeline.set_progress_bar_config(disable=True)
    if args.timesteps == "rlcm":
        pipeline.scheduler.set_timesteps(timesteps=rlcm_timesteps(pipeline.scheduler, args.num_steps))
    else:
        pipeline.scheduler.set_timesteps(args.num_steps)
    if pipeline.scheduler.config.prediction_type != "epsilon" or pipeline.scheduler.config.clip_sample \
            or pipeline.scheduler.config.thresholding:
        raise ValueError(f"{args.model}: this script's sampler supports an epsilon-prediction LCMScheduler without "
                         f"clipping or thresholding; found {dict(pipeline.scheduler.config)}")
    for module in [pipeline.unet, pipeline.vae, pipeline.text_encoder]:
        module.requires_grad_(False).eval()
    unet = pipeline.unet
    unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                                init_lora_weights="gaussian" if args.lora_init == "gaussian" else True,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    trainable = [p for p in unet.parameters() if p.requires_grad]  # the LoRA weights
    for p in trainable:  # in float32, the frozen weights in frozen_dtype
        p.data = p.data.float()
    policy = DDP(unet, device_ids=[local_rank] if device.type == "cuda" else None) if distributed else unet
    scorer = load_aesthetic_scorer(args).to(device)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, eps=args.adam_eps, weight_decay=args.weight_decay)

    prompts = ANIMALS
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts = [line.strip() for line in f if line.strip()]
    # the LCM's guidance embedding of w - 1 (diffusers' convention), the same for every image
    w_embedding = pipeline.get_guidance_scale_embedding(
        torch.full((2 * args.sample_batch_size,), args.guidance_scale - 1.0),
        embedding_dim=unet.config.time_cond_proj_dim).to(device)
    latent_shape = (2 * args.sample_batch_size, unet.config.in_channels,
                    *[args.resolution // pipeline.vae_scale_factor] * 2)

    start_update, buffers, metrics = 0, {}, {}
    if args.resume_from:
        start_update, buffers = load_checkpoint(args.resume_from, unet, optimizer, generator, rank)
        if master:  # forget what the interrupted run logged after its checkpoint
            with open(f"{run_dir}/metrics.jsonl") as f:
                kept = [line for line in f if json.loads(line)["update"] <= start_update]
            with open(f"{run_dir}/metrics.jsonl", "w") as f:
                f.writelines(kept)
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

    skipped_in_a_row = 0
    progress = tqdm(range(start_update + 1, args.num_updates + 1), disable=not master, desc="updates")
    for update in progress:
        # 1. Collect D_t = {x, y, y'} with y, y' ~ pi_t(.|x) (Algorithm 1, line 5; mu = pi_t as in Section 5): two
        #    images per prompt with independent noise, rows 2i and 2i+1, sampled in one batch; then their scores.
        sampling_start = time.time()
        prompt_ids = torch.randint(len(prompts), (args.sample_batch_size,), generator=generator).repeat_interleave(2)
        prompt_ids = prompt_ids.to(device)
        batch_prompts = [prompts[i] for i in prompt_ids.tolist()]
        with torch.no_grad(), autocast:
            prompt_embeds = encode_prompts(pipeline, batch_prompts, device)
            latents, logprobs, denoised = sample(unet, pipeline.scheduler, prompt_embeds, w_embedding, latent_shape,
                                                 generator)
            scores = scorer(decode(pipeline.vae, denoised))
        logprobs = logprobs.sum(1)  # ln pi_t(y|x): the sum over the stochastic steps
        sampling_time = time.time() - sampling_start

        # 2. r(x, y): the aesthetic score normalised per prompt over all ranks' samples (App. H.3.3), clipped
        # every rank's, in rank order, in one all_gather (prompt indices are exact in float32 below 2^24)
        scores_and_ids = torch.stack([scores.float(), prompt_ids.float()])
        if distributed:
            parts = [torch.empty_like(scores_and_ids) for _ in range(args.world_size)]
            dist.all_gather(parts, scores_and_ids)
            scores_and_ids = torch.cat(parts, 1)
        all_scores, all_ids = scores_and_ids[0], scores_and_ids[1].long()
        rewards = normalize_rewards(all_scores, [prompts[i] for i in all_ids.tolist()], buffers,
                                    args.stat_buffer_size, args.stat_min_count)
        rewards = rewards.view(args.world_size, -1)[rank].clamp(-args.adv_clip_max, args.adv_clip_max)

        # 3. Regress the log-ratio differences onto eta times the reward differences (Eq. 1): one optimizer step
        #    over the batch, accumulated over micro-batches of `train_batch_size` pairs (App. H.3.3: one inner epoch,
        #    accumulation over the whole batch). The training pass runs at theta = theta_t, so the ratios are 0 when the
        #    gradient is taken and the step is -2 eta^2 sum (r - r') grad(ln pi(y|x) - ln pi(y'|x)) of Eq. (1)
        training_start = time.time()
        losses = torch.zeros(args.gradient_accumulation_steps, device=device)
        for micro in range(args.gradient_accumulation_steps):
            seqs = slice(2 * micro * args.train_batch_size, 2 * (micro + 1) * args.train_batch_size)
            policy.require_backward_grad_sync = micro == args.gradient_accumulation_steps - 1  # DDP: sync at the end
            with autocast:
                new_logprobs = trajectory_logprobs(policy, pipeline.scheduler, latents[seqs], prompt_embeds[seqs],
                                                   w_embedding[seqs]).sum(1)
            loss = rebel_loss(new_logprobs.view(-1, 2), logprobs[seqs].view(-1, 2), rewards[seqs].view(-1, 2),
                              args.eta)
            (loss / args.gradient_accumulation_steps).backward()
            losses[micro] = loss.detach()
        grad_norm = nn.utils.clip_grad_norm_(trainable, args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
        # a NaN or inf loss on any rank makes the gradient, which DDP averages, non-finite on every rank: all ranks skip
        # the step together, so the policy never samples from NaN weights
        skipped = not torch.isfinite(grad_norm)
        if not skipped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
        training_time = time.time() - training_start

        # 4. Log (means over ranks), evaluate at the end of every `eval_every` epochs, checkpoint
        metrics = {"update": update, "epoch": update / args.batches_per_epoch,
                   "reward_queries": update * args.world_size * len(scores), **mean_over_ranks({
                       "objective/scores": scores.mean(), "objective/scores_std": scores.std(),
                       "rebel/loss": losses.mean(), "rebel/grad_norm": grad_norm.to(device)}),
                   "train/skipped_steps": int(skipped), "lr": optimizer.param_groups[0]["lr"],
                   "time/sampling_s": sampling_time, "time/training_s": training_time,
                   "time/sampling_images_per_s": len(scores) / sampling_time,
                   "time/training_images_per_s": len(scores) / training_time,
                   "memory/peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else
                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        progress.set_postfix({k: f"{metrics[k]:.3f}" for k in ["objective/scores", "rebel/loss"]})
        epochs_done = update // args.batches_per_epoch
        rows = None
        if (update % args.batches_per_epoch == 0 and epochs_done % args.eval_every == 0) or update == args.num_updates:
            eval_metrics, rows = evaluate(pipeline, scorer, prompts, w_embedding, args, device, autocast)
            metrics.update(eval_metrics)
        log(metrics, rows)
        if skipped_in_a_row == 3:
            raise FloatingPointError(f"update {update}: 3 optimizer steps in a row skipped for a non-finite loss or "
                                     f"gradient norm; the last checkpoint (if any) is kept in {run_dir}/checkpoint; "
                                     f"try a lower --lr (now {args.lr})")

        if args.save_every and update % args.save_every == 0:
            save_checkpoint(f"{run_dir}/checkpoint", unet, optimizer, generator, buffers, update, rank)

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
