"""apo_math.py: A*-PO's V* and regression by hand, and the script end to end (tiny run that learns, resume with V*
from the checkpoint, full-parameter torchrun with FSDP2)."""
import glob
import math

import pytest
import torch

import apo_math
from conftest import assert_resume_reproduces, assert_tiny_math_run_learns, read_metrics, run_script


def test_optimal_values_by_hand():
    scores = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [-1, 0, 1, 1]])
    expected = [0.5 * math.log((math.exp(2) + 3) / 4), 1.0, 0.0,
                0.5 * math.log((math.exp(-2) + 1 + 2 * math.exp(2)) / 4)]
    torch.testing.assert_close(apo_math.optimal_values(scores, 0.5), torch.tensor(expected))
    # beta_1 -> infinity: the mean reward (pi* = pi_0); beta_1 -> 0: the best of the samples
    torch.testing.assert_close(apo_math.optimal_values(scores, 1e4), scores.mean(1), atol=1e-3, rtol=0)
    torch.testing.assert_close(apo_math.optimal_values(scores, 1e-3), scores.max(1).values, atol=2e-3, rtol=0)


def test_apo_loss_by_hand():
    logprobs, ref_logprobs = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -5.0])
    loss = apo_math.apo_loss(logprobs, ref_logprobs, torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.6]), 0.1)
    assert loss.item() == pytest.approx(((0.1 * 1 - (1 - 0.6)) ** 2 + (0 - (0 - 0.6)) ** 2) / 2)


@pytest.mark.slow
def test_tiny_run_learns_resumes_and_runs_under_torchrun(workdir):
    _, metrics = assert_tiny_math_run_learns("apo_math.py", workdir, "apo_e2e", {"apo/loss", "apo/v_star"})
    assert all(0 <= m["apo/v_star"] <= 1 for m in metrics[1:])  # no NaN: V* exists for every prompt trained on
    _, _, run_dir = assert_resume_reproduces("apo_math.py", workdir, "apo_resume", "--num_minibatches", "2",
                                             "--num_value_samples", "2", task="math")
    (state,) = glob.glob(f"{run_dir}/checkpoint*/state.pt")
    saved = torch.load(state, weights_only=True)["v_star"]  # what the resumed run read: its metrics match
    estimated = saved[saved.isfinite()]  # for the 3 x 32 prompts that the run trains on, NaN for the others
    assert saved.shape == (1024,) and len(estimated) == 96 and ((0 <= estimated) & (estimated <= 1)).all()
    # from 2 samples of pi_0 each (--num_value_samples): V* = beta_1 ln mean exp(r / beta_1) of two rewards in {0, 1}
    pairs = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert torch.isclose(estimated[:, None], apo_math.optimal_values(pairs, 0.5)[None]).any(1).all()
    # full-parameter under torchrun: pi_0 sharded with FSDP2, V* sampled from it with as many generate calls per rank
    run_script("apo_math.py", workdir, "--exp_name", "apo_fsdp", "--total_episodes", "64", "--eval_samples", "16",
               "--lora_rank", "0", "--lr", "1e-4", torchrun=True)
    _, metrics = read_metrics(workdir, "math__apo_fsdp")
    assert [m["update"] for m in metrics] == [0, 1, 2] and all(0 <= m["apo/v_star"] <= 1 for m in metrics[1:])
