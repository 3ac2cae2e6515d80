"""Tests of kernels.sample_continuations on randomly initialised tiny models (CPU).

Greedy continuations must equal transformers' own greedy generate token for token (Llama, Qwen2,
GPT-2; prefixes of different lengths, nested and duplicated, in one batch); sampling must follow
softmax(logits / T) after top-p truncation (chi-square); EOS / stop strings / max_new_tokens must end
rows exactly where they should.
"""
import gc
import math
import types
import weakref

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM)

import kernels as ks
from conftest import DEVICES

V = 24


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from a second thread, and lose a lot when the 2 cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _llama(seed=0, vocab=V):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None, initializer_range=0.1)
    return LlamaForCausalLM(cfg).eval()


def _qwen2(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None, initializer_range=0.1)
    return Qwen2ForCausalLM(cfg).eval()


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                     bos_token_id=None, eos_token_id=None, pad_token_id=None, initializer_range=0.1)
    return GPT2LMHeadModel(cfg).eval()


def _hf_greedy(model, prefix, n, eos=None):
    dev = model.device
    out = model.generate(torch.tensor([prefix], device=dev), attention_mask=torch.ones(1, len(prefix), dtype=torch.long,
                                                                                       device=dev),
                         max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prefix):].tolist()


# Different lengths, nests (A ⊂ B ⊂ C), a duplicate, a length-1 prefix, an unrelated one.
PREFIXES = [[3, 1, 4, 1, 5], [3, 1, 4, 1, 5, 9, 2, 6], [7], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7],
            [3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4, 5, 2, 3, 5, 3, 6]]


def test_nest_leaders():
    lead = ks._nest_leaders([[1, 2], [1, 2, 3], [1, 3], [1], [1, 2, 3], [2], [1, 2, 4, 5]])
    assert lead[(1, 2, 3)] == (1, 2, 3) and lead[(1, 3)] == (1, 3) and lead[(2,)] == (2,)
    assert lead[(1, 2, 4, 5)] == (1, 2, 4, 5)
    assert lead[(1, 2)] in [(1, 2, 3), (1, 2, 4, 5)] and lead[(1,)][:1] == (1,)  # rides on a longer nest
    assert len(set(lead.values())) == 4


# On a GPU the decode's layers run compiled (by default for half-precision weights) or eager: both there. The CPU
# runs the default, eager there.
DEVICE_LAYERS = [(d, c) for d in DEVICES for c in ([True, False] if d == "cuda" else ["auto"])]


@pytest.mark.parametrize("device,layers", DEVICE_LAYERS,
                         ids=[f"{d}-{ {True: 'compiled', False: 'eager'}.get(c, c)}" for d, c in DEVICE_LAYERS])
@pytest.mark.parametrize("make", [_llama, _qwen2, _gpt2], ids=["llama", "qwen2", "gpt2"])
def test_greedy_equals_hf_generate(make, device, layers, capsys, monkeypatch):
    """On a GPU this runs the Triton cascade attention (ieee fp32 dots) and the CUDA-graph decode step (which
    would fall back to eager steps, saying so, if its capture failed), with compiled and with eager layers."""
    monkeypatch.setattr(ks, "SAMPLER_COMPILE", layers)
    model = make().to(device)
    toks, fin = ks.sample_continuations(model, PREFIXES, k=2, max_new_tokens=12, temperature=0)
    assert "CUDA graph capture failed" not in capsys.readouterr().out and not ks._COMPILE_FAILED   # it compiled
    for p, rows, f in zip(PREFIXES, toks, fin):
        ref = _hf_greedy(model, p, 12)
        assert rows == [ref, ref] and f == [False, False]
        assert all(type(x) is int for x in rows[0])


def test_greedy_small_batches_and_split_nests():
    """A tiny KV budget forces one batch per row (nests split across batches): same answers."""
    model = _llama(1)
    ks.SAMPLER_STATS["batches"] = 0
    toks, _ = ks.sample_continuations(model, PREFIXES, k=3, max_new_tokens=8, temperature=0, max_batch_tokens=12)
    assert toks == [[_hf_greedy(model, p, 8)] * 3 for p in PREFIXES]
    assert ks.SAMPLER_STATS["batches"] == 3 * len(PREFIXES)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama-gqa", "gpt2-mha"])
def test_greedy_other_attention_backends(backend, make, monkeypatch):
    """The GPU attention path (Triton kernel, run by the interpreter here) and the plain-matmul fallback
    give the same greedy tokens as HF generate, with grouped queries (Llama: 2 per KV head) and without
    (GPT-2: one, the layout whose query gather is not a view; it failed only on the GPU once)."""
    if backend == "triton":
        import triton  # noqa: F401  (in requirements.txt: a missing Triton is a failure, not a skip)
    model = make(2)
    prefixes = PREFIXES[:4]
    monkeypatch.setattr(ks, "SAMPLER_BACKEND", backend)
    toks, _ = ks.sample_continuations(model, prefixes, k=2, max_new_tokens=3, temperature=0)
    assert toks == [[_hf_greedy(model, p, 3)] * 2 for p in prefixes]
    assert ks._ACTIVE == []   # no batch's cache (its KV) stays referenced after the call


def test_attention_scaling_of_the_model_is_used():
    """The cascade attention takes the model's own softmax scale: GPT-2 with scale_attn_by_inverse_layer_idx
    scales layer i's scores by D^-0.5 / (i + 1), not D^-0.5, and the tokens still equal HF generate's."""
    torch.manual_seed(3)
    cfg = GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                     scale_attn_by_inverse_layer_idx=True,
                     bos_token_id=None, eos_token_id=None, pad_token_id=None, initializer_range=0.5)
    model = GPT2LMHeadModel(cfg).eval()
    toks, _ = ks.sample_continuations(model, PREFIXES, k=1, max_new_tokens=6, temperature=0)
    assert toks == [[_hf_greedy(model, p, 6)] for p in PREFIXES]


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_decode_layers_equal_hf_generate(device, monkeypatch):
    """SAMPLER_COMPILE: the decode steps run torch.compile'd decoder layers (the attention and the cache write
    left eager); greedy tokens still equal HF generate's, across compactions (a new batch size), and the layers
    get their own forward back afterwards (the prefill and training never run the compiled one). Llama only: a
    first compile costs ~25 s here."""
    from torch._dynamo.utils import counters
    model = _llama(4).to(device)
    monkeypatch.setattr(ks, "SAMPLER_COMPILE", True)
    budgets = [2, 10, 3, 10, 2, 10]   # rows at their budget stop: compactions mid-batch
    frames = counters["frames"]["ok"]
    ks.SAMPLER_STATS["compactions"] = 0
    toks, _ = ks.sample_continuations(model, PREFIXES, k=2, max_new_tokens=budgets, temperature=0)
    assert ks.SAMPLER_STATS["compactions"] >= 1 and counters["frames"]["ok"] > frames   # it compiled
    assert toks == [[_hf_greedy(model, p, b)] * 2 for p, b in zip(PREFIXES, budgets)]
    layers = ks._decoder_layers(model)
    assert len(layers) == 2 and all("forward" not in vars(layer) for layer in layers)
    assert type(layers[0]) in ks._COMPILED_FORWARD and not ks._COMPILE_FAILED
    # training calls the sampler with new batch sizes and budgets every time: sizes are dynamic by now, so a
    # call with other ones compiles at most one more frame, not the layers again
    frames = counters["frames"]["ok"]
    toks, _ = ks.sample_continuations(model, PREFIXES[:5], k=3, max_new_tokens=[4, 11, 5, 7, 6], temperature=0)
    assert counters["frames"]["ok"] - frames <= 1 and not ks._COMPILE_FAILED
    assert toks == [[_hf_greedy(model, p, b)] * 3 for p, b in zip(PREFIXES, [4, 11, 5, 7, 6])]
    # no compiled code keeps the layers, their weights, alive (training may load another model; 7B is 13 GB)
    gone = [weakref.ref(layer) for layer in layers]
    del model, layers
    gc.collect()
    assert all(layer() is None for layer in gone)


def test_a_failed_layer_compile_falls_back_to_eager_layers(monkeypatch):
    """A compile that fails (Inductor or Triton on a GPU it was never run on, say) does not end the run: the batch
    runs again with eager layers, with one warning, and later calls decode eager without compiling again."""
    from torch._dynamo.exc import BackendCompilerFailed
    calls = []

    def failing_compile(fn, *args, **kwargs):
        def compiled(*a, **kw):
            calls.append(fn)
            raise BackendCompilerFailed(failing_compile, RuntimeError("no C compiler here"), None)
        return compiled
    monkeypatch.setattr(torch, "compile", failing_compile)
    monkeypatch.setattr(ks, "_COMPILED_FORWARD", {})   # no layer class compiled by an earlier test
    monkeypatch.setattr(ks, "SAMPLER_COMPILE", True)
    monkeypatch.setattr(ks, "_COMPILE_FAILED", [])
    model = _llama(4)
    with pytest.warns(UserWarning, match="decoding with eager layers from now on"):
        toks, _ = ks.sample_continuations(model, PREFIXES, k=2, max_new_tokens=6, temperature=0)
    assert toks == [[_hf_greedy(model, p, 6)] * 2 for p in PREFIXES]
    assert len(calls) == 1 and "no C compiler here" in ks._COMPILE_FAILED[0]
    assert all("forward" not in vars(layer) for layer in ks._decoder_layers(model))   # their own forward back
    toks, _ = ks.sample_continuations(model, PREFIXES[:2], k=1, max_new_tokens=3, temperature=0)
    assert len(calls) == 1 and toks == [[_hf_greedy(model, p, 3)] for p in PREFIXES[:2]]
    monkeypatch.setattr(ks, "SAMPLER_COMPILE", False)   # errors of an uncompiled decode are not swallowed
    monkeypatch.setattr(ks, "_COMPILE_FAILED", [])
    failure = BackendCompilerFailed(None, KeyError("x"), None)
    monkeypatch.setattr(ks, "_run_batch", lambda *a: (_ for _ in ()).throw(failure))
    with pytest.raises(BackendCompilerFailed):
        ks.sample_continuations(model, PREFIXES[:1], k=1, max_new_tokens=2, temperature=0)


def test_layers_compile_by_default_on_a_gpu_only(monkeypatch):
    """SAMPLER_COMPILE "auto" (the default) compiles the decode steps' layers where an H100 timed them: a model on a
    GPU with native bf16 (compute capability >= 8.0) whose weights are mostly bf16 (a bf16 model; a LoRA model's
    bf16 base); not fp32 master weights under autocast, nor fp16 (untimed), nor on a CPU (no steady gain there).
    True and False hold everywhere, but nothing compiles after a failed compile, nor layers with a forward of their
    own (accelerate's hooks). On the CPU, the default samples uncompiled. (Models as stand-ins: one decoder layer;
    their parameters' device, dtype and size.)"""
    from torch._dynamo.utils import counters
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[0])

    def model(device, *dtype_sizes, hooked=False):
        params = [types.SimpleNamespace(device=torch.device(device), dtype=dt, numel=lambda n=n: n)
                  for dt, n in dtype_sizes]
        layer = torch.nn.Linear(1, 1)
        if hooked:
            layer.forward = lambda x: x
        return types.SimpleNamespace(parameters=lambda: iter(params), config=types.SimpleNamespace(num_hidden_layers=1),
                                     base_model=torch.nn.Sequential(torch.nn.ModuleList([layer])))
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    auto_on = [model("cuda", (bf16, 100)), model("cuda", (bf16, 900), (fp32, 100))]
    auto_off = [model("cuda", (fp32, 100)), model("cuda", (bf16, 40), (fp32, 60)), model("cuda", (fp16, 100)),
                model("cpu", (bf16, 100))]
    hooked = model("cuda", (bf16, 100), hooked=True)
    assert ks.SAMPLER_COMPILE == "auto" and not ks._COMPILE_FAILED
    assert [ks._compiles_layers(m) for m in auto_on + auto_off + [hooked]] == [True] * 2 + [False] * 5
    capability[0] = (7, 5)   # a T4: no native bf16
    assert not any(ks._compiles_layers(m) for m in auto_on)
    for setting in (True, False):
        monkeypatch.setattr(ks, "SAMPLER_COMPILE", setting)
        assert all(ks._compiles_layers(m) is setting for m in auto_on + auto_off) and not ks._compiles_layers(hooked)
    monkeypatch.setattr(ks, "_COMPILE_FAILED", ["BackendCompilerFailed: ..."])
    assert not any(ks._compiles_layers(m) for m in auto_on + auto_off)
    monkeypatch.setattr(ks, "_COMPILE_FAILED", [])
    monkeypatch.setattr(ks, "SAMPLER_COMPILE", "auto")
    model, frames = _llama(4), counters["frames"]["ok"]
    toks, _ = ks.sample_continuations(model, PREFIXES[:2], k=1, max_new_tokens=3, temperature=0)
    assert counters["frames"]["ok"] == frames and toks == [[_hf_greedy(model, p, 3)] for p in PREFIXES[:2]]


@pytest.mark.parametrize("device", DEVICES)
def test_partial_attention_kernel_matches_torch(device):
    import triton  # noqa: F401
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, n, 16).to(device) for n in (20, 40, 40))
    lens = torch.randint(0, 41, (3, 20), dtype=torch.int32).to(device)
    lens[0, 0] = 0  # a query with an empty prefix: output 0, lse -inf
    o1, l1 = ks._partial_attention_torch(q, k, v, lens, 0.25)
    o2, l2 = ks._partial_attention_triton(q, k, v, lens, 0.25, 1)
    assert torch.allclose(o1, o2, atol=1e-5) and torch.equal(torch.isinf(l1), torch.isinf(l2))
    assert torch.allclose(l1[~torch.isinf(l1)], l2[~torch.isinf(l2)], atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nrep", [3, 1])  # query heads per KV head: 3 (GQA, padded to 4 lanes), 1 (MHA)
def test_merge_partials_kernel_matches_torch(nrep, device):
    """The two attention parts merged by the kernel equal the torch path: rows at their (G, R) slots,
    holes in the grid, and prefix parts with no columns (lse -inf, weight 0)."""
    import triton  # noqa: F401
    torch.manual_seed(1)
    G, R, Hkv, D = 3, 4, 2, 24
    counts = [4, 1, 2]  # rows per nest: slots (1, 1..3) and (2, 2..3) are holes
    pad_idx = torch.tensor([g * R + r for g, n in enumerate(counts) for r in range(n)]).to(device)  # (B,)
    B = len(pad_idx)
    o1, l1 = torch.randn(G, Hkv, R * nrep, D).to(device), torch.randn(G, Hkv, R * nrep).to(device) * 3
    o2, l2 = torch.randn(B, Hkv, nrep, D).to(device), torch.randn(B, Hkv, nrep).to(device) * 3
    l1[0, :, :nrep] = float("-inf")  # row 0 attends to no prefix column (its o1 is 0, as the kernels write)
    o1[0, :, :nrep] = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        want = ks._merge_partials_torch(o1, l1, o2, l2, pad_idx, R, dtype)
        got = ks._merge_partials_triton(o1, l1, o2, l2, pad_idx, R, dtype)
        assert got.dtype == want.dtype == dtype and got.shape == (B, Hkv, nrep, D)   # the model's dtype, both paths
        # bf16: a tolerance, as the interpreter does not round fp32 -> bf16 to nearest
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-6 if dtype == torch.float32 else 8e-3,
                                   atol=1e-6 if dtype == torch.float32 else 1e-2)
        if dtype == torch.float32:
            assert torch.equal(got[0], o2[0])  # no prefix column: the row's own part, exactly


def test_merge_is_stable_at_large_log_sum_exps():
    """The merge weighs the two parts by exp(lse - max): with both lse near 100 (exp overflows float32 at 88) it
    stays finite and equals the merge of the same parts shifted down by 100; with only the prefix's lse near 100
    the prefix part takes all the weight (the max is over both parts, not the row's own)."""
    torch.manual_seed(1)
    G, R, Hkv, D, nrep = 2, 2, 2, 8, 1
    pad_idx = torch.arange(G * R)
    o1, l1 = torch.randn(G, Hkv, R * nrep, D), torch.randn(G, Hkv, R * nrep) + 100
    o2, l2 = torch.randn(G * R, Hkv, nrep, D), torch.randn(G * R, Hkv, nrep) + 100
    shifted = ks._merge_partials_torch(o1, l1 - 100, o2, l2 - 100, pad_idx, R, torch.float32)
    for merge in (ks._merge_partials_torch, ks._merge_partials_triton):   # the kernel in Triton's interpreter
        got = merge(o1, l1, o2, l2, pad_idx, R, torch.float32)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, shifted)
        prefix_only = merge(o1, l1, o2, l2 - 100, pad_idx, R, torch.float32)   # exp(-100 +- noise): weight ~0
        torch.testing.assert_close(prefix_only, o1.view(G, Hkv, R, D).permute(0, 2, 1, 3).reshape(G * R, Hkv, 1, D))


@pytest.mark.parametrize("device", DEVICES)
def test_eos_ends_rows_exactly_with_compaction(device, capsys):
    """Rows of different prefixes hit EOS at different steps, so finished rows get compacted out while
    several groups are still running; every row equals HF greedy generate with the same EOS, EOS included."""
    model = _llama(3).to(device)
    prefixes = [[i, (3 * i) % V, (5 * i + 1) % V] + [(7 * i) % V] * (i % 4) for i in range(1, 13)]
    refs = [_hf_greedy(model, p, 20) for p in prefixes]

    def first(r, eos):  # index of the first EOS in a reference continuation (99: none)
        return min([r.index(e) for e in eos if e in r] + [99])

    def split(eos):  # (rows ending by step 8, rows running past step 12)
        return sum(first(r, eos) < 8 for r in refs), sum(first(r, eos) > 12 for r in refs)
    eos = max(([a, b] for a in range(V) for b in range(a + 1, V)), key=lambda e: min(split(e)[0] - 5, split(e)[1]))
    assert split(eos)[0] >= 7 and split(eos)[1] >= 2  # > 40% of rows end early (compaction), some run on
    ks.SAMPLER_STATS["compactions"] = 0
    toks, fin = ks.sample_continuations(model, prefixes, k=2, max_new_tokens=20, temperature=0, eos_token_ids=eos)
    assert ks.SAMPLER_STATS["compactions"] >= 1
    for p, rows, f, r in zip(prefixes, toks, fin, refs):
        exp = r[:first(r, eos) + 1]
        assert rows == [exp, exp] and f == [first(r, eos) < 99] * 2
        assert rows[0] == _hf_greedy(model, p, 20, eos=eos)
    assert "CUDA graph capture failed" not in capsys.readouterr().out   # (GPU) re-captured after each compaction


def test_decode_inputs_keep_their_storage_until_a_compaction(monkeypatch, capsys):
    """The CPU counterpart of the CUDA-graph decode: a captured graph replays reading the step's ids and
    positions from the storage it was captured with, so the loop must update them in place, and the stepper
    must be reset (re-captured) whenever a compaction replaces them. Recorded on the CPU, where the same loop
    runs without a graph, in the scenario of the compaction test above."""
    seen, real_call, real_reset = [], ks._Stepper.__call__, ks._Stepper.reset

    def call(self, ids, pos):
        seen.append((ids.data_ptr(), pos.data_ptr()))
        return real_call(self, ids, pos)

    def reset(self):
        seen.append("reset")
        real_reset(self)

    monkeypatch.setattr(ks._Stepper, "__call__", call)
    monkeypatch.setattr(ks._Stepper, "reset", reset)
    test_eos_ends_rows_exactly_with_compaction("cpu", capsys)
    segments, current = [], None
    for event in seen:
        if event == "reset":
            current = []
            segments.append(current)
        else:
            current.append(event)
    assert len(segments) >= 2 and all(segments)   # the stepper's own reset, then one per compaction
    assert all(len(set(seg)) == 1 for seg in segments)   # one storage per capture


def _char_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    chars = ["<unk>"] + list("abcdefghijklmnopqrstu\n:")[:V - 1]
    tk = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, model_input_names=["input_ids", "attention_mask"])


@pytest.mark.parametrize("sync_every", [None, 5])
def test_stop_strings_cut_exactly(sync_every, monkeypatch):
    monkeypatch.setattr(ks, "SAMPLER_SYNC_EVERY", sync_every)
    tok, model = _char_tokenizer(), _llama(4)
    prefix = [5, 6, 7]
    ref = _hf_greedy(model, prefix, 24)
    text = tok.decode(ref)
    stop = text[7:9]  # a 2-character string the greedy continuation contains
    cut = next(e for e in range(1, 25) if stop in tok.decode(ref[:e]))
    toks, fin = ks.sample_continuations(model, [prefix, [9]], k=2, max_new_tokens=24, temperature=0,
                                        stop=(tok, [stop, "never-there"]))
    assert toks[0] == [ref[:cut]] * 2 and fin[0] == [True, True]
    other = _hf_greedy(model, [9], 24)
    oc = next((e for e in range(1, 25) if stop in tok.decode(other[:e])), None)
    assert toks[1][0] == (other[:oc] if oc else other) and fin[1][0] == (oc is not None)
    # completed by the last token the budget allows: a stop (finished), not a cut at max_new_tokens
    toks, fin = ks.sample_continuations(model, [prefix], k=2, max_new_tokens=cut, temperature=0, stop=(tok, [stop]))
    assert toks == [[ref[:cut]] * 2] and fin == [[True, True]]


class _PiecesTokenizer:
    """Token i decodes to pieces[i]: multi-character tokens (str pieces), or byte tokens (bytes pieces, decoded
    together as UTF-8, so one character may take several tokens)."""
    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        parts = [self.pieces[i] for i in ids]
        return b"".join(parts).decode("utf-8", errors="replace") if parts and isinstance(parts[0], bytes) else "".join(parts)

    def batch_decode(self, seqs):
        return [self.decode(s) for s in seqs]


def _first_stop(stopper, prefix, new):
    """Drive the stop checker as the decode loop does with a check after every step: the cut length, or None."""
    context, checked = stopper.contexts([prefix])[0], 0
    for t in range(len(new)):
        lo = stopper.tail_start(checked)
        (cut,) = stopper.cut_lengths([new[lo:t + 1]], lo, checked, [context])
        if cut is not None:
            return cut
        checked = t + 1
    return None


def test_stop_checker_with_multi_character_and_byte_tokens():
    """A stop string wholly inside a multi-character token of the prefix stops nothing ("aba" holds "ab"), one
    completed later does; stop strings spelled by byte tokens (an emoji's 4 UTF-8 bytes and "!": 5 tokens for 2
    characters; three emoji: 12 tokens for 3) are found, at the token completing them: the checker's window is
    counted in bytes."""
    checker = ks._StopChecker((_PiecesTokenizer(["aba", "c", "b", "x"]), ["ab"]))
    assert _first_stop(checker, [3, 0], [1, 1, 1]) is None
    assert _first_stop(checker, [3, 0], [1, 3, 0, 1]) == 3
    # the context is kept for "bc" (the prefix ends in "b"), and it ends with a whole "ab": that one stops nothing
    checker = ks._StopChecker((_PiecesTokenizer(["ab", "x", "c"]), ["ab", "bc"]))
    assert checker.contexts([[1, 0]]) == [[0]]
    assert _first_stop(checker, [1, 0], [1, 1]) is None and _first_stop(checker, [1, 0], [2]) == 1
    checker = ks._StopChecker((_PiecesTokenizer([bytes([b]) for b in range(256)]), ["\U0001F600!"]))
    new = list(b"xy") + list("\U0001F600!".encode()) + list(b"zz")
    assert _first_stop(checker, list(b"q"), new) == 2 + 5
    # a stop string of three 4-byte characters: 12 byte tokens for 3 characters
    checker = ks._StopChecker((_PiecesTokenizer([bytes([b]) for b in range(256)]), ["\U0001F600" * 3]))
    new = list(b"xy") + list(("\U0001F600" * 3).encode()) + list(b"zz")
    assert _first_stop(checker, list(b"q"), new) == 2 + 12


def test_stop_string_then_eos_between_host_checks(monkeypatch):
    """GPU mode (host checks every 8 steps): a stop string completes, then EOS comes before the next check;
    the row must still end at the stop string."""
    monkeypatch.setattr(ks, "SAMPLER_SYNC_EVERY", 8)
    tok, model = _char_tokenizer(), _llama(4)
    for prefix in ([5, 6, 7], [9], [1, 2], [3, 3, 3], [8, 1]):
        ref = _hf_greedy(model, prefix, 8)
        # stop string = the 2 characters ending at token i; EOS = the token at j, i < j < 8, both first occurrences
        pairs = [(i, j) for i in range(1, 7) for j in range(i + 1, 8)
                 if ref[j] not in ref[:j] and tok.decode(ref[i - 1:i + 1]) not in tok.decode(ref[:i])]
        if pairs:
            break
    i, j = pairs[0]
    toks, fin = ks.sample_continuations(model, [prefix], k=2, max_new_tokens=8, temperature=0,
                                        stop=(tok, [tok.decode(ref[i - 1:i + 1])]), eos_token_ids=[ref[j]])
    assert toks == [[ref[:i + 1]] * 2] and fin == [[True, True]]


@pytest.mark.parametrize("sync_every", [None, 5])
def test_stop_string_that_begins_in_the_prefix(sync_every, monkeypatch):
    """A VinePPO state may end part-way through a stop string (GSM8K: a state ending in "\n\n\n" whose
    continuation writes "Problem:"): the row stops at the token that completes it. A stop string wholly
    inside the prefix stops nothing. Oracle: the first e at which decode(prefix + new[:e]) holds a stop
    string ending past the prefix's text."""
    monkeypatch.setattr(ks, "SAMPLER_SYNC_EVERY", sync_every)
    tok, model = _char_tokenizer(), _llama(4)
    # shorter and longer than the checker's window; the third holds a stop string that its continuation never completes
    prefixes = [[5, 6, 7], list(range(2, 17)), [2, 4, 6, 8, 10, 12, 14, 16, 18]]
    n = 12
    refs = [_hf_greedy(model, p, n) for p in prefixes]
    texts = [tok.decode(p) for p in prefixes]
    stops = [texts[0][-2:] + tok.decode(refs[0][:2]),   # 2 prefix characters + the first 2 new tokens
             texts[1][-6:] + tok.decode(refs[1][:1]),   # 6 prefix characters + the first new token: 6 of the
                                                        # 10 tokens before that token are context
             texts[2][:4]]                              # inside the third prefix

    def first_stop(prefix, new):
        start = len(tok.decode(prefix))
        return next((e for e in range(1, len(new) + 1) if any(
            tok.decode(prefix + new[:e]).find(s, max(0, start - len(s) + 1)) >= 0 for s in stops)), None)

    assert [first_stop(p, r) for p, r in zip(prefixes, refs)] == [2, 1, None]
    toks, fin = ks.sample_continuations(model, prefixes, k=2, max_new_tokens=n, temperature=0, stop=(tok, stops))
    assert toks == [[refs[0][:2]] * 2, [refs[1][:1]] * 2, [refs[2]] * 2]
    assert fin == [[True, True], [True, True], [False, False]]
    # nested states (one prefill): each state's context is its own last tokens, not its leader's; the 8 rows of
    # prefixes[1] stop at the first check and are compacted out while the others still need their contexts
    leader = prefixes[0] + [9, 1, 4, 3]
    nested = [leader, prefixes[0], prefixes[2], leader[:5]] + [prefixes[1]] * 4
    refs = [_hf_greedy(model, p, n) for p in nested]
    want = [first_stop(p, r) for p, r in zip(nested, refs)]
    assert want[1] == 2 and want.count(None) >= 2
    toks, fin = ks.sample_continuations(model, nested, k=2, max_new_tokens=n, temperature=0, stop=(tok, stops))
    assert toks == [[r[:e] if e else r] * 2 for r, e in zip(refs, want)]
    assert fin == [[e is not None] * 2 for e in want]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sync_every", [None, 4])
def test_sampled_rows_respect_stop_eos_and_max_new(sync_every, monkeypatch, device):
    """Every row ends at its first EOS / stop string or at max_new_tokens. sync_every=4 is the GPU's
    mode (host checks every few steps): rows overshoot and must be cut back exactly."""
    tok, model = _char_tokenizer(), _llama(5).to(device)
    torch.manual_seed(0)
    stops, eos, n = ["ab", "c\n"], 3, 15
    monkeypatch.setattr(ks, "SAMPLER_SYNC_EVERY", sync_every)
    toks, fin = ks.sample_continuations(model, PREFIXES, k=6, max_new_tokens=n, temperature=1.0, top_p=0.95,
                                        stop=(tok, stops), eos_token_ids=[eos])
    n_fin = 0
    for rows, fs in zip(toks, fin):
        for r, f in zip(rows, fs):
            assert 1 <= len(r) <= n
            text, before = tok.decode(r), tok.decode(r[:-1])
            assert eos not in r[:-1] and not any(s in before for s in stops)  # nothing ended too late
            if f:
                n_fin += 1
                assert r[-1] == eos or any(s in text for s in stops)
            else:
                assert len(r) == n and eos not in r and not any(s in text for s in stops)
    assert n_fin > 5


def test_seed_determinism():
    model = _llama(6)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(ks.sample_continuations(model, PREFIXES, k=3, max_new_tokens=6, temperature=0.8, top_p=0.9))
    assert runs[0] == runs[1]


def _chi2_sf(x, df):
    """Upper tail of chi-square (Wilson-Hilferty normal approximation; fine for df >= 3)."""
    z = ((x / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampling_distribution_chi_square(temperature, top_p, device):
    """Next-token frequencies at a fixed state (first and second generated token) against
    softmax(logits / T) after top-p truncation."""
    torch.manual_seed(7)
    model = _llama(7, vocab=16).to(device)
    prefix, n = [1, 2, 3, 4, 5], 20000
    torch.manual_seed(0)
    toks, _ = ks.sample_continuations(model, [prefix], k=n, max_new_tokens=2, temperature=temperature, top_p=top_p)
    first = torch.tensor([r[0] for r in toks[0]])
    mode = int(first.mode().values)
    seconds = torch.tensor([r[1] for r in toks[0] if r[0] == mode])
    for ctx, draws in [(prefix, first), (prefix + [mode], seconds)]:
        with torch.no_grad():
            p = torch.softmax(model(torch.tensor([ctx], device=device)).logits[0, -1].double().cpu() / temperature, -1)
        sp, si = p.sort(descending=True)
        keep = si[(sp.cumsum(0) - sp) < top_p]
        expected = torch.zeros_like(p)
        expected[keep] = p[keep] / p[keep].sum()
        counts = torch.bincount(draws, minlength=16).double()
        assert counts[expected == 0].sum() == 0, "a token outside the top-p set was drawn"
        if top_p < 1:
            assert (expected == 0).any(), "test should exercise truncation"
        e = expected[expected > 0] * len(draws)
        chi2 = float(((counts[expected > 0] - e) ** 2 / e).sum())
        df = int((expected > 0).sum()) - 1
        assert df >= 2 and _chi2_sf(chi2, df) > 1e-3, (chi2, df)


# The GPU's top-p draw (a Triton kernel with no sort; the interpreter runs it here) against the torch path
# with the same uniforms: the same token for every row. A row repeated with u on a grid over (0, 1) traces
# the whole inverse CDF, so every kept token's interval is checked, not only the tokens a few draws hit.
def _u_grid(n):
    return (torch.arange(n) + 0.5) / n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,temperature,top_p", [(torch.float32, 0.6, 0.9), (torch.bfloat16, 0.6, 0.9),
                                                     (torch.float16, 1.0, 0.5), (torch.bfloat16, 0.8, 1.0)],
                         ids=["fp32-nucleus", "bf16-nucleus", "fp16-half", "bf16-no-nucleus"])
def test_top_p_kernel_draws_the_torch_paths_tokens(dtype, temperature, top_p, device):
    import triton  # noqa: F401
    torch.manual_seed(3)
    B, n = 2, 24
    V = 160 if device == "cpu" else 1200  # two of the interpreter's 128-wide blocks; three of a GPU's 512
    logits = (torch.randn(B, V) * 1.5).to(dtype)
    rows = torch.cat([logits, logits[:1].expand(n, V)]).to(device)  # (B + n, V)
    u = torch.cat([1.0 - torch.rand(B), _u_grid(n)]).to(device)  # (B + n,)
    want = ks._sample_next_torch(rows, temperature, top_p, u)
    got = ks._top_p_sample_triton(rows, temperature, top_p, u)
    assert torch.equal(got, want)
    assert want[B:].unique().numel() >= (3 if top_p < 1 else 12), "the grid should reach many tokens"


@pytest.mark.parametrize("device", DEVICES)
def test_top_p_kernel_ties_at_the_nucleus_boundary(device):
    """bf16 logits from 7 levels (about 23 tokens each, masked -inf ones among them): the nucleus ends inside
    a group of tied tokens, of which the stable sort keeps the first ones by index; so does the kernel."""
    import triton  # noqa: F401
    torch.manual_seed(4)
    n, temperature, top_p = 32, 1.0, 0.7
    V = 160 if device == "cpu" else 1200  # two of the interpreter's 128-wide blocks; three of a GPU's 512
    levels = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, float("-inf")])
    row = levels[torch.randint(0, len(levels), (V,))].to(torch.bfloat16)  # bf16: where ties are common
    rows, u = row.expand(n, V).contiguous().to(device), _u_grid(n).to(device)
    want = ks._sample_next_torch(rows, temperature, top_p, u)
    got = ks._top_p_sample_triton(rows, temperature, top_p, u)
    assert torch.equal(got, want)
    # the test's premise: the last level reached is cut part-way, and nothing past it is drawn
    want = want.cpu()
    last = row[want].float().min()
    group = (row.float() == last).nonzero().squeeze(1)
    drawn = torch.isin(group, want)
    assert drawn.any() and not drawn.all() and bool((row[want].float() >= last).all())
    assert not torch.isinf(row[want].float()).any()


def test_sampled_continuations_equal_on_the_triton_and_torch_backends(monkeypatch):
    """The GPU decode path (Triton attention + the kernel's top-p draw, interpreted here) samples the same
    continuations as the plain torch path from the same seed."""
    import triton  # noqa: F401
    model = _llama(11)
    runs = []
    for backend in ["torch", "triton"]:
        monkeypatch.setattr(ks, "SAMPLER_BACKEND", backend)
        torch.manual_seed(5)
        runs.append(ks.sample_continuations(model, PREFIXES[:3], k=2, max_new_tokens=3, temperature=0.7, top_p=0.9))
    assert runs[0] == runs[1]
    assert len({tuple(t) for rows in runs[0][0] for t in rows}) > 4, "draws should differ across rows"


def test_rows_past_their_budget_stay_within_the_models_positions():
    """Budgets differ within a batch (VinePPO: the cap minus the written steps), so a row past its own budget
    keeps stepping until compaction; its position must stop at its last one. GPT-2 has 32 learned positions
    here: the long prefix may add 4 tokens, the short ones 30 (one row of three finishes: no compaction)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=None,
                                       eos_token_id=None, pad_token_id=None, initializer_range=0.1)).eval()
    prefixes, budgets = [[1] * 28, [2, 3], [4, 5]], [4, 30, 30]
    ks.SAMPLER_STATS["compactions"] = 0
    toks, fin = ks.sample_continuations(model, prefixes, k=1, max_new_tokens=budgets, temperature=0)
    assert [rows[0] for rows in toks] == [_hf_greedy(model, p, b) for p, b in zip(prefixes, budgets)]
    assert fin == [[False]] * 3 and ks.SAMPLER_STATS["compactions"] == 0   # the finished row kept stepping


def test_batches_fit_the_budget_with_prefixes_padded_to_the_longest(monkeypatch):
    """A batch's prefix buffer is (nests x longest leader): one long prefix among short ones must be charged
    at its length for every nest of its batch, or the batch overruns max_batch_tokens."""
    model = _llama()
    bytes_tok, vocab = ks._probe(model)
    per_row = 2 + -(-24 * vocab // bytes_tok)
    seen, real_run = [], ks._run_batch
    monkeypatch.setattr(ks, "_run_batch", lambda m, units, *a: (seen.append(units), real_run(m, units, *a))[1])
    prefixes = [[1] * 40] + [[i + 2, i + 3] for i in range(10)]
    toks, _ = ks.sample_continuations(model, prefixes, k=1, max_new_tokens=2, temperature=0, max_batch_tokens=150)
    assert toks == [[_hf_greedy(model, p, 2)] for p in prefixes]
    assert len(seen) > 1 and sum(len(u) for u in seen) == len(prefixes)
    for units in seen:
        rows = sum(len(members) for _, members in units)
        assert len(units) * max(len(L) for L, _ in units) + rows * per_row <= 150


def test_sliding_window_and_softcapping_are_refused():
    """The cascade attention is full causal attention: a model whose attention differs must fail loudly."""
    model = _qwen2()
    model.config.use_sliding_window, model.config.sliding_window = True, 8
    with pytest.raises(AssertionError, match="sliding window"):
        ks.sample_continuations(model, [[1, 2, 3]], k=1, max_new_tokens=6)
    assert ks.sample_continuations(model, [[1, 2, 3]], k=1, max_new_tokens=5, temperature=0)[0] == [[
        _hf_greedy(model, [1, 2, 3], 5)]]   # within the window the two attentions agree
    model.config.use_sliding_window = False
    model.config.attn_logit_softcapping = 50.0
    with pytest.raises(AssertionError, match="soft-capping"):
        ks.sample_continuations(model, [[1, 2, 3]], k=1, max_new_tokens=6)
    from transformers import MistralConfig, MistralForCausalLM   # Mistral: a sliding_window, no use_sliding_window flag
    mistral = MistralForCausalLM(MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, sliding_window=8)).eval()
    with pytest.raises(AssertionError, match="sliding window"):
        ks.sample_continuations(mistral, [[1, 2, 3]], k=1, max_new_tokens=6)


def test_attention_sinks_are_refused():
    """gpt-oss passes its attention sinks to the attention function (`s_aux`); no config flag says so, so the
    cascade attention itself refuses what it would otherwise drop."""
    from transformers import GptOssConfig, GptOssForCausalLM
    torch.manual_seed(0)
    model = GptOssForCausalLM(GptOssConfig(
        vocab_size=V, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=64,
        max_position_embeddings=64, layer_types=["full_attention"],
        rope_parameters=dict(rope_type="default", rope_theta=1e4))).eval()
    with pytest.raises(AssertionError, match="does not support \\['s_aux'\\]"):
        ks.sample_continuations(model, [[1, 2, 3]], k=1, max_new_tokens=4, temperature=0)


def test_edge_cases_and_length_assert():
    model = _llama(8)
    assert ks.sample_continuations(model, [[1, 2]], k=2, max_new_tokens=0) == ([[[], []]], [[False, False]])
    # a prefix with no budget left draws nothing, even where every token would be an EOS
    toks, fin = ks.sample_continuations(model, [[1, 2], [3, 4], [1, 2, 5]], k=2, max_new_tokens=[0, 1, 0],
                                        temperature=1.0, eos_token_ids=list(range(V)))
    assert toks[0] == toks[2] == [[], []] and fin[0] == fin[2] == [False, False]
    assert [len(r) for r in toks[1]] == [1, 1] and fin[1] == [True, True]
    assert ks.sample_continuations(model, [], k=2, max_new_tokens=4) == ([], [])
    with pytest.raises(AssertionError, match="positions"):
        ks.sample_continuations(model, [[1] * 100], k=1, max_new_tokens=29)
    # a prefix past the positions with no budget is not decoded, so it does not trip the assert (vineppo.generate
    # gives a test prompt longer than the model's positions budget 0)
    toks, fin = ks.sample_continuations(model, [[1] * 200, [1, 2]], k=1, max_new_tokens=[0, 2], temperature=0)
    assert toks == [[[]], [_hf_greedy(model, [1, 2], 2)]] and fin == [[False], [False]]
    # nor does it lead the nest of a prefix of it: only [1, 1]'s own tokens are prefilled (a learned position table
    # would have raised IndexError on the 200 tokens)
    ks.SAMPLER_STATS["prefill_tokens"] = 0
    toks, _ = ks.sample_continuations(model, [[1] * 200, [1, 1]], k=1, max_new_tokens=[0, 2], temperature=0)
    assert toks == [[[]], [_hf_greedy(model, [1, 1], 2)]] and ks.SAMPLER_STATS["prefill_tokens"] == 1


@pytest.mark.parametrize("device", DEVICES)
def test_per_prefix_budgets_greedy_and_lengths(device):
    """max_new_tokens may differ per prefix (VinePPO: what the response cap leaves after a state's
    written steps): each row stops, unfinished, at its own budget; greedy tokens still equal HF's."""
    model = _llama().to(device)
    budgets = [3, 9, 1, 5, 7, 2]
    toks, fin = ks.sample_continuations(model, PREFIXES, 2, budgets, temperature=0.0)
    for p, b, rows, f in zip(PREFIXES, budgets, toks, fin):
        assert [len(r) for r in rows] == [b, b] and f == [False, False]
        assert rows[0] == _hf_greedy(model, p, b)
    # sampled rows, with an EOS id that ends some rows early: never longer than their own budget
    torch.manual_seed(0)
    toks, fin = ks.sample_continuations(model, PREFIXES, 4, budgets, temperature=1.0, eos_token_ids=[5])
    for b, rows, fs in zip(budgets, toks, fin):
        for r, f in zip(rows, fs):
            assert len(r) <= b and f == (len(r) > 0 and r[-1] == 5) and 5 not in r[:-1]
            assert f or len(r) == b


def test_bench_sampler_gpu_rows_code_path_on_cpu(capsys):
    """benchmarks/bench_sampler.py's GPU table, run on the CPU with a tiny config: the code a GPU session
    will run (workload, both generate baselines, roofline, prefill counts) finishes and prints every row."""
    from benchmarks import bench_sampler
    tiny = ("tiny", dict(layers=1, d=64, heads=4, kv_heads=2, vocab=64, inter=128, max_pos=128), 1, 2, 2)
    args = types.SimpleNamespace(new_tokens=3, compile_baseline=False, no_generate=False, greedy_row=True,
                                 sort_row=True, profile=True, repeats=2, memory_fraction=[0.9], compile=True,
                                 generate_states=3, fp32_autocast=True)
    with torch.no_grad():
        bench_sampler.gpu_rows(args, device="cpu", configs=[tiny], shape=(8, 16, 4), K=2, dtype=torch.float32)
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("tiny")]
    table = rows[:10]
    assert [r[1:3] for r in table] == [["ours", "25"], ["ours,", "sort"], ["ours,", "memory"], ["ours,", "compiled"],
                                       ["ours,", "compiled,"], ["ours,", "fp32"], ["ours,", "fp32"], ["ours,", "greedy"],
                                       ["generate", "eager"], ["generate", "static"]]
    # 1 + 8 x 3 states, K=2
    assert table[0][2:4] == ["25", "50"] and table[1][4:6] == table[2][4:6] == table[7][3:5] == ["25", "50"]
    assert table[3][3:5] == ["25", "50"] and table[4][5:7] == ["25", "50"]
    assert table[5][5:7] == ["25", "50"] and table[6][6:8] == ["25", "50"]   # fp32 + autocast, eager and compiled
    assert table[8][3:5] == table[9][3:5] == ["3", "6"]   # --generate-states 3: 3 states, K = 2 rows each
    # counted alike: ours prefills the 8 leaders (20 tokens) but their last (8 x 19), then each of its 50 rows passes
    # over its state's last token; generate pads its 3 states to 16 tokens and prefills each of their 2 copies
    assert "prefill tokens: ours 202 for 25 states, generate 96 for 3 (4x more per state)" in out
    # (on the CPU the batch budget is a fixed 1 GiB, not a share of free memory: this covers the row's code path)
    for name in ("ours, memory 0.9", "ours, compiled", "ours, compiled, memory 0.9", "ours, fp32 + autocast",
                 "ours, fp32 + autocast, compiled"):
        assert f"{name}: 1 batches, 0 OOM retries, 3 decode steps" in out
    assert "ours, compiled: the compile's warm-up runs took" in out
    assert "ours, fp32 + autocast, compiled: the compile's warm-up runs took" in out
    assert out.count("... tiny ours: ") == 2 and "... tiny ours, compiled, memory 0.9: " in out   # as each is timed
    assert (ks.SAMPLER_TOP_P_KERNEL and ks.SAMPLER_MEMORY_FRACTION == 0.7 and ks.SAMPLER_COMPILE == "auto"), \
        "the extra rows restore the defaults"
    prof = out[out.index("profile: 50 rows, 16 decode steps"):].splitlines()
    spent = {line[18:58].strip(): float(line[58:].split()[0]) for line in prof[1:5]}
    assert list(spent)[0] == "matmul" and spent["matmul"] > 0 and prof[5].strip().startswith("top ")
    assert abs(sum(spent.values()) - float(prof[0].split("time ")[1].split()[0])) < 0.02  # printed rows sum to the printed total
    assert "prefill tokens: ours" in out and "failed" not in out and "sampling 50 rows" in out
    line = out.split("ours, 2 runs (the row above is the median, the faster of the middle two), new tok/s: ")[1]
    assert len(line.split("\n")[0].split(", ")) == 2
    bench_sampler.attention_cost(3, 2, tiny[1], 4, torch.float32, "cpu", reps=1)  # the table runs it on a GPU
    line = capsys.readouterr().out
    assert "attention at step 2 of 4, 6 rows x 1 layers" in line and "merge kernel" in line
    bench_sampler.top_p_tiles(2, 40, "cpu", batches=2, tiles=((32, 1),), reps=1)  # interpreted here
    assert "V 40, ms per draw: 2 rows 32x1 " in capsys.readouterr().out


def test_out_of_memory_retries_at_half_the_batch_after_releasing_it(monkeypatch):
    """A batch that runs out of memory is split in two and each half retried, down to single rows; the
    retry runs after the except block, when the failed attempt's frames (its KV cache) are freed."""
    import sys
    model = _llama(9)
    expected = ks.sample_continuations(model, PREFIXES, k=2, max_new_tokens=5, temperature=0)
    real_run_batch, attempts, sizes = ks._run_batch, [], []

    class KVCache:  # stands in for the memory a failed attempt held
        pass

    def run_batch(model, units, *args, **kwargs):
        assert sys.exc_info() == (None, None, None)              # not retried inside the except block
        assert all(ref() is None for ref in attempts)            # every failed attempt's memory is released
        n_rows = sum(len(rows) for _, rows in units)
        if n_rows > 3:
            held = KVCache()
            attempts.append(weakref.ref(held))
            sizes.append((len(units), n_rows))
            raise torch.cuda.OutOfMemoryError("fake: more than 3 rows")
        return real_run_batch(model, units, *args, **kwargs)

    monkeypatch.setattr(ks, "_run_batch", run_batch)
    ks.SAMPLER_STATS["oom_retries"] = 0
    assert ks.sample_continuations(model, PREFIXES, k=2, max_new_tokens=5, temperature=0) == expected
    assert ks.SAMPLER_STATS["oom_retries"] == len(attempts) >= 3
    # (nests, rows) of each failed attempt: 3 nests of 2, 8 and 2 rows halve into [2] (runs) and [8, 2]; that into
    # [8] and [2] (runs); the single nest of 8 rows into rows 4 + 4, each into 2 + 2 (run)
    assert sizes == [(3, 12), (2, 10), (1, 8), (1, 4), (1, 4)]
    # a single row that does not fit is the caller's problem: the error comes out, after 2 halvings (4 rows -> 1)
    monkeypatch.setattr(ks, "_run_batch", lambda *a, **k: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("fake")))
    ks.SAMPLER_STATS["oom_retries"] = 0
    with pytest.raises(torch.cuda.OutOfMemoryError):
        ks.sample_continuations(model, PREFIXES[:1], k=4, max_new_tokens=5, temperature=0)
    assert ks.SAMPLER_STATS["oom_retries"] == 2


def test_counters_and_training_mode(monkeypatch):
    """SAMPLER_STATS for one 5-token prefix, k = 2, 3 new tokens: 4 prefill tokens (the last is fed at step 0), 3
    steps of 2 rows, each step reading the 4 cached prefix tokens once and each row's t + 1 own; a model in
    training mode is sampled in eval mode (no dropout) and handed back in training mode."""
    model = _llama().train()
    for key in ks.SAMPLER_STATS:
        ks.SAMPLER_STATS[key] = 0
    modes, run_batch = [], ks._run_batch

    def recording(model, *a, **kw):
        modes.append(any(m.training for m in model.modules()))
        return run_batch(model, *a, **kw)
    monkeypatch.setattr(ks, "_run_batch", recording)
    ks.sample_continuations(model, [[1, 2, 3, 4, 5]], k=2, max_new_tokens=3, temperature=0)
    assert modes == [False] and model.training
    assert {k: ks.SAMPLER_STATS[k] for k in ("batches", "prefill_tokens", "steps", "row_steps", "kv_read_tokens")} == \
        dict(batches=1, prefill_tokens=4, steps=3, row_steps=6, kv_read_tokens=3 * 4 + 2 * (1 + 2 + 3))


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_fp32_model_under_bf16_autocast(backend, monkeypatch):
    """vineppo.py on a GPU: fp32 weights under bf16 autocast, where the rotary embedding leaves q and k in
    fp32 and v in bf16. The caches keep keys in the values' dtype; greedy tokens equal generate's under
    the same autocast (CPU autocast here)."""
    monkeypatch.setattr(ks, "SAMPLER_BACKEND", backend)
    model = _llama(10)
    cached, real_prefill = [], ks._prefill
    monkeypatch.setattr(ks, "_prefill", lambda *a: (cached.append(real_prefill(*a)), cached[-1])[1])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        toks, _ = ks.sample_continuations(model, PREFIXES[:4], k=2, max_new_tokens=4, temperature=0)
        refs = [_hf_greedy(model, p, 4) for p in PREFIXES[:4]]
    assert toks == [[r, r] for r in refs]
    assert {x.dtype for pk, pv in cached for x in pk + pv} == {torch.bfloat16}   # the autocast dtype, not fp32


# ---------------------------------------------------------------- the batch planner, the prefill chunks, the draw's boundaries


def test_cascade_cache_layout_and_compaction():
    """Rows sit in a (G, R) grid by nest; the prefix reads one step costs are each nest's longest prefix once
    (SAMPLER_STATS' kv_read_tokens, the benchmark's roofline); a compaction that empties a nest drops its prefix."""
    G, Hkv, P, D = 3, 1, 6, 2
    pk = [torch.arange(G, dtype=torch.float).view(G, 1, 1, 1).expand(G, Hkv, P, D).clone()]   # nest g's KV = g
    grp, plen = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([4, 2, 5, 1, 3, 3])
    c = ks._CascadeCache(pk, [x.clone() for x in pk], grp, plen, T=4, backend="torch")
    assert (c.G, c.R) == (3, 3) and c.pad_idx.tolist() == [0, 1, 3, 6, 7, 8]
    assert c.prefix_read == 4 + 5 + 3
    c.select(torch.tensor([0, 3, 5]))   # nest 1 has no row left
    assert (c.G, c.R) == (2, 2) and c.grp.tolist() == [0, 1, 1] and c.plen.tolist() == [4, 1, 3]
    assert c.pk[0][:, 0, 0, 0].tolist() == [0.0, 2.0] and c.prefix_read == 4 + 3


def test_split_nest_parts_fit_the_batch_budget(monkeypatch):
    """One nest of many rows split across batches: each part is charged its prefix buffer too."""
    model = _llama()
    bytes_tok, vocab = ks._probe(model)
    per_row = 2 + -(-24 * vocab // bytes_tok)
    seen, real_run = [], ks._run_batch
    monkeypatch.setattr(ks, "_run_batch", lambda m, units, *a: (seen.append(units), real_run(m, units, *a))[1])
    prefix = [1] * 40
    toks, _ = ks.sample_continuations(model, [prefix], k=40, max_new_tokens=2, temperature=0, max_batch_tokens=150)
    assert toks == [[_hf_greedy(model, prefix, 2)] * 40]
    assert len(seen) > 1
    for units in seen:
        rows = sum(len(members) for _, members in units)
        assert len(units) * max(len(L) for L, _ in units) + rows * per_row <= 150


def test_batches_are_filled_by_splitting_the_nest_that_overflows(monkeypatch):
    """Three nests of 10 rows, a budget of 1.5 nests: whole nests would take 3 batches (each re-reads the
    weights at every step); filling each batch and splitting the overflowing nest takes 2, within budget."""
    model = _llama()
    bytes_tok, vocab = ks._probe(model)
    per_row = 2 + -(-24 * vocab // bytes_tok)
    seen, real_run = [], ks._run_batch
    monkeypatch.setattr(ks, "_run_batch", lambda m, units, *a: (seen.append(units), real_run(m, units, *a))[1])
    prefixes = [[i + 2] * 10 for i in range(3)]
    budget = 2 * 10 + 15 * per_row
    toks, _ = ks.sample_continuations(model, prefixes, k=10, max_new_tokens=2, temperature=0, max_batch_tokens=budget)
    assert toks == [[_hf_greedy(model, p, 2)] * 10 for p in prefixes]
    assert [[len(members) for _, members in units] for units in seen] == [[10, 5], [5, 10]]
    for units in seen:
        assert len(units) * max(len(L) for L, _ in units) + sum(len(m) for _, m in units) * per_row <= budget


def test_prefill_in_chunks_equals_one_chunk(monkeypatch):
    """_prefill chunks the leaders' forward (prefill_tokens): with one leader per chunk the greedy tokens still
    equal HF generate's (the chunks' KV must land in their own rows of the prefix buffer)."""
    model = _llama(2)
    real_run = ks._run_batch
    monkeypatch.setattr(ks, "_run_batch", lambda *a: real_run(*a[:-1], 1))     # prefill_tokens = 1: a chunk per leader
    toks, _ = ks.sample_continuations(model, PREFIXES, k=2, max_new_tokens=4, temperature=0)
    assert toks == [[_hf_greedy(model, p, 4)] * 2 for p in PREFIXES]


def test_top_p_boundary_exactly_at_the_mass_excludes_the_next_token():
    """Four equally likely tokens, top_p = 0.5: the mass before the third is exactly 0.5, not < 0.5: two are kept."""
    logits = torch.zeros(64, 4)
    u = (torch.arange(64) + 0.5) / 64
    got = ks._sample_next_torch(logits, 1.0, 0.5, u)
    assert set(got.tolist()) == {0, 1}


def test_batches_charge_the_logits_scratch_per_row(monkeypatch):
    """A batch's budget includes each row's logits / sort scratch (24 bytes per vocabulary entry): with a large
    vocabulary it, not the KV, bounds the rows of a batch."""
    model = _llama(vocab=2000)
    bytes_tok, vocab = ks._probe(model)
    per_row = 2 + -(-24 * vocab // bytes_tok)
    assert per_row > 50
    seen, real_run = [], ks._run_batch
    monkeypatch.setattr(ks, "_run_batch", lambda m, units, *a: (seen.append(units), real_run(m, units, *a))[1])
    prefixes = [[i + 2, i + 3] for i in range(6)]
    toks, _ = ks.sample_continuations(model, prefixes, k=2, max_new_tokens=2, temperature=0, max_batch_tokens=400)
    assert toks == [[_hf_greedy(model, p, 2)] * 2 for p in prefixes]
    assert len(seen) > 1
    for units in seen:
        rows = sum(len(members) for _, members in units)
        assert len(units) * max(len(L) for L, _ in units) + rows * per_row <= 400


def test_nested_prefixes_are_prefilled_once_per_leader():
    """PREFIXES nest as [3,1,4,1,5] < [.., 9,2,6] < [14 tokens] (and a duplicate): only the leaders are prefilled,
    each minus its last token: 13 + 0 + 20 tokens."""
    model = _llama()
    ks.SAMPLER_STATS["prefill_tokens"] = 0
    ks.sample_continuations(model, PREFIXES, k=2, max_new_tokens=2, temperature=0)
    assert ks.SAMPLER_STATS["prefill_tokens"] == 13 + 0 + 20


def test_inverse_cdf_picks_the_first_token_whose_cdf_reaches_u():
    """Equal logits, u on the cdf's steps exactly: the token whose cdf equals u is drawn (cdf >= u), on both paths."""
    logits = torch.zeros(4, 4)
    u = torch.tensor([0.25, 0.5, 0.75, 1.0])
    assert ks._sample_next_torch(logits, 1.0, 1.0, u).tolist() == [0, 1, 2, 3]
    assert ks._top_p_sample_triton(logits, 1.0, 1.0, u).tolist() == [0, 1, 2, 3]
