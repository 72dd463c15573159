"""rebel_spo_tldr.py (App. D.2): solved exactly, its regression is mirror descent on the iteration-dependent reward
l(x, y, pi_t), whose average policy reaches the minimax winner of an intransitive preference that no reward model
represents; the target's mean over the opponent y'' is l(x, y, pi_t) - l(x, y', pi_t); and the script end to end."""
import glob
import json

import pytest
import torch

import rebel_spo_tldr as spo
from conftest import assert_resume_reproduces, read_metrics, run_script

# P[i, j] = P(i > j): rock-paper-scissors over responses 0, 1, 2 (each beats the next with probability 0.9), and a
# response 3 that every other beats with probability 0.8
P = torch.tensor([[0.5, 0.9, 0.1, 0.8],
                  [0.1, 0.5, 0.9, 0.8],
                  [0.9, 0.1, 0.5, 0.8],
                  [0.2, 0.2, 0.2, 0.5]], dtype=torch.float64)


def test_no_reward_vector_represents_the_cyclic_preference():
    """The best Bradley-Terry fit, P(i > j) = sigmoid(r_i - r_j), misses the cycle by at least 0.35 somewhere."""
    r = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([r], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        optimizer.zero_grad()
        loss = (torch.sigmoid(r[:, None] - r[None, :]) - P).pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    assert (torch.sigmoid(r[:, None] - r[None, :]) - P).abs().max() > 0.35


def test_exact_spo_rebel_reaches_the_minimax_winner():
    """A tabular softmax policy over the 4 responses to one prompt; each iteration solves the script's regression
    (rebel_loss on all pairs (y, y'), the target r_t(y) = E_{y''~pi_t} spo_rewards(P(y > y''))) to convergence. The
    average policy's duality gap max_y l(y, avg) - min_y l(avg, y) falls below 0.05 and the dominated response's
    mass below 0.02."""
    l = 2 * P - 1
    eta, iterations = 0.2, 1200
    pairs = torch.tensor([(i, j) for i in range(4) for j in range(4) if i != j])
    logits = torch.tensor([1.5, 0.0, -1.0, 0.5], dtype=torch.float64)  # pi_0 off the equilibrium: the iterates cycle
    average = torch.zeros(4, dtype=torch.float64)
    for _ in range(iterations):
        old_logprobs = logits.log_softmax(0)
        rewards = spo.spo_rewards(P, binary=False) @ old_logprobs.exp()  # r_t(y) = l(y, pi_t)
        theta = logits.clone().requires_grad_()
        optimizer = torch.optim.LBFGS([theta], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

        def closure():
            optimizer.zero_grad()
            loss = spo.rebel_loss(theta.log_softmax(0)[pairs], old_logprobs[pairs], rewards[pairs], eta)
            loss.backward()
            return loss

        optimizer.step(closure)
        logits = theta.detach()
        torch.testing.assert_close(logits.softmax(0), torch.softmax(old_logprobs + eta * rewards, 0))  # mirror descent
        average += logits.softmax(0) / iterations
    duality_gap = (l @ average).max() - (average @ l).min()
    assert duality_gap < 0.05 and average[3] < 0.02, (duality_gap, average)
    last = logits.softmax(0)  # the last iterate is no minimax winner: the average is the answer
    assert (l @ last).max() - (last @ l).min() > 0.5


def test_the_targets_mean_over_the_opponent_is_the_difference_of_l_against_pi_t():
    g = torch.Generator().manual_seed(0)
    pi = torch.rand(4, generator=g, dtype=torch.float64)
    pi /= pi.sum()
    l_vs_pi = (2 * P - 1) @ pi  # l(x, y, pi_t)
    for y in range(4):
        for y2 in range(4):
            mean = sum(pi[o] * (spo.spo_rewards(P[y, o], False) - spo.spo_rewards(P[y2, o], False)) for o in range(4))
            assert mean.item() == pytest.approx((l_vs_pi[y] - l_vs_pi[y2]).item(), abs=1e-12)
    torch.manual_seed(0)  # binary feedback: 2o - 1, o ~ Bernoulli(P), has the same mean
    samples = spo.spo_rewards(P.expand(20000, 4, 4), True)
    assert set(samples.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(samples.mean(0), 2 * P - 1, atol=0.03, rtol=0)


def test_a_missing_preference_model_is_named():
    with pytest.raises(FileNotFoundError, match="--preference_model ./no/judge: no such local file or folder"):
        spo.check_args(spo.Args(preference_model="./no/judge"))


@pytest.mark.slow
def test_tiny_run_raises_the_judge_win_rate_and_resumes(workdir):
    run_script("rebel_spo_tldr.py", workdir, "--exp_name", "spo")
    run_dir, metrics = read_metrics(workdir, "tldr__spo")
    assert [m["update"] for m in metrics] == list(range(21))
    before, after = metrics[0], metrics[-1]
    assert after["eval/judge_win_rate"] > before["eval/judge_win_rate"] + 0.1, (before, after)
    assert all({"spo/target_abs", "spo/order_disagreement", "rebel/loss", "objective/kl", "policy/entropy"} <= set(m)
               for m in metrics[1:])
    assert all(0 <= m["spo/target_abs"] <= 2 and 0 <= m["spo/order_disagreement"] <= 1 for m in metrics[1:])
    with open(f"{run_dir}/args.json") as f:
        assert json.load(f)["preference_model"] == "runs/tiny/judge"
    assert_resume_reproduces("rebel_spo_tldr.py", workdir, "spo_resume")


@pytest.mark.slow
def test_torchrun_two_processes(workdir):
    run_script("rebel_spo_tldr.py", workdir, "--exp_name", "spo_ddp", "--total_episodes", "64", "--eval_samples", "16",
               "--binary_feedback", torchrun=True)
    _, metrics = read_metrics(workdir, "tldr__spo_ddp")
    assert [m["update"] for m in metrics] == [0, 1, 2] and "eval/judge_win_rate" in metrics[-1]
    assert glob.glob(f"{workdir}/runs/tldr__spo_ddp__*/model/*.safetensors")
