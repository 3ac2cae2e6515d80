"""Test-wide environment: set before torch/triton/transformers are imported anywhere.

TRITON_INTERPRET=1 runs the Triton kernels on the CPU (it must be set before `import triton`);
the HF_*_OFFLINE flags make a hub lookup fail at once instead of after a 23-46 s network timeout.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests that take a `device` run on the CPU everywhere and, where a GPU is present and the Triton
# interpreter is off (TRITON_INTERPRET=0, as benchmarks/gpu_checks.sh runs them), also on the GPU with
# the compiled kernels: the cpu case is each GPU case's CPU counterpart, same logic, same assertions.
DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1" else ["cpu"]

ASCII = "".join(chr(c) for c in range(32, 127)) + "\n"


# Qwen2's (and, nearly, DeepSeek's) pre-tokenizer: a word takes the one character before it (a space), digits
# stand alone, punctuation takes the newlines after it
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def bpe_tokenizer(corpus, vocab_size=400):
    """A byte-level BPE of the Qwen2 / DeepSeek kind (their pre-tokenizer regex, the byte-level alphabet), trained
    here on `corpus` (a list of texts): tokens of several characters, as the paper's models have, without a download."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def save_random_model(folder, arch="llama", alphabet=ASCII, seed=0, layers=2, width=64, positions=512, tokenizer=None):
    """A randomly initialised small model of a real architecture with a character tokenizer (or `tokenizer`),
    saved like a Hub checkpoint: what `--model <folder>` loads on this offline machine."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    import vineppo

    tok = tokenizer or vineppo.build_char_tokenizer(alphabet)
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions, **common))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=width, n_layer=layers, n_head=4, n_positions=positions, **common))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """A private $XDG_CACHE_HOME with the demo's SFT model (DEMO_DEFAULTS) trained once for the session.
    It is trained here, on two threads where the machine has them, as `python vineppo.py` trains it on a
    2-core machine: its batch-64 matmuls run 1.5x faster than on CI's one thread (0.20 against 0.30 s a
    step, 700 steps); nothing else runs while it trains."""
    import vineppo

    cache = tmp_path_factory.mktemp("xdg_cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, min(2, os.cpu_count() or 1)))
    try:
        vineppo.demo_sft_model(vineppo.parse_args([]))
        torch.set_num_threads(threads)
        yield cache
    finally:
        torch.set_num_threads(threads)
        if old is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = old
