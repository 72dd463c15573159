# Table 1's win rate with a local LLM judge: Gao et al., "REBEL: Reinforcement Learning via Regressing Relative
# Rewards", NeurIPS 2024, Section 5.1 and App. H.1.6 (the GPT-4 prompt, verbatim). Single file, CleanRL style.
# Judges the samples_update{N}.csv of any TL;DR script: each summary against the human reference, or two runs head to
# head; every comparison in both orders, so that the judge's position bias cancels.
#   python judge_tldr.py --tiny                                       # a tiny run's samples, tiny judge, CPU
#   torchrun --nproc_per_node 8 judge_tldr.py --samples "runs/tldr__rebel_tldr__1__*/samples_update1953.csv"
import csv
import glob
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer


@dataclass
class Args:
    samples: tuple[str, ...] = ()
    """samples_update{N}.csv files of TL;DR runs (globs); each response is judged against its reference"""
    against: Optional[str] = None
    """another run's samples file (a glob matching one): its responses in place of the references, head to head"""
    judge_model: str = "Qwen/Qwen2.5-7B-Instruct"
    """the judge: any causal LM, a hub ID or a local path; its chat template is used when it has one"""
    reasoning: bool = True
    """the judge writes the prompt's one-sentence comparison before its verdict; --no-reasoning asks for the verdict
    at once (one forward pass per comparison)"""
    max_new_tokens: int = 128
    """most tokens of the judge's comparison sentence"""
    batch_size: int = 8
    """comparisons per generate call or forward pass on one device"""
    trust_remote_code: bool = False
    """allow a judge with custom code from the hub"""
    out: Optional[str] = None
    """the outputs' path without extension, for one samples file; by default judge_update{N}(_vs_{run}) beside it"""
    tiny: bool = False
    """a tiny judge (tiny.py, runs/tiny/judge) on tiny runs' samples, CPU: TINY's values become defaults"""


TINY = dict(judge_model="runs/tiny/judge", samples=("runs/tldr__*/samples_update*.csv",), max_new_tokens=16,
            batch_size=32)

# App. H.1.6, as printed (quotes straight)
PROMPT = """Which of the following summaries does a better job of summarizing the most important points in the given
forum post, without including unimportant or irrelevant details? Judge based on accuracy, coverage, and
coherence.
### Post:
{post}
### Summary A:
{summary_a}
### Summary B:
{summary_b}
### Instructions:
FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why.
SECOND, on a new line, state only "A" or "B" to indicate your choice. Your response should use the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">"""
VERDICT = "Preferred:"


def judge_input(tokenizer, post, summary_a, summary_b):
    """The prompt as the judge reads it: in its chat template's user turn when it has one, else as plain text."""
    prompt = PROMPT.format(post=post, summary_a=summary_a.strip(), summary_b=summary_b.strip())
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt + "\n"


def verdict_tokens(tokenizer):
    """The tokens that say A and B after "Preferred:", and the text between (" " for a tokenizer of single bytes, ""
    where " A" is one token, as in BPE): the first tokens at which "Preferred: A" and "Preferred: B" differ."""
    a, b = (tokenizer(f"{VERDICT} {x}", add_special_tokens=False).input_ids for x in "AB")
    prefix = tokenizer(VERDICT, add_special_tokens=False).input_ids
    first = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), None)
    if first is None:
        raise ValueError(f"--judge_model: its tokenizer reads '{VERDICT} A' and '{VERDICT} B' as the same tokens")
    if a[:len(prefix)] != prefix or first < len(prefix):
        raise ValueError(f"--judge_model: its tokenizer splits '{VERDICT} A' unlike '{VERDICT}' and 'A'")
    return tokenizer.decode(a[len(prefix):first]), a[first], b[first]


def p_first(model, tokenizer, contexts, tokens, batch_size, device):
    """P(A) = softmax over {A, B} of the judge's next-token logits after each context (which ends at "Preferred:"),
    from one forward pass per batch that computes logits at the last position only."""
    suffix, a, b = tokens
    probabilities = []
    for i in range(0, len(contexts), batch_size):
        batch = tokenizer([c + suffix for c in contexts[i: i + batch_size]], add_special_tokens=False,
                          padding=True, return_tensors="pt").to(device)
        logits = model(**batch, position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0),
                       logits_to_keep=1).logits[:, -1].float()
        probabilities.append(torch.sigmoid(logits[:, a] - logits[:, b]))
    return torch.cat(probabilities).cpu()


def verdict_contexts(model, tokenizer, inputs, args, device):
    """Each input followed by the judge's reply up to its "Preferred:": with --reasoning its greedy comparison
    sentence first (a reply without "Preferred:" gets one appended, counted as forced), else "Preferred:" at once."""
    if not args.reasoning:
        return [x + VERDICT for x in inputs], [""] * len(inputs), 0
    contexts, sentences, forced = [], [], 0
    for i in range(0, len(inputs), args.batch_size):
        batch = tokenizer(inputs[i: i + args.batch_size], add_special_tokens=False, padding=True,
                          return_tensors="pt").to(device)
        out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False, top_p=None, top_k=None,
                             temperature=None, repetition_penalty=1.0, pad_token_id=tokenizer.pad_token_id)
        for x, reply in zip(inputs[i: i + args.batch_size], tokenizer.batch_decode(
                out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)):
            if found := re.search(r"Preferred\s*:", reply):
                contexts.append(x + reply[: found.start()] + VERDICT)
            else:
                contexts.append(x + reply.rstrip() + "\n" + VERDICT)
                forced += 1
            sentences.append(reply[: found.start() if found else len(reply)].strip())
    return contexts, sentences, forced


def judge(model, tokenizer, posts, responses, others, args, device):
    """P(response > other) per prompt: the judge's P(A) with the response as A, and its P(B) = 1 - P(A) with the
    response as B, averaged (written as 1/2 + the difference of the P(A)s / 2, so that P(response > other) +
    P(other > response) = 1 exactly in floating point); the judge's bias for a position cancels."""
    tokens = verdict_tokens(tokenizer)
    inputs = [judge_input(tokenizer, p, *pair) for p, y, o in zip(posts, responses, others) for pair in [(y, o), (o, y)]]
    contexts, sentences, forced = verdict_contexts(model, tokenizer, inputs, args, device)
    p_a = p_first(model, tokenizer, contexts, tokens, args.batch_size, device).double().view(-1, 2)
    return dict(p_response_first=p_a[:, 0], p_response_second=1 - p_a[:, 1], p=0.5 + (p_a[:, 0] - p_a[:, 1]) / 2,
                sentences=sentences, forced=forced)


def win_rate(p, response_first, response_second):
    """Mean P(response > other) and its standard error over prompts; the same for the hard verdict (1 when p > 1/2,
    1/2 at a tie); the share of prompts whose two orders disagree."""
    hard = (p > 0.5).double() + 0.5 * (p == 0.5).double()
    n = len(p)
    return dict(n=n, win_rate=p.double().mean().item(), win_rate_se=(p.double().std() / n ** 0.5).item() if n > 1 else 0.0,
                hard_win_rate=hard.mean().item(), hard_win_rate_se=(hard.std() / n ** 0.5).item() if n > 1 else 0.0,
                order_disagreement=((response_first > 0.5) != (response_second > 0.5)).double().mean().item())


# ---- infrastructure: inputs, start-up checks, outputs ----

def read_samples(path, columns):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if missing := [c for c in columns if not rows or c not in rows[0]]:
        raise ValueError(f"{path}: lacks column(s) {missing}" + (f"; found {list(rows[0])}" if rows else ", or any row"))
    return rows


def comparisons(args):
    """[(samples file, output path, prompts, responses, the other summaries, rows)], all read and checked."""
    files = sorted({f for pattern in args.samples for f in glob.glob(os.path.expanduser(pattern))})
    if not files:
        raise FileNotFoundError(f"--samples {' '.join(args.samples) or '(none)'}: no file matches" +
                                ("; `python rebel_tldr.py --tiny` writes one" if args.tiny else ""))
    if args.out and len(files) > 1:
        raise ValueError(f"--out {args.out}: one output path for {len(files)} samples files")
    if args.against and len(matches := glob.glob(os.path.expanduser(args.against))) != 1:
        raise FileNotFoundError(f"--against {args.against}: matches {len(matches)} files, not one")
    against = {r["query"]: r["response"] for r in read_samples(matches[0], ["query", "response"])} \
        if args.against else None
    work = []
    for file in files:
        rows = read_samples(file, ["query", "response"] + ([] if against else ["reference"]))
        if against and (missing := [r["query"] for r in rows if r["query"] not in against]):
            raise ValueError(f"--against {args.against}: lacks {len(missing)} of the {len(rows)} prompts of {file}")
        others = [against[r["query"]] if against else r["reference"] for r in rows]
        name = re.fullmatch(r"samples_update(\d+)\.csv", os.path.basename(file))
        out = args.out or (f"{os.path.dirname(file)}/judge_update{name[1]}" if name else file[: -len(".csv")] + "_judge")
        if against:
            out += f"_vs_{os.path.basename(os.path.dirname(os.path.abspath(matches[0])))}"
        work.append((file, out, [r["query"] for r in rows], [r["response"] for r in rows], others, rows))
    return work


if __name__ == "__main__":
    args = tyro.cli(Args, default=Args(tiny=True, **TINY) if "--tiny" in sys.argv else None)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # all_gather_object sends through the current device
        torch.cuda.set_device(device)
    args.judge_model, args.out = (os.path.expanduser(p) if p else p for p in (args.judge_model, args.out))  # --x=~/y too
    if args.tiny and rank == 0:
        import tiny  # test scaffolding, next to this file
        tiny.write_judge(args.judge_model)
    if distributed:
        dist.barrier()
    for name in ["max_new_tokens", "batch_size"]:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.judge_model.startswith((".", "/")) and not os.path.exists(args.judge_model):
        raise FileNotFoundError(f"--judge_model {args.judge_model}: no such local folder")
    work = comparisons(args)
    if few := [file for file, *_, rows in work if len(rows) < world_size]:
        raise ValueError(f"{', '.join(few)}: fewer prompts than the {world_size} processes that share them")

    tokenizer = AutoTokenizer.from_pretrained(args.judge_model, padding_side="left",
                                              trust_remote_code=args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        args.judge_model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        trust_remote_code=args.trust_remote_code).to(device).eval()
    for file, out, posts, responses, others, rows in work:
        start = time.time()
        mine = list(range(rank, len(rows), world_size))  # this rank's prompts
        with torch.no_grad():
            result = judge(model, tokenizer, [posts[i] for i in mine], [responses[i] for i in mine],
                           [others[i] for i in mine], args, device)
        per_prompt = [(i, result["p_response_first"][j].item(), result["p_response_second"][j].item(),
                       result["p"][j].item(), *result["sentences"][2 * j: 2 * j + 2])
                      for j, i in enumerate(mine)]
        forced = result["forced"]
        if distributed:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, (per_prompt, forced))
            per_prompt, forced = sum([g[0] for g in gathered], []), sum(g[1] for g in gathered)
        if rank > 0:
            continue
        per_prompt.sort()
        p, first, second = (torch.tensor([r[k] for r in per_prompt], dtype=torch.float64) for k in [3, 1, 2])
        summary = dict(samples=file, against=args.against, judge_model=args.judge_model, reasoning=args.reasoning,
                       **win_rate(p, first, second), forced_verdicts=forced, seconds=time.time() - start)
        summary["comparisons_per_s"] = 2 * len(rows) / summary["seconds"]
        for column in ["score", "kl"]:  # the RM score and Table 1's KL of the same samples, where the file has them
            if column in rows[0]:
                summary[f"mean_{column}"] = sum(float(r[column]) for r in rows) / len(rows)
        with open(f"{out}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["query", "response", "other", "p_response_first", "p_response_second", "p",
                             "comparison_response_first", "comparison_response_second"])
            writer.writerows([posts[i], responses[i], others[i], *r] for i, *r in per_prompt)
        with open(f"{out}.json", "w") as f:
            json.dump(summary, f, indent=1)
        print(f"{file}: win rate {100 * summary['win_rate']:.1f} +- {100 * summary['win_rate_se']:.1f} % (hard verdicts "
              f"{100 * summary['hard_win_rate']:.1f} %) against the {'other run' if args.against else 'references'}"
              + "".join(f", {k} {summary[f'mean_{c}']:.2f}" for c, k in [("score", "RM score"), ("kl", "KL")]
                        if f"mean_{c}" in summary)
              + f"; {len(rows)} prompts judged in both orders by {args.judge_model} (orders disagree on "
              f"{100 * summary['order_disagreement']:.1f} %, {forced} verdicts forced); wrote {out}.csv and .json")
    if distributed:  # no rank leaves before rank 0 has written: torchrun stops all ranks when one exits with an error
        dist.barrier()
        dist.destroy_process_group()
