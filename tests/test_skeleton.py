"""Specification of the skeleton that the TL;DR scripts share: its copies are identical; a checkpoint survives a kill
at any step of its swap; a resume that would change what is trained is refused; weights that do not fit are refused;
two runs never share a folder; bad flags and paths fail at start-up, naming them."""
import ast
import dataclasses

import pytest
import torch

import rebel_tldr
from conftest import ROOT, save_killed_at

TLDR_SCRIPTS = ["rebel_tldr", "ppo_tldr", "dpo_tldr", "rloo_tldr", "iterative_dpo_tldr", "rebel_spo_tldr"]
# the shared skeleton: defined once per script, in the same words everywhere; what a script changes is its algorithm
SKELETON = ["TINY", "pad", "generate", "first_eos", "token_logprobs", "response_logprobs", "sample_and_score",
            "ScalarRewardModel", "load_reward_model", "shard", "shard_from_rank0", "load_policy",
            "enable_gradient_checkpointing", "gathered", "load_prompts", "check_args", "new_run_dir", "RESUMABLE",
            "find_checkpoint", "save_checkpoint", "load_checkpoint", "mean_over_ranks", "evaluate"]
OWN = {"ppo_tldr": {"sample_and_score"}, "dpo_tldr": {"TINY"}, "rebel_spo_tldr": {"TINY"}}


def definitions(script):
    """Each top-level function, class and constant of SCRIPT by name, as source."""
    with open(f"{ROOT}/{script}.py") as f:
        source = f.read()
    names = {}
    for node in ast.parse(source).body:
        targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        for name in [getattr(node, "name", None), *targets]:
            if name:
                names[name] = ast.get_source_segment(source, node)
    return names


@pytest.mark.parametrize("script", TLDR_SCRIPTS[1:])
def test_the_skeleton_is_the_same_in_every_tldr_script(script):
    reference, copy = definitions("rebel_tldr"), definitions(script)
    for name in SKELETON:
        if name not in OWN.get(script, ()):
            assert copy.get(name) == reference[name], f"{script}.{name} differs from rebel_tldr.{name}"


@pytest.mark.parametrize("script, names", [
    ("rebel_chat", ["pad", "shard", "shard_from_rank0", "gathered", "new_run_dir", "find_checkpoint", "save_checkpoint",
                    "load_checkpoint", "mean_over_ranks"]),
    ("rebel_lcm", ["new_run_dir", "find_checkpoint", "mean_over_ranks", "rebel_loss"]),
    ("rebel_math", ["pad", "generate", "first_eos", "token_logprobs", "response_logprobs", "rebel_loss", "shard",
                    "shard_from_rank0", "load_policy", "enable_gradient_checkpointing", "gathered", "check_args",
                    "new_run_dir", "RESUMABLE", "find_checkpoint", "save_checkpoint", "load_checkpoint",
                    "mean_over_ranks"])])
def test_chat_lcm_and_math_share_the_skeletons_words(script, names):
    reference, copy = definitions("rebel_tldr"), definitions(script)
    for name in names:
        assert copy[name] == reference[name], f"{script}.{name} differs from rebel_tldr.{name}"


MATH_SKELETON = ["PROMPT", "last_boxed", "normalize", "verify", "pad", "generate", "first_eos", "token_logprobs",
                 "response_logprobs", "sample_and_score", "shard", "shard_from_rank0", "load_policy",
                 "enable_gradient_checkpointing", "gathered", "load_prompts", "ZERO_ALLOWED", "check_args",
                 "new_run_dir", "RESUMABLE", "find_checkpoint", "save_checkpoint", "load_checkpoint", "mean_over_ranks",
                 "evaluate"]


@pytest.mark.parametrize("script, own", [("grpo_math", {"sample_and_score"}), ("apo_math", set())])
def test_the_math_baselines_share_rebel_maths_skeleton(script, own):
    reference, copy = definitions("rebel_math"), definitions(script)
    for name in MATH_SKELETON:
        if name not in own:
            assert copy.get(name) == reference[name], f"{script}.{name} differs from rebel_math.{name}"


def tiny_checkpoint(tmp_path, update, policy, args):
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.1)
    policy(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    rebel_tldr.save_checkpoint(str(tmp_path / "checkpoint"), policy, optimizer, torch.Generator(), update, args, 0)
    return optimizer


def test_a_kill_at_any_step_of_the_checkpoint_swap_leaves_a_whole_checkpoint(tmp_path, monkeypatch):
    """save_checkpoint killed before each of its file operations (by an exception there): the checkpoint found
    afterwards is whole, the previous update's or the new one's, with that update's weights."""
    args = rebel_tldr.Args()
    outcomes = []
    for kill_at in range(10):
        folder = tmp_path / str(kill_at)
        torch.manual_seed(0)
        policy = torch.nn.Linear(3, 2)
        tiny_checkpoint(folder, 1, policy, args)
        weights = {1: policy.weight.detach().clone()}
        killed = save_killed_at(lambda: tiny_checkpoint(folder, 2, policy, args), rebel_tldr, kill_at, monkeypatch)
        weights[2] = policy.weight.detach().clone()
        found = rebel_tldr.find_checkpoint(str(folder / "checkpoint"), args)
        loaded = torch.nn.Linear(3, 2)
        update = rebel_tldr.load_checkpoint(found, loaded, torch.optim.AdamW(loaded.parameters()), torch.Generator(),
                                            0)["update"]
        torch.testing.assert_close(loaded.weight, weights[update], atol=0, rtol=0)
        outcomes.append((update, found.endswith(".old"), killed))
    assert outcomes[0] == (1, False, True) and outcomes[-1] == (2, False, False)  # killed at once; not killed
    assert (1, True, True) in outcomes  # killed between the renames: the previous checkpoint, from checkpoint.old


def test_resume_with_other_training_settings_is_refused(tmp_path):
    args = rebel_tldr.Args(batch_size=32, lora_rank=8)
    tiny_checkpoint(tmp_path, 1, torch.nn.Linear(3, 2), args)
    path = str(tmp_path / "checkpoint")
    assert rebel_tldr.find_checkpoint(path, dataclasses.replace(args, save_every=3, track=True)) == path
    with pytest.raises(ValueError, match="would change what is trained: batch_size 32 -> 16, lora_rank 8 -> 0$"):
        rebel_tldr.find_checkpoint(path, dataclasses.replace(args, batch_size=16, lora_rank=0))
    # the evaluation draws from the rollouts' random stream: another schedule would sample other rollouts
    with pytest.raises(ValueError, match="would change what is trained: eval_every 100 -> 1$"):
        rebel_tldr.find_checkpoint(path, dataclasses.replace(args, eval_every=1))
    # another script's checkpoint (here one with a flag that rebel_tldr.py lacks) is refused, not half-compared
    @dataclasses.dataclass
    class OtherArgs(rebel_tldr.Args):
        preference_model: str = "a judge"
    tiny_checkpoint(tmp_path / "other", 1, torch.nn.Linear(3, 2), OtherArgs(batch_size=32, lora_rank=8))
    with pytest.raises(ValueError, match="would change what is trained: preference_model a judge -> None$"):
        rebel_tldr.find_checkpoint(str(tmp_path / "other" / "checkpoint"), args)
    with pytest.raises(FileNotFoundError, match="--resume_from .*/elsewhere: no checkpoint there"):
        rebel_tldr.find_checkpoint(str(tmp_path / "elsewhere"), args)


def test_weights_that_do_not_fit_the_model_are_refused(tmp_path):
    """A LoRA checkpoint loaded into a model without LoRA, say: an error, not weights silently left untrained."""
    tiny_checkpoint(tmp_path, 1, torch.nn.Linear(3, 2), rebel_tldr.Args())
    other = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="holds 2 weights this model does not train and lacks 2 that it does"):
        rebel_tldr.load_checkpoint(str(tmp_path / "checkpoint"), other, torch.optim.AdamW(other.parameters()),
                                   torch.Generator(), 0)


def test_two_runs_with_one_name_get_two_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = rebel_tldr.new_run_dir("tldr__x__1__17"), rebel_tldr.new_run_dir("tldr__x__1__17")
    assert (first, second) == ("runs/tldr__x__1__17", "runs/tldr__x__1__17_2")
    assert (tmp_path / first).is_dir() and (tmp_path / second).is_dir()


@pytest.mark.parametrize("flags, message", [
    (dict(eta=0.0), "--eta must be positive, got 0.0"), (dict(eta=-1.0), "--eta must be positive, got -1.0"),
    (dict(num_minibatches=0), "--num_minibatches must be positive, got 0"),
    (dict(eval_samples=-3), "--eval_samples must be at least 0, got -3"),
    (dict(rollout_batch_size=0), "--rollout_batch_size must be positive, got 0"),
    (dict(temperature=0.0), "--temperature must be positive, got 0.0"),
    (dict(reward_model="/no/such/rm"), "--reward_model /no/such/rm: no such local file or folder"),
    (dict(dataset="./data"), "--dataset ./data: no such local file or folder")])
def test_bad_flags_and_paths_are_named(flags, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        rebel_tldr.check_args(rebel_tldr.Args(**flags))
    rebel_tldr.check_args(rebel_tldr.Args())  # the paper's defaults pass (hub IDs)
