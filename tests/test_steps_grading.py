"""Tasks, grading, step splitting and the token -> step map (vineppo.py sections 2-3)."""
import random

import pytest

import vineppo as vp
from conftest import QWEN2_SPLIT, write_jsonl

GSM8K_SOLUTION = (
    "\nNatalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)

MATH_SOLUTION = (
    "\nWe have $x = 3.5$ and $y = 1.25$. So the sum is $x+y$.\n"
    "Then\n$$\na^2 + b^2 = c^2.\nThus c = 5.\n$$\n"
    "Multiplying out, we find that the product \\(p = 2.5 \\cdot 4\\) equals ten, and that the remaining factor, "
    "which we call $q$, must satisfy $q = 7$, so therefore the final answer is $\\boxed{\\frac{1}{2}}$."
)


# ---------------------------------------------------------------- steps
def test_gsm8k_steps_one_per_line_answer_glued_to_last():
    steps = vp.split_steps(GSM8K_SOLUTION, "gsm8k")
    assert steps == [
        "\nNatalia sold 48/2 = <<48/2=24>>24 clips in May.\n",        # leading "\n" joins the first step
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    ]


@pytest.mark.parametrize("task", ["gsm8k", "math"])
def test_stop_string_joins_the_last_step(task):
    """The sampler keeps the tokens up to the one completing "\n\n\nProblem:" (that token may carry more): they
    belong to the answer's step, not to a step of their own, which would cost an MC state and take R - V."""
    answer = "#### 5" if task == "gsm8k" else "So the answer is $\\boxed{5}$."
    body = "We add the two numbers first.\nThen we carry the one.\n" + answer
    steps = vp.split_steps(body, task)
    assert len(steps) >= 2
    # the last: more than the MATH splitter's 20 characters, which it would otherwise keep as a step of their own
    for tail in ("\n\n\nProblem:", "\n\n\nProblem: A", "\n\n\nProblem: Tom has three apples and"):
        assert vp.split_steps(body + tail, task) == steps[:-1] + [steps[-1] + tail]
    assert vp.split_steps("\n\n\nProblem:", task) == ["\n\n\nProblem:"]


def test_line_steps_blank_lines_join_previous_step():
    assert vp.split_steps("a\n\nb\n#### 3", "arith") == ["a\n\n", "b\n#### 3"]
    assert vp.split_steps("", "arith") == [""]
    assert vp.split_steps("#### 5", "gsm8k") == ["#### 5"]


def test_arith_solution_steps():
    row = vp.make_arith_problem(random.Random(3))
    steps = vp.split_steps(row["solution"], "arith")
    assert len(steps) == row["problem"].count("+") + row["problem"].count("-") + row["problem"].count("*")
    assert steps[-1].endswith(f"#### {row['answer']}")


def test_arith_solutions_are_correct_mod_100_in_both_forms():
    """Every line of every solution is true arithmetic mod 100, recalled (`47*8=76`) and worked
    (`47*8=40*8+7*8=20+56=76`) alike; the answer is the last result; both forms occur."""
    forms = set()
    for i in range(300):
        row = vp.make_arith_problem(random.Random(f"check-{i}"))
        *lines, answer_line = row["solution"].split("\n")
        x = int(row["problem"].split("+")[0].split("-")[0].split("*")[0])
        ops = [(c, int(d)) for c, d in zip(row["problem"][len(str(x))::2], row["problem"][len(str(x)) + 1::2])]
        assert len(lines) == len(ops)
        for line, (op, b) in zip(lines, ops):
            y = {"+": x + b, "-": x - b, "*": x * b}[op] % 100
            parts = line.split("=")
            assert parts[0] == f"{x}{op}{b}" and parts[-1] == str(y), line
            if len(parts) == 4:                               # worked: t0*b+u*b = (10 t b mod 100) + u b
                t, u = divmod(x, 10)
                assert op == "*" and parts[1] == f"{t}0*{b}+{u}*{b}" and parts[2] == f"{t * b % 10 * 10}+{u * b}"
                assert (t * b % 10 * 10 + u * b) % 100 == y
            forms.add((op, len(parts)))
            x = y
        assert answer_line == f"#### {x}" and row["answer"] == str(x)
    assert {("*", 2), ("*", 4), ("+", 2), ("-", 2)} == forms


def test_worked_share_counts_multiplication_steps_only():
    texts = ["49+5=54\n54*8=50*8+4*8=0+32=32\n32*2=64\n#### 64", "7*8=00*8+7*8=0+56=56\n#### 56", "1+2=3\n#### 3"]
    assert vp.worked_share(texts) == pytest.approx(2 / 3)
    assert vp.worked_share(["1+2=3\n#### 3"]) is None


def _inside(text, start, end, pos):
    return start < pos < end


def test_math_steps_never_split_inside_math():
    steps = vp.split_steps(MATH_SOLUTION, "math")
    assert "".join(steps) == MATH_SOLUTION
    cuts, pos = [], 0
    for s in steps[:-1]:
        pos += len(s)
        cuts.append(pos)
    # the periods and newlines inside $..$, $$..$$ and \(..\) never become step boundaries
    spans = [(m.start(), m.end()) for m in vp.MATH_SPAN.finditer(MATH_SOLUTION)]
    inline = [(a, b) for a, b in spans if not MATH_SOLUTION[a:b].startswith("$$")]
    assert all(not _inside(MATH_SOLUTION, a, b, c) for c in cuts for a, b in inline)
    display = MATH_SOLUTION.index("$$\na^2")
    assert not any(display < c < MATH_SOLUTION.index("5.\n$$") + 4 for c in cuts)  # short display block: whole
    assert len(steps) >= 3
    assert all(len(s.strip()) >= 20 for s in steps[:-1])       # short pieces were merged
    long_sentence = [s for s in steps if "Multiplying" in s or "remaining factor" in s]
    assert len(long_sentence) >= 2                              # the >100-character sentence was bisected
    assert all(len(s) <= 100 for s in long_sentence)


@pytest.mark.parametrize("seed", range(30))
def test_concatenation_invariant_random_text(seed):
    rng = random.Random(seed)
    alphabet = ["a", "b", " ", ".", "\n", "$", "\\(", "\\)", "$$", ",", "=", "####", "\\\\", "\\[", "\\]", "and "]
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
    for task in ("gsm8k", "math", "arith"):
        assert "".join(vp.split_steps(text, task)) == text
    # line steps: every step but the last ends a line; blank lines and "####" lines never start a step of their
    # own (they join the step before), except at the very start; so no step but the first is blank
    steps = vp.split_steps(text, "gsm8k")
    assert all(st.endswith("\n") for st in steps[:-1])
    assert not any(st.strip() == "" or st.lstrip().startswith("####") for st in steps[1:])


# ---------------------------------------------------------------- token -> step
def test_token_step_map_with_tokens_crossing_step_boundaries():
    # tokens: "x=1" "\ny" "=2\n" "##" "## 2" <eos>; steps: "x=1\n" | "y=2\n#### 2"
    pieces = ["x=1", "\ny", "=2\n", "##", "## 2", ""]
    decode = lambda ids: "".join(pieces[i] for i in ids)
    ids = list(range(len(pieces)))
    text = decode(ids)
    steps = vp.split_steps(text, "gsm8k")
    assert steps == ["x=1\n", "y=2\n#### 2"]
    starts = vp.step_token_starts(ids, steps, decode)
    # "\ny" starts with the "\n" of step 0, so it belongs to step 0; step 1 starts at "=2\n"
    assert starts == [0, 2]
    assert vp.token_steps(starts, len(ids)).tolist() == [0, 0, 1, 1, 1, 1]   # EOS -> last step


def test_token_step_map_with_a_step_without_own_token():
    pieces = ["a\nb\n", "c"]            # step "b\n" starts inside the first token: it owns no token
    decode = lambda ids: "".join(pieces[i] for i in ids)
    steps = vp.split_steps("a\nb\nc", "arith")
    starts = vp.step_token_starts([0, 1], steps, decode)
    assert starts == [0, 1, 1]
    assert vp.token_steps(starts, 2).tolist() == [0, 2]


def test_token_step_map_char_tokenizer_every_token_in_its_step():
    tok = vp.build_char_tokenizer()
    row = vp.make_arith_problem(random.Random(0))
    ids = tok(row["solution"], add_special_tokens=False).input_ids + [tok.eos_token_id]
    dec = lambda x: vp.decode(tok, x)
    steps = vp.split_steps(dec(ids), "arith")
    step_of = vp.token_steps(vp.step_token_starts(ids, steps, dec), len(ids)).tolist()
    owner = [j for j, s in enumerate(steps) for _ in s] + [len(steps) - 1]
    assert step_of == owner


# Pre-tokenizers of three families, built here (no download): a token never crosses their cuts, and every word
# after a space carries that space at its front (" Then", "▁Then"), as in the paper's models' tokenizers.
MATH_SENTENCES = ("We have $x = 3.5$ and that is the first fact. Then the value is really quite large, so we continue on "
                  "with the rest of it and we never stop. Finally we add up all of it, and that gives $\\boxed{3}$.")
MATH_DISPLAY = ("Expanding gives\n$$\na^2 + 2ab + b^2 + 2ac + 2bc + c^2 = (a+b+c)^2 = 100 + 200 + 300 + 400 + 500 + 600 "
                "\\\\\nx = 5 + 6 + 7 + 8 + 9 + 10 + 11 + 12 + 13 + 14 + 15\n$$\nso the answer is $\\boxed{5}$.")


def _pre_tokenizer(name):
    from tokenizers import Regex, pre_tokenizers
    return {"gpt2-bytelevel": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
            "qwen2-regex": lambda: pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            "llama-metaspace": lambda: pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                                 pre_tokenizers.Metaspace(prepend_scheme="first")])}[name]()


@pytest.mark.parametrize("pre", ["gpt2-bytelevel", "qwen2-regex", "llama-metaspace"])
@pytest.mark.parametrize("text,task", [(GSM8K_SOLUTION, "gsm8k"), (MATH_SOLUTION, "math"), (MATH_SENTENCES, "math"),
                                       (MATH_DISPLAY, "math")], ids=["gsm8k", "math", "math-sentences", "math-display"])
def test_each_state_is_the_prompt_and_its_steps_for_space_prefixed_tokens(pre, text, task):
    """s_i = prompt + the first i steps, token for token: the first token of step i starts at the step's first
    character, also where the step follows a sentence end, a comma or a display-math "=" and its first token
    carries the space before it. (Steps ending in ". " gave s_i step i's first word: " Then".)"""
    starts_at = sorted({a for _, (a, _) in _pre_tokenizer(pre).pre_tokenize_str(text)} | {0})
    pieces = [text[a:b] for a, b in zip(starts_at, starts_at[1:] + [len(text)])]   # one token per pre-token
    decode = lambda ids: "".join(pieces[i] for i in ids)
    ids = list(range(len(pieces)))
    steps = vp.split_steps(text, task)
    starts = vp.step_token_starts(ids, steps, decode)
    assert len(steps) >= 2 and decode(ids) == text
    assert [decode(ids[:t]) for t in starts] == ["".join(steps[:i]) for i in range(len(steps))]


def _byte_tokens(text, family):
    """`text` as one token per ASCII character and one per UTF-8 byte of any other, written as the tokenizer family
    writes byte tokens, with that family's own decoder from `tokenizers` (no download): Llama's byte fallback
    (RhoMath) shows an unfinished character as one U+FFFD per byte, byte-level BPE (GPT-2, Qwen2, DeepSeek) as one."""
    from tokenizers import decoders, pre_tokenizers
    if family == "llama-bytefallback":
        tokens = [t for ch in text for t in (["▁" if ch == " " else ch] if ch.isascii() else
                                             [f"<0x{b:02X}>" for b in ch.encode()])]
        decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    else:   # every byte is one character of the byte-level alphabet
        tokens = list(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)[0][0])
        decoder = decoders.ByteLevel()
    return list(range(len(tokens))), lambda ids: decoder.decode([tokens[i] for i in ids])


@pytest.mark.parametrize("family", ["llama-bytefallback", "byte-level"])
@pytest.mark.parametrize("text,task", [
    ("\nShe has 5 🍎\nSo 5 + 3 = 8 €\n#### 8", "gsm8k"),
    ("\nWe draw a happy face 😀. Then we count its 3 eyes and 2 mouths, which is odd. So the total is 5 "
     "and the angle is 90°. Finally the answer is $\\boxed{5}$.", "math"),
], ids=["gsm8k", "math"])
def test_states_never_end_inside_a_character_split_over_byte_tokens(family, text, task):
    """A character outside the vocabulary is sampled as byte tokens. Unfinished, it decodes to U+FFFD (one per byte
    with byte fallback, so the decoded length drops when it completes): the state before a step still ends after
    the whole character, and a step after a narrow no-break space (U+202F) starts with it."""
    ids, decode = _byte_tokens(text, family)
    steps = vp.split_steps(decode(ids), task)
    starts = vp.step_token_starts(ids, steps, decode)
    assert decode(ids) == text and len(steps) >= 2
    assert [decode(ids[:t]) for t in starts] == ["".join(steps[:i]) for i in range(len(steps))]
    assert task == "gsm8k" or any(st.startswith(" ") for st in steps)


# ---------------------------------------------------------------- grading
@pytest.mark.parametrize("response,gold,task,expected", [
    ("1+2=3\n#### 3", "3", "arith", True),
    ("1+2=3\n#### 4", "3", "arith", False),
    ("no answer line", "3", "arith", False),
    ("so 1,000 in all\n#### 1,000", "1000", "gsm8k", True),        # thousands separator
    ("#### 72.0", "72", "gsm8k", True),                             # numeric equality (authors: string)
    ("#### $18", "18", "gsm8k", True),
    ("#### 18\n\n\nProblem: next one #### 5", "18", "gsm8k", True),  # stop string cut before grading
    ("#### 17", "18", "gsm8k", False),
    ("#### ", "18", "gsm8k", False),
    ("#### sNaN", "18", "gsm8k", False),                            # parses as a Decimal, raises on ==
    ("#### NaN", "NaN", "gsm8k", True),                             # not a number: compared as strings
    ("#### 1,000 apples", "1000 apples", "gsm8k", True),            # strings compared without commas
    ("#### 1 000 apples", "1000 apples", "gsm8k", True),            # ... and spaces (spec 8)
    ("#### 1000 pears", "1000 apples", "gsm8k", False),
    ("#### Infinity", "18", "gsm8k", False),
    ("the answer is $\\boxed{0.5}$", "\\frac{1}{2}", "math", True),  # decimal vs fraction
    ("$\\boxed{\\frac12}$", "\\frac{1}{2}", "math", True),
    ("$\\boxed{\\dfrac{1}{2}}$", "0.5", "math", True),
    ("$\\boxed{1,000}$", "1000", "math", True),
    ("$\\boxed{3}$", "\\frac{1}{2}", "math", False),
    ("the answer is 1/2", "\\frac{1}{2}", "math", False),           # not boxed: no answer
    ("$\\boxed{x}$ then $\\boxed{\\sqrt{2}}$", "\\sqrt 2", "math", True),   # the last box counts
    ("$\\boxed{\\}{}$", "\\}{", "math", False),                     # gold that does not parse never scores
    ("$\\boxed{ \\mathrm{x}}{}$", "\\mathrm{}}{", "math", False),
])
def test_grade(response, gold, task, expected):
    assert vp.grade(response, gold, task) is expected


def test_vote_keys_of_numbers_that_grade_equal_or_overflow():
    """maj@N's key follows grade(): -0 and 0 are one answer; an exponent that Decimal cannot normalise is no number
    (it raised decimal.Overflow in the vote)."""
    assert vp.answer_key("-0", "gsm8k") == vp.answer_key("0.00", "gsm8k") == "0" and vp.grade("#### -0", "0", "gsm8k")
    assert vp.answer_key("1e9999999999", "gsm8k") == "1e9999999999" and not vp.grade("#### 1e9999999999", "1", "gsm8k")
    assert vp.answer_key("7.2e1", "gsm8k") == vp.answer_key("72", "gsm8k") == "72"
    # an answer that is no number: grade() compares it without commas and spaces, and so does its vote
    assert vp.grade("#### 1 000 apples", "1,000apples", "gsm8k") and vp.answer_key("1 000 apples", "gsm8k") == "1000apples"


@pytest.mark.parametrize("task,gold,answers,expected", [
    # three ways of writing the right answer against two votes for a wrong one: by strings the wrong one wins
    ("gsm8k", "72", ["72", "5", "72.0", "5", "72.00"], dict(acc=3 / 6, maj=True, greedy=True)),
    ("math", "\\frac{1}{2}", ["\\frac12", "2", "0.5", "2", "\\dfrac{1}{2}"], dict(acc=3 / 6, maj=True, greedy=True)),
    ("gsm8k", "72", ["5", "72", "5", "72.0"], dict(acc=2 / 5, maj=False, greedy=False)),   # a tie: the class seen first wins
])
def test_evaluate_majority_votes_by_equivalence(task, gold, answers, expected, monkeypatch):
    """maj@N groups answers that grade() counts as equal; an unfinished sample (the sixth, right) never
    votes and counts as wrong; greedy accuracy and pass@N beside it."""
    box = (lambda a: f"so $\\boxed{{{a}}}$") if task == "math" else (lambda a: f"#### {a}")
    texts = [box(a) for a in answers] + [box(gold)]

    def fake_generate(model, tokenizer, prompts, k, max_new_tokens, temperature, top_p, desc):
        if k == 1:   # greedy
            return [[[0]] for _ in prompts], [[True] for _ in prompts]
        return [list(map(list, zip(range(len(texts))))) for _ in prompts], [[True] * len(answers) + [False]]

    monkeypatch.setattr(vp, "generate", fake_generate)
    monkeypatch.setattr(vp, "decode", lambda tokenizer, ids: texts[ids[0]])
    monkeypatch.setattr(vp, "encode_prompt", lambda tokenizer, problem, task: [1])
    args = vp.parse_args(["--eval-samples", str(len(texts))])
    out = vp.evaluate(None, None, [{"problem": "p", "answer": gold}], args, task)
    assert out["eval/accuracy"] == pytest.approx(expected["acc"])
    assert out[f"eval/maj@{len(texts)}"] == float(expected["maj"])
    assert out[f"eval/pass@{len(texts)}"] == 1.0
    assert out["eval/greedy_accuracy"] == float(expected["greedy"])   # greedy decodes to the first answer


def test_evaluate_greedy_cut_at_the_cap_scores_zero(monkeypatch):
    """A greedy answer that hit the length cap is wrong even where its text holds the right answer, as for samples."""
    for greedy_done, expected in ((True, 1.0), (False, 0.0)):
        monkeypatch.setattr(vp, "generate", lambda model, tok, prompts, k, *a, **kw: (
            [[[0]] * k for _ in prompts], [[greedy_done if k == 1 else True] * k for _ in prompts]))
        monkeypatch.setattr(vp, "decode", lambda tokenizer, ids: "#### 72")
        monkeypatch.setattr(vp, "encode_prompt", lambda tokenizer, problem, task: [1])
        out = vp.evaluate(None, None, [{"problem": "p", "answer": "72"}], vp.parse_args(["--eval-samples", "2"]), "gsm8k")
        assert out["eval/greedy_accuracy"] == expected and out["eval/accuracy"] == 1.0


def test_last_boxed_nested_braces():
    assert vp.last_boxed("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"
    assert vp.last_boxed("\\boxed{1} and \\fbox{2}") == "2"
    assert vp.last_boxed("no box") is None


def test_arith_splits_are_disjoint_and_seeded():
    test = vp.load_problems("arith", "test")
    train = vp.load_problems("arith", "train")
    assert len(test) == 1000 and len(train) > 19000
    assert not {r["problem"] for r in test} & {r["problem"] for r in train}
    assert vp.load_problems("arith", "test") == test
    for row in test[:50]:   # every gold answer is what its solution computes
        assert vp.grade(row["solution"], row["answer"], "arith")


def test_gsm8k_grades_the_line_after_the_last_marker():
    """Spec 8: the answer is the text after the LAST "####" (a response may revise itself), its first line only;
    commas go before the numeric comparison, so "1,000.0" is 1000, and majority voting keys agree."""
    assert vp.grade("#### 5\nwait, recheck\n#### 7", "7", "gsm8k")
    assert not vp.grade("#### 5\nwait, recheck\n#### 7", "5", "gsm8k")
    assert vp.grade("#### 72\nThat is all.", "72", "gsm8k")
    assert vp.grade("#### 1,000.0", "1000", "gsm8k")
    assert vp.answer_key("1,000", "gsm8k") == vp.answer_key("1000", "gsm8k") == vp.answer_key("1000.00", "gsm8k")


@pytest.mark.parametrize("text,steps", [
    # a piece of exactly 20 characters is not "under 20": it stays a step of its own
    ("abcdefghij abcdefgh.\nThen the rest of the solution follows here.",
     ["abcdefghij abcdefgh.\n", "Then the rest of the solution follows here."]),
    # a short LAST piece joins the one before it
    ("We add the two numbers first and carry.\nSo $x=5$.", None),
    # exactly 100 characters is not "over 100": no bisection
    ("a" * 48 + ", " + "b" * 50, None),
    # a bisection that would leave a piece under 20 characters is not made
    ("ab, " + "c" * 120, None),
    # a decimal point is not a sentence end
    ("We compute the total value 12.5 apples and then continue working here.", None),
    # "=" bisects only inside display math, never in plain text
    ("x" * 50 + " = " + "y" * 60, None),
])
def test_math_step_thresholds(text, steps):
    """The MATH splitter's bounds exactly (spec 3: merge pieces under 20 characters, bisect pieces over 100)."""
    assert vp.split_steps(text, "math") == (steps or [text])


# ---------------------------------------------------------------- evaluation and data loading
def _fake_eval(monkeypatch, texts, done, gold_greedy=True):
    calls = []

    def fake_generate(model, tokenizer, prompts, k, max_new_tokens, temperature, top_p, desc):
        calls.append((k, max_new_tokens, temperature, top_p))
        if k == 1:
            return [[[0]] for _ in prompts], [[gold_greedy] for _ in prompts]
        return [[[i] for i in range(len(texts))] for _ in prompts], [list(done) for _ in prompts]

    monkeypatch.setattr(vp, "generate", fake_generate)
    monkeypatch.setattr(vp, "decode", lambda tokenizer, ids: texts[ids[0]])
    monkeypatch.setattr(vp, "encode_prompt", lambda tokenizer, problem, task: [1])
    return calls


@pytest.mark.parametrize("answers,expected_maj", [
    (["5", "72", "72"], 1.0),                           # the majority class is not the first sample's
    (["7", "72", "5", "72", "72.0"], 1.0),
    ([None, None, None, "72", "72"], 1.0),              # samples without an answer do not vote
    ([None, None, "5"], 0.0),
])
def test_evaluate_majority_is_graded_as_its_class_and_ignores_no_answer(answers, expected_maj, monkeypatch):
    texts = [f"#### {a}" if a is not None else "no final line" for a in answers]
    _fake_eval(monkeypatch, texts, [True] * len(texts))
    args = vp.parse_args(["--eval-samples", str(len(texts))])
    out = vp.evaluate(None, None, [{"problem": "p", "answer": "72"}], args, "gsm8k")
    assert out[f"eval/maj@{len(texts)}"] == expected_maj


def test_evaluate_samples_greedy_at_temperature_zero_and_the_rest_at_eval_settings(monkeypatch):
    calls = _fake_eval(monkeypatch, ["#### 72", "#### 72"], [True, True])
    args = vp.parse_args(["--eval-samples", "2", "--eval-temperature", "0.35", "--temperature", "0.6", "--top-p", "0.9",
                          "--max-new-tokens", "33"])
    vp.evaluate(None, None, [{"problem": "p", "answer": "72"}], args, "gsm8k")
    assert calls == [(1, 33, 0.0, 1.0), (2, 33, 0.35, 0.9)]


def test_load_problems_answer_rules(tmp_path, capsys):
    gsm = write_jsonl(tmp_path / "g.jsonl", [{"question": "a", "answer": "x #### 4 #### 5"},
                                              {"question": "b", "answer": "so\n#### "}])
    assert [r["answer"] for r in vp.load_problems("gsm8k", "train", gsm)] == ["5"]     # the last marker; "" dropped
    math_rows = write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "solution": "so $\\boxed{2}$", "answer": "\\frac{4}{2}"},
                                                   {"problem": "q", "solution": "so $\\boxed{}$"}])
    assert [r["answer"] for r in vp.load_problems("math", "test", math_rows)] == ["\\frac{4}{2}"]   # the field wins
