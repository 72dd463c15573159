"""rebel_math.py: the verifier on hand-written cases, the two dataset formats and their refusals, and the script end to
end (tiny run, resume, torchrun)."""
import json

import pytest

import rebel_math
from conftest import assert_resume_reproduces, assert_tiny_math_run_learns, read_metrics, run_script


@pytest.mark.parametrize("response, reference, reward", [
    ("3 + 4 = 7, so \\boxed{7}.", "7", 1.0),
    ("\\boxed{1234}", "1,234", 1.0),  # GSM8K's thousands separator, on either side
    ("\\boxed{1,234}", "1234", 1.0),
    ("\\boxed{1,234.50}", "1234.5", 1.0),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),  # nested braces
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1.0),
    ("\\boxed{\\tfrac34}", "\\frac{3}{4}", 1.0),
    ("\\boxed{-5}", "-5", 1.0),
    ("\\boxed{5}", "-5", 0.0),
    ("\\boxed{\u22125}", "-5", 1.0),  # the unicode minus
    ("\\boxed{7.}", "7", 1.0),  # a trailing period
    ("\\boxed{7.0}", "7", 1.0),
    ("\\boxed{$7$}", "7", 1.0),
    ("\\boxed{\\$18.90}", "18.9", 1.0),  # an escaped dollar sign
    ("so it is $\\boxed 2$.", "2", 1.0),  # the brace-less form of a few MATH solutions
    ("\\boxed {7}", "7", 1.0),
    ("\\boxed{12345678901}", "12345678902", 0.0),  # numbers compared exactly
    ("\\boxed{\\frac{-1}{2}}", "-0.5", 1.0),
    ("\\boxed{\\frac123}", "4", 0.0),  # LaTeX's \frac{1}{2}3, not 12/3
    ("\\boxed{3\\frac12}", "3\\frac{1}{2}", 1.0),  # unbraced arguments, as lm-eval's strip_string reads them
    ("\\boxed{3\\sqrt2}", "3\\sqrt{2}", 1.0),
    ("\\boxed{25\\%}", "25", 1.0),  # what strip_string drops: percent, degrees, a unit, a short "x =" prefix
    ("\\boxed{90^\\circ}", "90", 1.0),
    ("\\boxed{10\\text{ dollars}}", "10", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{1e3}", "1000", 0.0),  # digits alone are numbers, no exponent: Fraction("1e9999999") takes minutes
    ("\\boxed{1/0}", "1", 0.0),
    ("\\boxed{3}, no: \\boxed{4}", "4", 1.0),  # several boxed answers: the last counts
    ("\\boxed{3}, no: \\boxed{4}", "3", 0.0),
    ("the answer is 7", "7", 0.0),  # none at all
    ("\\boxed{7", "7", 0.0),  # unclosed
    ("within \\boxed{}.", "", 0.0),  # an empty box is no answer, whatever the reference
    ("\\boxed{x^{2} + 1}", "x^{2}+1", 1.0),  # not a number: compared as normalized text
    ("\\boxed{x^{2} + 2}", "x^{2}+1", 0.0),
])
def test_the_verifier(response, reference, reward):
    assert rebel_math.verify(response, reference) == reward


def test_reference_answers_of_both_formats_and_refusals(tmp_path):
    from transformers import ByT5Tokenizer
    tokenizer = ByT5Tokenizer()
    rows = {"gsm8k": [{"question": "Tom has 3 pens and gets 4. How many?", "answer": "3+4 = <<3+4=7>>7\n#### 7"}],
            "math": [{"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
                     {"problem": "One and one?", "solution": "It is $\\boxed 2$."},
                     {"problem": "Why?", "solution": "No boxed answer: dropped."}],
            "bad": [{"question": "Tom has 3 pens?", "solution": "7"}]}
    for name, row in rows.items():
        (tmp_path / name).mkdir()
        for split in ["train", "test"]:
            with open(tmp_path / name / f"{split}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in row)
    args = rebel_math.Args(dataset=str(tmp_path / "gsm8k"), dataset_config=None, eval_dataset=str(tmp_path / "math"))
    gsm8k = rebel_math.load_prompts(args, tokenizer, "train", 0)
    assert gsm8k[0]["answer"] == "7" and gsm8k[0]["question"] == rows["gsm8k"][0]["question"]
    assert tokenizer.decode(gsm8k[0]["query_token"]) == rebel_math.PROMPT.format(question=rows["gsm8k"][0]["question"])
    assert rebel_math.load_prompts(args, tokenizer, "test", 0, "eval_dataset")["answer"] == ["\\frac{1}{2}", "2"]
    args.dataset = "nosuch/dataset"  # unknown on the hub (or, offline, not in the cache)
    with pytest.raises(ValueError, match="--dataset nosuch/dataset: "):
        rebel_math.load_prompts(args, tokenizer, "train", 0)
    args.eval_dataset = str(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"--eval_dataset .*bad \(test\): neither GSM8K's columns \(question, answer\) "
                                         r"nor MATH's \(problem, solution\); found \['question', 'solution'\]"):
        rebel_math.load_prompts(args, tokenizer, "test", 0, "eval_dataset")


@pytest.mark.slow
def test_tiny_run_learns_resumes_and_runs_under_torchrun(workdir):
    run_dir, metrics = assert_tiny_math_run_learns("rebel_math.py", workdir, "math_e2e", {"rebel/loss"})
    for m in [metrics[0], metrics[10], metrics[20]]:
        assert 0 <= m["eval/accuracy"] <= 1 and 0 <= m["eval/truncated_share"] <= 1 and m["eval/response_length"] > 0
    assert metrics[0]["eval/kl"] == pytest.approx(0, abs=1e-4)
    assert all(0 <= m["objective/scores"] <= 1 and m["train/grad_norm"] < float("inf") for m in metrics[1:])
    with open(f"{run_dir}/samples_update20.csv") as f:
        assert f.readline().strip() == "question,response,answer,correct,kl"
    assert_resume_reproduces("rebel_math.py", workdir, "math_resume", "--num_minibatches", "2", task="math")
    run_script("rebel_math.py", workdir, "--exp_name", "math_ddp", "--total_episodes", "64", "--eval_samples", "16",
               torchrun=True)
    _, metrics = read_metrics(workdir, "math__math_ddp")
    assert [m["update"] for m in metrics] == [0, 1, 2]
