"""Specification of rebel_chat.py: prompts in the policy's chat template (over-long ones dropped and counted), rewards
from an RM with its own tokenizer and template (Gamma without end-of-turn; ArmoRM without its remote code), log-probs
from the response positions only, a shared-bottom reference equal to a full frozen copy of pi_0, and end-to-end tiny
runs (N = 2 with frozen layers, N = 4 best/worst in full-parameter mode, torchrun with DDP and FSDP2) that learn, save,
reload and resume, drop truncated pairs when asked, and stop on non-finite steps. Assertions on a run hold for any
sample it draws, except that learning raises the held-out score."""
import copy
import glob
import json
import math
import os
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import rebel_chat
import tiny
from conftest import (assert_recomputed_with_the_same_gradients, assert_tokenization_is_cached, checkpoint_update,
                      read_metrics, run_script, save_with_custom_code, tensor_layout)


@pytest.fixture(autouse=True)
def one_thread():
    """One thread for the tests that run models in this process, as conftest.py sets for the runs: tiny models gain
    nothing from more, and on a shared CPU spinning threads cost several times the run time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(vocab_size=384, layers=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)).eval()


def tiny_rm(tokenizer, template):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(1)
    tokenizer.chat_template = template
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=4, num_key_value_heads=4,
                                                       intermediate_size=64, num_labels=1, pad_token_id=0)).eval()
    return rebel_chat.ChatRewardModel(model, tokenizer)


def test_remote_code_needs_the_flag(tmp_path):
    """Checkpoints whose configs map to custom code run that code only with --trust_remote_code: the policy (and pi_0,
    its loader's) and the RM. Without it, a known architecture loads as the built-in class."""
    from transformers import ByT5Tokenizer
    policy, rm = tiny_llama(layers=2), tiny_rm(ByT5Tokenizer(extra_ids=0), tiny.CHAT_RM_TEMPLATE)
    save_with_custom_code(policy, tmp_path / "policy", "AutoModelForCausalLM")
    save_with_custom_code(rm.model, tmp_path / "rm", "AutoModelForSequenceClassification")
    rm.tokenizer.save_pretrained(tmp_path / "rm")
    for trust in [False, True]:
        args = SimpleNamespace(trust_remote_code=trust)
        loaded = rebel_chat.load_policy(str(tmp_path / "policy"), torch.float32, args, "cpu", 0)
        reward_model = rebel_chat.load_reward_model(str(tmp_path / "rm"), torch.float32, trust)
        assert [hasattr(m, "custom") for m in [loaded, reward_model.model]] == [trust] * 2
    # a checkpoint without a trained score head (here the policy) is refused, not given a random head
    policy.save_pretrained(tmp_path / "lm")
    rm.tokenizer.save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match=r"--reward_model .*lm: the checkpoint lacks \['score.weight'\]"):
        rebel_chat.load_reward_model(str(tmp_path / "lm"), torch.float32, False)


# a left-padded batch of prompts and right-padded responses of different lengths
BATCH = dict(queries=[[5, 6, 7, 8], [9, 10]], responses=[[11, 12, 1], [13]], pad_id=0, device="cpu")


def test_response_logprobs_equal_those_of_the_whole_logits():
    """The LM head at the response positions only, and the fp32 log-softmax one sequence at a time under checkpoint:
    the same log-probs, entropy and gradients as the log-softmax of the whole [B x T x vocabulary] logits."""
    policy = tiny_llama()
    ids, mask, context_length, response_mask = rebel_chat.pack(**BATCH)
    logprobs, entropy = rebel_chat.response_logprobs(policy, ids, mask, context_length, 0.7, with_entropy=True)
    (logprobs * response_mask).sum().backward()
    grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = policy(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, context_length - 1: -1]
    logits = logits.float() / 0.7
    expected = logits.gather(-1, ids[:, context_length:, None]).squeeze(-1) - logits.logsumexp(-1)
    (expected * response_mask).sum().backward()
    torch.testing.assert_close(logprobs, expected, atol=1e-6, rtol=0)
    expected_entropy = logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)
    torch.testing.assert_close(entropy, expected_entropy.detach(), atol=1e-6, rtol=0)
    for grad, p in zip(grads, policy.parameters()):
        torch.testing.assert_close(grad, p.grad, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_recomputes_layers_in_eval_mode():
    policy = tiny_llama()
    ids, mask, context_length, response_mask = rebel_chat.pack(**BATCH)
    assert_recomputed_with_the_same_gradients(
        policy, rebel_chat.enable_gradient_checkpointing, policy.model.layers[0].mlp,
        lambda m: (rebel_chat.response_logprobs(m, ids, mask, context_length, 0.7)[0] * response_mask).sum())


def test_shared_bottom_reference_equals_a_full_frozen_copy():
    """With the bottom frozen, pi_0's top K layers on the policy's hidden state give pi_0's log-probs, however far the
    trained top has moved; the batch is left-padded prompts plus right-padded responses of different lengths."""
    policy = tiny_llama()
    full_copy = rebel_chat.copy.deepcopy(policy)
    reference = rebel_chat.SharedBottomReference(policy, 2, torch.float32)
    assert sum(p.numel() for p in reference.parameters()) < 0.7 * sum(p.numel() for p in policy.parameters())
    with torch.no_grad():  # "training" moves the top layers, the norm and the head
        for module in [*policy.model.layers[-2:], policy.model.norm, policy.lm_head]:
            for p in module.parameters():
                p.add_(torch.randn_like(p))
    ids, mask, context_length, response_mask = rebel_chat.pack(**BATCH)
    with torch.no_grad():
        logprobs, _ = rebel_chat.response_logprobs(policy, ids, mask, context_length, 0.7)
        shared, _ = rebel_chat.response_logprobs(reference, ids, mask, context_length, 0.7)
        expected, _ = rebel_chat.response_logprobs(full_copy, ids, mask, context_length, 0.7)
    torch.testing.assert_close(shared * response_mask, expected * response_mask)
    assert not torch.allclose(logprobs * response_mask, expected * response_mask, atol=1e-3)  # the policy did move


def test_reward_model_scores_through_its_own_template():
    """A conversation rendered with the RM's template and tokenizer scores what the RM gives the same text written by
    hand; batching (right padding) changes nothing."""
    from transformers import ByT5Tokenizer
    rm = tiny_rm(ByT5Tokenizer(extra_ids=0), tiny.CHAT_RM_TEMPLATE)
    conversations = [[{"role": "user", "content": "Why cat?"}, {"role": "assistant", "content": "dog"}],
                     [{"role": "user", "content": "Tell me about a plan?"}, {"role": "assistant", "content": "job"}]]
    by_hand = ["[INST] Why cat? [/INST] dog</s>", "[INST] Tell me about a plan? [/INST] job</s>"]
    with torch.no_grad():
        expected = torch.cat([rm.model(input_ids=torch.tensor([rm.tokenizer(t, add_special_tokens=False).input_ids]))
                              .logits[:, 0] for t in by_hand])
        torch.testing.assert_close(rm(conversations), expected)


LLAMA3_TEMPLATE = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content']"
                   " + '<|eot_id|>' }}{% endfor %}")


def test_armorm_loads_without_remote_code_and_scores_as_by_hand(tmp_path):
    """A tiny checkpoint in ArmoRM's layout (its state-dict keys, its config.json keys, its remote-code architecture)
    loads without --trust_remote_code and scores gating(h at the prompt's <|eot_id|>) . (W h_last @ T), here with the
    Llama-3 template's text written through a byte-level tokenizer, batched with right padding."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaModel
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=259, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=0)
    backbone = LlamaModel(config).eval()
    state = {f"model.{k}": v for k, v in backbone.state_dict().items()}
    gating = [torch.nn.Linear(a, b) for a, b in [(32, 16), (16, 16), (16, 16), (16, 19)]]
    state |= {f"gating.layers.{i}.{k}": v for i, layer in enumerate(gating) for k, v in layer.state_dict().items()}
    state |= {"regression_layer.weight": torch.randn(19, 32), "gating.logit_scale": torch.tensor([1.5]),
              "reward_transform_matrix": torch.randn(19, 19)}
    os.makedirs(tmp_path / "armo")
    from safetensors.torch import save_file
    save_file(state, tmp_path / "armo" / "model.safetensors")
    with open(tmp_path / "armo" / "config.json", "w") as f:
        json.dump(config.to_dict() | {
            "architectures": ["LlamaForRewardModelWithGating"], "num_objectives": 19, "gating_temperature": 10,
            "gating_hidden_dim": 16, "gating_n_hidden": 3,
            "auto_map": {"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"}}, f)
    tokenizer = ByT5Tokenizer(extra_ids=0)
    tokenizer.chat_template = LLAMA3_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "armo")
    rm = rebel_chat.load_reward_model(str(tmp_path / "armo"), torch.float32, trust_remote_code=False)
    assert isinstance(rm.model, rebel_chat.ArmoRewardModel)
    # what the ranks but rank 0 build under FSDP2 before rank 0 broadcasts the weights: the same tensors and buffers
    # in the same dtypes, without memory; in bf16 too, as on a GPU
    for dtype in [torch.float32, torch.bfloat16]:
        loaded = rebel_chat.load_reward_model(str(tmp_path / "armo"), dtype, False)
        empty = rebel_chat.load_reward_model(str(tmp_path / "armo"), dtype, False, meta=True)
        assert tensor_layout(empty) == tensor_layout(loaded) and all(v.is_meta for v in empty.state_dict().values())
    chats = [("Why cat?", "dog"), ("Tell me about a plan?", "a job and a car")]
    with torch.no_grad():
        scores = rm([[{"role": "user", "content": p}, {"role": "assistant", "content": r}] for p, r in chats])
        for (prompt, response), score in zip(chats, scores):
            head = f"<|start_header_id|>user<|end_header_id|>\n\n{prompt}"
            ids = tokenizer(f"{head}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{response}<|eot_id|>",
                            add_special_tokens=False).input_ids
            hidden = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]
            objectives = state["regression_layer.weight"] @ hidden[-1]
            x = hidden[len(tokenizer(head, add_special_tokens=False).input_ids)]  # the prompt's <|eot_id|>
            for layer in gating[:-1]:
                x = torch.relu(layer(x))
            weights = torch.softmax(gating[-1](x) / 10, 0) * 1.5
            torch.testing.assert_close(score, weights @ (objectives @ state["reward_transform_matrix"]))


class DataArgs:
    max_prompt_length = 40


def test_long_prompts_are_dropped_and_counted_in_the_policy_template(tmp_path, capsys):
    from transformers import ByT5Tokenizer
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = tiny.CHAT_POLICY_TEMPLATE  # 9 + len(prompt) + 1 + 14 tokens
    os.makedirs(tmp_path / "data")
    with open(tmp_path / "data" / "train-00000-of-00001.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": "x" * n}) + "\n" for n in [10, 16, 17, 200])
    args = DataArgs()
    args.dataset = str(tmp_path)
    data = rebel_chat.load_prompts(args, tokenizer, "train", 0)
    assert [len(q) for q in data["query_token"]] == [34, 40]
    assert tokenizer.decode(data["query_token"][0]) == "<|user|>\nxxxxxxxxxx</s><|assistant|>\n"
    assert "dropped 2 of 4 prompts longer than --max_prompt_length 40" in capsys.readouterr().out


def test_tokenized_prompts_are_cached_across_runs(tmp_path):
    from transformers import ByT5Tokenizer
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = tiny.CHAT_POLICY_TEMPLATE
    os.makedirs(tmp_path / "data")
    with open(tmp_path / "data" / "train-00000-of-00001.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "x"}) + "\n")
    assert_tokenization_is_cached("rebel_chat.py", "load_prompts", tokenizer, dataset=str(tmp_path))


def test_nectar_transcripts_become_chat_messages():
    assert rebel_chat.to_messages("Hi there") == [{"role": "user", "content": "Hi there"}]
    assert rebel_chat.to_messages("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a cat.\n\nAssistant:") == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a cat."}]
    assert rebel_chat.to_messages("Human: Hi\n\nAssistant:") == [{"role": "user", "content": "Hi"}]  # no blank line first
    quoting = "Fix this log:\n\nHuman: hi\n\nAssistant: hello"  # a prompt that quotes a transcript is one turn
    assert rebel_chat.to_messages(quoting) == [{"role": "user", "content": quoting}]


def test_response_without_end_of_turn_scores_gamma(monkeypatch):
    """sample_and_score cuts each response after its first end-of-turn (ids 1 or 2 here) and scores the decoded text
    with the RM; a response that reaches max_new_tokens without one gets Gamma whatever the RM says. Log-probs and RM
    scores come from micro-batches (of one response here). With pi_0 every response gets a log-prob pass under pi_t
    and pi_0 (r needs all their KL terms to pick the best and worst of N); without pi_0 (gamma = 0, Section 5.2.1)
    none: the training loop then computes pi_t's for the pairs' responses only."""
    from transformers import ByT5Tokenizer
    policy, tokenizer = tiny_llama(), ByT5Tokenizer()
    rm = tiny_rm(ByT5Tokenizer(extra_ids=0), tiny.CHAT_RM_TEMPLATE)
    tokenizer.chat_template = tiny.CHAT_POLICY_TEMPLATE
    dog, catnip = (tokenizer(w, add_special_tokens=False).input_ids for w in ["dog", "catnip"])
    generated = torch.tensor([dog + [2, 0, 0], catnip])  # "dog" and end-of-turn, then padding; "catnip" never ends
    policy.generate = lambda input_ids, **kwargs: torch.cat([input_ids, generated], 1)
    args = SimpleNamespace(pad_token_id=0, eos_token_ids=(1, 2), max_new_tokens=6, temperature=0.7,
                           penalty_reward_value=-4.0, per_device_train_batch_size=1)
    batch = {"prompt": ["Why cat?", "Why dog?"], "query_token": [[7, 8, 9], [10, 11]]}
    reference = copy.deepcopy(policy)
    scored, response_logprobs = [], rebel_chat.response_logprobs  # sequences per log-prob pass
    monkeypatch.setattr(rebel_chat, "response_logprobs", lambda model, ids, *a: scored.append(len(ids)) or
                        response_logprobs(model, ids, *a))
    with torch.no_grad():
        out = rebel_chat.sample_and_score(policy, reference, rm, tokenizer, batch, 1, 0.7, args, "cpu")
        assert scored == [1, 1, 1, 1]  # pi_t and pi_0, each response on its own
        without_pi_0 = rebel_chat.sample_and_score(policy, None, rm, tokenizer, batch, 1, 0.7, args, "cpu")
        assert scored == [1, 1, 1, 1] and "logprobs" not in without_pi_0 and "kl" not in without_pi_0
        expected = rm([[{"role": "user", "content": "Why cat?"}, {"role": "assistant", "content": "dog"}]])
        logprobs, _ = response_logprobs(policy, *rebel_chat.pack([[7, 8, 9]], [dog + [2]], 0, "cpu")[:3], 0.7)
    assert out["responses"] == [dog + [2], catnip] and out["texts"] == ["dog", "catnip"]
    assert out["contains_eos"].tolist() == [True, False] and out["lengths"].tolist() == [4, 6]
    torch.testing.assert_close(out["scores"], torch.stack([expected[0], torch.tensor(-4.0)]))
    torch.testing.assert_close(out["logprobs"][0], logprobs.sum())
    assert out["kl"].tolist() == [0, 0]  # pi_t = pi_0 before any update


def test_learning_rate_schedules():
    args = SimpleNamespace(lr=1.0, num_epochs=1, num_minibatches=10, num_updates=3, lr_schedule="cosine",
                           warmup_ratio=0.1)
    cosine = [rebel_chat.learning_rate(args, 2, step) for step in range(10)]
    assert cosine[0] == pytest.approx(0.5) and cosine[1] == pytest.approx(1.0) and cosine[-1] < 0.05
    assert all(a >= b for a, b in zip(cosine[1:], cosine[2:]))
    assert rebel_chat.learning_rate(args, 3, 0) == cosine[0]  # restarted in every iteration
    args.lr_schedule = "linear"
    assert rebel_chat.learning_rate(args, 1, 0) == 1.0 and rebel_chat.learning_rate(args, 3, 5) == pytest.approx(1 / 6)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """One folder for all runs, so that the tiny models and data are written once."""
    return tmp_path_factory.mktemp("runs")


def test_tiny_assets_follow_their_paths(tmp_path, monkeypatch):
    """An earlier tiny run's assets (here, their files) do not stop `--tiny --dataset DIR` from writing DIR, and are
    not written again."""
    monkeypatch.chdir(tmp_path)
    earlier = ["runs/tiny_chat/prompts/data/test_prefs-00000-of-00001.jsonl", "runs/tiny_chat/sft/tokenizer_config.json",
               "runs/tiny_chat/reward/tokenizer_config.json"]
    for path in earlier:
        os.makedirs(os.path.dirname(path))
        open(path, "w").close()
    tiny.write_chat(rebel_chat.Args(**{**rebel_chat.TINY, "dataset": "runs/other/prompts"}))
    assert os.path.getsize("runs/other/prompts/data/train_prefs-00000-of-00001.jsonl") > 0
    assert all(os.path.getsize(path) == 0 for path in earlier)


def run(workdir, *flags, **kwargs):
    return run_script("rebel_chat.py", workdir, *flags, **kwargs)


def metrics_of(workdir, exp_name):
    return read_metrics(workdir, f"chat__{exp_name}")


@pytest.fixture(scope="session")
def tiny_run(workdir):
    """The --tiny run (N = 2, last 2 of 4 layers trained), checkpointing at iteration 18: its output and its metrics."""
    proc = run(workdir, "--exp_name", "e2e", "--save_every", "18")
    return proc, *metrics_of(workdir, "e2e")


@pytest.mark.slow
def test_tiny_run_with_frozen_layers_learns_and_saves(workdir, tiny_run):
    proc, run_dir, metrics = tiny_run
    assert "train_prefs: dropped 21 of 1024 prompts longer than --max_prompt_length 64" in proc.stdout
    assert [m["update"] for m in metrics] == list(range(21))
    assert all(0 < m["train/grad_norm"] < float("inf") and m["objective/dropped_share"] == 0 for m in metrics[1:])
    assert all(m["perf/tokens_per_s"] > 0 and m["time/generate_s"] > 0 for m in metrics[1:])
    before, after = metrics[0], metrics[-1]
    # learning, judged on the held-out prompts: the RM score rises (-0.32 to 1.43 in docs/chat.md; the one assertion
    # that depends on the samples), and the KL to pi_0, exactly 0 before the first update, moves
    assert after["eval/scores"] > before["eval/scores"] + 0.5, (before, after)
    assert before["eval/kl"] == pytest.approx(0, abs=1e-4) and after["eval/kl"] != pytest.approx(0, abs=1e-4)
    with open(f"{run_dir}/alpaca_eval_update20.json") as f:
        outputs = json.load(f)
    assert len(outputs) == 64 and set(outputs[0]) == {"instruction", "output", "generator"}
    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(f"{run_dir}/model").state_dict()
    sft = AutoModelForCausalLM.from_pretrained(f"{workdir}/runs/tiny_chat/sft").state_dict()
    for name in sft:  # only the last 2 of 4 layers, the final norm and the head were trained
        trained_part = name.startswith(("model.layers.2.", "model.layers.3.", "model.norm", "lm_head"))
        assert torch.equal(trained[name], sft[name]) != trained_part, name
    # AdamW as the released code configures it: betas (0.9, 0.95), eps 1e-8, weight decay 1e-6
    (group,) = torch.load(f"{run_dir}/checkpoint/state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert (tuple(group["betas"]), group["eps"], group["weight_decay"]) == ((0.9, 0.95), 1e-8, 1e-6)


@pytest.mark.slow
def test_resume_gives_the_same_metrics(workdir, tiny_run):
    _, run_dir, straight = tiny_run
    assert checkpoint_update(f"{run_dir}/checkpoint") == 18
    run(workdir, "--exp_name", "e2e", "--resume_from", f"{run_dir}/checkpoint")
    _, resumed = metrics_of(workdir, "e2e")
    assert [m["update"] for m in resumed] == list(range(21))
    for a, b in zip(straight[19:], resumed[19:]):
        for key in a:
            if not key.startswith(("time/", "episodes_per_s", "memory/", "perf/")):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a["update"])


@pytest.mark.slow
def test_tiny_best_of_4_full_parameter_learns_and_tracks(workdir):
    run(workdir, "--exp_name", "best_of_4", "--num_samples", "4", "--num_layers_unfrozen", "0", "--lr", "3e-4",
        "--num_iterations", "8", "--eval_samples", "32", "--track")
    run_dir, metrics = metrics_of(workdir, "best_of_4")
    before, after = metrics[0], metrics[-1]
    assert after["eval/scores"] > before["eval/scores"] + 0.5, (before, after)
    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(f"{run_dir}/model").state_dict()
    sft = AutoModelForCausalLM.from_pretrained(f"{workdir}/runs/tiny_chat/sft").state_dict()
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], sft["model.layers.0.mlp.up_proj.weight"])
    (run_file,) = glob.glob(f"{workdir}/wandb/offline-run-*/run-*.wandb")
    with open(run_file, "rb") as f:
        assert b"perf/tokens_per_s" in f.read()


@pytest.mark.slow
def test_drop_truncated_leaves_pairs_without_end_of_turn_out(workdir):
    """Responses of at most 8 tokens, so that many never end their turn, scored Gamma = 1e6: a pair with one of them
    in the regression would add about 1e12 to the loss. The pairs dropped are those with a truncated response (a share
    between 1 and 2 times that of truncated responses), and the loss stays that of the others' RM scores. With
    gamma = 0 no KL is logged."""
    run(workdir, "--exp_name", "drop", "--drop_truncated", "--max_new_tokens", "8", "--penalty_reward_value", "1e6",
        "--kl_coef", "0", "--num_iterations", "2", "--eval_samples", "16")
    _, metrics = metrics_of(workdir, "drop")
    assert not any("kl" in key for m in metrics for key in m if key != "rebel/approxkl")
    assert any(m["objective/eos_share"] < 1 for m in metrics[1:])  # there were truncated responses to drop
    for m in metrics[1:]:
        truncated = 1 - m["objective/eos_share"]
        assert truncated - 1e-6 <= m["objective/dropped_share"] <= min(1, 2 * truncated) + 1e-6, m
        assert m["objective/dropped_share"] == 1 or m["rebel/loss"] < 1e3, m  # NaN: no pair left to train on


@pytest.mark.slow
def test_a_minibatch_without_pairs_makes_no_step(workdir):
    """Responses of one token, which end their turn only if that token is the end-of-turn: nearly every pair is
    dropped (here, all of them). A minibatch without a pair makes no AdamW step (one would move the weights by its
    weight decay), so the policy is unchanged exactly when every pair was dropped, and an update without any pair
    logs a NaN loss, not a 0 averaged in. Both relations hold whatever is sampled; the old code failed the first."""
    run(workdir, "--exp_name", "no_pairs", "--drop_truncated", "--max_new_tokens", "1", "--weight_decay", "0.1",
        "--num_iterations", "2", "--eval_samples", "16")
    run_dir, metrics = metrics_of(workdir, "no_pairs")
    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(f"{run_dir}/model").state_dict()
    sft = AutoModelForCausalLM.from_pretrained(f"{workdir}/runs/tiny_chat/sft").state_dict()
    unchanged = all(torch.equal(trained[k], sft[k]) for k in trained)
    assert unchanged == all(m["objective/dropped_share"] == 1 for m in metrics[1:]), [m["objective/dropped_share"]
                                                                                        for m in metrics]
    assert all((m["objective/dropped_share"] == 1) == math.isnan(m["rebel/loss"]) for m in metrics[1:])


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_before_its_step(workdir):
    """eta = NaN makes every loss NaN: the run stops before the first optimizer step, with an error naming the update,
    and the checkpoint of a run that never took a step does not exist."""
    proc = run(workdir, "--exp_name", "nan", "--eta", "nan", "--num_iterations", "3", "--save_every", "1",
               "--eval_samples", "16", check=False)
    assert proc.returncode != 0
    assert "FloatingPointError: update 1: non-finite loss or gradient norm (nan)" in proc.stderr
    run_dir, metrics = metrics_of(workdir, "nan")
    assert [m["update"] for m in metrics] == [0] and not os.path.exists(f"{run_dir}/checkpoint")


@pytest.mark.slow
def test_adamw_settings_and_a_resume_from_the_last_iteration(workdir):
    """The checkpoint holds AdamW with the settings given, and with --lr_schedule cosine the moments of the last
    iteration alone (each iteration a fresh regression); resumed from the run's last iteration, there is nothing to
    train and the model is saved again, the checkpoint's weights. Also --eval_split as a slice of another split (as
    in Section 5.2.1's command): the evaluation prompts are those of the slice, in its order."""
    flags = ["--exp_name", "adamw", "--num_iterations", "2", "--save_every", "1", "--eval_split", "train_prefs[:16]",
             "--adam_betas", "0.8", "0.9", "--adam_eps", "1e-6", "--weight_decay", "0.01", "--lr_schedule", "cosine",
             "--minibatch_size", "8"]
    proc = run(workdir, *flags)
    run_dir, _ = metrics_of(workdir, "adamw")
    with open(glob.glob(f"{workdir}/runs/tiny_chat/prompts/data/train_prefs-*.jsonl")[0]) as f:
        first = [json.loads(line)["prompt"] for line in f][:16]
    with open(f"{run_dir}/alpaca_eval_update2.json") as f:
        instructions = [row["instruction"] for row in json.load(f)]
    dropped = re.search(r"train_prefs\[:16\]: dropped (\d+) of 16 prompts longer", proc.stdout)
    kept = 16 - (int(dropped.group(1)) if dropped else 0)  # those of at most 64 tokens
    assert len(instructions) == kept and instructions == [p for p in first if p in instructions]
    optimizer = torch.load(f"{run_dir}/checkpoint/state.pt", weights_only=True)["optimizer"]
    (group,) = optimizer["param_groups"]
    assert (tuple(group["betas"]), group["eps"], group["weight_decay"]) == ((0.8, 0.9), 1e-6, 0.01)
    assert {float(p["step"]) for p in optimizer["state"].values()} == {4 * 2}  # 4 epochs x 2 minibatches, not 16
    shutil.rmtree(f"{run_dir}/model")
    proc = run(workdir, *flags, "--resume_from", f"{run_dir}/checkpoint")
    with open(f"{run_dir}/metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert [m["update"] for m in logged] == [0, 1, 2]
    assert f'"eval/scores": {logged[-1]["eval/scores"]}' in proc.stdout  # the summary: the last metrics logged
    from transformers import AutoModelForCausalLM
    saved = AutoModelForCausalLM.from_pretrained(f"{run_dir}/model").state_dict()
    for name, value in load_file(f"{run_dir}/checkpoint/model.safetensors").items():
        assert torch.equal(saved[name], value), name


@pytest.mark.slow
def test_settings_that_do_not_fit_the_data_or_model_fail_at_start_up(workdir):
    """Each fails before any model loads ("Loading weights" is what from_pretrained prints) and leaves no run folder."""
    for flags, message in [(["--minibatch_size", "12"], "--batch_size 16 must be a multiple of --minibatch_size 12"),
                           (["--eta", "1", "2"], "--eta takes one value or one per iteration (20), got 2"),
                           (["--num_layers_unfrozen", "99"], "--num_layers_unfrozen 99: --sft_model has")]:
        proc = run(workdir, "--exp_name", "bad_input", *flags, check=False)
        assert proc.returncode != 0 and message in proc.stderr and "Loading weights" not in proc.stderr, flags
    assert not glob.glob(f"{workdir}/runs/chat__bad_input__*")


# Section 5.2.1 in miniature: the whole (sliced) train split as one batch, best/worst of 4, truncated pairs dropped,
# one epoch of minibatches per iteration with a cosine schedule restarted each iteration, and one eta per iteration
# (gamma is 0.05 here, not 0, so that the FSDP2-sharded pi_0 is exercised too)
LARGE_BATCH = ["--num_layers_unfrozen", "0", "--train_split", "train_prefs[:70]", "--batch_size", "0",
               "--minibatch_size", "16", "--num_epochs", "1", "--num_samples", "4", "--drop_truncated", "--lr", "3e-4",
               "--lr_schedule", "cosine", "--warmup_ratio", "0.1", "--eta", "2", "1", "--gradient_checkpointing",
               "--per_device_train_batch_size", "4"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], LARGE_BATCH], ids=["ddp_frozen", "fsdp2_full_large_batch"])
def test_torchrun_two_processes(workdir, mode):
    """Two ranks stay in step whatever lengths their responses have (FSDP2's generate steps until all ranks are
    done), and the trained model is saved whole. ddp_frozen keeps --tiny's batch sizes, as the README's two-process
    command does."""
    exp_name = "torchrun_" + ("full" if mode else "frozen")
    run(workdir, "--exp_name", exp_name, "--num_iterations", "2", "--eval_samples", "16", *mode, torchrun=True)
    run_dir, metrics = metrics_of(workdir, exp_name)
    assert [m["update"] for m in metrics] == [0, 1, 2]
    assert metrics[-1]["objective/kl"] != 0  # the policy moved away from pi_0 after the first update
    with open(f"{run_dir}/alpaca_eval_update2.json") as f:
        assert len(json.load(f)) == 16  # both ranks' answers
    if mode:  # 68 prompts after the drop: a batch of 64 = 4 minibatches of 16 pairs; eta 2, then 1
        assert [m["episode"] for m in metrics] == [0, 64, 128] and [m["eta"] for m in metrics[1:]] == [2, 1]
        assert metrics[1]["lr"] == metrics[2]["lr"] < 3e-4 / 2  # the end of a cosine, restarted each iteration
    from transformers import AutoModelForCausalLM, GenerationConfig
    AutoModelForCausalLM.from_pretrained(f"{run_dir}/model")
    assert GenerationConfig.from_pretrained(f"{run_dir}/model").eos_token_id == 1  # the SFT model's end-of-turn



def test_bad_flags_are_named_and_meaningful_zeros_pass():
    with pytest.raises(ValueError, match=r"--eta must be positive, got \(1.0, 0.0\)"):
        rebel_chat.check_args(rebel_chat.Args(eta=(1.0, 0.0)))
    with pytest.raises(ValueError, match="--per_device_train_batch_size must be positive, got 0"):
        rebel_chat.check_args(rebel_chat.Args(per_device_train_batch_size=0))
    with pytest.raises(FileNotFoundError, match="--reward_model /no/such/rm: no such local file or folder"):
        rebel_chat.check_args(rebel_chat.Args(reward_model="/no/such/rm"))
    with pytest.raises(ValueError, match="--num_samples 1: a pair needs at least 2 responses per prompt"):
        rebel_chat.check_args(rebel_chat.Args(num_samples=1))
    # 0 means the whole split, the whole batch, no KL term, all layers trained (Section 5.2.1)
    rebel_chat.check_args(rebel_chat.Args(batch_size=0, minibatch_size=0, kl_coef=0.0, num_layers_unfrozen=0))
