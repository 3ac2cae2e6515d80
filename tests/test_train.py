"""End to end: the demo learns, resume is exact, the real-model path runs, bad flags fail cleanly."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import pytest

import vineppo as vp
from conftest import DEVICES, bpe_tokenizer, save_random_model, write_jsonl

ARITH = "0123456789+-*=# \n"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo's own SFT model (DEMO_DEFAULTS, trained once per session into demo_cache), smaller iterations.
SMALL = ["--prompts-per-iteration", "16", "--samples-per-prompt", "4", "--k", "2",
         "--mini-batch", "32", "--micro-batch", "32", "--eval-problems", "20", "--eval-samples", "2"]


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_times(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def run_cli(args, env=None, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "vineppo.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT, **kw)


def test_demo_improves_train_reward(demo_cache, tmp_path):
    """The demo pipeline (tiny model, arith, VinePPO) on a fixed set of 16 training problems: reward on
    them rises within a dozen iterations (a fixed prompt set makes the signal consistent enough for a
    short test; the full demo's gain on held-out problems is measured by `python vineppo.py`)."""
    import random
    rows = [vp.make_arith_problem(random.Random(f"e2e-{i}")) for i in range(16)]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    args = vp.parse_args(["--out", str(tmp_path / "run"), "--iterations", "12", "--lr", "1e-4", "--eval-every", "100",
                          "--seed", "3", "--train-file", train_file, *SMALL, "--prompts-per-iteration", "16",
                          "--samples-per-prompt", "8", "--mini-batch", "64", "--micro-batch", "64"])
    records = vp.train(args)
    rewards = [r["train/reward"] for r in records if "train/reward" in r]
    assert len(rewards) == 12
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.1, rewards
    for key in ("iteration", "train/reward", "loss/kl", "loss/clipfrac", "adv/zero_frac", "mc/rollouts",
                "time/sample", "time/mc", "time/update"):
        assert key in records[-1], key
    assert "eval/accuracy" in records[0] and "eval/accuracy" in records[-1]
    assert records[-1]["mc/rollouts"] > 0 and 0 <= records[-1]["adv/zero_frac"] <= 1


def test_resume_after_exception_is_bit_exact(demo_cache, tmp_path, monkeypatch, capsys):
    """With --advantage critic, whose value network, its optimizer and its schedule must come back too (the
    SIGKILL test below resumes a VinePPO run)."""
    common = ["--iterations", "3", "--save-every", "1", "--eval-every", "2", "--lr", "3e-4", "--advantage", "critic", *SMALL]
    os.makedirs(tmp_path / "a")
    vp.log_metrics(str(tmp_path / "a"), {"iteration": 9, "train/reward": -1.0})   # an old run's: a fresh start drops it
    straight = vp.train(vp.parse_args(["--out", str(tmp_path / "a"), *common]))
    # interrupted right after the checkpoint of iteration 1, with a stray metrics line of iteration 2
    # (a kill between writing metrics and writing the checkpoint)
    saved = []
    real_save = vp.save_checkpoint

    def save_then_die(out, iteration, *a, **kw):
        real_save(out, iteration, *a, **kw)
        saved.append(iteration)
        if iteration == 1:
            vp.log_metrics(out, {"iteration": 2, "train/reward": -1.0})
            raise KeyboardInterrupt

    monkeypatch.setattr(vp, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        vp.train(vp.parse_args(["--out", str(tmp_path / "b"), *common]))
    monkeypatch.setattr(vp, "save_checkpoint", real_save)
    sampled, real_sample = [], vp.sample_episodes
    monkeypatch.setattr(vp, "sample_episodes", lambda *a, **kw: (sampled.append(1), real_sample(*a, **kw))[1])
    capsys.readouterr()
    resumed = vp.train(vp.parse_args(["--out", str(tmp_path / "b"), "--resume", *common]))
    printed = capsys.readouterr()
    assert "at iteration 1" in printed.err and len(sampled) == 2   # iterations 2 and 3 only
    assert printed.out.count("| adv0    - |") == 2   # the critic's advantages have no share of exact zeros
    assert without_times(read_metrics(tmp_path / "a")) == without_times(read_metrics(tmp_path / "b"))
    assert without_times(straight) == without_times(resumed)
    assert os.path.isfile(tmp_path / "b" / "ckpt" / "model.safetensors")


def test_a_checkpoint_killed_at_any_moment_leaves_a_complete_one(tmp_path, monkeypatch):
    """save_checkpoint writes ckpt.tmp, then renames ckpt -> ckpt.old and ckpt.tmp -> ckpt. A kill while writing
    leaves the old ckpt; a kill between the renames leaves ckpt.old and a complete ckpt.tmp, which find_checkpoint
    ignores: it picks ckpt.old (the newer iterations are redone); the next save cleans up both."""
    import torch
    folder = save_random_model(tmp_path / "m", "gpt2")
    policy, tok = vp.load_policy(folder, torch.device("cpu"), vp.parse_args(["--model", folder]))
    optimizer = torch.optim.AdamW(policy.parameters())
    scheduler = vp.warmup_linear_schedule(optimizer, 10, 0.0)
    out = str(tmp_path / "run")
    os.makedirs(out)

    def saved_iteration():
        ckpt = vp.find_checkpoint(out)
        return os.path.basename(ckpt), torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)["iteration"]

    assert vp.find_checkpoint(out) is None
    vp.save_checkpoint(out, 1, policy, tok, optimizer, scheduler)
    assert saved_iteration() == ("ckpt", 1) and sorted(os.listdir(out)) == ["ckpt"]
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))   # killed writing
    with pytest.raises(KeyboardInterrupt):
        vp.save_checkpoint(out, 2, policy, tok, optimizer, scheduler)
    monkeypatch.setattr(torch, "save", real_save)
    assert saved_iteration() == ("ckpt", 1) and sorted(os.listdir(out)) == ["ckpt", "ckpt.tmp"]
    real_replace, renames = os.replace, []

    def die_after_one_rename(src, dst):
        if renames:
            raise KeyboardInterrupt
        renames.append((os.path.basename(src), os.path.basename(dst)))
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", die_after_one_rename)
    with pytest.raises(KeyboardInterrupt):
        vp.save_checkpoint(out, 3, policy, tok, optimizer, scheduler)
    monkeypatch.setattr(os, "replace", real_replace)
    assert renames == [("ckpt", "ckpt.old")] and sorted(os.listdir(out)) == ["ckpt.old", "ckpt.tmp"]
    assert os.path.isfile(os.path.join(out, "ckpt.tmp", "COMPLETE"))
    assert saved_iteration() == ("ckpt.old", 1)
    vp.save_checkpoint(out, 4, policy, tok, optimizer, scheduler)
    assert saved_iteration() == ("ckpt", 4) and sorted(os.listdir(out)) == ["ckpt"]
    real_rmtree, removed = vp.shutil.rmtree, []

    def die_before_the_last_cleanup(path, **kw):   # rmtree calls: ckpt.tmp, ckpt.old, (renames), ckpt.old
        removed.append(os.path.basename(path))
        if len(removed) == 3:
            raise KeyboardInterrupt
        real_rmtree(path, **kw)
    monkeypatch.setattr(vp.shutil, "rmtree", die_before_the_last_cleanup)
    with pytest.raises(KeyboardInterrupt):
        vp.save_checkpoint(out, 5, policy, tok, optimizer, scheduler)
    monkeypatch.setattr(vp.shutil, "rmtree", real_rmtree)
    assert removed == ["ckpt.tmp", "ckpt.old", "ckpt.old"] and sorted(os.listdir(out)) == ["ckpt", "ckpt.old"]
    assert saved_iteration() == ("ckpt", 5)   # both complete: the newer one


def test_a_new_run_leaves_no_older_checkpoint_to_resume(tmp_path, monkeypatch):
    """A run started without --resume in a folder that holds an older run's ckpt.old (a kill between
    save_checkpoint's renames) and ckpt.tmp removes them: a --resume before its first save starts afresh, never
    from the older run, whose config.json the new run has already replaced."""
    model = save_random_model(tmp_path / "llama", "llama")
    data = write_jsonl(tmp_path / "rows.jsonl", GSM8K_ROWS)
    out = tmp_path / "run"
    for name in ("ckpt", "ckpt.old", "ckpt.tmp"):
        os.makedirs(out / name)
        open(out / name / "COMPLETE", "w").close()

    def killed(*a, **kw):
        raise KeyboardInterrupt   # the new run dies in its first evaluation, before any checkpoint

    monkeypatch.setattr(vp, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        vp.train(vp.parse_args(["--model", model, "--task", "gsm8k", "--train-file", data, "--test-file", data,
                                "--out", str(out), "--max-new-tokens", "12"]))
    assert vp.find_checkpoint(str(out)) is None and sorted(os.listdir(out)) == ["config.json", "metrics.jsonl"]


def test_resume_after_sigkill_is_bit_exact(demo_cache, tmp_path):
    common = ["--iterations", "4", "--save-every", "1", "--eval-every", "2", *SMALL]
    env = {"XDG_CACHE_HOME": str(demo_cache)}
    assert run_cli(["--out", str(tmp_path / "a"), *common], env=env).returncode == 0
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "vineppo.py"), "--out", str(tmp_path / "b"), *common],
                            env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while True:   # kill mid-run, once at least two iterations are on disk
        time.sleep(0.2)
        path = tmp_path / "b" / "metrics.jsonl"
        if path.exists() and sum(1 for _ in open(path)) >= 3:
            break
        assert time.time() < deadline and proc.poll() is None, "the run ended or stalled before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    result = run_cli(["--out", str(tmp_path / "b"), "--resume", *common], env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"resumed from \S+ at iteration [123]\b", result.stderr), result.stderr[-2000:]
    assert without_times(read_metrics(tmp_path / "a")) == without_times(read_metrics(tmp_path / "b"))


GSM8K_ROWS = [{"question": f"Tom has {a} apples and buys {b} more. How many apples?",
               "answer": f"Tom has {a}+{b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"} for a, b in
              [(3, 4), (10, 5), (7, 8), (1, 1), (20, 22), (6, 6)]]
MATH_ROWS = [{"problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?", "solution": "We add. The sum is $\\boxed{\\frac{3}{4}}$."},
             {"problem": "Compute $2^3$.", "solution": "$2^3 = 8$, so the answer is $\\boxed{8}$."}]



def one_math_iteration(tmp_path, model, out, *flags):
    """Args of a one-iteration run of `model` on MATH_ROWS (train and test), 2 prompts x 2 samples, K = 2."""
    rows = write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    return vp.parse_args(["--model", model, "--task", "math", "--train-file", rows, "--test-file", rows,
                          "--out", str(tmp_path / out), "--iterations", "1", "--k", "2", "--prompts-per-iteration", "2",
                          "--samples-per-prompt", "2", "--eval-samples", "2", "--mini-batch", "4", *flags])

def test_real_model_path_llama_gsm8k_cli(tmp_path):
    model = save_random_model(tmp_path / "llama", "llama")
    train_file = write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS)
    test_file = write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS[:3])
    out = tmp_path / "run"
    result = run_cli(["--model", model, "--task", "gsm8k", "--train-file", train_file, "--test-file", test_file,
                      "--out", str(out), "--iterations", "2", "--k", "2", "--prompts-per-iteration", "2",
                      "--samples-per-prompt", "2", "--max-new-tokens", "12", "--eval-problems", "2", "--eval-samples", "2",
                      "--mini-batch", "3", "--micro-batch", "1", "--eval-every", "1"])
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(out)
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert records[1]["mc/rollouts"] > 0 and records[1]["update/steps"] == 4   # 2 epochs x 2 mini-batches (3 + 1)
    # the schedule counts the short mini-batch: 8 steps in all, 1 of warm-up (3% of 8 rounds to 0: at least 1), then linear to 0
    assert [r["update/skipped"] for r in records[1:]] == [0, 0]
    assert records[1]["update/lr"] == pytest.approx(1e-6 * (8 - 4) / (8 - 1)) and records[2]["update/lr"] == 0
    config = json.load(open(out / "config.json"))
    assert config["k"] == 2 and config["lr"] == 1e-6 and config["temperature"] == 0.6   # the flag; paper lr and T kept
    assert os.path.isfile(out / "ckpt" / "model.safetensors") and os.path.isfile(out / "ckpt" / "state.pt")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch,advantage,lora", [("qwen2", "vine", 0), ("gpt2", "critic", 0), ("llama", "vine", 4)])
def test_real_model_path_math_jsonl(tmp_path, arch, advantage, lora, device, capsys):
    """One iteration of the real-model path; on a GPU: bf16 autocast, the compiled kernels, the CUDA-graph sampler
    (which would fall back to eager steps, saying so, if its capture failed)."""
    model = save_random_model(tmp_path / arch, arch)
    args = one_math_iteration(tmp_path, model, "run", "--advantage", advantage, "--max-new-tokens", "10",
                              "--micro-batch", "2", "--device", device, "--lora-rank", str(lora),
                              "--entropy-coef", "0.1")   # random models earn no reward: the entropy bonus gives a gradient
    records = vp.train(args)
    assert records[-1]["iteration"] == 1 and "eval/accuracy" in records[-1]
    assert records[-1]["update/steps"] == 2
    assert 0 < records[-1]["update/grad_norm"] < float("inf")
    if device == "cuda":
        assert vp.kernels.HAS_TRITON and "CUDA graph capture failed" not in capsys.readouterr().out


BPE_ROWS = {   # solutions of several steps, each a sentence or line of >= 20 characters
    "gsm8k": [{"question": f"Tom has {a} apples and buys {b} more. How many apples?",
               "answer": f"Tom had {a} apples before he went out.\nThen he has {a}+{b} = <<{a}+{b}={a + b}>>{a + b} apples.\n"
                         f"#### {a + b}"} for a, b in [(3, 4), (10, 5), (7, 8), (20, 22)]],
    "math": [{"problem": f"Compute ${a}^2 + {b}$.",
              "solution": f"First we compute the square on its own. Then ${a}^2 = {a * a}$, and we add {b} to it. "
                          f"So the answer is $\\boxed{{{a * a + b}}}$."} for a, b in [(2, 3), (3, 5), (4, 1), (5, 2)]],
}


@pytest.mark.parametrize("task", ["gsm8k", "math"])
def test_real_model_path_with_a_bpe_tokenizer(tmp_path, task, monkeypatch):
    """The paper's models' tokenizers are BPEs whose tokens span several characters, carry the space before a
    word (" Then") and join punctuation to the newlines after it. A random Qwen2 with a byte-level BPE trained
    here, fine-tuned for a moment on solutions of several steps, runs an iteration, and every state of every
    sampled response ends exactly after its steps wherever a token boundary lies there (the states the MC
    rollouts continue from, and the steps' token ranges, follow from them)."""
    import torch
    rows = BPE_ROWS[task]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    problems = vp.load_problems(task, "train", data)
    tok = bpe_tokenizer([vp.format_prompt(r["problem"], task) + r["solution"] for r in problems] * 4)
    model = save_random_model(tmp_path / "qwen2", "qwen2", tokenizer=tok, seed=1)
    policy, _ = vp.load_policy(model, torch.device("cpu"), vp.parse_args(["--model", model]))
    vp.sft(policy, tok, problems, task, steps=150, lr=3e-3, batch_size=8, seed=0)   # ~2 s
    policy.save_pretrained(model)
    episodes, real_sample = [], vp.sample_episodes
    monkeypatch.setattr(vp, "sample_episodes", lambda *a, **kw: (lambda out: episodes.extend(out) or out)(real_sample(*a, **kw)))
    records = vp.train(vp.parse_args(["--model", model, "--task", task, "--train-file", data, "--test-file", data,
                                      "--out", str(tmp_path / "run"), "--iterations", "1", "--k", "2",
                                      "--prompts-per-iteration", "4", "--samples-per-prompt", "4", "--temperature", "1.0",
                                      "--max-new-tokens", "60", "--eval-problems", "1", "--eval-samples", "1",
                                      "--mini-batch", "16"]))
    assert records[-1]["iteration"] == 1 and records[-1]["mc/rollouts"] > 0 and records[-1]["update/steps"] == 2
    checked = 0
    for e in episodes:
        dec = lambda ids: vp.decode(tok, ids)
        shown = {dec(e.response_ids[:t]) for t in range(len(e.response_ids) + 1)}   # the texts token boundaries end
        assert e.step_starts == sorted(e.step_starts) and "".join(e.steps) == e.text == dec(e.response_ids)
        for i, t in enumerate(e.step_starts[1:], 1):
            if "".join(e.steps[:i]) in shown:
                assert dec(e.response_ids[:t]) == "".join(e.steps[:i]), (i, e.steps)
                checked += 1
    assert len(episodes) == 16 and checked >= 8   # states after the first that end on a token boundary (here: all)


def test_sampler_flags_reach_the_sampler(tmp_path, monkeypatch):
    """--sampler-memory-fraction and --sampler-compile set kernels' settings for every sampler call of the run
    (episodes, MC rollouts, evaluation); without the flag the compile is kernels' "auto" (GPU, bf16 weights). The
    compile itself is left off here: its CPU warm-up takes 8-23 s, and tests/test_sampler.py checks the compiled
    decode's tokens."""
    import kernels as ks
    monkeypatch.setattr(ks, "SAMPLER_MEMORY_FRACTION", ks.SAMPLER_MEMORY_FRACTION)   # restored after the test
    monkeypatch.setattr(ks, "SAMPLER_COMPILE", ks.SAMPLER_COMPILE)
    seen, sample = [], ks.sample_continuations

    def recording(*a, **kw):
        seen.append((ks.SAMPLER_MEMORY_FRACTION, ks.SAMPLER_COMPILE))
        ks.SAMPLER_COMPILE = False
        try:
            return sample(*a, **kw)
        finally:
            ks.SAMPLER_COMPILE = seen[-1][1]
    monkeypatch.setattr(ks, "sample_continuations", recording)
    model = save_random_model(tmp_path / "llama", "llama")
    vp.train(one_math_iteration(tmp_path, model, "run", "--max-new-tokens", "6", "--micro-batch", "4",
                                "--sampler-memory-fraction", "0.5", "--sampler-compile", "on"))
    assert len(seen) == 6 and set(seen) == {(0.5, True)}   # 2 evaluations x 2 calls, episodes, MC rollouts
    default = vp.parse_args([])
    assert (default.sampler_memory_fraction, vp.SAMPLER_COMPILE_CHOICES[default.sampler_compile]) == (0.7, "auto")


def test_every_method_sees_the_same_evaluation_and_episodes(tmp_path, monkeypatch):
    """Methods are compared on the same seed: the critic's new head is initialised from a forked RNG, so the
    evaluation before training and the first iteration's episodes are those of a VinePPO run, draw for draw."""
    model = save_random_model(tmp_path / "gpt2", "gpt2")
    drawn, generate = [], vp.generate

    def recording(*a, desc, **kw):
        drawn.append((desc, generate(*a, desc=desc, **kw)))
        return drawn[-1][1]
    monkeypatch.setattr(vp, "generate", recording)
    runs = {}
    for advantage in ("vine", "critic", "grpo"):
        drawn.clear()
        vp.train(one_math_iteration(tmp_path, model, advantage, "--advantage", advantage, "--max-new-tokens", "8",
                                    "--micro-batch", "4"))
        runs[advantage] = drawn[:3]   # evaluation (greedy, sampled), the iteration's episodes
    assert [desc for desc, _ in runs["vine"]] == ["eval greedy", "eval sampled", "sampling"]
    assert runs["critic"] == runs["vine"] and runs["grpo"] == runs["vine"]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "falcon", "opt"])
def test_policy_and_critic_have_no_dropout(tmp_path, arch):
    """PPO's ratio starts at 1 only if the update's train-mode forward equals the eval-mode forward that gave the
    old log-probs: dropout is off in the policy and the critic (GPT-2 defaults to 0.1; Llama's attention here 0.5;
    Falcon reads its rates from the config at every forward, through no Dropout module)."""
    import torch
    from transformers import AutoConfig, FalconConfig, FalconForCausalLM, OPTConfig, OPTForCausalLM
    if arch in ("falcon", "opt"):   # OPT copies its rates into plain floats on its layers, and has layerdrop
        folder = save_random_model(tmp_path / arch, "llama")   # for its tokenizer
        c = AutoConfig.from_pretrained(folder)
        ids = dict(vocab_size=c.vocab_size, pad_token_id=c.pad_token_id, eos_token_id=c.eos_token_id, bos_token_id=None)
        torch.manual_seed(0)
        if arch == "falcon":
            model = FalconForCausalLM(FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                   hidden_dropout=0.5, attention_dropout=0.5, **ids))
        else:
            model = OPTForCausalLM(OPTConfig(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, num_hidden_layers=2,
                                             num_attention_heads=4, dropout=0.5, attention_dropout=0.5,
                                             layerdrop=0.5, **ids))
        model.save_pretrained(folder)
    else:
        folder = save_random_model(tmp_path / arch, arch)
    if arch == "llama":
        config = AutoConfig.from_pretrained(folder)
        config.attention_dropout = 0.5
        config.save_pretrained(folder)
    rates = ("resid_pdrop", "attention_dropout", "hidden_dropout", "dropout")
    assert max(getattr(AutoConfig.from_pretrained(folder), a, 0.0) for a in rates) > 0
    args = vp.parse_args(["--model", folder, "--task", "gsm8k"])
    policy, _ = vp.load_policy(folder, torch.device("cpu"), args)
    critic = vp.make_critic(folder, torch.device("cpu"))
    ids = torch.arange(3, 40).unsqueeze(0)
    policy.eval(); critic.eval()
    logits, hidden = policy(ids).logits, critic["backbone"](ids).last_hidden_state
    policy.train(); critic.train()
    torch.manual_seed(0)
    assert torch.equal(policy(ids).logits, logits) and torch.equal(critic["backbone"](ids).last_hidden_state, hidden)


@pytest.mark.parametrize("flags,message", [
    (["--k", "0"], "--k must be >= 1"),
    (["--task", "chess"], "unknown --task"),
    (["--model", "no-such-preset"], "is not a preset"),
    (["--advantage", "magic"], "unknown --advantage"),
    (["--model", "tiny", "--task", "gsm8k"], "runs --task arith only"),
    (["--model", "rho-math-1.1b", "--task", "arith"], "has SFT checkpoints for --task gsm8k and math only"),
    (["--eval-problems", "0"], "--eval-problems must be >= 1"),
    (["--advantage", "grpo", "--samples-per-prompt", "1"], "needs --samples-per-prompt >= 2"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--sampler-memory-fraction", "0"], "--sampler-memory-fraction must be in (0, 1]"),
    (["--sampler-memory-fraction", "1.5"], "--sampler-memory-fraction must be in (0, 1]"),
    (["--sampler-compile", "yes"], "unknown --sampler-compile 'yes' (choose auto, on or off)"),
    (["--temperature", "0"], "--temperature > 0"),
    (["--lora-alpha", "16"], "only with --lora-rank >= 1"),
    (["--train-file", "no/such/file.jsonl"], "does not exist"),
])
def test_invalid_flags_give_one_line_error(flags, message, capsys):
    """In-process (parse_args is what the command line runs first); the next test runs the real CLI once."""
    with pytest.raises(SystemExit) as exit_:
        vp.parse_args(flags)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_invalid_flag_from_the_command_line():
    result = run_cli(["--k", "0"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--k must be >= 1" in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize("argv,task,iterations,model", [
    ([], "arith", 30, None),   # the demo
    (["--model", "rho-math-1.1b", "--k", "9"], "gsm8k", 650, "realtreetune/rho-1b-sft-GSM8K"),   # the README's line
    (["--model", "deepseekmath-7b", "--task", "math"], "math", 1000, "realtreetune/deepseekmath-7b-sft-MATH-v2"),
    (["--model", "someone/any-model"], "gsm8k", 650, "someone/any-model"),
])
def test_task_defaults_to_gsm8k_for_real_models(argv, task, iterations, model):
    """`python vineppo.py --model rho-math-1.1b --k 9` is GSM8K with the paper's settings; no --model is the demo."""
    args = vp.parse_args(argv)
    assert (args.task, args.iterations, args.k) == (task, iterations, 4 if not argv else 9)
    assert args.max_states == (25 if task == "gsm8k" else None)   # the authors cap GSM8K's MC states only
    if model is not None:   # the demo's resolve_model trains or loads the tiny SFT model: not here
        assert vp.resolve_model(args) == model


def test_help_names_every_demo_default_once(capsys):
    """--help shows the real models' defaults; the demo's (applied with --model tiny) are listed under it, and a
    help text that says what its default depends on gets no automatic "(default: None)" after it."""
    with pytest.raises(SystemExit):
        vp.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())   # argparse wraps lines
    demo = text.split("the demo's apply to the flags not given:")[1]
    for name, value in vp.DEMO_DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        assert text.count(f"{flag} {value}") == 1 and f"{flag} {value}" in demo
        if "(default" not in vp.Args.__dataclass_fields__[name].metadata["help"]:   # its own line: the real models'
            own = re.search(rf"{flag} [A-Z_]+ ((?!--[a-z-]+ [A-Z_]+ ).)*", text)[0]   # to the next flag
            assert own.endswith(f"(default: {getattr(vp.Args(), name)}) "), own
    assert f"--iterations {vp.PAPER_ITERATIONS['arith']}" in demo
    assert "continuations per state (K) (default: 9)" in text
    said = [f.metadata["help"] for f in dataclasses.fields(vp.Args) if "(default" in f.metadata["help"]]
    assert len(said) >= 4 and all(" ".join(h.split()) + " --" in text for h in said)   # nothing appended


def test_prompts_near_the_position_limit_get_what_is_left(tmp_path):
    """A prefix's budget is cut to the model's positions (no assert mid-run, as a long MATH prompt on RhoMath's 2048
    positions would hit), and training problems whose prompt leaves less than half the cap are dropped."""
    import torch
    folder = save_random_model(tmp_path / "m", "gpt2", positions=40)   # learned positions: none past 40
    args = vp.parse_args(["--model", folder, "--max-new-tokens", "20"])
    model, tok = vp.load_policy(folder, torch.device("cpu"), args)
    prefixes = [list(range(3, 33)), list(range(3, 13)), list(range(3, 43))]   # 30, 10 and 42 tokens
    tokens, finished = vp.generate(model, tok, prefixes, 4, 20, 1.0, 1.0, desc="t")
    assert all(len(t) == 10 or f for t, f in zip(tokens[0], finished[0]))   # 40 - 30 positions left
    assert all(len(t) == 20 or f for t, f in zip(tokens[1], finished[1]))   # room for all 20: the cap binds
    assert tokens[2] == [[]] * 4 and finished[2] == [False] * 4               # no room: empty and unfinished
    # the character tokenizer: a token per character; room for 40 - 20 // 2 = 30 prompt tokens
    rows = [{"problem": "x" * n, "answer": "1"} for n in (5, 25, 40)]
    lengths = [len(vp.encode_prompt(tok, r["problem"], "arith")) for r in rows]   # the template adds "\n"
    kept = vp.fit_positions(rows, tok, model, args, "arith")
    assert kept == [r for r, n in zip(rows, lengths) if n <= 30] and 0 < len(kept) < len(rows)
    args.max_new_tokens = 2   # room 39 >= 4 x 6 characters + 8 for the shortest row alone: nothing to encode
    assert vp.fit_positions(rows[:1], None, model, args, "arith") == rows[:1]


def test_resume_refuses_other_run_defining_settings(tmp_path):
    """--resume continues the run in --out only with the settings it was started with: a changed default (here
    --max-states, 25 for every task before it became GSM8K-only) must not silently change the rest of the run."""
    import dataclasses
    args = vp.parse_args(["--model", "someone/any-model", "--task", "math", "--out", str(tmp_path)])
    saved = dataclasses.asdict(args) | {"resolved_model": "someone/any-model"}
    vp.check_resume(args, "someone/any-model")   # no config.json: nothing to compare
    for key, value in (("max_states", 25), ("max_new_tokens", 512), ("task", "gsm8k"), ("lr", 0.01), ("iterations", 5),
                       ("temperature", 1.0), ("resolved_model", "other/model")):
        with open(tmp_path / "config.json", "w") as f:
            json.dump(saved | {key: value}, f)
        with pytest.raises(SystemExit, match=f"--resume with other settings .*: {key} {value!r} -> "):
            vp.check_resume(args, "someone/any-model")
    with open(tmp_path / "config.json", "w") as f:   # other evaluations, checkpoints, memory use: allowed
        json.dump(saved | {"eval_every": 1, "eval_samples": 3, "save_every": 7, "micro_batch": 1, "device": "cpu"}, f)
    vp.check_resume(args, "someone/any-model")
    with open(tmp_path / "config.json", "w") as f:   # a run from before a flag existed: its config lacks the key
        json.dump({k: v for k, v in saved.items() if k not in ("sampler_memory_fraction", "value_analysis", "max_states")}, f)
    vp.check_resume(args, "someone/any-model")
    lora = vp.parse_args(["--model", "someone/any-model", "--out", str(tmp_path), "--lora-rank", "4"])
    with open(tmp_path / "config.json", "w") as f:   # the default --lora-alpha (None) is 2 x rank = 8
        json.dump(dataclasses.asdict(lora) | {"resolved_model": "someone/any-model"}, f)
    vp.check_resume(dataclasses.replace(lora, lora_alpha=8.0), "someone/any-model")
    with pytest.raises(SystemExit, match="lora_alpha 8 -> 16.0"):
        vp.check_resume(dataclasses.replace(lora, lora_alpha=16.0), "someone/any-model")


def test_data_without_answers_or_in_the_wrong_format(tmp_path, capsys):
    """Problems without a gold answer (GSM8K: no ####; MATH: no \\boxed) could only score 0: they are left out,
    with a note; a file in another task's format, or with no usable problem, ends the run with a one-line error."""
    gsm = write_jsonl(tmp_path / "g.jsonl", [{"question": " Tom has 3. ", "answer": "3\n#### 3"},
                                              {"question": "q", "answer": "no final line"}])
    math_rows = write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "solution": "so 2"},
                                                   {"problem": "q", "solution": "so $\\boxed{2}$"}])
    assert vp.load_problems("gsm8k", "train", gsm) == [{"problem": "Tom has 3.", "solution": "3\n#### 3", "answer": "3"}]
    assert [r["answer"] for r in vp.load_problems("math", "train", math_rows)] == ["2"]
    assert "1 of 2 problems have no final answer" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--task math rows have the fields"):
        vp.load_problems("math", "test", gsm)
    empty = write_jsonl(tmp_path / "e.jsonl", [{"question": "q", "answer": "none"}])
    model = save_random_model(tmp_path / "m", "llama")
    with pytest.raises(SystemExit, match="no training problems in"):
        vp.train(vp.parse_args(["--model", model, "--train-file", empty, "--test-file", gsm, "--out", str(tmp_path / "o"),
                                "--eval-problems", "1", "--eval-samples", "1", "--max-new-tokens", "4"]))


@pytest.mark.parametrize("arch", ["granite", "cohere"])
def test_models_that_rescale_their_logits_are_refused(tmp_path, arch):
    """The log-probs of the PPO loss are hidden @ lm_head.T, where the sampler reads model(...).logits: a model that
    rescales its logits in the forward (Granite divides them, Cohere multiplies) would train on other log-probs."""
    import torch
    from transformers import AutoConfig, CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM
    folder = save_random_model(tmp_path / arch, "llama")   # for its tokenizer
    c = AutoConfig.from_pretrained(folder)
    common = dict(vocab_size=c.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=c.pad_token_id, eos_token_id=c.eos_token_id,
                  bos_token_id=None)
    model = (GraniteForCausalLM(GraniteConfig(logits_scaling=8.0, **common)) if arch == "granite"
             else CohereForCausalLM(CohereConfig(logit_scale=0.5, **common)))
    model.save_pretrained(folder)
    with pytest.raises(AssertionError, match="this model's forward differs"):
        vp.load_policy(folder, torch.device("cpu"), vp.parse_args(["--model", folder]))


def test_an_lm_head_bias_is_refused():
    """A bias on the lm_head is refused even at zero, where the logits still agree: the loss's log-probs use its
    weight alone, so the bias would never train while the sampler reads it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    vp.check_logits_are_hidden_times_lm_head(model)   # no bias: accepted
    model.lm_head = torch.nn.Linear(32, 32, bias=True)
    torch.nn.init.zeros_(model.lm_head.bias)
    with pytest.raises(AssertionError, match="this model's forward differs"):
        vp.check_logits_are_hidden_times_lm_head(model)


def test_bf16_checkpoints_load_as_fp32_masters(tmp_path):
    """The authors' SFT checkpoints are stored in bf16: the policy (fp32 master weights for AdamW) and the
    reference (so that the KL starts at exactly 0) both load in fp32 whatever the checkpoint's dtype."""
    import torch
    from transformers import AutoModelForCausalLM
    folder = save_random_model(tmp_path / "bf16", "llama")
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(folder)
    assert AutoModelForCausalLM.from_pretrained(folder).dtype == torch.bfloat16   # as the Hub ones load by default
    policy, _ = vp.load_policy(folder, torch.device("cpu"), vp.parse_args(["--model", folder]))
    reference = vp.load_reference(folder, torch.device("cpu"))
    assert {p.dtype for m in (policy, reference) for p in m.parameters()} == {torch.float32}


# ---------------------------------------------------------------- position limits and resume
def test_fit_positions_bounds_exactly(tmp_path):
    model = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=40))
    tok = vp.build_char_tokenizer(ARITH + "x")
    args = vp.parse_args(["--model", "someone/any-model", "--max-new-tokens", "20"])   # room 30 prompt tokens
    rows = [{"problem": "x" * n, "answer": "1"} for n in (29, 30)]                     # prompts of 30 and 31 tokens
    assert vp.fit_positions(rows, tok, model, args, "arith") == rows[:1]             # exactly the room: kept
    args.max_new_tokens = 2                                                          # room 39
    rows = [{"problem": "x" * n, "answer": "1"} for n in (5, 40)]                    # 6 and 41 tokens
    assert vp.fit_positions(rows, tok, model, args, "arith") == rows[:1]             # the longest decides the shortcut


def test_fit_positions_shortcut_holds_for_several_tokens_per_character():
    """The no-encode shortcut must hold for byte-level tokenizers, up to 4 tokens per character: at the edge where
    3 tokens per character would take the shortcut (12 characters, room 44 = 3 x 12 + 8), a prompt of 45 tokens
    must be encoded, and dropped."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    core = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core)
    model = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=45))
    args = vp.parse_args(["--model", "someone/any-model", "--max-new-tokens", "2"])   # room 44
    rows = [{"problem": "\U0001F600" * 11, "answer": "1"}]                            # 12 characters, 45 tokens
    assert len(vp.encode_prompt(tok, rows[0]["problem"], "arith")) == 45
    with pytest.raises(SystemExit, match="no training problem fits"):
        vp.fit_positions(rows, tok, model, args, "arith")


ALLOWED = {"out", "resume", "device", "save_every", "eval_every", "eval_problems", "eval_samples", "eval_temperature",
           "value_analysis", "test_file", "gradient_checkpointing", "micro_batch", "sampler_memory_fraction",
           "sampler_compile"}


def _other(v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v + 1
    if isinstance(v, str):
        return v + "-other"
    return "other"


def test_resume_refuses_every_run_defining_flag(tmp_path):
    args = vp.parse_args(["--model", "someone/any-model", "--task", "math", "--out", str(tmp_path)])
    saved = dataclasses.asdict(args) | {"resolved_model": "someone/any-model"}
    for f in dataclasses.fields(vp.Args):
        with open(tmp_path / "config.json", "w") as fh:
            json.dump(saved | {f.name: _other(saved[f.name])}, fh)
        if f.name in ALLOWED:
            vp.check_resume(args, "someone/any-model")
        else:
            with pytest.raises(SystemExit, match=f"--resume with other settings .*{f.name} "):
                vp.check_resume(args, "someone/any-model")
