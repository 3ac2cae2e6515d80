"""LoRA (--lora-rank): only the adapters train, the policy with adapters off is the reference, LoRA
checkpoints resume bit for bit, PEFT loads them, and the sampler runs the adapted model exactly.

A random model earns no reward on GSM8K, so every advantage is 0: the runs here add an entropy bonus
(--entropy-coef) so that the PPO update has a gradient to follow.
"""
import json
import os

import pytest
import torch

import kernels as ks
import vineppo as vp
from conftest import save_random_model, write_jsonl
from test_sampler import PREFIXES, _gpt2, _hf_greedy, _llama
from test_train import GSM8K_ROWS, read_metrics, run_cli, without_times

CPU = torch.device("cpu")


def lora_flags(model, data, out, *extra):
    """A 2-iteration LoRA run; the last two flags are `--lora-rank 4` (drop them for full fine-tuning)."""
    return ["--model", model, "--task", "gsm8k", "--train-file", data, "--test-file", data, "--out", str(out),
            "--iterations", "2", "--k", "2", "--prompts-per-iteration", "2", "--samples-per-prompt", "2",
            "--max-new-tokens", "12", "--eval-problems", "2", "--eval-samples", "2", "--mini-batch", "2",
            "--micro-batch", "1", "--eval-every", "1", "--save-every", "1", "--lr", "1e-2", "--entropy-coef", "0.1",
            *extra, "--lora-rank", "4"]


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def base_params(model):
    """The frozen weights under the names of the source checkpoint (peft moves them to `<layer>.base_layer`)."""
    return {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}


def train_capturing_policy(args):
    """vp.train(args), and the policy object it trained (from its last save_checkpoint call)."""
    seen, real_save = [], vp.save_checkpoint

    def save(out, iteration, policy, *a, **kw):
        seen.append(policy)
        real_save(out, iteration, policy, *a, **kw)

    def no_reference(*_):
        raise AssertionError("a LoRA run must not load a second copy of the model")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vp, "save_checkpoint", save)
        mp.setattr(vp, "load_reference", no_reference)
        records = vp.train(args)
    return records, seen[-1]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One uninterrupted 2-iteration LoRA run of a random Llama on GSM8K JSONL rows."""
    tmp = tmp_path_factory.mktemp("lora")
    model = save_random_model(tmp / "llama", "llama")
    data = write_jsonl(tmp / "gsm8k.jsonl", GSM8K_ROWS)
    args = vp.parse_args(lora_flags(model, data, tmp / "a"))
    records, policy = train_capturing_policy(args)
    return dict(tmp=tmp, model=model, data=data, args=args, records=records, policy=policy)


def test_only_lora_weights_train(lora_run):
    from transformers import AutoModelForCausalLM
    policy, out = lora_run["policy"], lora_run["tmp"] / "a"
    source = AutoModelForCausalLM.from_pretrained(lora_run["model"], dtype=torch.float32).state_dict()
    base = base_params(policy)
    assert set(base) == set(source)
    for name, p in base.items():
        assert torch.equal(p, source[name]) and not p.requires_grad, name
    lora = lora_params(policy)
    assert len(lora) == 2 * 7 * 2   # A and B on q, k, v, o, gate, up, down of 2 layers ("all-linear", not lm_head)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in lora.values())
    assert max(float(p.detach().abs().max()) for n, p in lora.items() if "lora_B" in n) > 1e-3   # B starts at 0
    assert lora_run["records"][-1]["update/grad_norm"] > 0 and lora_run["records"][-1]["loss/kl"] > 0
    # the checkpoint: adapter + tokenizer, no full model; the optimizer holds the LoRA tensors only
    files = set(os.listdir(out / "ckpt"))
    assert {vp.LORA_FILE, vp.LORA_CONFIG, "state.pt", "COMPLETE"} <= files and "model.safetensors" not in files
    config = json.load(open(out / "ckpt" / vp.LORA_CONFIG))
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8.0, "all-linear")
    state = torch.load(out / "ckpt" / "state.pt", weights_only=False)
    assert len(state["optimizer"]["param_groups"][0]["params"]) == len(lora)


def test_lora_starts_as_the_sft_model(lora_run):
    """B = 0 and the adapters' init leaves the global RNG alone: the first evaluation and the first
    iteration's episodes and MC values are those of the same run with full fine-tuning."""
    flags = lora_flags(lora_run["model"], lora_run["data"], lora_run["tmp"] / "full")[:-2] + ["--iterations", "1"]
    full = vp.train(vp.parse_args(flags))
    lora = lora_run["records"]
    assert full[0] == lora[0]
    same = [k for k in full[1] if k.startswith(("train/", "mc/", "adv/"))]
    assert len(same) >= 6 and {k: full[1][k] for k in same} == {k: lora[1][k] for k in same}
    # a full fine-tuning checkpoint may be the base of a new LoRA run (B = 0: the same model at first)
    ckpt = vp.find_checkpoint(str(lora_run["tmp"] / "full"))
    as_base, tokenizer = vp.load_policy(ckpt, CPU, vp.Args(lora_rank=4))
    plain, _ = vp.load_policy(ckpt, CPU, vp.Args())
    ids = torch.tensor([_episodes(tokenizer)[0].prompt_ids])
    with torch.no_grad():
        assert torch.equal(as_base(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert sum(p.requires_grad for p in as_base.parameters()) == len(lora_params(as_base)) > 0


def test_adapter_init_follows_seed_and_pad_defaults_to_eos(lora_run, tmp_path):
    """The adapters' A comes from --seed alone (whatever the global RNG did before), so a run is reproducible, and
    its init leaves the global RNG where it was, so a LoRA run samples what a full fine-tuning run samples; a
    tokenizer without a pad token pads with EOS."""
    import shutil

    from transformers import AutoTokenizer
    source = tmp_path / "no_pad"
    shutil.copytree(lora_run["model"], source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(source)
    assert AutoTokenizer.from_pretrained(source).pad_token_id is None
    A = []
    for global_seed, seed in ((0, 1), (123, 1), (0, 2)):
        torch.manual_seed(global_seed)
        rng = torch.get_rng_state()
        policy, tok = vp.load_policy(str(source), CPU, vp.Args(lora_rank=4, seed=seed))
        assert torch.equal(torch.get_rng_state(), rng)   # nor does it move the global RNG (the sampling's)
        A.append(torch.cat([p.detach().flatten() for n, p in sorted(lora_params(policy).items()) if "lora_A" in n]))
    assert torch.equal(A[0], A[1]) and not torch.equal(A[0], A[2])
    assert tok.pad_token_id == tok.eos_token_id is not None


def _episodes(tokenizer):
    prompts = ["Tom has 3 apples.", "What is 7 + 8?"]
    responses = ["He has 7 apples.\n#### 7", "7 + 8 = 15\n#### 15"]
    return [vp.Episode(prompt_ids=vp.encode_prompt(tokenizer, p, "gsm8k"), response_ids=tokenizer(r).input_ids)
            for p, r in zip(prompts, responses)]


def test_adapters_off_is_the_source_model(lora_run):
    policy, source = lora_run["policy"], lora_run["model"]
    _, tokenizer = vp.load_policy(source, CPU, vp.Args())
    episodes, pad = _episodes(tokenizer), tokenizer.pad_token_id
    reference = vp.load_reference(source, CPU)
    ref = vp.token_logprobs(reference, episodes, pad, 0.6, 8)
    with vp.adapters_off(policy):
        off = vp.token_logprobs(policy, episodes, pad, 0.6, 8)
    on = vp.token_logprobs(policy, episodes, pad, 0.6, 8)
    assert torch.equal(off, ref)
    assert float((on - ref).abs().max()) > 1e-3
    assert all(p.requires_grad for p in lora_params(policy).values())   # adapters back on, trainable


def test_checkpoint_loads_exactly_here_and_in_peft(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    policy, ckpt = lora_run["policy"], vp.find_checkpoint(str(lora_run["tmp"] / "a"))
    loaded, tokenizer = vp.load_policy(ckpt, CPU, lora_run["args"])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lora_run["model"]), ckpt)
    ids = torch.tensor([_episodes(tokenizer)[0].prompt_ids])
    with torch.no_grad():
        expected = policy(input_ids=ids).logits
        assert torch.equal(loaded(input_ids=ids).logits, expected)
        assert torch.equal(peft_model(input_ids=ids).logits, expected)
    with pytest.raises(ValueError, match="--lora-rank 4"):   # a LoRA checkpoint needs the same flags
        vp.load_policy(ckpt, CPU, vp.Args(lora_rank=8))


def test_resume_is_bit_exact(lora_run, monkeypatch, capsys):
    """Interrupted right after the checkpoint of iteration 1, resumed: the same metrics as lora_run."""
    flags = lora_flags(lora_run["model"], lora_run["data"], lora_run["tmp"] / "b")
    real_save = vp.save_checkpoint

    def save_then_die(out, iteration, *a, **kw):
        real_save(out, iteration, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(vp, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        vp.train(vp.parse_args(flags))
    monkeypatch.setattr(vp, "save_checkpoint", real_save)
    capsys.readouterr()
    resumed = vp.train(vp.parse_args(flags + ["--resume"]))
    assert "at iteration 1" in capsys.readouterr().err   # from the checkpoint, not from scratch
    assert without_times(resumed) == without_times(lora_run["records"])
    assert without_times(read_metrics(lora_run["tmp"] / "b")) == without_times(read_metrics(lora_run["tmp"] / "a"))
    with pytest.raises(SystemExit, match="lora_rank 4 -> 0"):   # a LoRA run resumed without LoRA
        vp.train(vp.parse_args(flags[:-2] + ["--resume"]))
    with pytest.raises(ValueError, match="was written with --lora-rank 4"):   # its checkpoint, loaded as a model
        vp.load_policy(vp.find_checkpoint(str(lora_run["tmp"] / "b")), CPU, vp.Args())


def test_critic_gpt2_gradient_checkpointing(tmp_path):
    """LoRA on GPT-2 (Conv1D layers), with the critic (a full fine-tuned copy) and gradient checkpointing:
    the adapters get gradients through the checkpointed, frozen layers."""
    model = save_random_model(tmp_path / "gpt2", "gpt2")
    data = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    args = vp.parse_args(lora_flags(model, data, tmp_path / "run", "--advantage", "critic", "--gradient-checkpointing",
                                    "--iterations", "1", "--eval-every", "5"))
    records, policy = train_capturing_policy(args)
    assert any(getattr(m, "gradient_checkpointing", False) for m in policy.modules()), "checkpointing is on"
    assert records[-1]["update/steps"] == 4 and records[-1]["update/grad_norm"] > 0
    assert max(float(p.detach().abs().max()) for n, p in lora_params(policy).items() if "lora_B" in n) > 1e-3


@pytest.mark.parametrize("make,compiled", [(_llama, False), (_gpt2, False), (_llama, True)],
                         ids=["llama", "gpt2", "llama-compiled"])
def test_sampler_greedy_with_lora_equals_generate(make, compiled, monkeypatch):
    """kernels.sample_continuations on a model with injected LoRA layers (B != 0) = HF greedy generate on the
    same model, and = generate on the model with the adapters merged into the weights. Also with the decode
    layers torch.compile'd (--sampler-compile, e.g. beside --lora-rank for DeepSeekMath 7B): switching the
    adapters off between calls must not reuse code compiled with them on."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    from torch._dynamo.utils import counters
    model = make()
    base = ks.sample_continuations(model, PREFIXES, k=1, max_new_tokens=10, temperature=0)[0]
    monkeypatch.setattr(ks, "SAMPLER_COMPILE", compiled)   # (the model without adapters: tests/test_sampler.py)
    frames = counters["frames"]["ok"]
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0), model)
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    toks, _ = ks.sample_continuations(model, PREFIXES, k=2, max_new_tokens=10, temperature=0)
    assert toks != [[r] * 2 for r in [b[0] for b in base]]   # the adapters change the greedy text
    refs = [_hf_greedy(model, p, 10) for p in PREFIXES]
    assert toks == [[r, r] for r in refs]
    with vp.adapters_off(model):
        assert ks.sample_continuations(model, PREFIXES, k=1, max_new_tokens=10, temperature=0)[0] == base
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.merge()
    assert [_hf_greedy(model, p, 10) for p in PREFIXES] == refs
    assert (counters["frames"]["ok"] > frames) == compiled and not ks._COMPILE_FAILED


def test_invalid_lora_flags_give_one_line_error():
    for flags in (["--lora-rank", "-1"], ["--lora-alpha", "16"]):
        result = run_cli(flags)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and "--lora-rank must be >= 0" in lines[0], result.stderr
