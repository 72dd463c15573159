"""Specification of rebel_tldr.py: the REBEL update is mirror descent, the loss is Eq. (1), and the script runs end
to end on tiny models (single process, torchrun with DDP+LoRA and FSDP2), learns, resumes, and rejects bad input."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import rebel_tldr
from conftest import ROOT, read_metrics, run_script


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


def test_tiny_run_learns_and_saves(workdir):
    run(workdir, "--exp_name", "e2e")
    run_dir, metrics = metrics_of(workdir, "e2e")
    keys = {"update", "episode", "objective/scores", "objective/kl", "objective/rewards", "objective/eos_share",
            "rebel/loss", "rebel/approxkl", "policy/entropy", "lr", "time/rollout_s", "time/update_s", "eps",
            "memory/peak_gb"}
    assert [m["update"] for m in metrics] == list(range(21))
    assert all(keys <= set(m) for m in metrics[1:])
    before, after = metrics[0], metrics[-1]
    # learning, judged on the held-out prompts: the RM score (Gamma without EOS) and the EOS share rise
    assert after["eval/scores"] > before["eval/scores"] + 0.1, (before, after)
    assert after["eval/eos_share"] > before["eval/eos_share"]
    assert after["eval/kl"] > 0 and before["eval/kl"] == pytest.approx(0, abs=1e-4)
    assert os.path.exists(f"{run_dir}/samples_update20.csv")
    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(f"{run_dir}/model")
    sft = AutoModelForCausalLM.from_pretrained(f"{workdir}/runs/tiny/sft")
    assert glob.glob(f"{run_dir}/model/*.safetensors")
    weight = "gpt_neox.layers.0.attention.query_key_value.weight"
    assert not torch.equal(trained.state_dict()[weight], sft.state_dict()[weight])  # LoRA merged into the weights


@pytest.mark.parametrize("mode", [[], ["--lora_rank", "0", "--lr", "3e-4"]], ids=["ddp_lora", "fsdp2_full"])
def test_torchrun_two_processes(workdir, mode):
    exp_name = "torchrun_" + ("full" if mode else "lora")
    run(workdir, "--exp_name", exp_name, "--total_episodes", "64", *mode, torchrun=True)
    run_dir, metrics = metrics_of(workdir, exp_name)
    assert [m["update"] for m in metrics] == [0, 1, 2]
    assert metrics[-1]["objective/kl"] != 0  # the policy moved away from pi_0 after the first update
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(f"{run_dir}/model")


def test_resume_gives_the_same_metrics(workdir):
    flags = ["--total_episodes", "128", "--eval_every", "2"]
    run(workdir, "--exp_name", "straight", *flags)
    # the same run, killed once its update-2 checkpoint exists, then resumed from it
    proc = subprocess.Popen([sys.executable, f"{ROOT}/rebel_tldr.py", "--tiny", "--exp_name", "killed",
                             "--save_every", "2", *flags], cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not glob.glob(f"{workdir}/runs/tldr__killed__*/checkpoint/state.json") and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (checkpoint,) = glob.glob(f"{workdir}/runs/tldr__killed__*/checkpoint")
    with open(f"{checkpoint}/state.json") as f:
        assert json.load(f)["update"] == 2
    run(workdir, "--exp_name", "killed", "--resume_from", checkpoint, *flags)
    _, straight = metrics_of(workdir, "straight")
    _, resumed = metrics_of(workdir, "killed")
    assert [m["update"] for m in resumed] == [0, 1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        for key in a:
            if not key.startswith(("time/", "eps", "memory/")):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a["update"])


def test_backbone_plus_scalar_head_rm_scores_like_the_sequence_classifier(tmp_path):
    from safetensors.torch import save_file
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification
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


def test_long_prompts_are_dropped_and_counted(tmp_path, capsys):
    from transformers import ByT5Tokenizer
    write_jsonl(tmp_path / "data", [{"query": "x" * n, "reference_response": " y"} for n in [10, 60, 61, 200]])
    args = DataArgs()
    args.dataset = str(tmp_path / "data")
    data = rebel_tldr.load_prompts(args, ByT5Tokenizer(), "train", 0)
    assert [len(q) for q in data["query_token"]] == [10, 60]
    assert data["reference_token"][0][-1] == ByT5Tokenizer().eos_token_id  # EOS appended where missing
    assert "dropped 2 of 4 prompts longer than --query_length 60" in capsys.readouterr().out


def test_indivisible_batch_sizes_are_rejected(workdir):
    proc = run(workdir, "--batch_size", "30", "--per_device_train_batch_size", "16", check=False)
    assert proc.returncode != 0
    assert "--batch_size 30 must be a multiple of world size 1 x --num_minibatches 1 x " \
           "--per_device_train_batch_size 16" in proc.stderr


def test_track_writes_an_offline_wandb_run(workdir):
    run(workdir, "--exp_name", "tracked", "--total_episodes", "32", "--track")
    (run_file,) = glob.glob(f"{workdir}/wandb/offline-run-*/run-*.wandb")
    with open(run_file, "rb") as f:
        logged = f.read()
    for key in [b"objective/scores", b"rebel/loss", b"eval/win_rate", b"memory/peak_gb"]:
        assert key in logged
