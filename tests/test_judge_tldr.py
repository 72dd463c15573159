"""judge_tldr.py: App. H.1.6's prompt, P(A) read in both orders, the win rate and its standard error against a hand-made
judge, the tiny judge's agreement with its rule, end to end, under torchrun, and refused inputs."""
import csv
import glob
import json
import math
import types

import pytest
import torch
from transformers import ByT5Tokenizer

import judge_tldr
import tiny
from conftest import run_script

H16 = """Which of the following summaries does a better job of summarizing the most important points in the given
forum post, without including unimportant or irrelevant details? Judge based on accuracy, coverage, and
coherence.
### Post:
SUBREDDIT: r/cat

TITLE: dog?

POST: rent job

TL;DR:
### Summary A:
rent job
### Summary B:
cat
### Instructions:
FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why.
SECOND, on a new line, state only "A" or "B" to indicate your choice. Your response should use the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">"""
POST = "SUBREDDIT: r/cat\n\nTITLE: dog?\n\nPOST: rent job\n\nTL;DR:"


def test_the_prompt_is_app_h16_with_the_fields_filled():
    tokenizer = ByT5Tokenizer()
    assert judge_tldr.judge_input(tokenizer, POST, " rent job", " cat") == H16 + "\n"
    tokenizer.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<assistant>"
    assert judge_tldr.judge_input(tokenizer, POST, " rent job", " cat") == f"<user>{H16}</user><assistant>"


class StubJudge:
    """A judge with fixed logits: after "Preferred:", logit(A) - logit(B) = QUALITY[summary A] - QUALITY[summary B] +
    BIAS (a preference for position A); every other logit 0."""
    QUALITY, BIAS = {"good": 2.0, "fair": 0.5, "poor": -1.0}, 0.7

    def __init__(self, tokenizer):
        self.tokenizer, self.a, self.b = tokenizer, *judge_tldr.verdict_tokens(tokenizer)[1:]

    def __call__(self, input_ids, attention_mask, position_ids, logits_to_keep):
        logits = torch.zeros(len(input_ids), 1, len(self.tokenizer))
        for row, ids in enumerate(input_ids):
            text = self.tokenizer.decode(ids[attention_mask[row].bool()])
            summary_a, summary_b = (text.split(f"### Summary {x}:\n")[1].split("\n")[0] for x in "AB")
            logits[row, 0, self.a] = self.QUALITY[summary_a] - self.QUALITY[summary_b] + self.BIAS
        return types.SimpleNamespace(logits=logits)


def test_a_hand_made_judge_gives_the_win_rate_and_standard_error_computed_by_hand():
    tokenizer = ByT5Tokenizer(padding_side="left")
    responses, references = ["good", "poor", "fair", "good"], ["fair", "good", "poor", "good"]
    args = judge_tldr.Args(reasoning=False, batch_size=3)
    result = judge_tldr.judge(StubJudge(tokenizer), tokenizer, [POST] * 4, responses, references, args, "cpu")
    q, sigmoid = StubJudge.QUALITY, lambda x: 1 / (1 + math.exp(-x))
    first = [sigmoid(q[y] - q[o] + StubJudge.BIAS) for y, o in zip(responses, references)]  # the response is A
    second = [1 - sigmoid(q[o] - q[y] + StubJudge.BIAS) for y, o in zip(responses, references)]  # the response is B
    p = [(f + s) / 2 for f, s in zip(first, second)]
    assert result["p_response_first"].tolist() == pytest.approx(first, abs=1e-6)
    assert result["p_response_second"].tolist() == pytest.approx(second, abs=1e-6)
    assert result["p"].tolist() == pytest.approx(p, abs=1e-6) and result["p"][3] == 0.5  # the bias cancels
    swapped = judge_tldr.judge(StubJudge(tokenizer), tokenizer, [POST] * 4, references, responses, args, "cpu")["p"]
    assert torch.equal(result["p"] + swapped, torch.ones(4, dtype=torch.float64))  # exactly
    summary = judge_tldr.win_rate(result["p"], result["p_response_first"], result["p_response_second"])
    mean = sum(p) / 4
    assert summary["win_rate"] == pytest.approx(mean, abs=1e-6)
    assert summary["win_rate_se"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in p) / 3 / 4), abs=1e-6)
    assert summary["hard_win_rate"] == (1 + 0 + 1 + 0.5) / 4
    assert summary["order_disagreement"] == 0.25  # good vs good: A preferred in both orders, by the bias alone


def test_a_samples_file_without_the_needed_columns_is_refused_naming_them(tmp_path):
    with open(tmp_path / "samples_update3.csv", "w", newline="") as f:
        csv.writer(f).writerows([["query", "response"], ["q", "r"]])
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['reference'\]; found \['query', 'response'\]"):
        judge_tldr.comparisons(judge_tldr.Args(samples=(str(tmp_path / "samples_update3.csv"),)))
    with open(tmp_path / "other.csv", "w", newline="") as f:
        csv.writer(f).writerows([["query", "response"], ["another q", "r"]])
    with pytest.raises(ValueError, match="--against .*other.csv: lacks 1 of the 1 prompts of"):
        judge_tldr.comparisons(judge_tldr.Args(samples=(str(tmp_path / "samples_update3.csv"),),
                                               against=str(tmp_path / "other.csv")))
    with pytest.raises(FileNotFoundError, match="--against nowhere.csv: matches 0 files, not one"):
        judge_tldr.comparisons(judge_tldr.Args(samples=(str(tmp_path / "samples_update3.csv"),), against="nowhere.csv"))
    with pytest.raises(ValueError, match="--out x: one output path for 2 samples files"):
        judge_tldr.comparisons(judge_tldr.Args(samples=(str(tmp_path / "*.csv"),), out="x"))
    with pytest.raises(FileNotFoundError, match="--samples nowhere/\\*.csv: no file matches"):
        judge_tldr.comparisons(judge_tldr.Args(samples=("nowhere/*.csv",)))
    work = judge_tldr.comparisons(judge_tldr.Args(samples=(str(tmp_path / "other.csv"),), against=str(
        tmp_path / "other.csv")))
    assert work[0][1] == str(tmp_path / "other_judge_vs_") + tmp_path.name  # beside the file, named for the other run


def test_a_tokenizer_that_reads_a_and_b_alike_is_refused():
    class OneUnknownToken(ByT5Tokenizer):  # A and B are the same unknown token
        def __call__(self, text, **kwargs):
            return super().__call__(text.replace("A", "?").replace("B", "?"), **kwargs)
    with pytest.raises(ValueError, match="--judge_model: its tokenizer reads 'Preferred: A' and 'Preferred: B' as the "
                                         "same tokens"):
        judge_tldr.verdict_tokens(OneUnknownToken())

    class VerdictAloneOtherwise(ByT5Tokenizer):  # "Preferred:" alone is not the start of "Preferred: A"
        def __call__(self, text, **kwargs):
            return super().__call__(text.replace(":", ";") if text == judge_tldr.VERDICT else text, **kwargs)
    with pytest.raises(ValueError, match="--judge_model: its tokenizer splits 'Preferred: A' unlike 'Preferred:' and 'A'"):
        judge_tldr.verdict_tokens(VerdictAloneOtherwise())


class Replier:
    """A judge whose greedy replies are given: generate() appends the next of `replies` to each input."""

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies = tokenizer, list(replies)

    def generate(self, input_ids, attention_mask, **kwargs):
        rows = [self.tokenizer(self.replies.pop(0), add_special_tokens=False).input_ids for _ in input_ids]
        out = torch.full((len(rows), max(map(len, rows))), self.tokenizer.pad_token_id)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row)
        return torch.cat([input_ids, out], 1)


def test_reasoning_reads_the_verdict_after_the_judges_sentence_and_forces_a_missing_one():
    tokenizer = ByT5Tokenizer(padding_side="left")
    replies = ["Comparison: A is more precise.\nPreferred: A", "B is shorter.", "Preferred : B"]
    contexts, sentences, forced = judge_tldr.verdict_contexts(Replier(tokenizer, replies), tokenizer, ["x1 ", "x2 ", "x3 "],
                                                              judge_tldr.Args(batch_size=2), "cpu")
    assert contexts == ["x1 Comparison: A is more precise.\nPreferred:", "x2 B is shorter.\nPreferred:", "x3 Preferred:"]
    assert sentences == ["Comparison: A is more precise.", "B is shorter.", ""] and forced == 1


@pytest.fixture(scope="session")
def tiny_judge(workdir):
    tiny.write_judge(f"{workdir}/runs/tiny/judge")
    return f"{workdir}/runs/tiny/judge"


@pytest.mark.slow
def test_the_tiny_judge_follows_its_rule_on_held_out_pairs(tiny_judge):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_judge, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_judge).eval()
    pairs = tiny.judge_pairs(200, seed=2)  # neither the training (0) nor the validation (1) pairs
    with torch.no_grad():
        p = judge_tldr.judge(model, tokenizer, *zip(*[p[:3] for p in pairs]), judge_tldr.Args(reasoning=False), "cpu")["p"]
    agreement = ((p > 0.5) == torch.tensor([p[3] == "A" for p in pairs])).double().mean().item()
    assert agreement >= 0.7, agreement


@pytest.mark.slow
def test_tiny_end_to_end_both_modes_head_to_head_and_torchrun(workdir, tiny_judge):
    run_script("rebel_tldr.py", workdir, "--exp_name", "judged", "--total_episodes", "64", "--eval_every", "1",
               "--eval_samples", "16")
    (run_dir,) = glob.glob(f"{workdir}/runs/tldr__judged__*")
    summaries = {}
    for mode in ["--reasoning", "--no-reasoning"]:
        run_script("judge_tldr.py", workdir, "--samples", f"{run_dir}/samples_update2.csv", mode)
        with open(f"{run_dir}/judge_update2.json") as f:
            summaries[mode] = json.load(f)
        with open(f"{run_dir}/judge_update2.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == summaries[mode]["n"] == 16
    assert summaries["--reasoning"]["reasoning"] and not summaries["--no-reasoning"]["reasoning"]
    run_script("judge_tldr.py", workdir, "--samples", f"{run_dir}/samples_update2.csv", "--against",
               f"{run_dir}/samples_update0.csv", "--no-reasoning")
    with open(f"{run_dir}/judge_update2_vs_{run_dir.rsplit('/', 1)[1]}.csv", newline="") as f:
        others = {r["query"]: r["other"] for r in csv.DictReader(f)}
    with open(f"{run_dir}/samples_update0.csv", newline="") as f:  # the other run's summaries, matched by prompt
        assert others == {r["query"]: r["response"] for r in csv.DictReader(f)}
    run_script("judge_tldr.py", workdir, "--samples", f"{run_dir}/samples_update2.csv", "--no-reasoning", "--out",
               f"{workdir}/two_ranks", torchrun=True)
    with open(f"{workdir}/two_ranks.json") as f:
        assert json.load(f)["win_rate"] == pytest.approx(summaries["--no-reasoning"]["win_rate"], abs=1e-6)
    with open(f"{run_dir}/samples_update2.csv", newline="") as f, open(f"{workdir}/one.csv", "w", newline="") as g:
        csv.writer(g).writerows(list(csv.reader(f))[:2])  # the header and one prompt, for two processes
    proc = run_script("judge_tldr.py", workdir, "--samples", f"{workdir}/one.csv", torchrun=True, check=False)
    assert proc.returncode != 0 and "one.csv: fewer prompts than the 2 processes that share them" in proc.stderr
