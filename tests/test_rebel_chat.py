"""Specification of rebel_chat.py: prompts in the policy's chat template (over-long ones dropped and counted), rewards
from an RM with its own tokenizer and template (Gamma without end-of-turn), a shared-bottom reference equal to a full
frozen copy of pi_0, and end-to-end tiny runs (N = 2 with frozen layers, N = 4 best/worst in full-parameter mode,
torchrun with DDP and FSDP2) that learn, save, reload and resume."""
import glob
import json
import os
from types import SimpleNamespace

import pytest
import torch

import rebel_chat
from conftest import read_metrics, run_script

ENV = dict(os.environ, OMP_NUM_THREADS="1")  # conftest.py sets HF_HUB_OFFLINE=1 and WANDB_MODE=offline; one thread
# per process: tiny models gain nothing from more, and on a shared CPU spinning threads cost several times the run time


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
    ids, mask, context_length, response_mask = rebel_chat.pack([[5, 6, 7, 8], [9, 10]], [[11, 12, 1], [13]], 0, "cpu")
    with torch.no_grad():
        logprobs, _ = rebel_chat.response_logprobs(policy, ids, mask, context_length, 0.7)
        shared, _ = rebel_chat.response_logprobs(reference, ids, mask, context_length, 0.7)
        expected, _ = rebel_chat.response_logprobs(full_copy, ids, mask, context_length, 0.7)
    torch.testing.assert_close(shared * response_mask, expected * response_mask)
    assert not torch.allclose(logprobs * response_mask, expected * response_mask, atol=1e-3)  # the policy did move


def test_reward_model_scores_through_its_own_template():
    """A conversation rendered with the RM's template and tokenizer scores what the RM gives the same text written by
    hand; batching (right padding) changes nothing, and so does the one-at-a-time path of custom-code RMs."""
    from transformers import ByT5Tokenizer
    rm = tiny_rm(ByT5Tokenizer(extra_ids=0), rebel_chat.TINY_RM_TEMPLATE)
    conversations = [[{"role": "user", "content": "Why cat?"}, {"role": "assistant", "content": "dog"}],
                     [{"role": "user", "content": "Tell me about a plan?"}, {"role": "assistant", "content": "job"}]]
    by_hand = ["[INST] Why cat? [/INST] dog</s>", "[INST] Tell me about a plan? [/INST] job</s>"]
    with torch.no_grad():
        expected = torch.cat([rm.model(input_ids=torch.tensor([rm.tokenizer(t, add_special_tokens=False).input_ids]))
                              .logits[:, 0] for t in by_hand])
        torch.testing.assert_close(rm(conversations), expected)
        rm.per_token = False  # as for ArmoRM: the model's own forward, one conversation at a time
        torch.testing.assert_close(rm(conversations), expected)


class DataArgs:
    max_prompt_length = 40


def test_long_prompts_are_dropped_and_counted_in_the_policy_template(tmp_path, capsys):
    from transformers import ByT5Tokenizer
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = rebel_chat.TINY_POLICY_TEMPLATE  # 9 + len(prompt) + 1 + 14 tokens
    os.makedirs(tmp_path / "data")
    with open(tmp_path / "data" / "train-00000-of-00001.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": "x" * n}) + "\n" for n in [10, 16, 17, 200])
    args = DataArgs()
    args.dataset = str(tmp_path)
    data = rebel_chat.load_prompts(args, tokenizer, "train", 0)
    assert [len(q) for q in data["query_token"]] == [34, 40]
    assert tokenizer.decode(data["query_token"][0]) == "<|user|>\nxxxxxxxxxx</s><|assistant|>\n"
    assert "dropped 2 of 4 prompts longer than --max_prompt_length 40" in capsys.readouterr().out


def test_nectar_transcripts_become_chat_messages():
    assert rebel_chat.to_messages("Hi there") == [{"role": "user", "content": "Hi there"}]
    assert rebel_chat.to_messages("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a cat.\n\nAssistant:") == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a cat."}]


def test_response_without_end_of_turn_scores_gamma():
    """sample_and_score cuts each response after its first end-of-turn (ids 1 or 2 here) and scores the decoded text
    with the RM; a response that reaches max_new_tokens without one gets Gamma whatever the RM says."""
    from transformers import ByT5Tokenizer
    policy, tokenizer = tiny_llama(), ByT5Tokenizer()
    rm = tiny_rm(ByT5Tokenizer(extra_ids=0), rebel_chat.TINY_RM_TEMPLATE)
    tokenizer.chat_template = rebel_chat.TINY_POLICY_TEMPLATE
    dog, catnip = (tokenizer(w, add_special_tokens=False).input_ids for w in ["dog", "catnip"])
    generated = torch.tensor([dog + [2, 0, 0], catnip])  # "dog" and end-of-turn, then padding; "catnip" never ends
    policy.generate = lambda input_ids, **kwargs: torch.cat([input_ids, generated], 1)
    args = SimpleNamespace(pad_token_id=0, eos_token_ids=(1, 2), max_new_tokens=6, temperature=0.7,
                           penalty_reward_value=-4.0)
    batch = {"prompt": ["Why cat?", "Why dog?"], "query_token": [[7, 8, 9], [10, 11]]}
    times = dict(generate=0.0, logprobs=0.0, reward=0.0, tokens=0)
    with torch.no_grad():
        out = rebel_chat.sample_and_score(policy, rebel_chat.copy.deepcopy(policy), rm, tokenizer, batch, 1, 0.7, args,
                                          "cpu", times)
        expected = rm([[{"role": "user", "content": "Why cat?"}, {"role": "assistant", "content": "dog"}]])
    assert out["responses"] == [dog + [2], catnip] and out["texts"] == ["dog", "catnip"]
    assert out["contains_eos"].tolist() == [True, False] and times["tokens"] == 10
    torch.testing.assert_close(out["scores"], torch.stack([expected[0], torch.tensor(-4.0)]))
    torch.testing.assert_close(out["logprobs"], out["ref_logprobs"])  # pi_t = pi_0 before any update


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


def run(workdir, *flags, **kwargs):
    return run_script("rebel_chat.py", workdir, *flags, env=ENV, **kwargs)


def metrics_of(workdir, exp_name):
    return read_metrics(workdir, f"chat__{exp_name}")


@pytest.fixture(scope="session")
def tiny_run(workdir):
    """The --tiny run (N = 2, last 2 of 4 layers trained), checkpointing at iteration 18: its output and its metrics."""
    proc = run(workdir, "--exp_name", "e2e", "--save_every", "18")
    return proc, *metrics_of(workdir, "e2e")


def test_tiny_run_with_frozen_layers_learns_and_saves(workdir, tiny_run):
    proc, run_dir, metrics = tiny_run
    assert "train_prefs: dropped 21 of 1024 prompts longer than --max_prompt_length 64" in proc.stdout
    assert [m["update"] for m in metrics] == list(range(21))
    before, after = metrics[0], metrics[-1]
    # learning, judged on the held-out prompts: the RM score rises, and the policy still ends its turns
    assert after["eval/scores"] > before["eval/scores"] + 0.5, (before, after)
    assert after["eval/eos_share"] > 0.9
    assert after["eval/kl"] > 0 and before["eval/kl"] == pytest.approx(0, abs=1e-4)
    assert all(m["perf/tokens_per_s"] > 0 and m["time/generate_s"] > 0 for m in metrics[1:])
    with open(f"{run_dir}/alpaca_eval_update20.json") as f:
        outputs = json.load(f)
    assert len(outputs) == 64 and set(outputs[0]) == {"instruction", "output", "generator"}
    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(f"{run_dir}/model").state_dict()
    sft = AutoModelForCausalLM.from_pretrained(f"{workdir}/runs/tiny_chat/sft").state_dict()
    for name in sft:  # only the last 2 of 4 layers, the final norm and the head were trained
        trained_part = name.startswith(("model.layers.2.", "model.layers.3.", "model.norm", "lm_head"))
        assert torch.equal(trained[name], sft[name]) != trained_part, name


def test_resume_gives_the_same_metrics(workdir, tiny_run):
    _, run_dir, straight = tiny_run
    with open(f"{run_dir}/checkpoint/state.json") as f:
        assert json.load(f)["update"] == 18
    run(workdir, "--exp_name", "e2e", "--resume_from", f"{run_dir}/checkpoint")
    _, resumed = metrics_of(workdir, "e2e")
    assert [m["update"] for m in resumed] == list(range(21))
    for a, b in zip(straight[19:], resumed[19:]):
        for key in a:
            if not key.startswith(("time/", "eps", "memory/", "perf/")):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a["update"])


def test_tiny_best_of_4_full_parameter_learns_and_tracks(workdir):
    run(workdir, "--exp_name", "best_of_4", "--num_samples", "4", "--num_layers_unfrozen", "0", "--lr", "3e-4",
        "--num_iterations", "8", "--eval_samples", "32", "--track")
    run_dir, metrics = metrics_of(workdir, "best_of_4")
    before, after = metrics[0], metrics[-1]
    assert after["eval/scores"] > before["eval/scores"] + 0.5, (before, after)
    assert all(m["objective/reward_gap"] > 0 for m in metrics[1:])  # best minus worst of 4
    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(f"{run_dir}/model").state_dict()
    sft = AutoModelForCausalLM.from_pretrained(f"{workdir}/runs/tiny_chat/sft").state_dict()
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], sft["model.layers.0.mlp.up_proj.weight"])
    (run_file,) = glob.glob(f"{workdir}/wandb/offline-run-*/run-*.wandb")
    with open(run_file, "rb") as f:
        assert b"perf/tokens_per_s" in f.read()


# Section 5.2.1 in miniature: the whole (sliced) train split as one batch, best/worst of 4, gamma = 0, one epoch of
# minibatches per iteration with a cosine schedule restarted each iteration, and one eta per iteration
LARGE_BATCH = ["--num_layers_unfrozen", "0", "--train_split", "train_prefs[:70]", "--batch_size", "0",
               "--minibatch_size", "16", "--num_epochs", "1", "--num_samples", "4", "--kl_coef", "0", "--lr", "3e-4",
               "--lr_schedule", "cosine", "--warmup_ratio", "0.1", "--eta", "2", "1"]


@pytest.mark.parametrize("mode", [[], LARGE_BATCH], ids=["ddp_frozen", "fsdp2_full_large_batch"])
def test_torchrun_two_processes(workdir, mode):
    """Under torchrun the ranks' responses differ in length (they stop at end-of-turn); FSDP2 still stays in step."""
    exp_name = "torchrun_" + ("full" if mode else "frozen")
    run(workdir, "--exp_name", exp_name, "--num_iterations", "2", "--eval_samples", "16",
        "--per_device_train_batch_size", "4", *mode, torchrun=True)
    run_dir, metrics = metrics_of(workdir, exp_name)
    assert [m["update"] for m in metrics] == [0, 1, 2]
    assert metrics[-1]["objective/kl"] != 0  # the policy moved away from pi_0 after the first update
    with open(f"{run_dir}/alpaca_eval_update2.json") as f:
        assert len({len(o["output"]) for o in json.load(f)}) > 1
    if mode:  # 68 prompts after the drop: a batch of 64 = 4 minibatches of 16 pairs; eta 2, then 1
        assert [m["episode"] for m in metrics] == [0, 64, 128] and [m["eta"] for m in metrics[1:]] == [2, 1]
        assert metrics[1]["lr"] == metrics[2]["lr"] < 3e-4 / 2  # the end of a cosine, restarted each iteration
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(f"{run_dir}/model")
