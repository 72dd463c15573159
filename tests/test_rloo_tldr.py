"""Specification of rloo_tldr.py, the RLOO and REINFORCE baselines (Ahmadian et al., 2024): the leave-one-out advantage
and the REINFORCE loss are what the equations say, and the script runs end to end on tiny models (single process and
torchrun with DDP+LoRA), learns, resumes exactly (REINFORCE's running baseline included) and rejects bad input."""

import pytest
import torch

import rloo_tldr
from conftest import assert_resume_reproduces, assert_tiny_run_learns, read_metrics, run_script


def test_leave_one_out_advantages_by_hand():
    # k = 2: each response's baseline is the other's reward
    rewards = torch.tensor([[1.0, 3.0], [-0.5, 0.5]])
    torch.testing.assert_close(rloo_tldr.rloo_advantages(rewards, baseline=100.0),
                               torch.tensor([[1.0 - 3.0, 3.0 - 1.0], [-0.5 - 0.5, 0.5 + 0.5]]))
    # k = 4: the mean of the other three, e.g. 1 - (2 + 3 + 6) / 3 = -8/3
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    advantages = rloo_tldr.rloo_advantages(rewards, baseline=100.0)
    torch.testing.assert_close(advantages, torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3]]))
    # which is k/(k-1) times the reward minus the mean of all k: the advantages of a prompt sum to 0
    torch.testing.assert_close(advantages, 4 / 3 * (rewards - rewards.mean()))
    # k = 1 (REINFORCE): the given baseline, the running mean of past rewards
    torch.testing.assert_close(rloo_tldr.rloo_advantages(torch.tensor([[0.5], [-1.0]]), baseline=0.2),
                               torch.tensor([[0.3], [-1.2]]))


def test_reinforce_loss_is_the_advantage_weighted_score_function():
    logprobs = torch.tensor([-3.0, -1.0, -2.0, -5.0], requires_grad=True)  # ln pi_theta(y|x) of whole responses
    advantages = torch.tensor([2.0, -2.0, 0.5, 0.0])
    loss = rloo_tldr.reinforce_loss(logprobs, advantages)
    assert loss.item() == pytest.approx(-(2 * -3 - 2 * -1 + 0.5 * -2 + 0) / 4)
    loss.backward()
    # descending it raises ln pi of responses with positive advantage, lowers it for negative, ignores A = 0
    torch.testing.assert_close(logprobs.grad, -advantages / 4)



def run(workdir, *flags, **kwargs):
    return run_script("rloo_tldr.py", workdir, *flags, **kwargs)


def metrics_of(workdir, exp_name):
    return read_metrics(workdir, f"tldr__{exp_name}")


@pytest.mark.slow
def test_tiny_run_learns_and_saves(workdir):
    keys = {"update", "episode", "objective/scores", "objective/kl", "objective/rewards", "objective/eos_share",
            "rloo/loss", "rloo/approxkl", "rloo/baseline", "policy/entropy", "train/grad_norm", "lr",
            "time/rollout_s", "time/update_s", "episodes_per_s", "memory/peak_gb"}
    _, metrics = assert_tiny_run_learns("rloo_tldr.py", workdir, "rloo_e2e", keys, 0.05)
    # one on-policy step per batch: the loss differentiates ln pi_t itself, the policy that sampled
    assert all(m["rloo/approxkl"] < 1e-8 for m in metrics[1:])


@pytest.mark.slow
def test_reinforce_resumes_with_the_same_metrics_and_baseline(workdir):
    """REINFORCE (--k 1), killed once its update-2 checkpoint exists and resumed from it, logs what the straight run
    logs: the running baseline travels in the checkpoint."""
    straight, resumed, _ = assert_resume_reproduces("rloo_tldr.py", workdir, "reinforce", "--k", "1")
    # the baseline is the mean reward of all updates so far (a batch's mean reward is logged as objective/rewards)
    for t in range(1, 4):
        assert straight[t]["rloo/baseline"] == pytest.approx(
            sum(m["objective/rewards"] for m in straight[1: t + 1]) / t, rel=1e-5)


@pytest.mark.slow
def test_torchrun_two_processes_with_four_samples(workdir):
    """Also runs with two minibatches per epoch and --eval_temperature 0.7."""
    run(workdir, "--exp_name", "rloo_torchrun", "--k", "4", "--total_episodes", "64", "--eval_samples", "16",
        "--num_minibatches", "2", "--per_device_train_batch_size", "4", "--eval_temperature", "0.7", torchrun=True)
    run_dir, metrics = metrics_of(workdir, "rloo_torchrun")
    assert [m["update"] for m in metrics] == [0, 1, 2]
    assert metrics[-1]["objective/kl"] != 0  # the policy moved away from pi_0 after the first update
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(f"{run_dir}/model")
