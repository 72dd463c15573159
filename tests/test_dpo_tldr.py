"""Specification of dpo_tldr.py, the offline DPO baseline: the loss is Eq. (7) of Rafailov et al., and the script runs
end to end on tiny models and a tiny preference dataset in the real one's format (single process and torchrun with
DDP+LoRA), learns the held-out preferences, evaluates like rebel_tldr.py and saves."""
import json
import math
import os

import pytest
import torch

import dpo_tldr
from conftest import assert_resume_reproduces, assert_tokenization_is_cached, read_metrics, run_script


def test_dpo_loss_is_its_formula():
    logprobs = torch.tensor([[-1.0, -2.0], [-3.0, -0.5], [-4.0, -4.0]])  # columns: chosen, rejected
    ref_logprobs = torch.tensor([[-1.5, -1.0], [-2.0, -1.0], [-4.0, -4.0]])
    for beta in [0.05, 0.5]:  # the paper's, and another --beta
        by_hand = []
        for (lw, ll), (rw, rl) in zip(logprobs.tolist(), ref_logprobs.tolist()):
            margin = beta * (lw - rw) - beta * (ll - rl)
            by_hand.append(-math.log(1 / (1 + math.exp(-margin))))
        loss, rewards = dpo_tldr.dpo_loss(logprobs, ref_logprobs, beta)
        assert loss.item() == pytest.approx(sum(by_hand) / len(by_hand))
        torch.testing.assert_close(rewards, beta * (logprobs - ref_logprobs))


def test_pairs_share_the_response_column():
    from transformers import ByT5Tokenizer
    tokenizer = ByT5Tokenizer()
    args = dpo_tldr.Args(**dpo_tldr.TINY)
    args.eos_token_id, args.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    batch = {"query_token": [[5, 6, 7], [8]], "chosen_token": [[10, 1], [11, 12, 1]], "rejected_token": [[13, 1], [1]]}
    query_responses, attention_mask, response_mask, context_length = dpo_tldr.pad_pairs(batch, args, "cpu")
    assert context_length == 3
    assert query_responses.tolist() == [[5, 6, 7, 10, 1, 0], [5, 6, 7, 13, 1, 0],
                                        [0, 0, 8, 11, 12, 1], [0, 0, 8, 1, 0, 0]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]]
    assert response_mask.tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]]


def test_tokenized_preferences_are_cached_across_runs(tmp_path):
    from transformers import ByT5Tokenizer
    os.makedirs(tmp_path / "pairs")
    with open(tmp_path / "pairs" / "train.jsonl", "w") as f:
        f.write(json.dumps({"query": "x", "chosen": " y", "rejected": " z"}) + "\n")
    assert_tokenization_is_cached("dpo_tldr.py", "load_preferences", ByT5Tokenizer(),
                                  preference_dataset=str(tmp_path / "pairs"))


def run(workdir, *flags, **kwargs):
    return run_script("dpo_tldr.py", workdir, *flags, **kwargs)


def metrics_of(workdir, exp_name):
    return read_metrics(workdir, f"tldr__{exp_name}")


@pytest.mark.slow
def test_tiny_run_learns_the_held_out_preferences(workdir):
    run(workdir, "--exp_name", "dpo_e2e")
    # the synthetic preference data has the real dataset's text columns and splits
    for split in ["train", "validation"]:
        with open(f"{workdir}/runs/tiny/tldr_preference/{split}.jsonl") as f:
            row = json.loads(f.readline())
        assert set(row) == {"query", "chosen", "rejected"} and row["query"].endswith("TL;DR:")
        assert row["chosen"].endswith("</s>") and row["chosen"] != row["rejected"]
    run_dir, metrics = metrics_of(workdir, "dpo_e2e")
    keys = {"update", "episode", "dpo/loss", "dpo/rewards/chosen", "dpo/rewards/rejected", "dpo/reward_margin",
            "dpo/accuracy", "lr", "time/rollout_s", "time/update_s", "episodes_per_s", "train/grad_norm",
            "memory/peak_gb"}
    assert [m["update"] for m in metrics] == list(range(21))
    assert all(keys <= set(m) for m in metrics[1:])
    before, after = metrics[0], metrics[-1]
    # before training pi = pi_0: every implicit reward is 0, no held-out pair is ranked right
    assert before["eval/dpo/reward_margin"] == pytest.approx(0, abs=1e-5) and before["eval/dpo/accuracy"] == 0
    # learning, judged on held-out pairs: the implicit reward margin and the preference accuracy rise
    assert after["eval/dpo/reward_margin"] > 0.1 and after["eval/dpo/accuracy"] > 0.7, after
    assert after["dpo/loss"] < metrics[1]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-3)
    # the same evaluation as rebel_tldr.py, with the RM: present before and after
    for key in ["eval/scores", "eval/kl_at_eval_temperature", "eval/kl_at_train_temperature", "eval/win_rate",
                "eval/eos_share"]:
        assert key in before and key in after
    assert os.path.exists(f"{run_dir}/samples_update20.csv")
    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(f"{run_dir}/model")
    sft = AutoModelForCausalLM.from_pretrained(f"{workdir}/runs/tiny/sft")
    weight = "gpt_neox.layers.0.attention.query_key_value.weight"
    assert not torch.equal(trained.state_dict()[weight], sft.state_dict()[weight])  # LoRA merged into the weights


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(workdir):
    """Also the data position: the preference pairs of update 3 are those the uninterrupted run trained on."""
    assert_resume_reproduces("dpo_tldr.py", workdir, "dpo_resume", "--eval_pairs", "8")


@pytest.mark.slow
def test_torchrun_two_processes(workdir):
    """Also runs with --eval_temperature 0.7."""
    run(workdir, "--exp_name", "dpo_torchrun", "--total_episodes", "64", "--eval_pairs", "4", "--eval_samples", "16",
        "--eval_temperature", "0.7", torchrun=True)
    run_dir, metrics = metrics_of(workdir, "dpo_torchrun")
    assert [m["update"] for m in metrics] == [0, 1, 2]
    assert metrics[-1]["dpo/reward_margin"] != 0  # the policy moved away from pi_0 after the first update
    assert metrics[-1]["eval/dpo/pairs"] == 4  # the held-out preference pairs: --eval_pairs, not the whole split
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(f"{run_dir}/model")
