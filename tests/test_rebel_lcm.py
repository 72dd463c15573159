"""Specification of rebel_lcm.py: the hand-written sampler is diffusers' LCM sampler, the training pass recomputes the
sampling log-probabilities in one batched UNet call, the aesthetic head loads only tensors, and the script runs end to
end on tiny models (single process and torchrun), raises the aesthetic score, saves loadable LoRA weights, resumes."""
import glob
import json
import os
import pickle
import shutil

import pytest
import torch

import rebel_lcm
from conftest import read_metrics, run_script

ENV = dict(os.environ, OMP_NUM_THREADS="1")  # conftest.py sets HF_HUB_OFFLINE=1 and WANDB_MODE=offline


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """One folder for all runs, so that the tiny models are written once (by the first test that needs them)."""
    path = tmp_path_factory.mktemp("runs")
    cwd = os.getcwd()
    os.chdir(path)
    try:
        rebel_lcm.write_tiny_assets(rebel_lcm.Args(tiny=True, **rebel_lcm.TINY))
    finally:
        os.chdir(cwd)
    return path


def tiny_pipeline(workdir):
    """The tiny LCM pipeline as the script sets it up: LoRA on the UNet's attention, the sampler's timesteps."""
    from diffusers import LatentConsistencyModelPipeline
    from peft import LoraConfig
    pipeline = LatentConsistencyModelPipeline.from_pretrained(f"{workdir}/runs/tiny_lcm/lcm")
    pipeline.set_progress_bar_config(disable=True)
    pipeline.unet.requires_grad_(False)
    pipeline.unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    pipeline.scheduler.set_timesteps(rebel_lcm.TINY["num_steps"])
    return pipeline


def inputs(pipeline, prompts):
    embeds = rebel_lcm.encode_prompts(pipeline, prompts, "cpu")
    w_embedding = pipeline.get_guidance_scale_embedding(torch.full((len(prompts),), 8.0 - 1), 32)
    shape = (len(prompts), 4, 4, 4)  # 32 px images, VAE factor 8
    return embeds, w_embedding, shape


def test_sampling_loop_is_the_diffusers_lcm_sampler(workdir):
    """The same generator gives the same images as LatentConsistencyModelPipeline: the loop is the real sampler."""
    pipeline = tiny_pipeline(workdir)
    prompts = ["cat", "hedgehog", "zebra"]
    with torch.no_grad():
        expected = pipeline(prompts, num_inference_steps=4, guidance_scale=8.0, output_type="pt",
                            generator=torch.Generator().manual_seed(3)).images
        embeds, w_embedding, shape = inputs(pipeline, prompts)
        latents, logprobs, denoised = rebel_lcm.sample(pipeline.unet, pipeline.scheduler, embeds, w_embedding, shape,
                                                       torch.Generator().manual_seed(3))
        images = rebel_lcm.decode(pipeline.vae, denoised)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    assert expected.std() > 0.05  # not a blank image
    # 4 steps: the start noise and 3 sampled latents; the last step draws nothing, so 3 log-probabilities
    assert latents.shape == (3, 4, 4, 4, 4) and logprobs.shape == (3, 3)


def test_training_pass_recomputes_the_sampling_logprobs(workdir):
    pipeline = tiny_pipeline(workdir)
    unet, scheduler = pipeline.unet, pipeline.scheduler
    prompts = ["cat", "cat", "dog", "dog", "fox", "fox"]
    embeds, w_embedding, shape = inputs(pipeline, prompts)
    with torch.no_grad():
        latents, logprobs, _ = rebel_lcm.sample(unet, scheduler, embeds, w_embedding, shape,
                                                torch.Generator().manual_seed(0))
        # each step's value is the Gaussian log-density N(sqrt(abar') denoised, (1 - abar') I), averaged over the
        # latent dimensions; checked here against diffusers' LCMScheduler.step for the first step of trajectory 0
        t, t_next = scheduler.timesteps[0], scheduler.timesteps[1]
        eps = unet(latents[:1, 0], t, timestep_cond=w_embedding[:1], encoder_hidden_states=embeds[:1]).sample
        scheduler._step_index = 0
        denoised = scheduler.step(eps, t, latents[:1, 0], return_dict=False)[1]
        abar_next = scheduler.alphas_cumprod[t_next]
        by_hand = torch.distributions.Normal(abar_next.sqrt() * denoised, (1 - abar_next).sqrt()).log_prob(
            latents[:1, 1]).mean()
        torch.testing.assert_close(logprobs[0, 0], by_hand, atol=1e-5, rtol=0)

    # the training pass: one UNet call over all (trajectory, step) pairs, the same weights: the same values
    recomputed = rebel_lcm.trajectory_logprobs(unet, scheduler, latents, embeds, w_embedding)
    torch.testing.assert_close(recomputed, logprobs, atol=1e-5, rtol=0)
    recomputed.sum().backward()  # gradients reach the LoRA weights, and only them
    lora = [p for p in unet.parameters() if p.requires_grad]
    assert lora and all(p.grad is not None for p in lora)
    assert any(p.grad.abs().sum() > 0 for p in lora)

    with torch.no_grad():  # other LoRA weights: other log-probabilities of the same trajectories
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn_like(p))
        changed = rebel_lcm.trajectory_logprobs(unet, scheduler, latents, embeds, w_embedding)
    assert (changed - logprobs).abs().min() > 1e-4


class Payload:
    """A pickle that runs a shell command when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_aesthetic_head_loads_a_state_dict_and_rejects_pickled_code(workdir, tmp_path):
    head = rebel_lcm.aesthetic_mlp()
    state = {f"layers.{k}": torch.randn_like(v) for k, v in head.state_dict().items()}
    torch.save(state, tmp_path / "head.pth")
    args = rebel_lcm.Args(clip_model=f"{workdir}/runs/tiny_lcm/clip", aesthetic_head_path=str(tmp_path / "head.pth"))
    scorer = rebel_lcm.load_aesthetic_scorer(args, torch.float32)
    assert torch.equal(scorer.head[0].weight, state["layers.0.weight"])
    # the score is the head on the L2-normalised CLIP image embedding
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        embeds = scorer.vision(pixel_values=(images - scorer.mean) / scorer.std).image_embeds
        by_hand = scorer.head(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(-1)
        torch.testing.assert_close(scorer(images), by_hand)

    marker = tmp_path / "pwned"
    torch.save({"layers.0.weight": Payload(marker)}, tmp_path / "evil.pth")
    args.aesthetic_head_path = str(tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        rebel_lcm.load_aesthetic_scorer(args, torch.float32)
    assert not marker.exists()

    args.aesthetic_head_path = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match=r"aesthetic head weights not found at --aesthetic_head_path .*"
                                                r"missing\.pth; download sac\+logos\+ava1-l14-linearMSE\.pth"):
        rebel_lcm.load_aesthetic_scorer(args, torch.float32)


def run(workdir, *flags, **kwargs):
    return run_script("rebel_lcm.py", workdir, *flags, env=ENV, **kwargs)


def metrics_of(workdir, exp_name):
    return read_metrics(workdir, f"lcm__{exp_name}")


def test_tiny_run_raises_the_aesthetic_score_and_saves(workdir):
    run(workdir, "--exp_name", "e2e")
    run_dir, metrics = metrics_of(workdir, "e2e")
    keys = {"update", "epoch", "reward_queries", "objective/scores", "objective/scores_std", "rebel/loss",
            "rebel/grad_norm", "lr", "time/sampling_s", "time/training_s", "time/sampling_images_per_s",
            "time/training_images_per_s", "memory/peak_gb"}
    num_updates = rebel_lcm.TINY["num_epochs"] * rebel_lcm.TINY["batches_per_epoch"]
    assert [m["update"] for m in metrics] == list(range(num_updates + 1))
    assert all(keys <= set(m) for m in metrics[1:])
    assert metrics[-1]["reward_queries"] == num_updates * 2 * rebel_lcm.TINY["sample_batch_size"]
    evaluations = [m["update"] for m in metrics if "eval/scores" in m]
    assert evaluations == [0, 10, 20, 30]  # before training, then every 2 epochs of 5 updates
    # learning, judged on the evaluation prompts with fixed noise: the score rises, in units of its std (about 1)
    before, after = metrics[0]["eval/scores"], metrics[-1]["eval/scores"]
    assert after > before + 0.4, [m.get("eval/scores") for m in metrics]
    for update in evaluations:  # an image grid at every evaluation
        assert os.path.getsize(f"{run_dir}/images/update{update}.png") > 1000

    from diffusers import LatentConsistencyModelPipeline
    pipeline = LatentConsistencyModelPipeline.from_pretrained(f"{workdir}/runs/tiny_lcm/lcm")
    pipeline.set_progress_bar_config(disable=True)
    generate = lambda: pipeline(["cat"], num_inference_steps=4, output_type="pt",  # noqa: E731
                                generator=torch.Generator().manual_seed(0)).images
    base = generate()
    pipeline.load_lora_weights(f"{run_dir}/lora")
    assert not torch.allclose(generate(), base, atol=1e-3)  # the trained adapter changes the images


def test_resume_continues_the_run_exactly(workdir):
    """The first 5 updates of the e2e run with a checkpoint at the end, resumed for 5 more: the e2e run's metrics."""
    run(workdir, "--exp_name", "resumed", "--num_epochs", "1", "--save_every", "5")
    (checkpoint,) = glob.glob(f"{workdir}/runs/lcm__resumed__*/checkpoint")
    with open(f"{checkpoint}/state.json") as f:
        assert json.load(f)["update"] == 5
    run(workdir, "--exp_name", "resumed", "--num_epochs", "2", "--resume_from", checkpoint)
    _, resumed = metrics_of(workdir, "resumed")
    if not glob.glob(f"{workdir}/runs/lcm__e2e__*"):
        run(workdir, "--exp_name", "e2e")
    _, straight = metrics_of(workdir, "e2e")
    assert [m["update"] for m in resumed] == list(range(11))
    for a, b in zip(straight, resumed):
        for key in a:
            if not key.startswith(("time/", "memory/")):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a["update"])


def test_torchrun_two_processes_with_a_prompts_file_and_wandb(workdir):
    with open(f"{workdir}/prompts.txt", "w") as f:
        f.write("red fox\n\nblue whale\n")
    run(workdir, "--exp_name", "ddp", "--num_epochs", "1", "--batches_per_epoch", "2", "--eval_prompts", "0",
        "--prompts_file", "prompts.txt", "--track", torchrun=True)
    run_dir, metrics = metrics_of(workdir, "ddp")
    assert [m["update"] for m in metrics] == [0, 1, 2]
    assert metrics[-1]["reward_queries"] == 2 * 2 * 2 * rebel_lcm.TINY["sample_batch_size"]  # updates x ranks x 2 x 8
    assert metrics[-1]["eval/scores"] != metrics[0]["eval/scores"]  # the policy moved
    assert os.path.exists(f"{run_dir}/lora/pytorch_lora_weights.safetensors")
    (run_file,) = glob.glob(f"{workdir}/wandb/offline-run-*/run-*.wandb")
    with open(run_file, "rb") as f:
        logged = f.read()
    for key in [b"objective/scores", b"rebel/loss", b"eval/scores", b"eval/images", b"reward_queries"]:
        assert key in logged
    shutil.rmtree(f"{workdir}/wandb")
