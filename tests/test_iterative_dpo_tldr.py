"""Specification of iterative_dpo_tldr.py, the online DPO baseline of App. H.1.3 (Algorithm 2): the loss is Eq. (21),
DPO against pi_t with the preference given by the reward, and the script runs end to end on tiny models (single process
and torchrun with DDP+LoRA), learns, resumes exactly and rejects bad input."""
import math

import pytest
import torch

import dpo_tldr
import iterative_dpo_tldr
from conftest import assert_resume_reproduces, assert_tiny_run_learns, read_metrics, run_script


def test_loss_is_eq21_by_hand():
    """-ln sigmoid(beta (ln pi/pi_t(y_w) - ln pi/pi_t(y_l))), y_w the response of larger reward, in column 0 or 1."""
    logprobs = torch.tensor([[-1.0, -2.0], [-3.0, -0.5], [-4.0, -6.0], [-2.0, -2.5]], requires_grad=True)
    old_logprobs = torch.tensor([[-1.5, -1.0], [-2.0, -1.0], [-4.5, -5.0], [-2.0, -2.0]])
    rewards = torch.tensor([[0.3, -0.2], [1.0, 2.0], [-1.0, 0.5], [0.7, 0.7]])  # y wins, y' wins, y' wins, a tie
    beta = 0.5
    by_hand = []
    for (lp, lp2), (old, old2), (r, r2) in zip(logprobs.tolist(), old_logprobs.tolist(), rewards.tolist()):
        (lw, ow), (ll, ol) = ((lp, old), (lp2, old2)) if r > r2 else ((lp2, old2), (lp, old))
        margin = beta * (lw - ow) - beta * (ll - ol) if r != r2 else 0.0
        by_hand.append(-math.log(1 / (1 + math.exp(-margin))))
    loss = iterative_dpo_tldr.iterative_dpo_loss(logprobs, old_logprobs, rewards, beta)
    assert loss.item() == pytest.approx(sum(by_hand) / len(by_hand))
    loss.backward()
    assert (logprobs.grad[3] == 0).all()  # a tie teaches nothing, yet counts in the mean
    # descending it raises ln pi of the preferred response and lowers the other
    assert logprobs.grad[0, 0] < 0 < logprobs.grad[0, 1] and logprobs.grad[1, 1] < 0 < logprobs.grad[1, 0]
    # DPO's loss (dpo_tldr.py) with pi_t as the reference and the pairs ordered by reward: the same numbers
    order = (rewards[:3, 1] > rewards[:3, 0]).long()[:, None]
    chosen_first = torch.cat([order, 1 - order], 1)
    dpo, _ = dpo_tldr.dpo_loss(logprobs[:3].gather(1, chosen_first), old_logprobs[:3].gather(1, chosen_first), beta)
    assert dpo.item() == pytest.approx(sum(by_hand[:3]) / 3)



def run(workdir, *flags, **kwargs):
    return run_script("iterative_dpo_tldr.py", workdir, *flags, **kwargs)


def metrics_of(workdir, exp_name):
    return read_metrics(workdir, f"tldr__{exp_name}")


@pytest.mark.slow
def test_tiny_run_learns_and_saves(workdir):
    keys = {"update", "episode", "objective/scores", "objective/kl", "objective/rewards", "objective/eos_share",
            "dpo/loss", "dpo/approxkl", "dpo/loss_first_epoch", "dpo/loss_last_epoch", "policy/entropy",
            "train/grad_norm", "lr", "time/rollout_s", "time/update_s", "episodes_per_s", "memory/peak_gb"}
    _, metrics = assert_tiny_run_learns("iterative_dpo_tldr.py", workdir, "idpo_e2e", keys, 0.05)
    # every batch starts at pi_theta = pi_t, where Eq. (21) is ln 2 for every pair; the epochs bring it below
    assert all(m["dpo/loss_first_epoch"] == pytest.approx(math.log(2), abs=1e-4) for m in metrics[1:])
    assert sum(m["dpo/loss_last_epoch"] for m in metrics[1:]) / (len(metrics) - 1) < math.log(2) - 1e-3


@pytest.mark.slow
def test_resume_gives_the_same_metrics(workdir):
    assert_resume_reproduces("iterative_dpo_tldr.py", workdir, "idpo")


@pytest.mark.slow
def test_torchrun_two_processes(workdir):
    """Also runs with two minibatches per epoch and --eval_temperature 0.7."""
    run(workdir, "--exp_name", "idpo_torchrun", "--total_episodes", "64", "--eval_samples", "16",
        "--num_minibatches", "2", "--per_device_train_batch_size", "4", "--eval_temperature", "0.7", torchrun=True)
    run_dir, metrics = metrics_of(workdir, "idpo_torchrun")
    assert [m["update"] for m in metrics] == [0, 1, 2]
    assert metrics[-1]["objective/kl"] != 0  # the policy moved away from pi_0 after the first update
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(f"{run_dir}/model")
