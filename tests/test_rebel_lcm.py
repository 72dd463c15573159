"""Specification of rebel_lcm.py: the hand-written sampler is diffusers' LCM sampler on the released code's timesteps,
the training pass recomputes the sampling log-probabilities in one batched UNet call, the aesthetic head loads only
tensors and scores in float32, and the script runs end to end on tiny models (single process and torchrun), raises the
aesthetic score, saves LoRA weights that load with their alpha, resumes (also a finished run), and skips non-finite
steps."""
import glob
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import rebel_lcm
from conftest import read_metrics, run_script


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


def tiny_pipeline(workdir, lora_init="gaussian", lora_alpha=8):
    """The tiny LCM pipeline as the script sets it up: its seed, LoRA on the UNet's attention (peft's init_lora_weights
    `lora_init`), the sampler's timesteps (the released code's)."""
    from diffusers import LatentConsistencyModelPipeline
    from peft import LoraConfig
    torch.manual_seed(1)
    pipeline = LatentConsistencyModelPipeline.from_pretrained(f"{workdir}/runs/tiny_lcm/lcm")
    pipeline.set_progress_bar_config(disable=True)
    pipeline.unet.requires_grad_(False)
    pipeline.unet.add_adapter(LoraConfig(r=8, lora_alpha=lora_alpha, init_lora_weights=lora_init,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    pipeline.scheduler.set_timesteps(timesteps=rebel_lcm.rlcm_timesteps(pipeline.scheduler, 4))  # TINY's num_steps
    return pipeline


def inputs(pipeline, prompts):
    embeds = rebel_lcm.encode_prompts(pipeline, prompts, "cpu")
    w_embedding = pipeline.get_guidance_scale_embedding(torch.full((len(prompts),), 8.0 - 1), 32)
    shape = (len(prompts), 4, 4, 4)  # 32 px images, VAE factor 8
    return embeds, w_embedding, shape


def test_rlcm_timesteps_are_the_released_codes():
    """The released code's LCMScheduler (diffusers 0.23's) for 8 steps of an LCM distilled on 50 of 1000 timesteps
    (that scheduler's defaults, which the released code uses in place of the model's); diffusers' spacing ends lower."""
    from diffusers import LCMScheduler
    scheduler = LCMScheduler(num_train_timesteps=1000, original_inference_steps=50)
    assert rebel_lcm.rlcm_timesteps(scheduler, 8) == [999, 879, 759, 639, 519, 399, 279, 159]
    scheduler.set_timesteps(8)
    assert scheduler.timesteps.tolist() == [999, 879, 759, 639, 499, 379, 259, 139]


@pytest.mark.parametrize("timesteps", ["rlcm", "diffusers"])
def test_sampling_loop_is_the_diffusers_lcm_sampler(workdir, timesteps):
    """The same generator gives the same images as LatentConsistencyModelPipeline: the loop is the real sampler, on
    either schedule of --timesteps."""
    pipeline = tiny_pipeline(workdir)
    schedule = dict(timesteps=rebel_lcm.rlcm_timesteps(pipeline.scheduler, 4)) if timesteps == "rlcm" else \
        dict(num_inference_steps=4)
    prompts = ["cat", "hedgehog", "zebra"]
    with torch.no_grad():
        expected = pipeline(prompts, **schedule, guidance_scale=8.0, output_type="pt",
                            generator=torch.Generator().manual_seed(3)).images
        pipeline.scheduler.set_timesteps(**schedule)
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
    scorer = rebel_lcm.load_aesthetic_scorer(args)
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
        rebel_lcm.load_aesthetic_scorer(args)
    assert not marker.exists()

    args.aesthetic_head_path = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match=r"aesthetic head weights not found at --aesthetic_head_path .*"
                                                r"missing\.pth; download sac\+logos\+ava1-l14-linearMSE\.pth"):
        rebel_lcm.load_aesthetic_scorer(args)


def test_scores_and_rewards_are_float32_inside_the_bf16_autocast(workdir):
    """The policy samples under a bf16 autocast (on GPU); the scores must not be rounded to bf16's steps of 1/32
    between 4 and 8. CPU autocast casts linear layers to bf16 as CUDA's does, so this runs anywhere."""
    scorer = rebel_lcm.load_aesthetic_scorer(rebel_lcm.Args(clip_model=f"{workdir}/runs/tiny_lcm/clip",
                                                            aesthetic_head_path=f"{workdir}/runs/tiny_lcm/head.pth"))
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        scores = scorer(images)
        with torch.autocast("cpu", torch.bfloat16):
            autocast_scores = scorer(images)
    assert scores.dtype == autocast_scores.dtype == torch.float32
    torch.testing.assert_close(autocast_scores, scores, atol=1e-5, rtol=0)
    rewards = rebel_lcm.normalize_rewards(scores.bfloat16(), ["cat", "cat", "dog", "dog"], {}, 32, 16)
    assert rewards.dtype == torch.float32


def test_tiny_defaults_go_under_explicit_flags():
    import tyro
    args = tyro.cli(rebel_lcm.Args, args=["--tiny", "--lr", "0.5"])
    assert args.tiny and args.lr == 0.5
    assert all(getattr(args, key) == value for key, value in rebel_lcm.TINY.items() if key != "lr")
    assert tyro.cli(rebel_lcm.Args, args=["--lr", "0.5"]) == rebel_lcm.Args(lr=0.5)


def test_tiny_assets_are_written_where_the_flags_point(workdir, tmp_path, monkeypatch):
    """An earlier tiny run's assets in ./runs/tiny_lcm do not keep --tiny --model DIR from writing DIR."""
    monkeypatch.chdir(workdir)
    paths = dict(model=tmp_path / "lcm", clip_model=tmp_path / "clip", aesthetic_head_path=tmp_path / "head.pth")
    args = rebel_lcm.Args(tiny=True, **{key: str(path) for key, path in paths.items()})
    rebel_lcm.write_tiny_assets(args)
    written = [paths["model"] / "model_index.json", paths["clip_model"] / "config.json", paths["aesthetic_head_path"]]
    for path in written:
        assert path.exists(), path


def run(workdir, *flags, **kwargs):
    return run_script("rebel_lcm.py", workdir, *flags, **kwargs)


def metrics_of(workdir, exp_name):
    return read_metrics(workdir, f"lcm__{exp_name}")


def lora_config(run_dir):
    """The UNet's LoraConfig saved with the final LoRA weights (what load_lora_weights builds the adapter from)."""
    with safe_open(f"{run_dir}/lora/pytorch_lora_weights.safetensors", "pt") as f:
        return {k.removeprefix("unet."): v for k, v in json.loads(f.metadata()["lora_adapter_metadata"]).items()}


def test_tiny_run_raises_the_aesthetic_score_and_saves(workdir):
    run(workdir, "--exp_name", "e2e")
    run_dir, metrics = metrics_of(workdir, "e2e")
    keys = {"update", "epoch", "reward_queries", "objective/scores", "objective/scores_std", "rebel/loss",
            "rebel/grad_norm", "train/skipped_steps", "lr", "time/sampling_s", "time/training_s",
            "time/sampling_images_per_s", "time/training_images_per_s", "memory/peak_gb"}
    num_updates = rebel_lcm.TINY["num_epochs"] * rebel_lcm.TINY["batches_per_epoch"]
    assert [m["update"] for m in metrics] == list(range(num_updates + 1))
    assert all(keys <= set(m) for m in metrics[1:])
    assert all(m["train/skipped_steps"] == 0 for m in metrics[1:])
    assert metrics[-1]["reward_queries"] == num_updates * 2 * rebel_lcm.TINY["sample_batch_size"]
    evaluations = [m["update"] for m in metrics if "eval/scores" in m]
    assert evaluations == [0, 10, 20, 30]  # before training, then every 2 epochs of 5 updates
    # learning, judged on the evaluation prompts with fixed noise: the score rises, in units of its std (about 1);
    # by 0.45 to 1.0 for seeds 1-3 on one CPU, so 0.3 leaves room for other machines' floating point
    before, after = metrics[0]["eval/scores"], metrics[-1]["eval/scores"]
    assert after > before + 0.3, [m.get("eval/scores") for m in metrics]
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
    config = lora_config(run_dir)  # the defaults: the released code's rank, alpha and Gaussian init
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 8, "gaussian")


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


@pytest.fixture(scope="module")
def finished_run(workdir):
    """A 2-update run with the non-default options and a checkpoint at its last update; its LoRA weights deleted, then
    resumed from that checkpoint: nothing is left to train, and the run must still save them and exit 0."""
    flags = ["--exp_name", "finished", "--num_epochs", "1", "--batches_per_epoch", "2", "--eval_prompts", "2",
             "--save_every", "2", "--lora_alpha", "16", "--lora_init", "default", "--weight_decay", "0.01",
             "--timesteps", "diffusers"]
    run(workdir, *flags)
    (run_dir,) = glob.glob(f"{workdir}/runs/lcm__finished__*")
    shutil.rmtree(f"{run_dir}/lora")
    proc = run(workdir, *flags, "--resume_from", f"{run_dir}/checkpoint")
    return run_dir, proc


def test_resuming_a_finished_run_saves_the_lora_weights(workdir, finished_run):
    run_dir, proc = finished_run
    assert "eval/scores" in proc.stdout  # the summary: the finished run's last metrics
    _, metrics = metrics_of(workdir, "finished")
    assert [m["update"] for m in metrics] == [0, 1, 2]
    saved = load_file(f"{run_dir}/lora/pytorch_lora_weights.safetensors")
    assert saved and all(torch.isfinite(v).all() for v in saved.values())
    config = lora_config(run_dir)
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    optimizer = torch.load(f"{run_dir}/checkpoint/optimizer.pt", weights_only=True)
    assert optimizer["param_groups"][0]["weight_decay"] == 0.01


def test_saved_lora_loads_with_its_alpha(workdir, finished_run):
    """--lora_alpha 16 --lora_rank 8: the adapter's output is scaled by 2. The pipeline with the saved LoRA weights
    computes what the trained UNet computed (the checkpoint's weights in a PEFT UNet with the run's LoraConfig)."""
    run_dir, _ = finished_run
    trained = tiny_pipeline(workdir, lora_init=True, lora_alpha=16).unet
    missing, unexpected = trained.load_state_dict(load_file(f"{run_dir}/checkpoint/model.safetensors"), strict=False)
    assert not unexpected and not any("lora_" in k for k in missing)
    from diffusers import LatentConsistencyModelPipeline
    pipeline = LatentConsistencyModelPipeline.from_pretrained(f"{workdir}/runs/tiny_lcm/lcm")
    pipeline.load_lora_weights(f"{run_dir}/lora")
    scalings = [s for m in pipeline.unet.modules() if hasattr(m, "scaling") for s in m.scaling.values()]
    assert scalings and all(s == 2.0 for s in scalings)
    latents, t, embeds = torch.randn(2, 4, 4, 4), torch.tensor([999, 519]), torch.randn(2, 16, 32)
    w_embedding = pipeline.get_guidance_scale_embedding(torch.full((2,), 7.0), 32)
    with torch.no_grad():
        expected = trained(latents, t, timestep_cond=w_embedding, encoder_hidden_states=embeds).sample
        loaded = pipeline.unet(latents, t, timestep_cond=w_embedding, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=0)


def test_non_finite_steps_are_skipped_and_three_in_a_row_stop_the_run(workdir):
    """A NaN in the aesthetic head makes every score, reward and loss NaN: each optimizer step is skipped and counted,
    the LoRA weights stay the initial ones (the script's seed, the Gaussian init), and the third skip in a row stops
    the run, keeping the checkpoint of update 2."""
    state = torch.load(f"{workdir}/runs/tiny_lcm/head.pth", weights_only=True)
    state["layers.7.bias"] = torch.full_like(state["layers.7.bias"], float("nan"))
    torch.save(state, f"{workdir}/nan_head.pth")
    proc = run(workdir, "--exp_name", "nan", "--aesthetic_head_path", "nan_head.pth", "--num_epochs", "1",
               "--batches_per_epoch", "5", "--eval_prompts", "2", "--save_every", "1", check=False)
    assert proc.returncode != 0
    assert "FloatingPointError: update 3: 3 optimizer steps in a row skipped" in proc.stderr, proc.stderr[-3000:]
    assert "try a lower --lr" in proc.stderr
    run_dir, metrics = metrics_of(workdir, "nan")
    assert [(m["update"], m["train/skipped_steps"]) for m in metrics[1:]] == [(1, 1), (2, 1), (3, 1)]
    with open(f"{run_dir}/checkpoint/state.json") as f:
        assert json.load(f)["update"] == 2
    saved = load_file(f"{run_dir}/checkpoint/model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    initial = {k: v for k, v in tiny_pipeline(workdir).unet.state_dict().items() if "lora_" in k}
    assert saved.keys() == initial.keys() and all(torch.equal(saved[k], initial[k]) for k in saved)
    kaiming = {k: v for k, v in tiny_pipeline(workdir, lora_init=True).unet.state_dict().items() if "lora_A" in k}
    assert not any(torch.equal(saved[k], kaiming[k]) for k in kaiming)  # the default init is the Gaussian one
    optimizer = torch.load(f"{run_dir}/checkpoint/optimizer.pt", weights_only=True)
    assert optimizer["param_groups"][0]["weight_decay"] == 0.0 and not optimizer["state"]  # no step was taken
