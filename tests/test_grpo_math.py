"""grpo_math.py: GRPO's group advantages and clipped loss by hand, the refusal of a group of one, and the script end to
end (tiny run that learns, resume, torchrun)."""
import math

import pytest
import torch

import grpo_math
from conftest import assert_resume_reproduces, assert_tiny_math_run_learns, read_metrics, run_script


def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, -1, -1, -1, -1, 1, 0, 0, 0])  # G = 4, -1 is Gamma
    advantages = grpo_math.group_advantages(scores, 4).view(5, 4)
    std = math.sqrt(4 * 0.5 ** 2 / 3)  # unbiased: mean 0.5, four deviations of 0.5
    torch.testing.assert_close(advantages[0], torch.tensor([1.0, -1, -1, 1]) * 0.5 / (std + 1e-6))
    assert torch.equal(advantages[1:4], torch.zeros(3, 4))  # all right, all wrong, all cut: nothing to compare
    torch.testing.assert_close(advantages[4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-6))


def test_grpo_loss_by_hand():
    """Two responses of two tokens and a pad; ratios 1.5 and 0.5 against pi_old, clipped at 1 +- 0.2 where that
    lowers the objective; pi_0 = pi_theta except at one token, where pi_0/pi_theta = 2."""
    old = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -2.0, 0.0]])
    new = old + torch.tensor([[math.log(1.5), math.log(0.5), 0.0]] * 2)
    mask = torch.tensor([[1.0, 1.0, 0.0]] * 2)
    advantages = torch.tensor([1.0, -1.0])
    loss, clipfrac, kl = grpo_math.grpo_loss(new, old, new, advantages, mask, 0.2, 0.04)
    # A = +1: min(1.5, 1.2), min(0.5, 0.8); A = -1: min(-1.5, -1.2), min(-0.5, -0.8); the mean over tokens, then rows
    assert loss.item() == pytest.approx(-((1.2 + 0.5) / 2 + (-1.5 - 0.8) / 2) / 2)
    assert clipfrac.item() == 0.5 and kl.item() == 0.0  # the clip is active at 1.5 for A = +1 and at 0.5 for A = -1
    ref = new + torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]])
    loss_with_kl, _, kl = grpo_math.grpo_loss(new, old, ref, advantages, mask, 0.2, 0.04)
    k3 = 2 - math.log(2) - 1  # pi_0/pi_theta - ln(pi_0/pi_theta) - 1
    assert kl.item() == pytest.approx(k3 / 2 / 2)
    assert loss_with_kl.item() == pytest.approx(loss.item() + 0.04 * k3 / 2 / 2)
    # --clip_range 0.6 clips neither ratio: the two responses' objectives cancel; --kl_coef 0.5 weighs the KL
    loss, clipfrac, _ = grpo_math.grpo_loss(new, old, ref, advantages, mask, 0.6, 0.5)
    assert clipfrac.item() == 0.0 and loss.item() == pytest.approx(0.5 * k3 / 2 / 2)


def test_a_group_of_one_is_refused_before_any_model_loads(tmp_path):
    proc = run_script("grpo_math.py", tmp_path, "--num_generations", "1", tiny=False, check=False)
    assert proc.returncode != 0
    assert "--num_generations 1: GRPO compares responses to one prompt, at least 2" in proc.stderr


@pytest.mark.slow
def test_tiny_run_learns_resumes_and_runs_under_torchrun(workdir):
    assert_tiny_math_run_learns("grpo_math.py", workdir, "grpo_e2e", {"grpo/loss", "grpo/clipfrac", "grpo/kl",
                                                                      "grpo/equal_groups"})
    assert_resume_reproduces("grpo_math.py", workdir, "grpo_resume", "--num_minibatches", "2", task="math")
    run_script("grpo_math.py", workdir, "--exp_name", "grpo_ddp", "--total_episodes", "64", "--eval_samples", "16",
               torchrun=True)
    _, metrics = read_metrics(workdir, "math__grpo_ddp")
    assert [m["update"] for m in metrics] == [0, 1, 2]
