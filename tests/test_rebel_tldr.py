"""Specification of rebel_tldr.py: the REBEL update is mirror descent, the loss is Eq. (1), and the script runs end
to end on tiny models (single process, torchrun with DDP+LoRA and FSDP2), learns, resumes, and rejects bad input."""
import contextlib
import csv
import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import rebel_tldr
from conftest import (assert_recomputed_with_the_same_gradients, assert_resume_reproduces, assert_tiny_run_learns,
                      assert_tokenization_is_cached, read_metrics, ROOT, run_script, save_with_custom_code, tensor_layout)


def tiny_policy(vocab_size=300, layers=2, hidden=32):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                            num_attention_heads=4, intermediate_size=4 * hidden, eos_token_id=1,
                                            pad_token_id=0)).eval()


def test_logprobs_equal_the_full_logits_computation():
    """Logits at the response positions only, log-softmax one sequence at a time under activation checkpointing:
    the same log-probs, entropies and gradients (the head's included) as the plain computation over full logits, on
    a left-padded batch."""
    model = tiny_policy()
    queries = torch.randint(2, 300, (4, 9))
    query_mask = torch.ones_like(queries)
    queries[:2, :3], query_mask[:2, :3] = 0, 0  # two prompts left-padded
    query_responses = torch.cat([queries, torch.randint(2, 300, (4, 6))], 1)
    attention_mask = torch.cat([query_mask, torch.ones(4, 6, dtype=torch.long)], 1)
    temperature = 0.7
    logits = model(input_ids=query_responses, attention_mask=attention_mask).logits[:, 8:-1].float() / temperature
    expected = logits.gather(-1, query_responses[:, 9:, None]).squeeze(-1) - logits.logsumexp(-1)
    expected_entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    weights = [model.gpt_neox.layers[0].mlp.dense_h_to_4h.weight, model.lm_head.weight]
    expected_grads = torch.autograd.grad(expected.sum(), weights)
    logprobs, entropy = rebel_tldr.response_logprobs(model, query_responses, attention_mask, 9, (temperature, 0.01),
                                                     True)
    torch.testing.assert_close(logprobs[0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=0)
    for grad, expected_grad in zip(torch.autograd.grad(logprobs[0].sum(), weights), expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)
    cold = logits * temperature / 0.01  # the second temperature: the same logits, rescaled
    torch.testing.assert_close(logprobs[1], cold.gather(-1, query_responses[:, 9:, None]).squeeze(-1)
                               - cold.logsumexp(-1), atol=1e-4, rtol=1e-6)


def test_gradient_checkpointing_recomputes_layers_in_eval_mode():
    model, ids = tiny_policy(), torch.randint(2, 300, (2, 12))
    assert_recomputed_with_the_same_gradients(model, rebel_tldr.enable_gradient_checkpointing,
                                              model.gpt_neox.layers[0].mlp, lambda m: rebel_tldr.response_logprobs(
                                                  m, ids, torch.ones_like(ids), 5, (0.7,))[0].sum())


def test_left_padding_changes_neither_logprobs_nor_scores():
    """Positions count real tokens only (as generate() and the released code do): with learned absolute position
    embeddings (GPT-2), a left-padded prompt gets the same log-probs and RM score as alone."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    policy = GPT2LMHeadModel(config).eval()
    reward_model = rebel_tldr.ScalarRewardModel(GPT2Model(config), torch.nn.Linear(32, 1), 0.0).eval()
    sequence = torch.randint(2, 300, (1, 11))  # a prompt of 5 tokens and a response of 6
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), sequence], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(sequence)], 1)
    with torch.no_grad():
        alone = rebel_tldr.response_logprobs(policy, sequence, torch.ones_like(sequence), 5, (0.7,))[0]
        torch.testing.assert_close(rebel_tldr.response_logprobs(policy, padded, mask, 9, (0.7,))[0], alone)
        torch.testing.assert_close(reward_model(padded, mask)[:, 4:], reward_model(sequence, torch.ones_like(sequence)))


def test_generation_stops_early_with_the_same_tokens():
    """Decoding stops once every response has its EOS, and the tokens up to each EOS are those that decoding all
    `response_length` steps draws from the same seed, with padding after it."""
    class Args:
        response_length, eos_token_id, pad_token_id = 30, 1, 0
    model = tiny_policy()
    # make EOS likely (p ~ 0.5 per step), so that all 32 responses end within a few steps on any machine
    model.get_output_embeddings().register_forward_hook(lambda m, i, logits: logits + 6.0 * (
        torch.arange(logits.shape[-1]) == 1))
    queries = torch.randint(2, 300, (4, 7))
    steps = []
    model.register_forward_pre_hook(lambda m, args, kwargs: steps.append(1), with_kwargs=True)
    torch.manual_seed(3)
    query_responses, attention_mask = rebel_tldr.generate(model, queries, torch.ones_like(queries), 8, Args, 1.0)
    decoded_steps = len(steps)
    Args.eos_token_id = None  # decoding every step, as the released code does
    torch.manual_seed(3)
    full, _ = rebel_tldr.generate(model, queries, torch.ones_like(queries), 8, Args, 1.0)
    assert decoded_steps < 30 and query_responses.shape == full.shape == (32, 37)
    eos_index = rebel_tldr.first_eos(full[:, 7:], 1)
    assert (eos_index < 30).all()
    truncated = full[:, 7:].masked_fill(torch.arange(30) > eos_index[:, None], 0)
    assert torch.equal(query_responses[:, 7:], truncated)
    assert attention_mask.shape == (32, 37)


def test_sampling_ignores_the_checkpoints_generation_settings():
    """Responses come from pi at the given temperature: top-k, top-p and a repetition penalty in the checkpoint's
    generation_config (instruction-tuned checkpoints ship such settings) change no token drawn from the same seed."""
    class Args:
        response_length, eos_token_id, pad_token_id = 12, 1, 0
    model, queries = tiny_policy(), torch.randint(2, 300, (4, 7))
    model.get_output_embeddings().register_forward_hook(lambda m, i, logits: 30 * logits)  # a peaked pi, as trained
    samples = []
    for settings in [{}, dict(top_k=20, top_p=0.8, repetition_penalty=1.1)]:
        for key, value in settings.items():
            setattr(model.generation_config, key, value)
        torch.manual_seed(3)
        samples.append(rebel_tldr.generate(model, queries, torch.ones_like(queries), 8, Args, 0.7)[0])
    assert torch.equal(*samples)


def test_the_score_is_the_rms_at_the_first_eos_and_gamma_without_one():
    """App. H.1.4: a response is scored by the RM at its first EOS (the tokens after it are padding); one without EOS
    in `response_length` tokens gets --penalty_reward_value, whatever the RM says."""
    model = tiny_policy()
    args = rebel_tldr.Args(response_length=4, penalty_reward_value=-7.0, eos_token_id=1, pad_token_id=0)
    queries, query_mask = rebel_tldr.pad([[5, 6], [7]], 0, "cpu")
    responses = torch.tensor([[3, 1, 0, 0], [3, 4, 5, 6]])  # the first ends at its EOS, the second never does
    model.generate = lambda input_ids, **kwargs: torch.cat([input_ids, responses], 1)

    def reward_model(ids, mask):  # a score per position: 10 x the position
        return 10.0 * torch.arange(ids.shape[1]).float().expand(len(ids), -1)
    out = rebel_tldr.sample_and_score(model, model, torch.no_grad, reward_model, queries, query_mask, 1, 0.7, args)
    assert out["scores"].tolist() == [30.0, -7.0]  # the first EOS is at position 2 + 1
    assert out["contains_eos"].tolist() == [True, False]
    assert out["response_mask"].tolist() == [[True, True, False, False], [True] * 4]


def test_exact_rebel_is_mirror_descent():
    """Solving Eq. (1) exactly over all pairs of a tabular policy gives pi_t+1 ∝ pi_t exp(eta r) (Eq. 3)."""
    torch.manual_seed(0)
    prompts, responses, eta = 3, 5, 0.7
    old_logprobs = torch.randn(prompts, responses).log_softmax(-1)
    rewards = torch.randn(prompts, responses)
    theta = old_logprobs.clone().requires_grad_(True)
    y, y_prime = torch.cartesian_prod(torch.arange(responses), torch.arange(responses)).T
    optimizer = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        optimizer.zero_grad()
        logprobs = theta.log_softmax(-1)
        loss = rebel_tldr.rebel_loss(torch.stack([logprobs[:, y], logprobs[:, y_prime]], -1).flatten(0, 1),
                                     torch.stack([old_logprobs[:, y], old_logprobs[:, y_prime]], -1).flatten(0, 1),
                                     torch.stack([rewards[:, y], rewards[:, y_prime]], -1).flatten(0, 1), eta)
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    mirror_descent = (old_logprobs + eta * rewards).softmax(-1)
    assert closure().item() < 1e-10
    torch.testing.assert_close(theta.softmax(-1), mirror_descent, atol=1e-5, rtol=0)
    assert not torch.allclose(mirror_descent, old_logprobs.exp(), atol=1e-2)  # the update did move the policy


def test_loss_is_eq1_times_eta_squared():
    logprobs = torch.tensor([[-1.0, -2.0], [-3.0, -0.5]])
    old_logprobs = torch.tensor([[-1.5, -1.0], [-2.0, -1.0]])
    rewards = torch.tensor([[0.3, -0.2], [1.0, 2.0]])
    eta = 2.0
    by_hand = []
    for (lp, lp2), (old, old2), (r, r2) in zip(logprobs.tolist(), old_logprobs.tolist(), rewards.tolist()):
        eq1 = (1 / eta * ((lp - old) - (lp2 - old2)) - (r - r2)) ** 2
        by_hand.append(eta**2 * eq1)
    loss = rebel_tldr.rebel_loss(logprobs, old_logprobs, rewards, eta)
    assert loss.item() == pytest.approx(sum(by_hand) / len(by_hand))



def run(workdir, *flags, **kwargs):
    return run_script("rebel_tldr.py", workdir, *flags, **kwargs)


def metrics_of(workdir, exp_name):
    return read_metrics(workdir, f"tldr__{exp_name}")


def write_tiny_assets(workdir):
    """The tiny models and data where the runs in `workdir` find them (tiny.py writes what is missing)."""
    import tiny
    tiny.write_tldr(rebel_tldr.Args(**{**rebel_tldr.TINY, **{k: f"{workdir}/{rebel_tldr.TINY[k]}" for k in
                                                              ["sft_model", "reward_model", "dataset"]}}))


@pytest.mark.slow
def test_tiny_run_learns_and_saves(workdir):
    keys = {"update", "episode", "objective/scores", "objective/kl", "objective/rewards", "objective/eos_share",
            "rebel/loss", "rebel/approxkl", "policy/entropy", "train/grad_norm", "lr", "time/rollout_s",
            "time/update_s", "episodes_per_s", "memory/peak_gb"}
    run_dir, metrics = assert_tiny_run_learns("rebel_tldr.py", workdir, "e2e", keys, 0.1)
    before, after = metrics[0], metrics[-1]
    assert len(metrics) == 21 and after["eval/eos_share"] > before["eval/eos_share"]
    # the same log-ratio at temperature 0.01 is the one at 0.7 scaled up: about 70x on near-greedy samples
    assert after["eval/kl_at_eval_temperature"] > 5 * after["eval/kl_at_train_temperature"]
    assert os.path.exists(f"{run_dir}/samples_update20.csv") and glob.glob(f"{run_dir}/model/*.safetensors")
    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(f"{run_dir}/model")
    sft = AutoModelForCausalLM.from_pretrained(f"{workdir}/runs/tiny/sft")
    weight = "gpt_neox.layers.0.attention.query_key_value.weight"
    from peft import PeftModel  # and the adapter itself, on top of the SFT model: the same policy
    with open(f"{run_dir}/adapter/adapter_config.json") as f:
        config = json.load(f)
    assert (config["r"], config["lora_alpha"]) == (8, 16)  # --tiny's --lora_rank and --lora_alpha
    adapted = PeftModel.from_pretrained(sft, f"{run_dir}/adapter").merge_and_unload()
    torch.testing.assert_close(adapted.state_dict()[weight], trained.state_dict()[weight])


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--lora_rank", "0", "--lr", "3e-4", "--gradient_checkpointing"]],
                         ids=["ddp_lora", "fsdp2_full"])
def test_torchrun_two_processes(workdir, mode):
    exp_name = "torchrun_" + ("full" if mode else "lora")
    flags = ["--exp_name", exp_name, "--total_episodes", "64", "--eval_samples", "16", "--save_every", "2", *mode]
    run(workdir, *flags, torchrun=True)
    run_dir, metrics = metrics_of(workdir, exp_name)
    assert [m["update"] for m in metrics] == [0, 1, 2]
    assert metrics[-1]["objective/kl"] != 0  # the policy moved away from pi_0 after the first update
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    final = AutoModelForCausalLM.from_pretrained(f"{run_dir}/model").state_dict()
    sft = AutoModelForCausalLM.from_pretrained(f"{workdir}/runs/tiny/sft").state_dict()
    assert not torch.equal(final["gpt_neox.layers.0.attention.query_key_value.weight"],
                           sft["gpt_neox.layers.0.attention.query_key_value.weight"])  # trained, gathered, saved
    if not mode:  # LoRA: every rank reads the small checkpoint, as the single-process resume test does
        return
    # resuming from the checkpoint of the last update: rank 0 reads it and broadcasts each rank's part, nothing is
    # left to train, and the model is saved again, the same
    run(workdir, *flags, "--resume_from", f"{run_dir}/checkpoint", torchrun=True)
    assert [m["update"] for m in metrics_of(workdir, exp_name)[1]] == [0, 1, 2]
    resumed = AutoModelForCausalLM.from_pretrained(f"{run_dir}/model").state_dict()
    for key, value in final.items():
        torch.testing.assert_close(resumed[key], value)
    for key, value in load_file(f"{run_dir}/checkpoint/model.safetensors").items():  # the whole policy
        torch.testing.assert_close(final[key], value)


@pytest.mark.slow
def test_resume_gives_the_same_metrics_and_refuses_changed_settings(workdir):
    """A resume reproduces the uninterrupted run, even after a kill mid-swap (see assert_resume_reproduces); one that
    would change what is trained is refused before anything loads or is written, naming each changed setting."""
    straight, _, run_dir = assert_resume_reproduces("rebel_tldr.py", workdir, "rebel", "--kl_coef", "0.1",
                                                    fresh=True)  # see FORKSERVER
    for m in straight[1:]:  # Eq. (22) with --kl_coef's gamma, on the means over the same samples
        assert m["objective/rewards"] == pytest.approx(m["objective/scores"] - 0.1 * m["objective/kl"], abs=1e-5)
    files = {f: open(f, "rb").read() for f in [f"{run_dir}/metrics.jsonl", *glob.glob(f"{run_dir}/model/*")]}
    flags = ["--exp_name", "rebel_killed", "--total_episodes", "96", "--eval_samples", "16", "--kl_coef", "0.1",
             "--resume_from", f"{run_dir}/checkpoint"]
    for changed, message in [(["--batch_size", "16", "--per_device_train_batch_size", "8"],
                              "batch_size 32 -> 16, per_device_train_batch_size 16 -> 8"),
                             (["--lora_rank", "0"], "lora_rank 8 -> 0")]:
        proc = run(workdir, *flags, *changed, check=False)
        assert proc.returncode != 0 and "would change what is trained: " + message in proc.stderr, proc.stderr[-2000:]
        assert "Loading weights" not in proc.stderr
    assert files == {f: open(f, "rb").read() for f in files}


def test_backbone_plus_scalar_head_rm_scores_like_the_sequence_classifier(tmp_path):
    from safetensors.torch import save_file
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, num_labels=1, pad_token_id=0)
    classifier = GPTNeoXForSequenceClassification(config).eval()
    classifier.save_pretrained(tmp_path / "seqcls")
    # the same weights in summarize_from_feedback_details' layout; head bias b and config bias b cancel
    state = {f"lm_backbone.{k}": v for k, v in classifier.gpt_neox.state_dict().items()}
    state["scalar_head.weight"] = classifier.score.weight.detach().clone()
    state["scalar_head.bias"] = torch.tensor([0.25])
    os.makedirs(tmp_path / "scalar")
    save_file(state, tmp_path / "scalar" / "model.safetensors")
    with open(tmp_path / "scalar" / "config.json", "w") as f:
        json.dump({"base_model": "x", "base_config": config.to_dict(), "hidden_size": 32, "bias": 0.25}, f)
    ids = torch.randint(1, 300, (3, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = classifier(input_ids=ids, attention_mask=mask).logits.squeeze(-1)  # score at the last token
        for path in ["seqcls", "scalar"]:
            rm = rebel_tldr.load_reward_model(str(tmp_path / path), torch.float32, False).eval()
            torch.testing.assert_close(rm(ids, mask)[:, -1], expected)
            # what the ranks but rank 0 build under FSDP2 before rank 0 broadcasts the weights: the same tensors and
            # buffers in the same dtypes (bf16 too, as on a GPU), without memory, and the same bias
            for dtype in [torch.float32, torch.bfloat16]:
                loaded = rebel_tldr.load_reward_model(str(tmp_path / path), dtype, False)
                empty = rebel_tldr.load_reward_model(str(tmp_path / path), dtype, False, meta=True)
                assert tensor_layout(empty) == tensor_layout(loaded) and empty.bias == loaded.bias
                assert all(v.is_meta for v in empty.state_dict().values())
    # a checkpoint without a trained score head (a causal LM) is refused, not given a random head
    GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "causal_lm")
    with pytest.raises(ValueError, match=r"--reward_model .*causal_lm: the checkpoint lacks \['score.weight'\]"):
        rebel_tldr.load_reward_model(str(tmp_path / "causal_lm"), torch.float32, False)


class DataArgs:
    query_length, response_length = 60, 16


def write_jsonl(folder, rows):
    os.makedirs(folder, exist_ok=True)
    for split in ["train", "validation"]:
        with open(f"{folder}/{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def test_missing_column_is_named(tmp_path):
    from transformers import ByT5Tokenizer
    write_jsonl(tmp_path / "data", [{"prompt": "a", "reference_response": "b"}])
    args = DataArgs()
    args.dataset = str(tmp_path / "data")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['query'\]; found \['prompt', 'reference_response'\]"):
        rebel_tldr.load_prompts(args, ByT5Tokenizer(), "train", 0)


def test_an_empty_split_is_named(tmp_path):
    from transformers import ByT5Tokenizer
    write_jsonl(tmp_path / "data", [])
    args = DataArgs()
    args.dataset = str(tmp_path / "data")
    with pytest.raises(ValueError, match=f"--dataset {args.dataset}: the train split is empty"):
        rebel_tldr.load_prompts(args, ByT5Tokenizer(), "train", 0)
    write_jsonl(tmp_path / "long", [{"query": "x" * 61, "reference_response": " y"}])  # emptied by the length filter
    args.dataset = str(tmp_path / "long")
    with pytest.raises(ValueError, match="no train prompt of at most --query_length 60 tokens"):
        rebel_tldr.load_prompts(args, ByT5Tokenizer(), "train", 0)


def test_long_prompts_are_dropped_and_counted(tmp_path, capsys):
    from transformers import ByT5Tokenizer
    write_jsonl(tmp_path / "data", [{"query": "x" * n, "reference_response": " y"} for n in [10, 60, 61, 200]])
    args = DataArgs()
    args.dataset = str(tmp_path / "data")
    data = rebel_tldr.load_prompts(args, ByT5Tokenizer(), "train", 0)
    assert [len(q) for q in data["query_token"]] == [10, 60]
    assert data["reference_token"][0][-1] == ByT5Tokenizer().eos_token_id  # EOS appended where missing
    assert "dropped 2 of 4 prompts longer than --query_length 60" in capsys.readouterr().out


def test_tokenized_prompts_are_cached_across_runs(tmp_path):
    from transformers import ByT5Tokenizer
    write_jsonl(tmp_path / "data", [{"query": "x", "reference_response": " y"}])
    assert_tokenization_is_cached("rebel_tldr.py", "load_prompts", ByT5Tokenizer(), dataset=str(tmp_path / "data"))


@pytest.mark.slow
def test_indivisible_batch_sizes_are_rejected(workdir):
    proc = run(workdir, "--batch_size", "30", "--per_device_train_batch_size", "16", check=False)
    assert proc.returncode != 0
    assert "--batch_size 30 must be a multiple of world size 1 x --num_minibatches 1 x " \
           "--per_device_train_batch_size 16" in proc.stderr


def test_computed_fields_are_not_flags(capsys):
    """Fields computed at run time (world size, updates, ...) are in the logged arguments but are not flags: one given
    on the command line is an error, not a value silently replaced."""
    import tyro
    with pytest.raises(SystemExit):
        tyro.cli(rebel_tldr.Args, args=["--num_updates", "10"])
    assert "Unrecognized options: --num_updates" in capsys.readouterr().err
    assert "num_updates" in dataclasses.asdict(tyro.cli(rebel_tldr.Args, args=[]))


@pytest.mark.slow
def test_tiny_assets_follow_their_paths(workdir, monkeypatch):
    """An earlier tiny run does not stop `--tiny --dataset DIR` from writing DIR, and the assets already there are
    not written again."""
    import tiny
    monkeypatch.chdir(workdir)
    tiny.write_tldr(rebel_tldr.Args(**rebel_tldr.TINY))

    def written():  # the TL;DR assets, not those that the other worker may be writing beside them
        return {path: os.path.getmtime(path) for name in ["sft", "reward", "tldr"]
                for path in glob.glob(f"runs/tiny/{name}/*")}
    before = written()
    tiny.write_tldr(rebel_tldr.Args(**{**rebel_tldr.TINY, "dataset": "runs/tiny_other/tldr"}))
    assert os.path.exists(f"{workdir}/runs/tiny_other/tldr/validation.jsonl")
    assert written() == before and len(before) > 6


def write_once_slowly(path):
    """An asset writer as tiny.py's are: whatever is missing, with its last file written at its end."""
    if not os.path.exists(f"{path}/done"):
        os.makedirs(path, exist_ok=True)
        with open(f"{path}/writes", "a") as f:
            f.write("x")
        time.sleep(0.5)
        open(f"{path}/done", "w").close()
    return os.path.exists(f"{path}/done")


def test_concurrent_tiny_runs_write_an_asset_once(tmp_path):
    """Runs that start together (the suite's workers) write a missing asset once; the others wait and find it."""
    import multiprocessing
    import tiny
    write = tiny.one_writer(lambda path: path)(write_once_slowly)
    processes = [multiprocessing.get_context("fork").Process(
        target=lambda: sys.exit(0 if write(str(tmp_path / "asset")) else 1)) for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    assert [process.exitcode for process in processes] == [0, 0, 0]  # each found the whole asset
    assert (tmp_path / "asset" / "writes").read_text() == "x"


@pytest.mark.slow
def test_a_non_finite_gradient_stops_the_run_before_its_step(workdir, tmp_path):
    """A reward model that scores NaN: the first optimizer step would apply a NaN gradient; the run stops before it,
    with an error naming the update, and saves nothing."""
    write_tiny_assets(workdir)
    shutil.copytree(f"{workdir}/runs/tiny/reward", tmp_path / "nan_rm")
    with open(tmp_path / "nan_rm" / "config.json") as f:
        config = json.load(f)
    with open(tmp_path / "nan_rm" / "config.json", "w") as f:
        json.dump({**config, "bias": float("nan")}, f)
    proc = run(workdir, "--exp_name", "nan", "--reward_model", str(tmp_path / "nan_rm"), "--save_every", "1",
               "--eval_samples", "8", check=False)
    assert proc.returncode != 0
    assert "FloatingPointError: update 1: non-finite loss or gradient norm (nan)" in proc.stderr
    run_dir, metrics = metrics_of(workdir, "nan")
    assert [m["update"] for m in metrics] == [0] and not os.path.exists(f"{run_dir}/checkpoint")
    assert not os.path.exists(f"{run_dir}/model")


def test_evaluation_samples_each_prompt_once_at_the_eval_temperature_in_rollout_chunks(monkeypatch):
    """evaluate() asks sample_and_score for one response per validation prompt, in the split's order, at
    --eval_temperature and --rollout_batch_size prompts per call; Table 1's KL is the one at that temperature, and every
    metric is a mean over all the prompts."""
    from datasets import Dataset
    from transformers import ByT5Tokenizer
    calls = []

    def sample_and_score(policy, ref_policy, ref_context, reward_model, queries, query_mask, num_samples, temperature,
                         args):
        calls.append((queries[:, -1].tolist(), num_samples, temperature))
        scores = queries[:, -1].float()  # the prompt's number, so that each metric's mean can be told from the others'
        return dict(query_responses=torch.cat([queries, torch.full_like(queries, 70)], 1), scores=scores,
                    kl_at_sample_temperature=2 * scores, kl=3 * scores, contains_eos=scores > 72)

    monkeypatch.setattr(rebel_tldr, "sample_and_score", sample_and_score)
    data = Dataset.from_dict({"query": [f"q{i}" for i in range(1, 6)], "query_token": [[70 + i] for i in range(1, 6)],
                              "reference_token": [[80]] * 5})
    args = SimpleNamespace(rollout_batch_size=2, pad_token_id=0, eval_temperature=0.3, world_size=1)
    metrics, rows = rebel_tldr.evaluate(torch.nn.Linear(1, 1), None, None, lambda ids, mask: torch.full(ids.shape, 73.0),
                                        ByT5Tokenizer(), data, args, "cpu", contextlib.nullcontext())
    assert calls == [([71, 72], 1, 0.3), ([73, 74], 1, 0.3), ([75], 1, 0.3)]
    assert metrics == pytest.approx({"eval/scores": 73, "eval/kl_at_eval_temperature": 146,
                                     "eval/kl_at_train_temperature": 219, "eval/win_rate": 0.4, "eval/eos_share": 0.6})
    assert [(r["query"], r["score"], r["reference_score"], r["kl"]) for r in rows] == [
        (f"q{i}", 70 + i, 73, 2 * (70 + i)) for i in range(1, 6)]


@pytest.mark.slow
def test_minibatches_rollout_chunks_eval_temperature_and_track(workdir):
    """--num_minibatches 2 takes two optimizer steps per epoch; --rollout_batch_size 8 and --eval_temperature 1.0 run
    (the rollout in chunks of 8 prompts), the evaluation in the validation split's order; --track writes an offline
    wandb run to --wandb_project with the metrics.jsonl keys. A flag given with --tiny wins over TINY's value, also
    when it equals the paper's default (--per_device_train_batch_size 8)."""
    proc = run(workdir, "--exp_name", "minibatches", "--total_episodes", "64", "--num_minibatches", "2",
               "--per_device_train_batch_size", "8", "--rollout_batch_size", "8", "--eval_temperature", "1.0",
               "--eval_samples", "16", "--save_every", "2", "--track", "--wandb_project", "tiny_tldr_project")
    assert '"per_device_train_batch_size": 8,' in proc.stdout and '"gradient_accumulation_steps": 2,' in proc.stdout
    run_dir, metrics = metrics_of(workdir, "minibatches")
    assert [m["update"] for m in metrics] == [0, 1, 2] and metrics[-1]["objective/kl"] != 0
    optimizer = torch.load(f"{run_dir}/checkpoint/state.pt", weights_only=True)["optimizer"]
    assert {float(p["step"]) for p in optimizer["state"].values()} == {2 * 4 * 2}  # updates x epochs x minibatches
    with open(f"{workdir}/runs/tiny/tldr/validation.jsonl") as f:
        queries = [json.loads(line)["query"] for line in f][:16]
    with open(f"{run_dir}/samples_update2.csv", newline="") as f:
        assert [row["query"] for row in csv.DictReader(f)] == queries
    (run_file,) = glob.glob(f"{workdir}/wandb/offline-run-*/run-*.wandb")
    with open(run_file, "rb") as f:
        logged = f.read()
    for key in [b"tiny_tldr_project", b"objective/scores", b"rebel/loss", b"eval/win_rate", b"memory/peak_gb"]:
        assert key in logged


@pytest.mark.slow
def test_eval_samples_below_the_world_size_are_rejected(workdir):
    proc = run(workdir, "--eval_samples", "1", torchrun=True, check=False)
    assert proc.returncode != 0
    assert "evaluation needs at least one validation prompt per rank: --eval_samples 1 of 128 prompts for world " \
           "size 2" in proc.stderr


def test_remote_code_needs_the_flag(tmp_path):
    """Checkpoints whose configs map to custom code (a policy, and a reward model in the sequence-classification
    layout) run that code only with --trust_remote_code: the policy (and pi_0, its loader's) and the RM. Without it, a known
    architecture loads as the built-in class."""
    from transformers import GPTNeoXForSequenceClassification
    rm_config = tiny_policy().config
    rm_config.num_labels = 1
    save_with_custom_code(tiny_policy(), tmp_path / "policy", "AutoModelForCausalLM")
    save_with_custom_code(GPTNeoXForSequenceClassification(rm_config), tmp_path / "rm",
                          "AutoModelForSequenceClassification")
    for trust in [False, True]:
        args = SimpleNamespace(trust_remote_code=trust)
        loaded = rebel_tldr.load_policy(str(tmp_path / "policy"), torch.float32, args, "cpu", 0)
        reward_model = rebel_tldr.load_reward_model(str(tmp_path / "rm"), torch.float32, trust)
        assert [hasattr(m, "custom") for m in [loaded, reward_model.scalar_head]] == [trust] * 2


FSDP2_LOAD = """
import resource, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import rebel_tldr
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy
dist.init_process_group("gloo")
rank = dist.get_rank()
class Args:
    trust_remote_code = False
mp_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
reward_model = rebel_tldr.load_reward_model(sys.argv[3], torch.float32, False, meta=rank > 0).requires_grad_(False)
reward_model = rebel_tldr.shard_from_rank0(reward_model, mp_policy, "cpu", rank)
rm_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
policy = rebel_tldr.load_policy(sys.argv[2], torch.float32, Args, "cpu", rank, mp_policy)
ref_policy = rebel_tldr.load_policy(sys.argv[2], torch.float32, Args, "cpu", rank, mp_policy).requires_grad_(False)
growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
options = StateDictOptions(full_state_dict=True, cpu_offload=True)
states = [get_model_state_dict(m, options=options) for m in [policy, ref_policy]]
ids, mask = torch.arange(2, 42).view(2, 20), torch.ones(2, 20, dtype=torch.long)
with torch.no_grad():
    scores = reward_model(ids, mask)
# log-probs and their gradients as in the regression (the head's weight included), after a rollout-like pass
with torch.no_grad(), rebel_tldr.gathered(policy):
    rebel_tldr.response_logprobs(policy, ids, mask, 12, (0.7,))
logprobs = rebel_tldr.response_logprobs(policy, ids, mask, 12, (0.7,))[0]
logprobs.sum().backward()
grads = {name: p.grad.full_tensor() for name, p in policy.named_parameters()}
if rank == 0:
    torch.save([*states, scores, logprobs.detach(), grads], sys.argv[4])
print(f"rank {rank} peak RSS growth {growth} {rm_growth}")
dist.barrier()  # no rank tears down gloo while the other still reads its last gather
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp2_loading_never_holds_two_whole_models(tmp_path):
    """Under FSDP2, the policy and pi_0 are loaded without any rank's peak RSS growing by a whole fp32 model plus a
    frozen copy (the old way: both whole on every rank), and the reward model without a whole copy on
    any rank but rank 0; the shards hold exactly the checkpoints, and the sharded RM scores as the whole one."""
    from safetensors.torch import save_file
    model = tiny_policy(vocab_size=384, layers=8, hidden=512)  # 25M parameters: 100 MB in fp32
    model.save_pretrained(tmp_path / "model")
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    os.makedirs(tmp_path / "reward")  # the RM in summarize_from_feedback_details' layout, the policy's backbone
    save_file({**{f"lm_backbone.{k}": v for k, v in model.gpt_neox.state_dict().items()},
               "scalar_head.weight": torch.randn(1, 512), "scalar_head.bias": torch.zeros(1)},
              tmp_path / "reward" / "model.safetensors")
    with open(tmp_path / "reward" / "config.json", "w") as f:
        json.dump({"base_config": model.config.to_dict(), "hidden_size": 512, "bias": 0.5}, f)
    (tmp_path / "load.py").write_text(FSDP2_LOAD)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "load.py"), ROOT, str(tmp_path / "model"), str(tmp_path / "reward"),
                           str(tmp_path / "states.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growths = {int(line.split()[1]): [int(n) for n in line.split()[-2:]] for line in proc.stdout.splitlines()
               if "peak RSS growth" in line}
    assert sorted(growths) == [0, 1]
    # pi and pi_0 after the RM: rank 0's peak with the checkpoint once and its shards; rank 1's with its halves only
    assert growths[0][0] < 2 * model_bytes and growths[1][0] < 1.5 * model_bytes, (growths, model_bytes)
    rm_bytes = model_bytes - 384 * 512 * 4  # the backbone without the LM head, plus a scalar head
    assert growths[1][1] < 0.8 * rm_bytes, (growths, rm_bytes)  # rank 1: its half (the old way: the whole RM first)
    *states, scores, logprobs, grads = torch.load(tmp_path / "states.pt", weights_only=True)
    ids, mask = torch.arange(2, 42).view(2, 20), torch.ones(2, 20, dtype=torch.long)  # as in the script
    expected = rebel_tldr.response_logprobs(model, ids, mask, 12, (0.7,))[0]
    expected.sum().backward()
    torch.testing.assert_close(logprobs, expected.detach())
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)
    for state in states:
        for key, value in model.state_dict().items():
            torch.testing.assert_close(state[key], value, atol=0, rtol=0)
    reward_model = rebel_tldr.load_reward_model(str(tmp_path / "reward"), torch.float32, False).eval()
    with torch.no_grad():
        torch.testing.assert_close(scores, reward_model(ids, mask))


@pytest.mark.slow
def test_bad_input_fails_at_start_up_naming_the_flag_or_path(workdir, tmp_path):
    """Each fails before any model loads ("Loading weights" is what from_pretrained prints) and leaves no run folder."""
    write_tiny_assets(workdir)
    shutil.copytree(f"{workdir}/runs/tiny/sft", tmp_path / "no_eos")
    with open(tmp_path / "no_eos" / "tokenizer_config.json") as f:
        config = json.load(f)
    with open(tmp_path / "no_eos" / "tokenizer_config.json", "w") as f:
        json.dump({**config, "eos_token": None}, f)
    cases = [(["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be positive, got 0"),
             (["--num_minibatches", "0"], "--num_minibatches must be positive, got 0"),
             (["--rollout_batch_size", "0"], "--rollout_batch_size must be positive, got 0"),
             (["--eval_every", "0"], "--eval_every must be positive, got 0"),
             (["--eval_samples", "-3"], "--eval_samples must be at least 0, got -3"),
             (["--eta", "0"], "--eta must be positive, got 0.0"), (["--eta", "-1"], "--eta must be positive, got -1.0"),
             (["--sft_model", str(tmp_path / "no_eos")], "its tokenizer has no EOS token"),
             (["--total_episodes", "16"], "and at most --total_episodes 16"),  # fewer than one batch of 32
             (["--batch_size", "4096", "--total_episodes", "4096"], "prompts, fewer than --batch_size 4096")]
    tiny_paths = [f"--{k}={workdir}/{rebel_tldr.TINY[k]}" for k in ["sft_model", "reward_model", "dataset"]]
    cases += [([*tiny_paths, f"--reward_model={tmp_path}/missing"],  # with --tiny, tiny.py would write it
               f"--reward_model {tmp_path}/missing: no such local file or folder")]
    for flags, message in cases:
        proc = run(workdir, "--exp_name", "bad_input", *flags, check=False, tiny="missing" not in flags[-1])
        assert proc.returncode != 0 and message in proc.stderr, (flags, proc.stderr[-2000:])
        assert "Loading weights" not in proc.stderr, flags
    assert not glob.glob(f"{workdir}/runs/tldr__bad_input__*")
