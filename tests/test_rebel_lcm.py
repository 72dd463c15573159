"""Specification of rebel_lcm.py: the hand-written sampler is diffusers' LCM sampler on the released code's timesteps,
the training pass recomputes the sampling log-probabilities in one batched UNet call, the aesthetic head loads only
tensors and scores in float32, bad flags and paths fail at start-up, a checkpoint survives a kill during its swap and
refuses weights or settings that do not fit; and the script runs end to end on tiny models (single process and
torchrun), raises the aesthetic score, saves LoRA weights that load with their alpha, resumes exactly (also a finished
run, also after a kill between the checkpoint swap's renames), and stops before a step on a non-finite gradient."""
import dataclasses
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
import tiny
from conftest import checkpoint_update, leave_as_killed_mid_swap, read_metrics, run_script, save_killed_at


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """One folder for all runs, so that the tiny models are written once (by the first test that needs them)."""
    path = tmp_path_factory.mktemp("runs")
    cwd = os.getcwd()
    os.chdir(path)
    try:
        tiny.write_lcm(rebel_lcm.Args(tiny=True, **rebel_lcm.TINY))
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
    with pytest.raises(ValueError, match="--num_steps 51: more than the 50 timesteps the LCM was distilled on"):
        rebel_lcm.rlcm_timesteps(scheduler, 51)


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


def test_rewards_are_normalized_per_prompt_over_its_last_scores():
    """App. H.3.3 (DDPO's per-prompt statistics): over the whole batch until a prompt has --stat_min_count scores,
    then over its last --stat_buffer_size (here 3 and 3)."""
    buffers, std = {}, (8 / 3) ** 0.5  # the population std of 1, 3, 5 (and of 3, 5, 7)
    rewards = rebel_lcm.normalize_rewards(torch.tensor([1.0, 3.0, 10.0, 14.0]), ["cat", "cat", "dog", "dog"], buffers,
                                          3, 3)
    torch.testing.assert_close(rewards, (torch.tensor([1.0, 3.0, 10.0, 14.0]) - 7) / 27.5 ** 0.5)  # the batch's
    rewards = rebel_lcm.normalize_rewards(torch.tensor([5.0, 20.0]), ["cat", "dog"], buffers, 3, 3)
    assert rewards[0].item() == pytest.approx((5 - 3) / std)  # cat's own: 1, 3, 5
    assert rebel_lcm.normalize_rewards(torch.tensor([7.0]), ["cat"], buffers, 3, 3).item() == pytest.approx(2 / std)
    assert buffers == {"cat": [3.0, 5.0, 7.0], "dog": [10.0, 14.0, 20.0]}  # the last 3 of each


@pytest.mark.parametrize("flags, message", [
    (dict(eta=0.0), "--eta must be positive, got 0.0"), (dict(eta=-1.0), "--eta must be positive, got -1.0"),
    (dict(train_batch_size=0), "--train_batch_size must be positive, got 0"),
    (dict(lora_rank=0), "--lora_rank must be positive, got 0"),
    (dict(eval_prompts=-3), "--eval_prompts must be at least 0, got -3"),
    (dict(model="./no/lcm"), "--model ./no/lcm: no such local file or folder"),
    (dict(clip_model="/no/clip"), "--clip_model /no/clip: no such local file or folder"),
    (dict(aesthetic_head_path="missing.pth"), "--aesthetic_head_path missing.pth: no such local file or folder"),
    (dict(prompts_file="prompts.txt"), "--prompts_file prompts.txt: no such local file or folder")])
def test_bad_flags_and_paths_are_named(flags, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sac+logos+ava1-l14-linearMSE.pth").touch()  # the paper's head, where the default points
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        rebel_lcm.check_args(rebel_lcm.Args(**flags))
    rebel_lcm.check_args(rebel_lcm.Args())  # the paper's settings pass (its models are hub IDs)


def tiny_checkpoint(path, update, model, args, buffers):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model["lora_A"](torch.ones(1, 3)).sum().backward()
    optimizer.step()
    rebel_lcm.save_checkpoint(path, model, optimizer, torch.Generator(), update, args, 0, reward_buffers=buffers)


def test_a_kill_at_any_step_of_the_checkpoint_swap_leaves_a_whole_checkpoint(tmp_path, monkeypatch):
    """save_checkpoint killed before each of its file operations (by an exception there): the checkpoint found
    afterwards is whole, the previous update's or the new one's, with that update's weights and reward buffers."""
    args = rebel_lcm.Args()
    outcomes = []
    for kill_at in range(10):
        path = str(tmp_path / str(kill_at) / "checkpoint")
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"lora_A": torch.nn.Linear(3, 2)})
        tiny_checkpoint(path, 1, model, args, {"cat": [1.0]})
        weights = {1: model["lora_A"].weight.detach().clone()}
        save_killed_at(lambda: tiny_checkpoint(path, 2, model, args, {"cat": [1.0, 2.0]}), rebel_lcm, kill_at,
                       monkeypatch)
        weights[2] = model["lora_A"].weight.detach().clone()
        found = rebel_lcm.find_checkpoint(path, args)
        loaded = torch.nn.ModuleDict({"lora_A": torch.nn.Linear(3, 2)})
        state = rebel_lcm.load_checkpoint(found, loaded, torch.optim.AdamW(loaded.parameters()), torch.Generator(), 0)
        torch.testing.assert_close(loaded["lora_A"].weight, weights[state["update"]], atol=0, rtol=0)
        assert len(state["reward_buffers"]["cat"]) == state["update"]
        outcomes.append((state["update"], found.endswith(".old")))
    assert outcomes[0] == (1, False) and outcomes[-1] == (2, False)  # killed at once; not killed
    assert (1, True) in outcomes  # killed between the renames: the previous checkpoint, from checkpoint.old


def test_one_sampling_step_is_refused_naming_the_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default model and head are hub IDs or absent: only the step count is wrong
    args = rebel_lcm.Args(aesthetic_head_path=__file__, num_steps=1)
    with pytest.raises(ValueError, match="--num_steps 1: the last sampling step is not trained, so at least 2"):
        rebel_lcm.check_args(args)
    rebel_lcm.check_args(dataclasses.replace(args, num_steps=2))


def test_weights_or_settings_that_do_not_fit_are_refused(tmp_path):
    path = str(tmp_path / "checkpoint")
    args = rebel_lcm.Args()
    tiny_checkpoint(path, 1, torch.nn.ModuleDict({"lora_A": torch.nn.Linear(3, 2)}), args, {})
    other = torch.nn.ModuleDict({"lora_A": torch.nn.Linear(3, 2), "lora_B": torch.nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="holds 0 weights this model does not train and lacks 2 that it does"):
        rebel_lcm.load_checkpoint(path, other, torch.optim.AdamW(other.parameters()), torch.Generator(), 0)
    # evaluation, saving, tracking and the number of epochs may change; what is trained may not
    assert rebel_lcm.find_checkpoint(path, dataclasses.replace(args, eval_every=3, num_epochs=200, track=True)) == path
    with pytest.raises(ValueError, match="would change what is trained: sample_batch_size 8 -> 4, lora_rank 8 -> 4$"):
        rebel_lcm.find_checkpoint(path, dataclasses.replace(args, sample_batch_size=4, lora_rank=4))


def test_tiny_assets_are_written_where_the_flags_point(workdir, tmp_path, monkeypatch):
    """An earlier tiny run's assets in ./runs/tiny_lcm do not keep --tiny --model DIR from writing DIR."""
    monkeypatch.chdir(workdir)
    paths = dict(model=tmp_path / "lcm", clip_model=tmp_path / "clip", aesthetic_head_path=tmp_path / "head.pth")
    args = rebel_lcm.Args(tiny=True, **{**rebel_lcm.TINY, **{key: str(path) for key, path in paths.items()}})
    tiny.write_lcm(args)
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


@pytest.mark.slow
def test_tiny_run_raises_the_aesthetic_score_and_saves(workdir):
    run(workdir, "--exp_name", "e2e")
    run_dir, metrics = metrics_of(workdir, "e2e")
    keys = {"update", "epoch", "reward_queries", "objective/scores", "objective/scores_std", "rebel/loss",
            "train/grad_norm", "lr", "time/sampling_s", "time/training_s", "time/sampling_images_per_s",
            "time/training_images_per_s", "memory/peak_gb"}
    num_updates = rebel_lcm.TINY["num_epochs"] * rebel_lcm.TINY["batches_per_epoch"]
    assert [m["update"] for m in metrics] == list(range(num_updates + 1))
    assert all(keys <= set(m) for m in metrics[1:])
    assert all(0 < m["train/grad_norm"] < float("inf") for m in metrics[1:])
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


@pytest.mark.slow
def test_resume_continues_the_run_exactly(workdir):
    """The first 5 updates of the e2e run with a checkpoint at the end, left as a kill between the checkpoint swap's
    two renames leaves it (moved to checkpoint.old, a torn checkpoint.tmp) with a torn last line in metrics.jsonl, and
    resumed for 5 more: the e2e run's metrics."""
    run(workdir, "--exp_name", "resumed", "--num_epochs", "1", "--save_every", "5")
    (checkpoint,) = glob.glob(f"{workdir}/runs/lcm__resumed__*/checkpoint")
    assert checkpoint_update(checkpoint) == 5
    leave_as_killed_mid_swap(checkpoint)
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


@pytest.mark.slow
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
             "--timesteps", "diffusers", "--lr", "3e-4"]  # the paper's lr: under --tiny, a flag given still wins
    run(workdir, *flags)
    (run_dir,) = glob.glob(f"{workdir}/runs/lcm__finished__*")
    shutil.rmtree(f"{run_dir}/lora")
    proc = run(workdir, *flags, "--resume_from", f"{run_dir}/checkpoint")
    return run_dir, proc


@pytest.mark.slow
def test_resuming_a_finished_run_saves_the_lora_weights(workdir, finished_run):
    run_dir, proc = finished_run
    assert "eval/scores" in proc.stdout  # the summary: the finished run's last metrics
    _, metrics = metrics_of(workdir, "finished")
    assert [m["update"] for m in metrics] == [0, 1, 2]
    saved = load_file(f"{run_dir}/lora/pytorch_lora_weights.safetensors")
    assert saved and all(torch.isfinite(v).all() for v in saved.values())
    config = lora_config(run_dir)
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    optimizer = torch.load(f"{run_dir}/checkpoint/state.pt", weights_only=True)["optimizer"]
    assert optimizer["param_groups"][0]["weight_decay"] == 0.01


@pytest.mark.slow
def test_a_flag_at_the_paper_default_wins_over_tiny(workdir, finished_run):
    """--tiny --lr 3e-4: the paper's value, not TINY's 2e-2, although it equals the default of Args."""
    assert rebel_lcm.TINY["lr"] != rebel_lcm.Args.lr == 3e-4
    _, proc = finished_run
    assert json.loads(proc.stdout[proc.stdout.index("{"): proc.stdout.index("}") + 1])["lr"] == 3e-4
    _, metrics = metrics_of(workdir, "finished")
    assert all(m["lr"] == 3e-4 for m in metrics[1:])


@pytest.mark.slow
def test_resume_with_other_training_settings_is_refused(workdir, finished_run):
    """Refused before any model loads, naming each setting that differs; the run's files are left as they were."""
    run_dir, _ = finished_run
    with open(f"{run_dir}/metrics.jsonl", "rb") as f:
        logged = f.read()
    proc = run(workdir, "--exp_name", "finished", "--num_epochs", "1", "--batches_per_epoch", "2", "--eval_prompts", "2",
               "--save_every", "2", "--lora_alpha", "16", "--lora_init", "default", "--weight_decay", "0.01",
               "--timesteps", "diffusers", "--lr", "1e-3", "--resume_from", f"{run_dir}/checkpoint", check=False)
    assert proc.returncode != 0
    assert "would change what is trained: lr 0.0003 -> 0.001" in proc.stderr, proc.stderr[-3000:]
    assert "Loading" not in proc.stderr  # no model loaded
    with open(f"{run_dir}/metrics.jsonl", "rb") as f:
        assert f.read() == logged
    assert glob.glob(f"{workdir}/runs/lcm__finished__*") == [run_dir]


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--train_batch_size", "0"], "--train_batch_size must be positive, got 0"),
    (["--eta", "0"], "--eta must be positive, got 0.0"),
    (["--sample_batch_size", "3", "--train_batch_size", "2"],
     "--sample_batch_size 3 must be a multiple of --train_batch_size 2"),
    (["--prompts_file", "{workdir}/blank_prompts.txt"], "blank_prompts.txt: no prompt in it")])
def test_bad_input_fails_at_start_up_naming_the_flag(workdir, flags, message):
    with open(f"{workdir}/blank_prompts.txt", "w") as f:
        f.write("\n  \n")
    proc = run(workdir, "--exp_name", "bad", *[flag.format(workdir=workdir) for flag in flags], check=False)
    assert proc.returncode != 0 and "ValueError: " in proc.stderr and message in proc.stderr, proc.stderr[-3000:]
    assert not glob.glob(f"{workdir}/runs/lcm__bad__*")  # no run folder is left behind


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_non_finite_gradient_stops_the_run_before_the_step(workdir):
    """A NaN in the aesthetic head makes every score, reward, loss and gradient NaN: the run stops at update 1 before
    the optimizer step, naming the update and what to do, logs no update and keeps no checkpoint."""
    state = torch.load(f"{workdir}/runs/tiny_lcm/head.pth", weights_only=True)
    state["layers.7.bias"] = torch.full_like(state["layers.7.bias"], float("nan"))
    torch.save(state, f"{workdir}/nan_head.pth")
    proc = run(workdir, "--exp_name", "nan", "--aesthetic_head_path", "nan_head.pth", "--num_epochs", "1",
               "--batches_per_epoch", "5", "--eval_prompts", "2", "--save_every", "1", check=False)
    assert proc.returncode != 0
    assert "FloatingPointError: update 1: non-finite loss or gradient norm (nan); stopped before the step: start " \
           "again with a lower --lr" in proc.stderr, proc.stderr[-3000:]
    run_dir, metrics = metrics_of(workdir, "nan")
    assert [m["update"] for m in metrics] == [0]
    assert not os.path.exists(f"{run_dir}/checkpoint")
