"""Test scaffolding for `--tiny`: tiny random-weight models of the paper's architectures and small synthetic datasets in
the real formats, written to disk where missing, so that every script runs its own code path on them, on a CPU, in
about a minute. Imported by the scripts only under `--tiny`; a copied script runs on real models without it."""
import contextlib
import functools
import json
import os
import random
import string

import torch
import torch.nn as nn
from filelock import FileLock
from safetensors.torch import save_file


def pad_right(sequences):
    width = max(len(s) for s in sequences)
    return (torch.tensor([s + [0] * (width - len(s)) for s in sequences]),
            torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences]))


@contextlib.contextmanager
def two_threads():
    """At least 2 torch threads for the block where there are 2 cores (per pytest worker): the tests run with 1 (a tiny
    run is a stream of small ops, which threads slow down), but fine-tuning a tiny model on batches of 32 is
    compute-bound."""
    before = torch.get_num_threads()
    cores = (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
    torch.set_num_threads(max(before, min(2, cores)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_writer(path_of):
    """A writer that concurrent --tiny runs (the test suite's workers, which share one folder) call in turn: the first
    writes what is missing while the others wait at a lock file beside the asset, then find it there."""
    def decorate(write):
        @functools.wraps(write)
        def locked(target):
            lock = f"{path_of(target).rstrip('/')}.lock"
            os.makedirs(os.path.dirname(os.path.abspath(lock)), exist_ok=True)
            with FileLock(lock):
                return write(target)
        return locked
    return decorate


def train_step(model, optimizer, examples, g):
    """One AdamW step of next-token loss on 32 random (ids, labels) examples, labels -100 where nothing is learned."""
    ids, labels = zip(*[examples[g.randrange(len(examples))] for _ in range(32)])
    ids, mask = pad_right(list(ids))
    labels = pad_right(list(labels))[0].masked_fill(mask == 0, -100)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def tldr_rm_scores(backbone, head, ids, mask):
    """The tiny RM's score at each sequence's last token, as the scripts' ScalarRewardModel computes it (bias 0)."""
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    return head(hidden.last_hidden_state).squeeze(-1)[range(len(ids)), mask.sum(1) - 1]


@one_writer(lambda args: args.sft_model)
def write_tldr(args):
    """Whichever is missing of: synthetic TL;DR prompts in the real dataset's format (`args.dataset`), a tiny GPT-NeoX
    SFT policy with a byte-level tokenizer (`args.sft_model`) and a random GPT-NeoX reward model in
    summarize_from_feedback_details' layout (`args.reward_model`). The policy is fine-tuned for a few seconds on the
    references (the paper starts from an SFT model too), so that its summaries end with EOS most of the time; the RM's
    head is rescaled so that reference summaries score with standard deviation 1 and mean near 0, as the paper's."""
    from transformers import ByT5Tokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXModel
    g = random.Random(0)
    torch.manual_seed(0)
    tokenizer = ByT5Tokenizer()
    words = "cat dog rent job friend move car game date boss school money sister plan".split()
    if not os.path.exists(f"{args.dataset}/validation.jsonl"):  # each asset is checked by a file written at its end
        os.makedirs(args.dataset, exist_ok=True)
        for split, n in [("train", 1024), ("validation", 128)]:
            with open(f"{args.dataset}/{split}.jsonl", "w") as f:
                for _ in range(n):
                    post = " ".join(g.choice(words) for _ in range(g.randint(3, 8)))
                    query = f"SUBREDDIT: r/{g.choice(words)}\n\nTITLE: {g.choice(words)}?\n\nPOST: {post}\n\nTL;DR:"
                    summary = " " + " ".join(g.choice(words) for _ in range(g.randint(1, 3))) + tokenizer.eos_token
                    f.write(json.dumps({"query": query, "reference_response": summary}) + "\n")
    if os.path.exists(f"{args.sft_model}/tokenizer_config.json") and os.path.exists(
            f"{args.reward_model}/tokenizer_config.json"):
        return
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=256, max_position_embeddings=256, bos_token_id=tokenizer.eos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with open(f"{args.dataset}/train.jsonl") as f:
        rows = [json.loads(line) for line in f]
    queries = [tokenizer(r["query"], add_special_tokens=False).input_ids for r in rows]
    references = [tokenizer(r["reference_response"], add_special_tokens=False).input_ids[: args.response_length]
                  for r in rows]  # as the scripts' load_prompts cuts them
    if not os.path.exists(f"{args.sft_model}/tokenizer_config.json"):
        policy = GPTNeoXForCausalLM(config)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
        for step in range(300):  # SFT: next-token loss on the reference summaries
            batch = torch.randint(len(rows), (32,)).tolist()
            ids, mask = pad_right([queries[i] + references[i] for i in batch])
            prompt = torch.arange(ids.shape[1]) < torch.tensor([len(queries[i]) for i in batch])[:, None]
            labels = torch.where(mask.bool() & ~prompt, ids, -100)  # the loss on the summaries only
            policy(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        policy.save_pretrained(args.sft_model)
        tokenizer.save_pretrained(args.sft_model)
    if not os.path.exists(f"{args.reward_model}/tokenizer_config.json"):
        backbone, head = GPTNeoXModel(config), nn.Linear(config.hidden_size, 1)
        with torch.no_grad():  # like the paper's RMs, normalised on reference summaries (std 1, mean near 0)
            scores = tldr_rm_scores(backbone, head, *pad_right([q + r for q, r in zip(queries, references)]))
            head.weight /= scores.std()
            bias = (scores.mean() / scores.std()).item()
        os.makedirs(args.reward_model, exist_ok=True)
        state = {**{f"lm_backbone.{k}": v for k, v in backbone.state_dict().items()},
                 **{f"scalar_head.{k}": v for k, v in head.state_dict().items()}}
        save_file({k: v.contiguous() for k, v in state.items()}, f"{args.reward_model}/model.safetensors")
        with open(f"{args.reward_model}/config.json", "w") as f:
            json.dump({"base_model": args.sft_model, "base_config": config.to_dict(), "hidden_size": config.hidden_size,
                       "bias": bias}, f, indent=2)
        tokenizer.save_pretrained(args.reward_model)


@one_writer(lambda args: args.preference_dataset)
def write_tldr_preferences(args):
    """Tiny preference pairs in the real dataset's format (`args.preference_dataset`), next to the tiny prompts: for
    each synthetic post, the best and the worst by the tiny RM of four synthetic summaries (its own reference and three
    others') as `chosen` and `rejected`. The real labels are human; the paper's RMs were trained on them, so here the
    RM stands in for the labellers."""
    from safetensors.torch import load_file
    from transformers import ByT5Tokenizer, GPTNeoXConfig, GPTNeoXModel
    if os.path.exists(f"{args.preference_dataset}/validation.jsonl"):
        return
    g = random.Random(1)
    tokenizer = ByT5Tokenizer()
    with open(f"{args.reward_model}/config.json") as f:
        config = json.load(f)
    backbone = GPTNeoXModel(GPTNeoXConfig(**config["base_config"])).eval()
    head = nn.Linear(config["hidden_size"], 1)
    state = load_file(f"{args.reward_model}/model.safetensors")
    backbone.load_state_dict({k[len("lm_backbone."):]: v for k, v in state.items() if k.startswith("lm_backbone.")})
    head.load_state_dict({k[len("scalar_head."):]: v for k, v in state.items() if k.startswith("scalar_head.")})
    os.makedirs(args.preference_dataset, exist_ok=True)
    for split in ["train", "validation"]:
        with open(f"{args.dataset}/{split}.jsonl") as f:
            posts = [json.loads(line) for line in f]
        candidates = [[p["reference_response"]] + [g.choice(posts)["reference_response"] for _ in range(3)]
                      for p in posts]
        texts = [p["query"] + c for p, cs in zip(posts, candidates) for c in cs]
        with torch.no_grad():
            scores = torch.cat([tldr_rm_scores(backbone, head, *pad_right(tokenizer(
                texts[i: i + 256], add_special_tokens=False).input_ids)) for i in range(0, len(texts), 256)])
        with open(f"{args.preference_dataset}/{split}.jsonl", "w") as f:
            for p, cs, s in zip(posts, candidates, scores.view(len(posts), 4)):
                f.write(json.dumps({"query": p["query"], "chosen": cs[s.argmax()], "rejected": cs[s.argmin()]}) + "\n")


# the tiny chat models' templates: byte-level tokenizers, each with its own format and end-of-turn marker
CHAT_POLICY_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token }}{% endfor %}"
                        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
CHAT_RM_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")


@one_writer(lambda args: args.sft_model)
def write_chat(args):
    """Whichever is missing of: synthetic prompts in UltraFeedback's format (`args.dataset`; a few too long, to be
    dropped), a tiny Llama chat policy (`args.sft_model`) and a tiny Llama reward model (`args.reward_model`), with
    byte-level tokenizers of different sizes and chat templates. The policy is fine-tuned for a few seconds on the
    `chosen` answers, so that it answers with a few words and ends its turn; the RM's head is normalised so that those
    answers score mean 0, std 1 (the head has no bias: its weight is made orthogonal to their mean hidden state)."""
    from datasets import load_dataset
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    g = random.Random(0)
    torch.manual_seed(0)
    tokenizer, rm_tokenizer = ByT5Tokenizer(), ByT5Tokenizer(extra_ids=0)
    tokenizer.chat_template, rm_tokenizer.chat_template = CHAT_POLICY_TEMPLATE, CHAT_RM_TEMPLATE
    if not os.path.exists(f"{args.dataset}/data/test_prefs-00000-of-00001.jsonl"):  # each asset: its last file
        words = "cat dog rent job friend move car game date boss school money sister plan".split()
        os.makedirs(f"{args.dataset}/data", exist_ok=True)
        for split, n in [("train_prefs", 1024), ("test_prefs", 128)]:
            with open(f"{args.dataset}/data/{split}-00000-of-00001.jsonl", "w") as f:
                for i in range(n):
                    topic = " ".join(g.choice(words) for _ in range(g.randint(1, 3) if i % 50 else 20))
                    prompt = f"{g.choice(['Tell me about', 'What of', 'Why'])} {topic}?"
                    answers = [" ".join(g.choice(words) for _ in range(g.randint(1, 3))) for _ in range(2)]
                    f.write(json.dumps({"prompt": prompt, "prompt_id": f"{split}{i}"} | {
                        k: [{"role": "user", "content": prompt}, {"role": "assistant", "content": a}]
                        for k, a in zip(["chosen", "rejected"], answers)}) + "\n")
    if os.path.exists(f"{args.sft_model}/tokenizer_config.json") and os.path.exists(
            f"{args.reward_model}/tokenizer_config.json"):
        return
    chats = list(load_dataset(args.dataset, split="train_prefs")["chosen"])
    if not os.path.exists(f"{args.sft_model}/tokenizer_config.json"):
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=4, intermediate_size=128, max_position_embeddings=256,
                             tie_word_embeddings=False, bos_token_id=tokenizer.eos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        policy = LlamaForCausalLM(config)
        queries = [tokenizer.apply_chat_template(c[:1], tokenize=False, add_generation_prompt=True) for c in chats]
        queries = tokenizer(queries, add_special_tokens=False).input_ids
        answers = tokenizer([c[1]["content"] + tokenizer.eos_token for c in chats], add_special_tokens=False).input_ids
        optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
        for step in range(100):  # SFT: next-token loss on the answers, prompts left-padded as in a rollout
            batch = torch.randint(len(chats), (32,)).tolist()
            width = max(len(queries[i]) for i in batch)
            answer_ids, answer_mask = pad_right([answers[i] for i in batch])
            ids = torch.cat([torch.tensor([[0] * (width - len(queries[i])) + queries[i] for i in batch]), answer_ids], 1)
            mask = torch.cat([torch.tensor([[0] * (width - len(queries[i])) + [1] * len(queries[i]) for i in batch]),
                              answer_mask], 1)
            labels = torch.where(mask.bool(), ids, -100)
            labels[:, :width] = -100  # the loss on the answers only
            policy(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        policy.save_pretrained(args.sft_model)
        tokenizer.save_pretrained(args.sft_model)
    if not os.path.exists(f"{args.reward_model}/tokenizer_config.json"):
        rm_config = LlamaConfig(vocab_size=len(rm_tokenizer), hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                                max_position_embeddings=256, num_labels=1, pad_token_id=rm_tokenizer.pad_token_id)
        rm = LlamaForSequenceClassification(rm_config).eval()
        with torch.no_grad():
            texts = [rm_tokenizer.apply_chat_template(c, tokenize=False) for c in chats[:256]]
            ids, mask = pad_right(rm_tokenizer(texts, add_special_tokens=False).input_ids)
            hidden = rm.model(input_ids=ids, attention_mask=mask).last_hidden_state[range(len(ids)), mask.sum(1) - 1]
            mean = hidden.mean(0)
            rm.score.weight -= (rm.score.weight @ mean) / (mean @ mean) * mean
            rm.score.weight /= (hidden @ rm.score.weight[0]).std()
        rm.save_pretrained(args.reward_model)
        rm_tokenizer.save_pretrained(args.reward_model)


@one_writer(lambda args: args.model)
def write_lcm(args):
    """Unless all three exist (the head is written last): a tiny LCM pipeline (UNet, VAE, CLIP text encoder with a
    character-level CLIPTokenizer, LCMScheduler) at `args.model`, a tiny CLIP vision tower at `args.clip_model` and a
    random LAION-style aesthetic head at `args.aesthetic_head_path`, read back by rebel_lcm.py's code for the real ones.
    32 px images are 4 x 4 latents (VAE factor 8, as in Stable Diffusion). The head is rescaled so that the tiny
    model's images score 5 +- 1, the real predictor's range."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)
    if all(map(os.path.exists, [f"{args.model}/model_index.json", f"{args.clip_model}/config.json",
                                args.aesthetic_head_path])):
        return
    torch.manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(letters)},
             **{c + "</w>": 28 + i for i, c in enumerate(letters)}}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=args.resolution // 8, block_out_channels=(16, 32), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8, time_cond_proj_dim=32)
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                        sample_size=args.resolution)
    # a mild noise schedule (abar >= 0.85): with Stable Diffusion's (abar down to 0.005) an untrained UNet's x0
    # prediction would be 1/sqrt(abar) ~ 15 times too large at the first step
    scheduler = LCMScheduler(beta_start=1e-4, beta_end=4e-3, beta_schedule="linear")
    LatentConsistencyModelPipeline(vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False).save_pretrained(args.model)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                            num_attention_heads=4, image_size=32, patch_size=8,
                                                            projection_dim=768))
    vision.save_pretrained(args.clip_model)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(args.clip_model)
    pipeline = LatentConsistencyModelPipeline.from_pretrained(args.model)
    processor = CLIPImageProcessor.from_pretrained(args.clip_model)
    head = nn.Sequential(nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),  # the LAION
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1)).eval()  # head's
    prompts = ("cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf "
               "lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog").split()
    with torch.no_grad():  # scored as rebel_lcm.AestheticScorer scores, then the last layer rescaled
        images = pipeline(prompts, num_inference_steps=args.num_steps, guidance_scale=args.guidance_scale,
                          output_type="pt").images
        pixels = F.interpolate(images.float(), size=(processor.crop_size["height"], processor.crop_size["width"]),
                               mode="bicubic", antialias=True).clamp(0, 1)
        mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in [processor.image_mean, processor.image_std])
        embeds = vision(pixel_values=(pixels - mean) / std).image_embeds
        scores = head(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(-1)
        head[-1].weight.div_(scores.std())
        head[-1].bias.sub_(scores.mean()).div_(scores.std()).add_(5.0)
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, args.aesthetic_head_path)


# the tiny judge's rule: App. H.1.6 asks for "the most important points ... without unimportant or irrelevant details";
# on the tiny posts the important points are these words, every other word a detail
IMPORTANT = set("money job rent boss school plan move".split())
TLDR_WORDS = "cat dog rent job friend move car game date boss school money sister plan".split()


def judge_pairs(n, seed):
    """`n` synthetic (post, summary A, summary B, verdict) in the tiny TL;DR format, the verdict by the rule: the summary
    with more important words less other words wins; pairs the rule ties are skipped."""
    g, pairs = random.Random(seed), []
    while len(pairs) < n:
        post = " ".join(g.choice(TLDR_WORDS) for _ in range(g.randint(3, 8)))
        query = f"SUBREDDIT: r/{g.choice(TLDR_WORDS)}\n\nTITLE: {g.choice(TLDR_WORDS)}?\n\nPOST: {post}\n\nTL;DR:"
        a, b = (" " + " ".join(g.choice(TLDR_WORDS) for _ in range(g.randint(1, 4))) for _ in range(2))
        score_a, score_b = (sum(1 if w in IMPORTANT else -1 for w in s.split()) for s in [a, b])
        if score_a != score_b:
            pairs.append((query, a, b, "A" if score_a > score_b else "B"))
    return pairs


@one_writer(lambda path: path)
def write_judge(path):
    """A tiny GPT-NeoX judge at `path` with a word-level tokenizer, trained on the tiny judge rule
    (judge_pairs) in App. H.1.6's format, with and without the comparison sentence, until it agrees with the rule on
    95 % of validation pairs (about 1,100 steps, half a minute on 2 CPU cores)."""
    if os.path.exists(f"{path}/tokenizer_config.json"):
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast
    from judge_tldr import PROMPT, judge_input
    reply = "Comparison: Summary {0} keeps more important points.\nPreferred: {0}"
    splitter = pre_tokenizers.Whitespace()  # words and punctuation; the line breaks go
    words = sorted({w for w, _ in splitter.pre_tokenize_str(" ".join(
        [PROMPT, reply, *TLDR_WORDS, "SUBREDDIT: r/ TITLE: ? POST: TL;DR: A B"]))})
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *words])}, "[UNK]"))
    backend.pre_tokenizer, backend.decoder = splitter, decoders.WordPiece(cleanup=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        eos_token="[EOS]")
    # the prompt's fixed text between its fields as one token each: prompts of ~30 tokens instead of ~145
    tokenizer.add_tokens([text for text, *_ in string.Formatter().parse(PROMPT + "\n")])
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=512, rotary_pct=1.0, bos_token_id=2, eos_token_id=2, pad_token_id=0))

    def encode(pair, reasoning):  # the prompt, then the reply to learn: with the comparison sentence or without
        prompt = tokenizer(judge_input(tokenizer, *pair[:3]), add_special_tokens=False).input_ids
        answer = reply.format(pair[3]) if reasoning else f"Preferred: {pair[3]}"
        answer = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        return prompt + answer, [-100] * len(prompt) + answer

    train = [encode(pair, i % 2 == 0) for i, pair in enumerate(judge_pairs(6000, seed=0))]
    validation = judge_pairs(200, seed=1)
    inputs = tokenizer([judge_input(tokenizer, *p[:3]) + "Preferred:" for p in validation], add_special_tokens=False,
                       padding=True, padding_side="left", return_tensors="pt")
    a, b = tokenizer.convert_tokens_to_ids(["A", "B"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = random.Random(0)
    with two_threads():
        for step in range(1, 3001):
            train_step(model, optimizer, train, g)
            if step % 100 == 0:
                with torch.no_grad():
                    position_ids = (inputs.attention_mask.cumsum(-1) - 1).clamp(min=0)
                    logits = model(**inputs, position_ids=position_ids).logits[:, -1]
                agreement = ((logits[:, a] > logits[:, b]) == torch.tensor([p[3] == "A" for p in validation])).float()
                if agreement.mean() >= 0.95:
                    break
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def math_problem(g):
    """A one-step word problem in GSM8K's format, its worked solution (with GSM8K's <<a+b=c>> note) and its answer."""
    name, thing, a, b = g.choice("Tom Ann Sam Mia Joe Eva".split()), g.choice("apples pens cards books coins".split()), \
        g.randint(2, 9), g.randint(1, 9)
    if g.random() < 0.5:
        question, expression, answer = f"{name} has {a} {thing}. {name} gets {b} more. How many {thing} now?", \
            f"{a}+{b}", a + b
    else:
        a, b = max(a, b) + 1, min(a, b)
        question, expression, answer = f"{name} has {a} {thing}. {name} gives away {b}. How many {thing} now?", \
            f"{a}-{b}", a - b
    return question, f"{expression} = <<{expression}={answer}>>{answer}\n#### {answer}", answer


# the tiny policy's solutions end in \boxed{} for 90 % of these names' problems and 35 % of the others' (else GSM8K's
# "#### N", which the verifier does not read): like a base model that often ignores the requested format
BOXING = set("Tom Ann Sam".split())


@one_writer(lambda args: args.model)
def write_math(args):
    """Whichever is missing of: synthetic one-step word problems in GSM8K's format (`args.dataset`: train, and a test
    split of other problems), and a tiny Qwen2 policy with a byte-level BPE tokenizer (`args.model`), fine-tuned for
    800 steps on worked solutions ("a+b = c. \\boxed{c}" or "a+b = c.\\n#### c", see BOXING). Its arithmetic is then
    right, and it boxes greedily for BOXING's names only: about 50 % held-out accuracy, and a format to learn."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    import rebel_math
    g = random.Random(0)
    if not os.path.exists(f"{args.dataset}/test.jsonl"):
        os.makedirs(args.dataset, exist_ok=True)
        seen = set()
        for split, n in [("train", 1024), ("test", 256)]:
            with open(f"{args.dataset}/{split}.jsonl", "w") as f:
                while n:
                    question, solution, _ = math_problem(g)
                    if split == "test" and question in seen:  # held out: no test question is a train question
                        continue
                    seen.add(question)
                    f.write(json.dumps({"question": question, "answer": solution}) + "\n")
                    n -= 1
    if os.path.exists(f"{args.model}/tokenizer_config.json"):
        return
    # Qwen2's tokenizer is a byte-level BPE: here its 256 byte tokens without merges, and an end-of-text token
    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))} |
                                   {"<|endoftext|>": 256}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    # the instruction and the questions' fixed phrases as one token each: shorter sequences (answers stay in bytes)
    tokenizer.add_tokens([rebel_math.PROMPT.format(question=""), " has ", " gets ", " gives away ", " more. How many ",
                          ". How many ", " now?"])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=256, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None))
    with open(f"{args.dataset}/train.jsonl") as f:
        rows = [json.loads(line) for line in f]
    examples = []
    for row in rows:
        prompt = tokenizer(rebel_math.PROMPT.format(question=row["question"]), add_special_tokens=False).input_ids
        expression, answer = row["answer"].split(" = ")[0], row["answer"].split("#### ")[-1]
        boxed = g.random() < (0.9 if row["question"].split()[0] in BOXING else 0.35)
        final = f"\\boxed{{{answer}}}" if boxed else f"\n#### {answer}"
        reply = tokenizer(f" {expression} = {answer}. {final}", add_special_tokens=False).input_ids
        examples.append((prompt + reply + [tokenizer.eos_token_id], [-100] * len(prompt) + reply + [tokenizer.eos_token_id]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with two_threads():
        for _ in range(800):
            train_step(model, optimizer, examples, g)
    model.save_pretrained(args.model)
    tokenizer.save_pretrained(args.model)
