#!/usr/bin/env python
"""VinePPO in one file: PPO for LLM reasoning where the value network is replaced by Monte Carlo
rollouts from every reasoning step. Read it beside the paper, arXiv 2410.01679v2
("VinePPO: Refining Credit Assignment in RL Training of LLMs", Kazemnejad et al., ICML 2025).

    python vineppo.py                                   # built-in demo: trains a tiny model on a CPU
    python vineppo.py --model rho-math-1.1b --k 9       # the paper's RhoMath 1.1B SFT model on GSM8K
    python vineppo.py --advantage critic                # the PPO baseline with a value network
    python vineppo.py --model deepseekmath-7b --lora-rank 64 --gradient-checkpointing   # 7B, LoRA adapters only

The file reads top to bottom in the algorithm's order:
  1. arguments            2. tasks and grading       3. reasoning steps
  4. models and sampling  5. advantages (THE part VinePPO changes, plus the baselines it is compared to)
  6. PPO loss and update  7. evaluation (7b: the value analysis of the paper's section 7)
  8. the iteration loop and checkpoints                9. main
Shapes in comments: B sequences, T padded length, d hidden size, V vocabulary, N response tokens (of the
micro-batch or mini-batch a line works on), L one response's tokens, n steps of a response, K continuations.
The heavy lifting (log-probs without logits, prefix-sharing sampling) lives in kernels.py.
"spec N" in comments: section N of docs/vineppo_spec.md, the authors' defaults (from the paper and their code)
that this file follows; `NOTE:` marks a departure (README, "Where we depart from the paper").
"""
import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Optional, Union, get_args, get_origin, get_type_hints

import torch
from tqdm.auto import tqdm

import kernels


# ============================================================================ 1. Arguments
def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    # --- run
    out: str = arg("runs/vineppo", "output folder: config.json, metrics.jsonl, ckpt/ (value_analysis.json)")
    seed: int = arg(1, "seed of sampling, data order and the LoRA init (the demo's SFT stage and the value analysis have their own)")
    iterations: Optional[int] = arg(None, "PPO iterations (default: GSM8K 650, MATH 1000 as in the paper; demo 30)")
    resume: bool = arg(False, "continue the run in --out from its last checkpoint")
    save_every: int = arg(10, "write a checkpoint every this many iterations (and at the end)")
    device: str = arg("auto", "cuda, cpu or auto")
    # --- model and task
    model: str = arg("tiny", "preset (rho-math-1.1b, deepseekmath-7b), Hub id, local folder, or tiny (the demo model trained here)")
    task: str = arg("gsm8k", "gsm8k, math, or arith (the built-in task; the default with --model tiny)")
    train_file: Optional[str] = arg(None, "local JSONL train split in the dataset's own format (instead of the Hub)")
    test_file: Optional[str] = arg(None, "local JSONL test split in the dataset's own format (instead of the Hub)")
    # --- credit assignment
    advantage: str = arg("vine", "vine (MC values, the paper), critic (PPO value network), grpo or rloo")
    k: int = arg(9, "VinePPO: Monte Carlo continuations per state (K)")
    max_states: Optional[int] = arg(None, "VinePPO: only the first this many states get MC values (default: 25 on GSM8K as spec 3, the authors' code 26; on MATH and arith all)")
    # --- sampling (training episodes and MC rollouts)
    prompts_per_iteration: int = arg(64, "prompts per iteration")
    samples_per_prompt: int = arg(8, "responses sampled per prompt")
    temperature: float = arg(0.6, "sampling temperature; log-probs use logits / temperature too")
    top_p: float = arg(0.9, "nucleus sampling threshold")
    max_new_tokens: int = arg(1024, "response length cap; a response that hits it gets reward 0")
    sampler_memory_fraction: float = arg(0.7, "GPU: share of the free memory one sampling batch's KV cache may take (more: fewer, larger batches)")
    sampler_compile: str = arg("auto", "torch.compile the sampler's decoder layers: auto (bf16 weights, e.g. LoRA's base, on a GPU of compute capability >= 8.0: 14-29%% more tokens/s on an H100), on, off")
    # --- PPO update
    epochs: int = arg(2, "PPO epochs over each iteration's episodes")
    mini_batch: int = arg(64, "episodes per optimizer step")
    micro_batch: int = arg(8, "episodes per forward/backward (gradient accumulation up to --mini-batch)")
    lr: float = arg(1e-6, "AdamW learning rate (policy and critic)")
    warmup: float = arg(0.03, "fraction of optimizer steps with linear warm-up; linear decay to 0 after (a skipped mini-batch is no step)")
    clip_eps: float = arg(0.2, "PPO ratio clip epsilon")
    kl_coef: float = arg(1e-4, "coefficient of the k3 KL to the reference in the loss")
    entropy_coef: float = arg(0.0, "entropy bonus coefficient (paper: none)")
    max_grad_norm: float = arg(1.0, "gradient-norm clip")
    skip_ratio: float = arg(10.0, "skip a mini-batch whose mean ratio exceeds this")
    value_clip: float = arg(0.2, "critic: value clip range around the old values")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward (GPU memory for 1B-7B models)")
    lora_rank: int = arg(0, "LoRA rank on every linear layer of the policy but the lm_head (0: full fine-tuning); the frozen base is then the KL reference")
    lora_alpha: Optional[float] = arg(None, "LoRA scale: the update B A is multiplied by alpha / rank (default: 2 x rank)")
    # --- evaluation
    eval_every: int = arg(50, "evaluate every this many iterations (and before training, unless resumed, and at the end)")
    eval_problems: Optional[int] = arg(None, "test problems evaluated (default: all)")
    eval_samples: int = arg(16, "samples per test problem at --eval-temperature (paper: 16)")
    eval_temperature: float = arg(0.35, "evaluation sampling temperature (paper: 0.35)")
    value_analysis: int = arg(0, "after training, the value analysis (paper section 7) on this many states of test responses: <out>/value_analysis.json (0: off)")
    # --- demo only: the tiny model and its SFT stage (cached under $XDG_CACHE_HOME/vineppo)
    sft_steps: int = arg(700, "demo: SFT optimizer steps of the tiny model")
    sft_lr: float = arg(3e-3, "demo: SFT learning rate")
    sft_batch: int = arg(64, "demo: SFT batch size")


PRESETS = {  # spec 1: the authors' SFT checkpoints; the frozen reference is the same checkpoint
    "rho-math-1.1b": {"gsm8k": "realtreetune/rho-1b-sft-GSM8K", "math": "realtreetune/rho-1b-sft-MATH"},
    "deepseekmath-7b": {"gsm8k": "realtreetune/deepseekmath-7b-sft-GSM8K", "math": "realtreetune/deepseekmath-7b-sft-MATH-v2"},
}
PAPER_ITERATIONS = {"gsm8k": 650, "math": 1000, "arith": 30}   # arith: the demo's, not the paper's
SAMPLER_COMPILE_CHOICES = {"auto": "auto", "on": True, "off": False}   # --sampler-compile -> kernels.SAMPLER_COMPILE

# The demo (tiny model, arith task, 2 CPU cores, 10 minutes) departs from the paper's defaults here.
# Each value applies only when the flag is not given on the command line.
DEMO_DEFAULTS = dict(
    task="arith",              # the built-in task: the tiny model reads its character vocabulary only
    k=4,                       # NOTE: paper K=9; 4 keeps MC rollouts at ~half the iteration on 2 cores
    samples_per_prompt=4,      # NOTE: paper 8; 64 x 4 = 256 episodes is the smallest stable batch we found
    temperature=1.0,           # NOTE: paper 0.6; the tiny model trained from scratch is already sharp
    top_p=1.0,                 # NOTE: paper 0.9; no nucleus cut on a 20-token vocabulary
    max_new_tokens=150,        # the longest solutions (5 worked multiplications) are ~125 characters
    mini_batch=128, micro_batch=128,  # 2 epochs x 2 mini-batches = 4 optimizer steps per iteration
    lr=1e-4,                   # NOTE: paper 1e-6 for 1B-7B models; on the tiny model 3e-5 also learns, about half as fast
    eval_every=10, eval_problems=500, eval_samples=4,
)


def parse_args(argv=None) -> Args:
    """Args from the command line; invalid values end the program with a one-line error."""
    demo = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO_DEFAULTS.items())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=(
        f"The defaults shown are for the real models (the paper's where it has one). With --model tiny (the default) the demo's apply to the flags not "
        f"given: {demo}, --iterations {PAPER_ITERATIONS['arith']}."))
    hints = get_type_hints(Args)
    for f in dataclasses.fields(Args):
        flag, typ = "--" + f.name.replace("_", "-"), hints[f.name]
        if get_origin(typ) is Union:  # Optional[X] -> X
            typ = [t for t in get_args(typ) if t is not type(None)][0]
        if typ is bool:
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=f.metadata["help"])
        else:
            said = "(default" in f.metadata["help"]   # the help already says what the default depends on
            parser.add_argument(flag, type=typ, default=argparse.SUPPRESS,
                                help=f.metadata["help"] + ("" if said else f" (default: {f.default})"))
    given = vars(parser.parse_args(argv))
    args = Args(**given)
    if args.model == "tiny":
        for name, value in DEMO_DEFAULTS.items():
            if name not in given:
                setattr(args, name, value)
    if args.max_states is None and args.task == "gsm8k":
        args.max_states = 25   # spec 3 caps GSM8K's MC states (the authors' code at 26), not MATH's
    if args.iterations is None:
        args.iterations = PAPER_ITERATIONS[args.task] if args.task in PAPER_ITERATIONS else 0
    error = validate(args)
    if error:
        parser.exit(2, f"vineppo.py: error: {error}\n")
    return args


def validate(args: Args) -> Optional[str]:
    if args.task not in ("arith", "gsm8k", "math"):
        return f"unknown --task {args.task!r} (choose arith, gsm8k or math)"
    if args.advantage not in ADVANTAGE_METHODS:
        return f"unknown --advantage {args.advantage!r} (choose {', '.join(ADVANTAGE_METHODS)})"
    if args.model in PRESETS and args.task not in PRESETS[args.model]:
        return f"--model {args.model} has SFT checkpoints for --task {' and '.join(PRESETS[args.model])} only"
    if args.model == "tiny" and args.task != "arith":
        return "--model tiny is the demo model with a character vocabulary: it runs --task arith only"
    if args.model != "tiny" and args.model not in PRESETS and not os.path.isdir(args.model) \
            and not re.fullmatch(r"[\w.-]+/[\w.-]+", args.model):
        return f"--model {args.model!r} is not a preset ({', '.join(PRESETS)}, tiny), a local folder or a Hub id owner/name"
    for name in ("k", "iterations", "prompts_per_iteration", "samples_per_prompt", "max_new_tokens", "epochs",
                 "mini_batch", "micro_batch", "eval_samples", "save_every", "eval_every", "max_states"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})"
    if args.eval_problems is not None and args.eval_problems < 1:
        return f"--eval-problems must be >= 1 (got {args.eval_problems})"
    if args.lora_rank < 0 or (args.lora_alpha is not None and (args.lora_alpha <= 0 or args.lora_rank == 0)):
        return "--lora-rank must be >= 0, and --lora-alpha > 0 and only with --lora-rank >= 1"
    if args.advantage in ("grpo", "rloo") and args.samples_per_prompt < 2:
        return f"--advantage {args.advantage} needs --samples-per-prompt >= 2"
    if not 0 < args.top_p <= 1 or args.temperature <= 0:
        return "--top-p must be in (0, 1] and --temperature > 0"
    if not 0 < args.sampler_memory_fraction <= 1:
        return f"--sampler-memory-fraction must be in (0, 1] (got {args.sampler_memory_fraction})"
    if args.sampler_compile not in SAMPLER_COMPILE_CHOICES:
        return f"unknown --sampler-compile {args.sampler_compile!r} (choose auto, on or off)"
    for name in ("train_file", "test_file"):
        if getattr(args, name) and not os.path.isfile(getattr(args, name)):
            return f"--{name.replace('_', '-')} {getattr(args, name)!r} does not exist"
    return None


# ============================================================================ 2. Tasks and grading
PROMPT = "[MATH_TASK] Problem:\n{problem}\n\nSolution:"  # spec 2; the model continues with "\n" + solution
STOP_STRINGS = ["\n\n\nProblem:"]


def format_prompt(problem: str, task: str) -> str:
    # NOTE: the paper's prompt is PROMPT for both datasets; the arith demo uses "<problem>\n" because the tiny
    # model reads characters: PROMPT's letters are not in its vocabulary, and its 32 characters would make the
    # sequences about 1.5x longer.
    return f"{problem}\n" if task == "arith" else PROMPT.format(problem=problem)


def make_arith_problem(rng: random.Random) -> dict:
    """The built-in task: `a op b op c ...` evaluated left to right modulo 100, one step per line.
    a in 0-99, 3-5 operations from {+, -, *} with operands 1-9; one slip anywhere ruins the answer, so
    which step went wrong is exactly the credit-assignment question. The solutions write each
    multiplication in one of two ways, at random: recalled (`47*8=76`: one of 900 facts) or worked out
    digit by digit (`47*8=40*8+7*8=20+56=76`: single-digit facts and an addition). The tiny model
    recalls many facts wrongly but works most out right, so the SFT model knows both ways and picks
    either; which way to take at each multiplication is the behaviour RL has to learn from 0/1 rewards."""
    x = rng.randrange(100)
    problem, lines = str(x), []
    for _ in range(rng.randint(3, 5)):
        op, b = rng.choice("+-*"), rng.randint(1, 9)
        y = {"+": x + b, "-": x - b, "*": x * b}[op] % 100
        problem += f"{op}{b}"
        if op == "*" and rng.random() < 0.5:   # worked: (10 t + u) * b = 10 (t b mod 10) + u b  (mod 100)
            t, u = divmod(x, 10)
            lines.append(f"{x}*{b}={t}0*{b}+{u}*{b}={t * b % 10 * 10}+{u * b}={y}\n")
        else:
            lines.append(f"{x}{op}{b}={y}\n")
        x = y
    return {"problem": problem, "solution": "".join(lines) + f"#### {x}", "answer": str(x)}


def worked_share(texts: list) -> Optional[float]:
    """arith: share of the multiplication steps in `texts` that are worked out rather than recalled."""
    mults = re.findall(r"^\d+\*\d=(\d+0\*)?", "\n".join(texts), flags=re.M)   # group 1 matches the worked form
    return sum(bool(m) for m in mults) / len(mults) if mults else None


def load_problems(task: str, split: str, path: Optional[str] = None) -> list:
    """Rows {problem, solution, answer}: `answer` is the gold final answer alone."""
    if path:  # local JSONL in the dataset's own format (arith: rows as make_arith_problem writes them)
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if task == "arith":
            return rows
    elif task == "arith":  # seeded, fixed splits; test problems never appear in train
        test = [make_arith_problem(random.Random(f"arith-test-{i}")) for i in range(1000)]
        if split == "test":
            return test
        seen = {row["problem"] for row in test}
        train = (make_arith_problem(random.Random(f"arith-train-{i}")) for i in range(20000))
        return [row for row in train if row["problem"] not in seen]
    else:
        from datasets import load_dataset
        if task == "gsm8k":
            rows = load_dataset("openai/gsm8k", "main", split=split)
        else:  # MATH: a maintained copy of the train split; MATH500 for test (spec 8)
            rows = load_dataset("HuggingFaceH4/MATH-500" if split == "test" else "DigitalLearningGmbH/MATH-lighteval",
                                split=split)
    fields = ("question", "answer") if task == "gsm8k" else ("problem", "solution")
    if len(rows) and not all(f in rows[0] for f in fields):
        raise SystemExit(f"vineppo.py: error: {path or task} ({split}): --task {task} rows have the fields {fields}")
    if task == "gsm8k":
        out = [{"problem": r["question"].strip(), "solution": r["answer"], "answer": r["answer"].split("####")[-1].strip()}
               for r in rows if "####" in r["answer"]]
    else:
        out = [{"problem": r["problem"], "solution": r["solution"], "answer": r.get("answer") or last_boxed(r["solution"])}
               for r in rows]
    out = [r for r in out if r["answer"]]   # NOTE: dropped: a problem without a gold answer could only ever score 0
    if len(out) < len(rows):
        where = "no ####" if task == "gsm8k" else "no \\boxed{}"
        print(f"{path or task} ({split}): {len(rows) - len(out)} of {len(rows)} problems have no final answer "
              f"({where}): left out", file=sys.stderr)
    return out


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}), with nested braces."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def strip_stop(text: str) -> str:
    for s in STOP_STRINGS:
        text = text.split(s)[0]
    return text


def extract_answer(response: str, task: str) -> Optional[str]:
    response = strip_stop(response)
    if task == "math":
        return last_boxed(response)
    if "####" not in response:
        return None
    return response.rsplit("####", 1)[1].strip().split("\n")[0].strip()


def _as_number(s: str) -> Optional[Decimal]:
    try:
        d = Decimal(s.replace(",", "").replace("$", "").replace(" ", "").rstrip("."))
    except InvalidOperation:
        return None
    # "NaN" / "Infinity" are not answers ("sNaN" would raise on ==), nor is 1e9999999999 (normalize() overflows)
    return d if d.is_finite() and abs(d.adjusted()) < 1000 else None


def _gsm8k_key(answer: str) -> str:
    """A GSM8K answer's canonical form, for grading and voting alike: its number normalised ("72.0", "7.2e1" and
    "72" give "72"; -0 gives "0"), or, for an answer that is no number, its text without commas and spaces."""
    d = _as_number(answer)
    if d is None:
        return answer.replace(",", "").replace(" ", "")
    return "0" if d.is_zero() else str(d.normalize())


def grade(response: str, gold: str, task: str) -> bool:
    """Is the final answer of `response` equal to `gold` (the final answer alone)?
    arith: exact string. gsm8k: numeric equality after removing ",", "$", spaces and a trailing ".", so "72.0" == "72"
    (an answer that is no number: the strings without commas and spaces)
    (NOTE: the authors' code compares strings, after removing commas and lower-casing (spec 8: commas and spaces);
    numeric equality forgives formatting only).
    math: last \\boxed{} vs gold, mathematical equivalence by math-verify; a gold that does not parse never scores."""
    pred = extract_answer(response, task)
    if pred is None or pred == "":
        return False
    if task == "arith":
        return pred == gold.strip()
    if task == "gsm8k":
        return _gsm8k_key(pred) == _gsm8k_key(gold)
    from math_verify import parse, verify
    gold_parsed = parse(f"${gold}$", fallback_mode="no_fallback")
    if not gold_parsed:
        return False
    return bool(verify(gold_parsed, parse(f"${pred}$")))


def answer_key(answer: str, task: str) -> str:
    """A final answer's class for majority voting: answers that grade() counts as equal share a key
    (gsm8k: the number, so "72.0" and "72" vote together; math: math-verify's parsed expression, so
    "\\frac12", "1/2" and "0.5" do; arith: the string)."""
    if task == "gsm8k":
        return _gsm8k_key(answer)
    if task == "math":
        from math_verify import parse
        parsed = parse(f"${answer}$")
        return str(parsed[0]) if parsed else answer
    return answer


# ============================================================================ 3. Reasoning steps
def split_steps(response: str, task: str) -> list:
    """Reasoning steps of a response (spec 3); "".join(steps) == response always.
    State s_i = prompt + steps[:i]; VinePPO estimates V(s_i) for i = 0..n-1 (the first --max-states of them).
    A stop string (and what its last token carried past it) is not a step: it joins the last step. (The authors'
    vLLM cuts it off; here its sampled tokens stay in the response, so they need a step, but no MC state.)"""
    cut = min([i for i in (response.find(s) for s in STOP_STRINGS) if i >= 0], default=len(response))
    body = response[:cut]
    steps = (_split_math(body) if task == "math" else _split_lines(body)) or [""]
    steps[-1] += response[cut:]
    assert "".join(steps) == response
    return steps


def _split_lines(response: str) -> list:
    """GSM8K / arith: one step per line; the "#### answer" line and blank lines join the step before;
    leading empty pieces join the first step."""
    steps = []
    for piece in re.split(r"(?<=\n)", response):
        if not piece:
            continue
        if steps and (steps[-1].strip() == "" or piece.strip() == "" or piece.lstrip().startswith("####")):
            steps[-1] += piece
        else:
            steps.append(piece)
    return steps or [response]


MATH_SPAN = re.compile(r"\$\$.*?\$\$|\\\[.*?\\\]|\\begin\{([a-zA-Z*]+)\}.*?\\end\{\1\}|\[asy\].*?\[/asy\]"
                       r"|\\\(.*?\\\)|(?<!\\)\$.*?(?<!\\)\$", re.S)


def _split_math(response: str, min_chars: int = 20, max_chars: int = 100) -> list:
    """MATH: LaTeX-aware. Split after newlines and sentence ends outside math; merge pieces under
    `min_chars` into the next; bisect pieces over `max_chars` after "," / " and" / ";" outside math or
    after "\\\\" / "=" inside display math. Never split inside inline math ($..$, \\(..\\)).
    Every cut goes before the spaces that follow it, so a step starts with its own spaces (as the authors'
    splitter does): tokenizers put a space on the word after it (" Then", "▁Then"), and a token belongs to
    the step holding its first character, so a step ending in ". " would give its state s_i the first word of
    step i, a choice V(s_i) should not have made yet."""
    inline = [False] * (len(response) + 1)   # position p lies inside inline math
    display = [False] * (len(response) + 1)  # ... inside display math ($$, \[, \begin, [asy])
    for m in MATH_SPAN.finditer(response):
        is_inline = m.group(0).startswith("\\(") or (m.group(0).startswith("$") and not m.group(0).startswith("$$"))
        for p in range(m.start() + 1, m.end()):
            (inline if is_inline else display)[p] = True
    in_math = [a or b for a, b in zip(inline, display)]
    # a cut after match m goes before the spaces m ends with (any but newlines: also U+00A0, U+202F ...)
    before_spaces = lambda m: m.end() - len(re.search(r"[^\S\n]*\Z", m.group()).group())  # noqa: E731
    cuts = [before_spaces(m) for m in re.finditer(r"\n+|[.!?]\s+", response) if not in_math[m.start()]]
    pieces = [response[a:b] for a, b in zip([0] + cuts, cuts + [len(response)]) if b > a]
    merged = []  # short pieces ("Thus, " / a lone formula line) join the piece after them
    for piece in pieces:
        if merged and len(merged[-1].strip()) < min_chars:
            merged[-1] += piece
        else:
            merged.append(piece)
    if len(merged) > 1 and len(merged[-1].strip()) < min_chars:
        merged[-2:] = [merged[-2] + merged[-1]]

    def bisect(start: int, end: int) -> list:
        if end - start <= max_chars:
            return [response[start:end]]
        spots = [before_spaces(m) for m in re.finditer(r", |; | and ", response[start:end]) if not in_math[start + m.start()]]
        spots += [before_spaces(m) for m in re.finditer(r"(?:\\\\|=)\s*", response[start:end]) if display[start + m.start()]]
        spots = [start + s for s in spots if min_chars <= s <= end - start - min_chars]
        if not spots:
            return [response[start:end]]
        mid = min(spots, key=lambda s: abs(s - (start + end) / 2))
        return bisect(start, mid) + bisect(mid, end)

    steps, pos = [], 0
    for piece in merged:
        steps += bisect(pos, pos + len(piece))
        pos += len(piece)
    return steps or [response]


def step_token_starts(response_ids: list, steps: list, decode) -> list:
    """Index of the first token of each step. Token t belongs to the step that holds its first
    character (spec 3), so step j starts at the first token whose text starts at or after the step's
    first character: the smallest t whose first t tokens cover the text before it. What they cover is the
    part of decode(ids[:t]) that agrees with the whole text: a character split over byte tokens shows as
    U+FFFD while unfinished, one per byte with Llama's byte fallback, so len(decode(ids[:t])) alone can
    shrink as t grows; the covered length cannot. Binary search per step."""
    text = "".join(steps)

    def covered(t):
        shown = decode(response_ids[:t])
        return len(shown) if text.startswith(shown) else len(os.path.commonprefix([shown, text]))

    starts, char = [], 0
    for step in steps:
        lo, hi = (starts[-1] if starts else 0), len(response_ids)
        while lo < hi:  # smallest t with covered(t) >= char
            mid = (lo + hi) // 2
            if covered(mid) >= char:
                hi = mid
            else:
                lo = mid + 1
        starts.append(lo)
        char += len(step)
    return starts


def token_steps(starts: list, n_tokens: int) -> torch.Tensor:
    """Step index of every response token [L]; tokens past the last step start (the EOS) go to the last step."""
    step_of = torch.zeros(n_tokens, dtype=torch.long)
    for j, t in enumerate(starts):
        step_of[t:] = j
    return step_of


# ============================================================================ 4. Models, sampling, log-probs
def build_char_tokenizer(alphabet: str = "0123456789+-*=# \n"):
    """Character-level tokenizer (the arith demo's): no download, saves and loads like any HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>"] + list(alphabet))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])


def tiny_model(tokenizer):
    """The demo policy: a 2-layer Llama, width 96, ~0.23 M parameters, from scratch."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def demo_sft_model(args: Args) -> str:
    """Train the tiny model on arith solutions (spec 7's SFT recipe, scaled down) once per settings,
    cache it under $XDG_CACHE_HOME/vineppo/sft-<hash>, return the folder. Every seed and method of
    the demo then starts from the same weights."""
    settings = dict(version=1, steps=args.sft_steps, lr=args.sft_lr, batch=args.sft_batch, model="llama-2x96-p256", data="arith-v2")
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vineppo", f"sft-{key}")
    if os.path.isfile(os.path.join(cache, "config.json")):
        return cache
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    model = tiny_model(tokenizer)
    rows = load_problems("arith", "train")
    sft(model, tokenizer, rows, "arith", steps=args.sft_steps, lr=args.sft_lr, batch_size=args.sft_batch, seed=0)
    tmp = f"{cache}.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)  # atomic: a killed SFT leaves no half-written cache
    return cache


def sft(model, tokenizer, rows: list, task: str, steps: int, lr: float, batch_size: int, seed: int) -> None:
    """Supervised fine-tuning on prompt -> solution (spec 7): loss on the solution's tokens and its EOS, token mean
    per sequence then batch mean; AdamW, 3% warm-up, linear decay."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = warmup_linear_schedule(optimizer, steps, warmup=0.03)
    rng = random.Random(seed)
    for _ in tqdm(range(steps), desc="SFT", leave=False):
        batch = [rng.choice(rows) for _ in range(batch_size)]
        prompts = tokenizer([format_prompt(r["problem"], task) for r in batch]).input_ids
        solutions = tokenizer([r["solution"] for r in batch], add_special_tokens=False).input_ids
        episodes = [Episode(prompt_ids=p, response_ids=s + [tokenizer.eos_token_id]) for p, s in zip(prompts, solutions)]
        input_ids, attention_mask, response_mask = collate(episodes, tokenizer.pad_token_id, model.device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()   # [B, T-1, V]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")  # [B, T-1]
        mask = response_mask[:, 1:].float()
        loss = ((nll * mask).sum(1) / mask.sum(1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(); scheduler.step(); optimizer.zero_grad(set_to_none=True)
    model.eval()


def resolve_model(args: Args) -> str:
    if args.model == "tiny":
        return demo_sft_model(args)
    return PRESETS[args.model][args.task] if args.model in PRESETS else args.model


LORA_FILE, LORA_CONFIG = "adapter_model.safetensors", "adapter_config.json"   # PEFT's own names: PeftModel loads them


def load_policy(path: str, device: torch.device, args: Args):
    """Policy (fp32 master weights; bf16 autocast on a GPU) and tokenizer, from the SFT model or a checkpoint.
    With --lora-rank: the base is frozen (bf16 on a GPU) and only LoRA weights (fp32) train; a LoRA
    checkpoint holds the adapter alone, so the base is reloaded from the model the run started from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    saved = {}                                                       # the adapter config of a LoRA checkpoint
    if os.path.isfile(os.path.join(path, LORA_CONFIG)):
        with open(os.path.join(path, LORA_CONFIG)) as f:
            saved = json.load(f)
    alpha = float(args.lora_alpha or 2 * args.lora_rank)
    written = (saved.get("r", 0), saved.get("lora_alpha", 0.0))     # a full fine-tuning checkpoint: rank 0
    # a LoRA checkpoint loads with its own rank (a full one may be the base of a new LoRA run; --resume checks it)
    if saved and os.path.isfile(os.path.join(path, "COMPLETE")) and written != (args.lora_rank, alpha):
        raise ValueError(f"{path} was written with --lora-rank {written[0]} --lora-alpha {written[1]:g}: load it with "
                         f"the same flags (got --lora-rank {args.lora_rank} --lora-alpha {alpha:g})")
    if args.lora_rank == 0:
        policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    else:
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from peft.tuners.lora import LoraLayer
        from safetensors.torch import load_file
        base = saved.get("base_model_name_or_path", path)
        policy = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        policy.requires_grad_(False)
        config = LoraConfig(r=args.lora_rank, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0,
                            base_model_name_or_path=base)   # "all-linear": every nn.Linear except the lm_head
        with torch.random.fork_rng(devices=[]):   # the init of A must not shift the sampling RNG (B = 0: the policy
            torch.manual_seed(args.seed)          # starts as the SFT model, and sees the same data as full fine-tuning)
            inject_adapter_in_model(copy.deepcopy(config), policy)   # in place; peft rewrites the config it is given
        for m in policy.modules():
            if isinstance(m, LoraLayer):
                m.lora_A.float(); m.lora_B.float()   # fp32 masters under a bf16 base (peft gives them the base's dtype)
        if saved:
            weights = {k.removeprefix("base_model.model."): v for k, v in load_file(os.path.join(path, LORA_FILE)).items()}
            assert not set_peft_model_state_dict(policy, weights).unexpected_keys, f"{path}: adapter does not fit {base}"
        policy.lora_config = config               # save_checkpoint writes it as adapter_config.json
        policy.to(device)
    if args.gradient_checkpointing:   # transformers 5.2x renamed it; the old name warns, older versions lack the new
        (getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable)()
    policy.config.use_cache = False
    without_dropout(policy)
    check_logits_are_hidden_times_lm_head(policy)
    return policy, tokenizer


@torch.no_grad()
def check_logits_are_hidden_times_lm_head(model) -> None:
    """The loss's log-probs are base_model(...).last_hidden_state @ lm_head.T (kernels.py never builds the
    logits); the sampler reads model(...).logits. A model whose forward does more (an lm_head bias, a logit scale
    or soft-cap: Granite, Cohere, Gemma 2, Falcon-H1) would train on other log-probs than it samples: refused,
    checked on a few tokens."""
    head = model.get_output_embeddings()
    ids = (torch.arange(1, 9, device=head.weight.device) % head.weight.shape[0]).unsqueeze(0)   # [1, 8]
    with autocast(ids.device):   # as the training forwards run: bf16 on a GPU
        logits = model(input_ids=ids).logits[0].float()                                           # [8, V]
        hidden = model.base_model(input_ids=ids).last_hidden_state[0]                             # [8, d]
        direct = (hidden @ head.weight.T.to(hidden.dtype)).float()                                # [8, V]
    tol = 1e-4 if ids.device.type == "cpu" else 2e-2
    assert head.bias is None and torch.allclose(logits, direct, rtol=tol, atol=tol * float(logits.abs().max())), (
        "fused log-probs assume logits = hidden @ lm_head.T, and this model's forward differs (a bias, scale or "
        f"soft-cap): max |difference| {float((logits - direct).abs().max()):.3g}")


def without_dropout(model):
    """Dropout off, as TRL does: PPO's old log-probs come from an eval-mode forward and the update's from a
    train-mode one (gradient checkpointing needs train mode), so with dropout the ratio would not start at 1.
    The paper's models (Llama architecture) have none; GPT-2 configs default to 0.1. Some models (Falcon,
    GPT-Neo) read a rate from the config at every forward, so the config's rates are zeroed too."""
    configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "to_dict")}
    # the model's config and any sub-model's (a critic's backbone, a text config), and every module: rates copied
    # into plain floats (Llama's attention_dropout, OPT's dropout and layerdrop, GPTBigCode's attn_pdrop ...)
    for obj in [*configs.values(), *model.modules()]:
        if isinstance(obj, torch.nn.Dropout):
            obj.p = 0.0
        for key, value in vars(obj).items():
            if isinstance(value, float) and ("dropout" in key or "pdrop" in key or "layerdrop" in key):
                setattr(obj, key, 0.0)
    return model


def load_reference(path: str, device: torch.device):
    """The frozen SFT model, loaded as the policy is (fp32, run under the same autocast on a GPU), so that
    before the first update the KL to it is exactly 0. (A bf16 copy would halve its 4.4 GB at 1.1B, but
    bf16 weights give a bf16 residual stream where the policy's is fp32, a KL offset from iteration 0.)"""
    from transformers import AutoModelForCausalLM
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    reference.requires_grad_(False)
    return reference


@contextlib.contextmanager
def adapters_off(policy):
    """LoRA: inside this block the policy is its frozen base, i.e. the SFT model: the KL reference without a
    second copy of the weights (for 7B, 28 GB saved: load_reference keeps it in fp32). A disabled LoRA layer computes exactly base_layer(x)."""
    from peft.tuners.lora import LoraLayer
    layers = [m for m in policy.modules() if isinstance(m, LoraLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield policy
    finally:
        for m in layers:
            m.enable_adapters(True)   # (peft also sets the adapters' requires_grad back to True)


def encode_prompt(tokenizer, problem: str, task: str) -> list:
    return tokenizer(format_prompt(problem, task)).input_ids


def decode(tokenizer, ids: list) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def autocast(device: torch.device):
    """bf16 autocast on a GPU (fp32 master weights, spec 1's bf16 training); plain fp32 on a CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def generate(model, tokenizer, prefixes: list, k: int, max_new_tokens, temperature: float, top_p: float, desc: str):
    """THE sampler call: k continuations of each prefix (token ids), at most max_new_tokens (an int, or one
    per prefix) new tokens each. Returns (tokens, finished) as
    kernels.sample_continuations does: prefix sharing, batched decoding, per-row stopping."""
    eos = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    # NOTE: a prefix near the end of the model's positions gets what they leave, as the authors' vLLM does
    # (RhoMath: 2048 positions, so a MATH prompt over 1024 tokens); a response cut there is unfinished: reward 0
    limit = kernels.max_positions(model.config) or float("inf")
    budgets = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prefixes)
    budgets = [max(0, min(b, limit - len(p))) for b, p in zip(budgets, prefixes)]
    model.eval()
    # On a GPU the sampler draws from bf16 logits (autocast), as the authors' vLLM does; PPO's old log-probs
    # come from the training forward (token_logprobs), never from the sampler, as with vLLM.
    with torch.no_grad(), autocast(model.device):
        return kernels.sample_continuations(model, prefixes, k, budgets, temperature=temperature, top_p=top_p,
                                            stop=(tokenizer, STOP_STRINGS), eos_token_ids=sorted(e for e in eos if e is not None),
                                            show_progress=True, desc=desc)


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


@dataclass
class Episode:
    """One sampled response to one prompt, and what the loss needs to know about it."""
    prompt_ids: list
    response_ids: list                 # sampled tokens, EOS included when the response finished on EOS
    group: int = 0                     # index of the prompt within the iteration (GRPO/RLOO groups)
    text: str = ""
    gold: str = ""
    finished: bool = False
    reward: float = 0.0
    steps: list = field(default_factory=list)          # the response split into reasoning steps
    step_starts: list = field(default_factory=list)    # first token of each step


def collate(episodes: list, pad_id: int, device):
    """Right-padded batch: input_ids [B, T], attention_mask [B, T], response_mask [B, T]."""
    T = max(len(e.prompt_ids) + len(e.response_ids) for e in episodes)
    input_ids = torch.full((len(episodes), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(episodes), T, dtype=torch.long)
    response_mask = torch.zeros(len(episodes), T, dtype=torch.bool)
    for b, e in enumerate(episodes):
        P, L = len(e.prompt_ids), len(e.response_ids)
        input_ids[b, :P + L] = torch.tensor(e.prompt_ids + e.response_ids)
        attention_mask[b, :P + L] = 1
        response_mask[b, P:P + L] = True
    return input_ids.to(device), attention_mask.to(device), response_mask.to(device)


def response_hidden(model, episodes: list, pad_id: int):
    """Last hidden states that predict each response token, flattened episode by episode.
    Returns hidden [N, d], targets [N] where N = total response tokens; the lm_head is applied by
    kernels.py so that the [N, V] logits never exist."""
    input_ids, attention_mask, response_mask = collate(episodes, pad_id, model.device)
    with autocast(model.device):
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, d]
    if hidden.is_cuda:   # fp32 weights under autocast keep an fp32 residual stream; the lm_head matmul is
        hidden = hidden.to(torch.bfloat16)   # bf16 under autocast, so the fused kernel gets bf16 (tensor cores)
    predicts = response_mask[:, 1:]                    # [B, T-1]: position t-1 predicts token t
    return hidden[:, :-1][predicts], input_ids[:, 1:][predicts]   # [N, d], [N]


def lm_head_weight(model, hidden: torch.Tensor) -> torch.Tensor:
    """The output projection [V, d] in the hidden states' dtype (a bf16 copy of the fp32 master on a GPU,
    through which the gradient reaches the master, as under autocast)."""
    return model.get_output_embeddings().weight.to(hidden.dtype)


@torch.no_grad()
def token_logprobs(model, episodes: list, pad_id: int, temperature: float, micro_batch: int) -> torch.Tensor:
    """log pi(y_t | x, y_<t) at the sampling temperature for every response token [N] (fp32)."""
    out = []
    for i in range(0, len(episodes), micro_batch):
        hidden, targets = response_hidden(model, episodes[i:i + micro_batch], pad_id)
        logp, _ = kernels.fused_logprobs(hidden, lm_head_weight(model, hidden), targets, temperature)
        out.append(logp.float())
    return torch.cat(out)


def sample_episodes(policy, tokenizer, rows: list, args: Args, task: str) -> list:
    """Sample `samples_per_prompt` responses per prompt, grade them, split them into steps."""
    prompts = [encode_prompt(tokenizer, r["problem"], task) for r in rows]
    tokens, finished = generate(policy, tokenizer, prompts, args.samples_per_prompt, args.max_new_tokens,
                                args.temperature, args.top_p, desc="sampling")
    episodes = []
    dec = lambda ids: decode(tokenizer, ids)
    for g, (row, prompt, conts, fins) in enumerate(zip(rows, prompts, tokens, finished)):
        for ids, fin in zip(conts, fins):
            text = dec(ids)
            e = Episode(prompt_ids=prompt, response_ids=ids, group=g, text=text, gold=row["answer"], finished=fin,
                        reward=float(fin and grade(text, row["answer"], task)))   # unfinished: reward 0
            e.steps = split_steps(text, task)
            e.step_starts = step_token_starts(ids, e.steps, dec)
            episodes.append(e)
    return episodes


# ============================================================================ 5. Advantages
# Every method maps one iteration's episodes to one advantage per response token. The PPO loss and
# loop (section 6, 8) are shared: THIS section is the whole difference between the methods, except the
# critic's own training, which ppo_update runs alongside the policy's with --advantage critic.
def step_advantages(V: list, R: float) -> list:
    """Eq. (6), arXiv 2410.01679v2: A_i = r_i + gamma V(s_{i+1}) - V(s_i), gamma = 1, with
    V(s_n) = 0 (terminal) and r_i = 0 except r_{n-1} = R. Their sum telescopes to R - V(s_0)."""
    n = len(V)
    V_next = list(V[1:]) + [0.0]                  # V(s_{i+1}); V(s_n) = 0
    r = [0.0] * (n - 1) + [R]
    return [r[i] + V_next[i] - V[i] for i in range(n)]


def vine_values(model, tokenizer, episodes: list, args: Args, task: str):
    """VinePPO's value estimates, Eq. (5), arXiv 2410.01679v2: V_hat(s_i) = 1/K sum_k R(eta_k),
    eta_k ~ pi(. | s_i), for the states s_0..s_{n-1} of every episode (the first --max-states of them;
    past the cap V = R). The environment is reset to
    the prefix s_i (prompt + first i steps) and K continuations are sampled; each is graded on the
    whole solution (written steps + continuation). Identical states are sampled once (s_0 is shared by
    all samples of a prompt); the continuations are used for values only, never trained on.
    Returns (V_hat per episode: a list of n values each, number of rollouts sampled)."""
    state_index, prefixes, owner = {}, [], []   # owner: (episode, prompt length) of each unique state
    states_of = []                               # per episode: index of each of its states among the unique ones
    for e in episodes:
        states_of.append([])
        for i in range(min(len(e.steps), args.max_states or len(e.steps))):   # spec 3: GSM8K's first 25 only
            prefix = e.prompt_ids + e.response_ids[:e.step_starts[i]]
            if tuple(prefix) not in state_index:
                state_index[tuple(prefix)] = len(prefixes)
                prefixes.append(prefix)
                owner.append((e, len(e.prompt_ids)))
            states_of[-1].append(state_index[tuple(prefix)])
    # a continuation may use what the response cap leaves after the written steps: same cap, same reward rule
    budgets = [args.max_new_tokens - (len(prefix) - P) for prefix, (_, P) in zip(prefixes, owner)]
    tokens, finished = generate(model, tokenizer, prefixes, args.k, budgets, args.temperature, args.top_p,
                                desc="MC rollouts")
    V_state = []
    for prefix, (e, P), conts, done in zip(prefixes, owner, tokens, finished):
        written = prefix[P:]
        rewards = [float(d and grade(decode(tokenizer, written + c), e.gold, task)) for c, d in zip(conts, done)]
        V_state.append(sum(rewards) / len(rewards))
    V = []
    for e, states in zip(episodes, states_of):
        V_e = [V_state[s] for s in states]
        V.append(V_e + [e.reward] * (len(e.steps) - len(V_e)))   # spec 3: past the cap V = R, so those steps get A = 0
    return V, len(prefixes) * args.k


def vine_advantages(model, tokenizer, episodes: list, args: Args, task: str, **_):
    """VinePPO (section 4 of the paper): MC values of every step, then Eq. (6) per step, then every
    token of step i gets A_i. The paper writes Eq. (6) per token (state s_t, action a_t); here, as in its
    experiments, the action is a whole reasoning step, so the states are the step boundaries and the step's
    tokens share its advantage. Returns (token advantages per episode, stats; adv/zero_frac: share of steps)."""
    V, rollouts = vine_values(model, tokenizer, episodes, args, task)
    token_adv, step_adv_all = [], []
    for e, V_e in zip(episodes, V):
        A = step_advantages(V_e, e.reward)                                     # [n steps]
        step_adv_all += A
        token_adv.append(torch.tensor(A)[token_steps(e.step_starts, len(e.response_ids))])   # [L]
    zero = sum(abs(a) < 1e-12 for a in step_adv_all) / max(1, len(step_adv_all))
    return token_adv, {"mc/rollouts": rollouts, "mc/value_s0": sum(v[0] for v in V) / len(V), "adv/zero_frac": zero}


def group_rewards(episodes: list) -> dict:
    groups = {}
    for e in episodes:
        groups.setdefault(e.group, []).append(e.reward)
    return groups


def grpo_advantages(model, tokenizer, episodes: list, args: Args, task: str, **_):
    """GRPO: one advantage per response, (R - mean of its group) / (std of its group + eps), the unbiased std."""
    groups, out = group_rewards(episodes), []
    for e in episodes:
        g = torch.tensor(groups[e.group], dtype=torch.float)
        out.append(torch.full((len(e.response_ids),), float((e.reward - g.mean()) / (g.std() + 1e-6))))
    return out, {"adv/zero_frac": sum(float(a[0]) == 0 for a in out) / len(out)}


def rloo_advantages(model, tokenizer, episodes: list, args: Args, task: str, **_):
    """RLOO: one advantage per response, R minus the mean reward of the other samples of its prompt."""
    groups, out = group_rewards(episodes), []
    for e in episodes:
        g = groups[e.group]
        out.append(torch.full((len(e.response_ids),), e.reward - (sum(g) - e.reward) / (len(g) - 1)))
    return out, {"adv/zero_frac": sum(float(a[0]) == 0 for a in out) / len(out)}


def make_critic(path: str, device: torch.device):
    """PPO's value network (spec 6): a copy of the SFT model with a linear head on the last hidden state."""
    from transformers import AutoModelForCausalLM
    backbone = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).base_model
    head = torch.nn.Linear(backbone.config.hidden_size, 1)
    torch.nn.init.zeros_(head.weight); torch.nn.init.zeros_(head.bias)   # NOTE: zero, not random: V starts at 0
    return without_dropout(torch.nn.ModuleDict({"backbone": backbone, "head": head}).to(device))


def critic_values(critic, episodes: list, pad_id: int) -> torch.Tensor:
    """V_phi(s_t) for every response token's state s_t (the context before token t), flattened [N]."""
    input_ids, attention_mask, response_mask = collate(episodes, pad_id, next(critic.parameters()).device)
    with autocast(input_ids.device):
        hidden = critic["backbone"](input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, d]
    return critic["head"](hidden[:, :-1][response_mask[:, 1:]].float()).squeeze(-1)   # [N]


def critic_advantages(model, tokenizer, episodes: list, args: Args, task: str, critic=None, **_):
    """PPO: GAE with gamma = lambda = 1 (spec 6) over the one-step advantages of Eq. (3), arXiv
    2410.01679v2, r_t + V_phi(s_{t+1}) - V_phi(s_t): they telescope to A_t = R - V_phi(s_t) for every
    token, and the return G_t = R is the value target."""
    with torch.no_grad():
        V_old = torch.cat([critic_values(critic, episodes[i:i + args.micro_batch], tokenizer.pad_token_id)
                           for i in range(0, len(episodes), args.micro_batch)]).cpu()   # [N]
    G = torch.cat([torch.full((len(e.response_ids),), e.reward) for e in episodes])    # [N]
    token_adv = list((G - V_old).split([len(e.response_ids) for e in episodes]))
    return token_adv, {"critic/value_mean": float(V_old.mean()), "V_old": V_old, "G": G}


def critic_loss(critic, episodes: list, pad_id: int, V_old: torch.Tensor, G: torch.Tensor, clip: float, n_tokens: int):
    """The value network's regression loss (Eq. (4), arXiv 2410.01679v2) as the authors' code clips it
    (spec 6): 0.5 * token-mean of max((V - G)^2, (clip(V, V_old +- c) - G)^2)."""
    V = critic_values(critic, episodes, pad_id)                                         # [N]
    V_old, G = V_old.to(V.device), G.to(V.device)
    V_clipped = V_old + (V - V_old).clamp(-clip, clip)
    return 0.5 * torch.maximum((V - G) ** 2, (V_clipped - G) ** 2).sum() / n_tokens


ADVANTAGE_METHODS = {"vine": vine_advantages, "critic": critic_advantages, "grpo": grpo_advantages, "rloo": rloo_advantages}
WHITEN = {"vine": True, "critic": True, "grpo": False, "rloo": False}   # spec 1 whitens VinePPO's and PPO's


def whiten(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Subtract the mean, divide by the std, over all response tokens of a mini-batch (spec 1).
    NOTE: biased variance, one process; the authors' code whitens across GPUs with the unbiased one."""
    return (x - x.mean()) / (x.std(unbiased=False) + eps) if x.numel() > 1 else x - x.mean()


# ============================================================================ 6. PPO loss and update
def warmup_linear_schedule(optimizer, total_steps: int, warmup: float):
    """Spec 1: linear warm-up over `warmup` of the steps, then linear decay to 0. (NOTE: the authors' DeepSpeed
    WarmupDecayLR ramps up as ln(step) / ln(warm-up steps) by default; the decay is the same.)"""
    warm = max(1, round(warmup * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (total_steps - s) / max(1, total_steps - warm)))


def ppo_update(policy, reference, optimizer, scheduler, episodes: list, token_adv: list, args: Args, pad_id: int,
               critic=None, critic_optimizer=None, critic_scheduler=None, critic_targets=None) -> dict:
    """PPO epochs over the iteration's episodes (spec 5). old and reference log-probs come from the same fused
    log-prob forward as the loss (eval mode, no grad) before the first step, never from the sampler; each
    optimizer step sees one mini-batch of episodes, accumulated over micro-batches. Loss (the shared part of all
    methods; KL_k3 clamped to [0, 10] per token):
      L = token-mean max(-A rho, -A clip(rho, 1-eps, 1+eps)) + beta * seq-mean sum_t KL_k3   (Eq. (1) + PPO clip)
          - entropy_coef * token-mean entropy (0 in the paper) [+ critic_loss with --advantage critic]
    reference None (LoRA): the reference is the policy with its adapters off."""
    old_logp = token_logprobs(policy, episodes, pad_id, args.temperature, args.micro_batch).cpu()       # [N]
    with adapters_off(policy) if reference is None else contextlib.nullcontext(reference) as ref:
        ref_logp = token_logprobs(ref, episodes, pad_id, args.temperature, args.micro_batch).cpu()      # [N]
    params = [p for group in optimizer.param_groups for p in group["params"]]   # what it steps (LoRA: the adapters)
    lengths = [len(e.response_ids) for e in episodes]
    offsets = [0]
    for L in lengths:
        offsets.append(offsets[-1] + L)
    A_all = torch.cat(token_adv).float()                                                                  # [N]
    stats = Counter()
    n_batches = math.ceil(len(episodes) / args.mini_batch)
    bar = tqdm(total=args.epochs * n_batches, desc="PPO update", leave=False)
    policy.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(episodes)).tolist()
        for start in range(0, len(episodes), args.mini_batch):
            mb = order[start:start + args.mini_batch]
            idx = [torch.arange(offsets[i], offsets[i + 1]) for i in mb]                   # token indices per episode
            A_mb = torch.cat([A_all[t] for t in idx])                                      # [N] (the mini-batch)
            if WHITEN[args.advantage]:
                A_mb = whiten(A_mb)
            n_tokens, n_seqs = A_mb.numel(), len(mb)
            A_split = list(A_mb.split([lengths[i] for i in mb]))
            ratios, mb_stats = [], Counter()
            for m0 in range(0, len(mb), args.micro_batch):
                micro = mb[m0:m0 + args.micro_batch]
                t = torch.cat(idx[m0:m0 + args.micro_batch])
                hidden, targets = response_hidden(policy, [episodes[i] for i in micro], pad_id)   # [N, d], [N] (micro-batch)
                dev = hidden.device
                loss, s = kernels.ppo_loss(hidden, lm_head_weight(policy, hidden), targets, old_logp[t].to(dev),
                                           ref_logp[t].to(dev), torch.cat(A_split[m0:m0 + args.micro_batch]).to(dev),
                                           temperature=args.temperature, clip_eps=args.clip_eps, kl_coef=args.kl_coef,
                                           n_tokens=n_tokens, n_seqs=n_seqs, entropy_coef=args.entropy_coef)
                if critic is not None:
                    loss = loss + critic_loss(critic, [episodes[i] for i in micro], pad_id, critic_targets["V_old"][t],
                                              critic_targets["G"][t], args.value_clip, n_tokens)
                loss.backward()
                ratios.append(s["ratio"])
                mb_stats["loss/kl"] += float(s["kl"].sum()) / n_seqs
                mb_stats["loss/clipfrac"] += float(s["clipped"].float().sum()) / n_tokens
                mb_stats["loss/entropy"] += float(s["entropy"].sum()) / n_tokens
                mb_stats["loss/total"] += float(loss.detach())
            ratio_mean = float(torch.cat(ratios).mean())
            # Spec 1 skip rule: a mini-batch that drifted this far is noise. NOTE: the authors' code zeroes each GPU's
            # loss but still steps the optimizer (Adam's momentum moves the weights) and the schedule; here nothing moves.
            if ratio_mean > args.skip_ratio:
                optimizer.zero_grad(set_to_none=True)
                if critic_optimizer is not None:
                    critic_optimizer.zero_grad(set_to_none=True)
                stats["update/skipped"] += 1
                bar.update()
                continue
            stats["update/grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm))
            optimizer.step(); scheduler.step(); optimizer.zero_grad(set_to_none=True)
            if critic_optimizer is not None:
                torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
                critic_optimizer.step(); critic_scheduler.step(); critic_optimizer.zero_grad(set_to_none=True)
            stats["update/steps"] += 1
            stats["loss/ratio_mean"] += ratio_mean
            stats.update(mb_stats)
            bar.update()
    bar.close()
    policy.eval()
    steps = max(1, stats["update/steps"])
    out = {k: v / steps for k, v in stats.items() if k.startswith("loss/") or k == "update/grad_norm"}
    out.update({"update/steps": stats["update/steps"], "update/skipped": stats["update/skipped"],
                "update/lr": scheduler.get_last_lr()[0]})   # the rate of the next step
    return out


# ============================================================================ 7. Evaluation
@torch.no_grad()
def evaluate(model, tokenizer, problems: list, args: Args, task: str) -> dict:
    """Spec 8: --eval-samples per test problem at --eval-temperature (paper: 16 at T = 0.35) and --top-p: mean
    accuracy (pass@1 estimate), pass@N, majority@N; and greedy accuracy. A sample cut at the length cap counts
    as wrong in the mean and takes no part in pass@N and maj@N."""
    prompts = [encode_prompt(tokenizer, p["problem"], task) for p in problems]
    greedy, greedy_done = generate(model, tokenizer, prompts, 1, args.max_new_tokens, 0.0, 1.0, desc="eval greedy")
    sampled, done = generate(model, tokenizer, prompts, args.eval_samples, args.max_new_tokens, args.eval_temperature,
                             args.top_p, desc="eval sampled")
    acc, pass_n, maj_n, greedy_acc, all_texts = [], [], [], [], []
    for p, g, g_done, conts, fin in zip(problems, greedy, greedy_done, sampled, done):
        greedy_acc.append(g_done[0] and grade(decode(tokenizer, g[0]), p["answer"], task))   # cut at the cap: 0
        decoded = [decode(tokenizer, c) for c in conts]
        all_texts += decoded
        texts = [t for t, f in zip(decoded, fin) if f]
        correct = [grade(t, p["answer"], task) for t in texts]
        acc.append(sum(correct) / len(conts))
        pass_n.append(any(correct))
        keys = [answer_key(a, task) if a else None for a in (extract_answer(t, task) for t in texts)]
        votes = Counter(k for k in keys if k is not None)
        majority = votes.most_common(1)[0][0] if votes else None   # graded like any sample of its class
        maj_n.append(majority is not None and correct[keys.index(majority)])
    mean = lambda xs: float(sum(xs) / max(1, len(xs)))
    n = args.eval_samples
    out = {"eval/accuracy": mean(acc), f"eval/pass@{n}": mean(pass_n), f"eval/maj@{n}": mean(maj_n),
           "eval/greedy_accuracy": mean(greedy_acc), "eval/problems": len(problems)}
    if task == "arith":   # what the demo's RL changes: how often a multiplication is worked out
        out["eval/worked_share"] = worked_share(all_texts)
    return out


# ============================================================================ 7b. Value analysis (paper section 7)
# How good is each value estimate? On states s_i of responses the policy samples: a ground truth V(s_i)
# from many rollouts (256, as the paper), the critic's V_phi(s_i), and VinePPO's K-rollout V_hat(s_i)
# from an independent call; their mean absolute error along the chain, and whether each estimator ranks
# the best of a few alternative next steps first (paper Fig. 8). A diagnostic: training never uses it.
def state_episode(prompt_ids: list, written_ids: list, gold: str) -> Episode:
    """The single state s = prompt + written, as an Episode whose only step starts after `written`:
    vine_values then estimates V(s) alone (continuations graded on written + continuation)."""
    return Episode(prompt_ids=prompt_ids, response_ids=list(written_ids), gold=gold, steps=[""], step_starts=[len(written_ids)])


def mc_state_values(model, tokenizer, states: list, k: int, args: Args, task: str) -> list:
    """V_hat(s) = mean reward of k continuations of each state (prompt_ids, written_ids, gold), computed by
    vine_values itself: k = K is the estimate VinePPO trains with, k = 256 the analysis' ground truth."""
    if not states:
        return []
    V, _ = vine_values(model, tokenizer, [state_episode(*s) for s in states], dataclasses.replace(args, k=k), task)
    return [v[0] for v in V]


@torch.no_grad()
def critic_state_values(critic, states: list, pad_id: int, micro_batch: int) -> list:
    """V_phi(s) of each state (prompt_ids, written_ids, gold). critic_values gives the value of the state
    before every response token, so append one (pad) token to `written` and read the value before it."""
    out = []
    for i in range(0, len(states), micro_batch):
        chunk = states[i:i + micro_batch]
        V = critic_values(critic, [Episode(prompt_ids=p, response_ids=list(w) + [pad_id]) for p, w, _ in chunk], pad_id)
        last = torch.tensor([len(w) + 1 for _, w, _ in chunk]).cumsum(0) - 1     # the appended token of each state
        out += V.cpu()[last].tolist()
    return out


def value_analysis(policy, tokenizer, rows: list, args: Args, task: str, critic=None, n_states: int = 100,
                   n_truth: int = 256, k: Optional[int] = None, n_rank: int = 50, alternatives: int = 5,
                   bins: int = 5, tie: float = 0.05, seed: int = 0) -> dict:
    """Paper section 7, on the states of one response per row that `policy` samples (until n_states):
    - MAE |V_est(s_i) - V(s_i)| with V from n_truth rollouts, overall and by position i/n in the chain
      (n = the response's steps; `bins` equal bins of [0, 1));
    - ranking (Fig. 8b): from n_rank states that are not the last one (i < n - 1), sample `alternatives`
      next steps (a continuation cut after its first new step); an estimator scores when the alternative
      it values highest is truly best (within `tie`), ties in its estimate broken at random (expected
      score); states whose distinct alternatives are all within `tie` of each other are skipped. An
      alternative that finishes the response is worth its reward, for the ground truth and every estimator.
    The MC estimate (k rollouts, default K) and the ground truth are independent calls to vine_values on the
    same states; the critic is read at each state's last token. Every value is a value of `policy`: to
    compare the critic fairly, pass the policy it was trained with. Leaves the global RNG as it was."""
    t0, k, dec = time.time(), k or args.k, (lambda ids: decode(tokenizer, ids))
    device = next(policy.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):   # manual_seed reseeds CUDA too
        torch.manual_seed(seed)
        # 1. states s_i = prompt + first i steps of sampled responses
        states, where = [], []     # (prompt_ids, written_ids, gold), (i, n)
        limit = kernels.max_positions(policy.config) or math.inf
        for e in sample_episodes(policy, tokenizer, rows[:n_states], dataclasses.replace(args, samples_per_prompt=1), task):
            for i in range(min(len(e.steps), args.max_states or len(e.steps))):
                if len(e.prompt_ids) + e.step_starts[i] >= limit:
                    continue   # at the end of the model's positions: nothing to continue, no critic read past it
                states.append((e.prompt_ids, e.response_ids[:e.step_starts[i]], e.gold)); where.append((i, len(e.steps)))
        states, where = states[:n_states], where[:n_states]
        # 2. alternative next steps: continue from s_i, cut after the first step that starts past `written`
        ranked = [j for j, (i, n) in enumerate(where) if i < n - 1][:n_rank]
        conts, done = generate(policy, tokenizer, [states[j][0] + states[j][1] for j in ranked], alternatives,
                               [args.max_new_tokens - len(states[j][1]) for j in ranked], args.temperature, args.top_p,
                               desc="alternatives")
        alts = []                  # per ranked state: {response ids of the alternative: reward if it finished, else None}
        for j, cs, ds in zip(ranked, conts, done):
            written, gold, seen = states[j][1], states[j][2], {}
            for c, d in zip(cs, ds):
                full = written + c
                nxt = [s for s in step_token_starts(full, split_steps(dec(full), task), dec) if s > len(written)]
                reward = None if nxt else float(d and grade(dec(full), gold, task))
                seen.setdefault(tuple(full[:nxt[0]] if nxt else full), reward)
            alts.append(seen)
        alt_states = [(states[j][0], list(a), states[j][2]) for j, seen in zip(ranked, alts) for a, r in seen.items() if r is None]
        # 3. values of all states: ground truth, MC estimate (independent rollouts), critic
        everything = states + alt_states
        truth = mc_state_values(policy, tokenizer, everything, n_truth, args, task)
        est = {"mc": mc_state_values(policy, tokenizer, everything, k, args, task)}
        if critic is not None:
            est["critic"] = critic_state_values(critic, everything, tokenizer.pad_token_id, args.micro_batch)

    def mean(xs):
        return float(sum(xs) / len(xs)) if xs else None
    position = [min(int(i / n * bins), bins - 1) for i, n in where]
    out = {"states": len(states), "n_truth": n_truth, "k": k, "seconds": None,
           "rollouts": len({(tuple(p), tuple(w)) for p, w, _ in everything}) * (n_truth + k),
           "mae": {}, "mae_by_position": {"bin_edges": [b / bins for b in range(bins + 1)],
                                          "count": [position.count(b) for b in range(bins)]},
           # the floors: the truth's own standard error, and the MAE of a K-rollout mean were the truth exact
           "truth_se_mean": mean([math.sqrt(v * (1 - v) / n_truth) for v in truth[:len(states)]]),
           "mc_mae_expected": mean([sum(math.comb(k, j) * v ** j * (1 - v) ** (k - j) * abs(j / k - v) for j in range(k + 1))
                                    for v in truth[:len(states)]]),
           "ranking": {"alternatives": alternatives, "tie": tie, "top1": {}}}
    for name, values in est.items():
        err = [abs(a - b) for a, b in zip(values[:len(states)], truth)]
        out["mae"][name] = mean(err)
        out["mae_by_position"][name] = [mean([x for x, b in zip(err, position) if b == bb]) for bb in range(bins)]

    def per_state(values):     # the values of each ranked state's alternatives (a finished one: its reward)
        groups, pos = [], len(states)
        for seen in alts:
            vs = []
            for r in seen.values():
                vs.append(values[pos] if r is None else r)
                pos += r is None
            groups.append(vs)
        return groups
    true_alts = per_state(truth)
    informative = [g for g, t in enumerate(true_alts) if len(t) > 1 and max(t) - min(t) > tie]
    out["ranking"].update(states=len(informative), skipped=len(true_alts) - len(informative))
    out["ranking"]["top1"]["chance"] = mean([sum(v >= max(true_alts[g]) - tie for v in true_alts[g]) / len(true_alts[g])
                                             for g in informative])
    for name, values in est.items():
        est_alts, hits = per_state(values), []
        for g in informative:
            top = [t for e, t in zip(est_alts[g], true_alts[g]) if e == max(est_alts[g])]
            hits.append(sum(t >= max(true_alts[g]) - tie for t in top) / len(top))
        out["ranking"]["top1"][name] = mean(hits)
    out["per_state"] = [{"i": i, "n": n, "written": dec(states[s][1]), "truth": truth[s], **{name: v[s] for name, v in est.items()}}
                        for s, (i, n) in enumerate(where)]
    out["seconds"] = time.time() - t0
    return out


# ============================================================================ 8. The iteration loop
def iteration_rows(train: list, iteration: int, per_iteration: int, seed: int) -> list:
    """Prompts of an iteration: a seeded permutation per pass over the data, so that the data position
    is a function of the iteration alone (resume needs no data-loader state)."""
    start = iteration * per_iteration
    rows = []
    while len(rows) < per_iteration:
        epoch, offset = divmod(start + len(rows), len(train))
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        rows += [train[i] for i in perm[offset:offset + per_iteration - len(rows)]]
    return rows


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: str, iteration: int, policy, tokenizer, optimizer, scheduler, critic=None,
                    critic_optimizer=None, critic_scheduler=None) -> None:
    """Atomic checkpoint: written to ckpt.tmp, then swapped in by renames, so a run killed at any
    moment leaves either the old or the new checkpoint complete (find_checkpoint picks it)."""
    tmp, final, old = (os.path.join(out, n) for n in ("ckpt.tmp", "ckpt", "ckpt.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    if getattr(policy, "lora_config", None) is None:
        policy.save_pretrained(tmp, safe_serialization=True)
    else:   # LoRA: the adapter only (the base is the source model), named as PeftModel.from_pretrained(base, ckpt) expects
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file
        os.makedirs(tmp)
        adapter = {"base_model.model." + k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(policy).items()}
        save_file(adapter, os.path.join(tmp, LORA_FILE))
        policy.lora_config.save_pretrained(tmp)   # LORA_CONFIG: rank, alpha, target modules, base model
    tokenizer.save_pretrained(tmp)
    torch.save({"iteration": iteration, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "critic": None if critic is None else {"model": critic.state_dict(), "optimizer": critic_optimizer.state_dict(),
                                                       "scheduler": critic_scheduler.state_dict()}},
               os.path.join(tmp, "state.pt"))
    open(os.path.join(tmp, "COMPLETE"), "w").close()
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out: str) -> Optional[str]:
    for name in ("ckpt", "ckpt.old"):  # ckpt.old survives a kill between the two renames
        if os.path.isfile(os.path.join(out, name, "COMPLETE")):
            return os.path.join(out, name)
    return None


def fit_positions(rows: list, tokenizer, model, args: Args, task: str) -> list:
    """NOTE: training problems whose prompt leaves less than half of --max-new-tokens before the end of the
    model's positions are dropped (the authors drop MATH questions over 1512 tokens for a 2048-position model)."""
    limit = kernels.max_positions(model.config)
    room = None if limit is None else limit - max(1, args.max_new_tokens // 2)   # most prompt tokens a problem may have
    if room is None or not rows or room >= 4 * max(len(format_prompt(r["problem"], task)) for r in rows) + 8:
        return rows   # at most 4 tokens per character (UTF-8 bytes) + special tokens: every prompt fits, none encoded
    kept = [r for r in rows if len(encode_prompt(tokenizer, r["problem"], task)) <= room]
    if len(kept) < len(rows):
        print(f"{len(rows) - len(kept)} of {len(rows)} training problems dropped: their prompts leave fewer than "
              f"{max(1, args.max_new_tokens // 2)} of the model's {limit} positions", file=sys.stderr)
    if not kept:
        raise SystemExit(f"vineppo.py: error: no training problem fits the model's {limit} positions with "
                         f"--max-new-tokens {args.max_new_tokens}")
    return kept


# What --resume may change: where and how often the run is evaluated and saved, how it fits in memory, how fast it samples.
RESUME_MAY_CHANGE = ("out", "resume", "device", "save_every", "eval_every", "eval_problems", "eval_samples",
                     "eval_temperature", "value_analysis", "test_file", "gradient_checkpointing", "micro_batch",
                     "sampler_memory_fraction", "sampler_compile")


def check_resume(args: Args, source: str) -> None:
    """A resumed run must be the run it continues: every other flag must equal its value in the run's
    config.json. (A changed default would otherwise change the run silently; --lr would not even take effect,
    the scheduler's saved state restoring the old one; --iterations would re-stretch the schedule mid-run.)"""
    path = os.path.join(args.out, "config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = json.load(f)
    now = dataclasses.asdict(args) | {"resolved_model": source}
    for flags in (saved, now):   # the LoRA scale as used: --lora-alpha's default is 2 x rank
        flags["lora_alpha"] = flags.get("lora_alpha") or 2 * flags.get("lora_rank", 0)
    changed = [f"{key} {saved[key]!r} -> {now[key]!r}" for key in now
               if key not in RESUME_MAY_CHANGE and key in saved and saved[key] != now[key]]
    if changed:
        raise SystemExit(f"vineppo.py: error: --resume with other settings than the run in {args.out}: "
                         + ", ".join(changed) + " (give the run's own flags, or a new --out)")


def log_metrics(out: str, record: dict) -> None:
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def train(args: Args) -> list:
    """The whole method. Returns the metrics records (also written to <out>/metrics.jsonl)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    os.makedirs(args.out, exist_ok=True)
    task = args.task
    source = resolve_model(args)                      # SFT checkpoint: starting policy and frozen reference
    ckpt = find_checkpoint(args.out) if args.resume else None
    if args.resume and ckpt is None:
        print(f"no checkpoint in {args.out}: starting from scratch", file=sys.stderr)
    if ckpt is not None:
        check_resume(args, source)
    if ckpt is None:   # a new run: no checkpoint of an older run in --out may be resumed later
        for name in ("ckpt", "ckpt.old", "ckpt.tmp"):
            shutil.rmtree(os.path.join(args.out, name), ignore_errors=True)
        open(os.path.join(args.out, "metrics.jsonl"), "w").close()
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(args) | {"resolved_model": source}, f, indent=2)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    kernels.SAMPLER_MEMORY_FRACTION = args.sampler_memory_fraction
    kernels.SAMPLER_COMPILE = SAMPLER_COMPILE_CHOICES[args.sampler_compile]

    policy, tokenizer = load_policy(ckpt or source, device, args)
    reference = load_reference(source, device) if args.lora_rank == 0 else None   # LoRA: the policy's frozen base
    train_rows = load_problems(task, "train", args.train_file)
    if not train_rows:
        raise SystemExit(f"vineppo.py: error: no training problems in {args.train_file or task}")
    train_rows = fit_positions(train_rows, tokenizer, policy, args, task)
    test_rows = load_problems(task, "test", args.test_file)[:args.eval_problems]
    episodes_per_iter = args.prompts_per_iteration * args.samples_per_prompt
    total_steps = args.iterations * args.epochs * math.ceil(episodes_per_iter / args.mini_batch)
    trainable = [p for p in policy.parameters() if p.requires_grad]   # LoRA: the adapters only
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scheduler = warmup_linear_schedule(optimizer, total_steps, args.warmup)
    critic = critic_optimizer = critic_scheduler = None
    if args.advantage == "critic":
        with torch.random.fork_rng(devices=[]):   # its head's init must not shift the sampling RNG: every method
            critic = make_critic(source, device)   # then sees the same iteration-0 evaluation and data
        critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        critic_scheduler = warmup_linear_schedule(critic_optimizer, total_steps, args.warmup)

    start, records = 0, []
    if ckpt is not None:
        state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
        optimizer.load_state_dict(state["optimizer"]); scheduler.load_state_dict(state["scheduler"])
        if critic is not None:
            critic.load_state_dict(state["critic"]["model"])
            critic_optimizer.load_state_dict(state["critic"]["optimizer"]); critic_scheduler.load_state_dict(state["critic"]["scheduler"])
        set_rng_state(state["rng"])
        start = state["iteration"]
        with open(os.path.join(args.out, "metrics.jsonl")) as f:   # drop records written after the checkpoint
            records = [r for r in map(json.loads, f) if r["iteration"] <= start]
        with open(os.path.join(args.out, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(f"resumed from {ckpt} at iteration {start}", file=sys.stderr)
    else:
        record = {"iteration": 0, **evaluate(policy, tokenizer, test_rows, args, task)}
        log_metrics(args.out, record); records.append(record)
        print(f"iter    0 | eval acc {record['eval/accuracy']:.3f} greedy {record['eval/greedy_accuracy']:.3f}"
              f" (before training, {len(test_rows)} test problems)")

    compute_advantages = ADVANTAGE_METHODS[args.advantage]
    for it in range(start, args.iterations):
        t0 = time.time()
        rows = iteration_rows(train_rows, it, args.prompts_per_iteration, args.seed)
        episodes = sample_episodes(policy, tokenizer, rows, args, task)
        t1 = time.time()
        token_adv, adv_stats = compute_advantages(policy, tokenizer, episodes, args, task, critic=critic)
        t2 = time.time()
        critic_targets = {"V_old": adv_stats.pop("V_old"), "G": adv_stats.pop("G")} if critic is not None else None
        update_stats = ppo_update(policy, reference, optimizer, scheduler, episodes, token_adv, args, tokenizer.pad_token_id,
                                  critic, critic_optimizer, critic_scheduler, critic_targets)
        t3 = time.time()
        record = {"iteration": it + 1,
                  "train/reward": sum(e.reward for e in episodes) / len(episodes),
                  "train/finished": sum(e.finished for e in episodes) / len(episodes),
                  "train/response_tokens": sum(len(e.response_ids) for e in episodes) / len(episodes),
                  "train/steps": sum(len(e.steps) for e in episodes) / len(episodes),
                  "mc/rollouts": 0, **adv_stats, **update_stats,
                  "time/sample": t1 - t0, "time/mc": t2 - t1, "time/update": t3 - t2}
        if (it + 1) % args.eval_every == 0 or it + 1 == args.iterations:
            record.update(evaluate(policy, tokenizer, test_rows, args, task))
            record["time/eval"] = time.time() - t3
        log_metrics(args.out, record); records.append(record)
        adv0 = f"{record['adv/zero_frac']:.2f}" if "adv/zero_frac" in record else "   -"   # critic: not counted
        print(f"iter {it + 1:4d} | reward {record['train/reward']:.3f} | kl {record.get('loss/kl', 0):.4f}"
              f" | clip {record.get('loss/clipfrac', 0):.3f} | adv0 {adv0}"
              f" | rollouts {record['mc/rollouts']:5d} | t {t1 - t0:.1f}+{t2 - t1:.1f}+{t3 - t2:.1f}s"
              + (f" | eval acc {record['eval/accuracy']:.3f} greedy {record['eval/greedy_accuracy']:.3f}" if "eval/accuracy" in record else ""),
              flush=True)
        if (it + 1) % args.save_every == 0 or it + 1 == args.iterations:
            save_checkpoint(args.out, it + 1, policy, tokenizer, optimizer, scheduler, critic, critic_optimizer, critic_scheduler)
    if args.value_analysis > 0:   # section 7b on the final policy (and the trained critic of --advantage critic)
        result = value_analysis(policy, tokenizer, test_rows, args, task, critic=critic, n_states=args.value_analysis)
        with open(os.path.join(args.out, "value_analysis.json"), "w") as f:
            json.dump(result, f, indent=1)
        print("value analysis: MAE " + ", ".join(f"{m} {v:.3f}" for m, v in result["mae"].items() if v is not None)
              + f" on {result['states']} states")
    return records


# ============================================================================ 9. main
def main(argv=None) -> None:
    args = parse_args(argv)
    t0 = time.time()
    records = train(args)
    first = next(r for r in records if "eval/accuracy" in r)
    last = [r for r in records if "eval/accuracy" in r][-1]
    print(f"test accuracy {first['eval/accuracy']:.3f} -> {last['eval/accuracy']:.3f} "
          f"(greedy {first['eval/greedy_accuracy']:.3f} -> {last['eval/greedy_accuracy']:.3f}) "
          f"on {last['eval/problems']} problems in {time.time() - t0:.0f}s; metrics in {args.out}/metrics.jsonl")
    if first.get("eval/worked_share") is not None and last.get("eval/worked_share") is not None:
        print(f"multiplications worked out rather than recalled: {first['eval/worked_share']:.2f} -> {last['eval/worked_share']:.2f}")


if __name__ == "__main__":
    main()
