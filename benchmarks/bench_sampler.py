"""Benchmark: kernels.sample_continuations vs transformers generate(num_return_sequences=K)
on the VinePPO MC-rollout workload (states s_0..s_{n-1} of sampled responses, K continuations each,
EOS suppressed so every continuation has max_new_tokens tokens).

    python benchmarks/bench_sampler.py            # CPU rows (+ GPU rows when CUDA is available)
    python benchmarks/bench_sampler.py --gpu      # GPU rows only (fails if there is no GPU)
    python benchmarks/bench_sampler.py --cpu      # CPU rows only

CPU rows: a demo-sized Llama (2 layers, d 96, MLP 384, vocabulary 32; the demo's own has MLP 256 and 20
tokens) and a small Llama (4 layers, d 256), demo-shaped
workload; reported as ratios ours / generate of new tokens/s and of prefill tokens computed.
GPU rows: randomly initialised RhoMath-1.1B-shaped Llama (22 layers, d 2048, 4 KV heads, vocab 32000)
and DeepSeekMath-7B-shaped Llama (30 layers, d 4096, 32 KV heads, vocab 102400), bf16, the paper's
workload shape (prompt 256, response 512 in 8 steps, K=9, continuations of 512 tokens); ours runs a
slice of 64 prompts x 8 responses sized to the time budget, generate a smaller slice, in one call
(--generate-states). Tokens/s are per-token rates, but they grow with the rows decoded together, and
generate's slice is smaller than ours' batches (288 rows against 2052 at 1.1B, 36 against ~171 at 7B)
and its states shorter at 7B (its first 4: prefixes of 256-448 tokens against ours' ~507 on average):
its rows understate what generate reaches at ours' batch size, by an amount not measured. Roofline: bytes one of our decode steps must read
(weights + the KV it attends over, the shared prefix once per nest) at the measured copy bandwidth.
Rows named "ours" decode with eager decoder layers; --compile adds rows with them torch.compile'd, the
sampler's default on a GPU for bf16 weights (kernels.SAMPLER_COMPILE "auto"), and --memory-fraction rows at other shares.
"""
import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import kernels as ks  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def workload(n_prompts, n_resp, prompt_len, resp_len, n_steps, vocab, seed=0):
    """States of the MC phase: for each response, prompt + its first i steps, i = 0..n_steps-1
    (s_0 = the prompt, shared by the n_resp responses of a prompt; deduplicated as vineppo does)."""
    g = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(n_prompts):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        states.append(prompt)
        for _ in range(n_resp):
            resp = torch.randint(3, vocab, (resp_len,), generator=g).tolist()
            cuts = [round(resp_len * i / n_steps) for i in range(1, n_steps)]
            states += [prompt + resp[:c] for c in cuts]
    return states


def run_ours(model, states, K, T, temperature=0.6, top_p=0.9):
    for key in ks.SAMPLER_STATS:
        ks.SAMPLER_STATS[key] = 0
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    toks, _ = ks.sample_continuations(model, states, k=K, max_new_tokens=T, temperature=temperature, top_p=top_p)
    sync()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    n_new = sum(len(r) for rows in toks for r in rows)
    assert n_new == len(states) * K * T, "EOS is suppressed: every continuation must have T tokens"
    stats = dict(ks.SAMPLER_STATS)
    # prefill: the tokens computed before each row's first new token, as generate's count is: the leaders' prefill
    # (all but each leader's last token) and, in decode step 0, every row's pass over its state's last token
    return dict(seconds=dt, cpu=cpu, new=n_new, prefill=stats["prefill_tokens"] + len(states) * K, stats=stats)


def run_generate(model, states, K, T, batch_states, static=False, compile=False, temperature=0.6, top_p=0.9):
    """transformers' generate: left-padded batches of states, num_return_sequences=K (each state is copied
    K times and each copy prefilled). Returns the same fields; prefill counts the padded tokens computed."""
    dev = next(model.parameters()).device
    n_new = prefill = 0
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for lo in range(0, len(states), batch_states):
        chunk = states[lo:lo + batch_states]
        L = max(map(len, chunk))
        ids = torch.zeros(len(chunk), L, dtype=torch.long, device=dev)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(chunk):
            ids[i, L - len(s):] = torch.tensor(s)
            mask[i, L - len(s):] = 1
        gc = copy.deepcopy(model.generation_config)
        gc.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, num_return_sequences=K,
                  max_new_tokens=T, min_new_tokens=T, eos_token_id=None, pad_token_id=0)
        if static:  # its preallocated cache; auto torch.compile only if asked (compiling costs minutes)
            gc.update(cache_implementation="static", disable_compile=not compile)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
        n_new += out[:, L:].numel()
        prefill += len(chunk) * K * L
    sync()
    return dict(seconds=time.perf_counter() - t0, cpu=time.process_time() - c0, new=n_new, prefill=prefill)


def ms_per_call(fn, reps=10):
    """Milliseconds per call of fn() on the device: one warm-up call (compiles), then reps timed calls."""
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps * 1e3


def compile_warm_up(model, states, K):
    """With kernels.SAMPLER_COMPILE on: two short runs at two batch sizes (the second makes the size dynamic), so
    that the timed run holds no compile. Returns their seconds."""
    t0 = time.perf_counter()
    run_ours(model, states[:9], K, 8)
    run_ours(model, states[:18], K, 8)
    return time.perf_counter() - t0


def measured(label, name, r):
    """One line as soon as a row is timed: a device call cut short by its time limit keeps the rows done so far
    (the table is printed when a config's rows are all done)."""
    print(f"... {label} {name}: {r['new'] / r['seconds']:.0f} new tok/s in {r['seconds']:.1f} s, "
          f"{r['stats']['batches']} batches", flush=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_llama(layers, d, heads, kv_heads, vocab, inter, max_pos, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a 7B model never exists in fp32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None
    return model.eval()


def cpu_rows(args):
    torch.set_num_threads(args.threads)
    # The demo's MC workload (python vineppo.py, iteration 1: mc/rollouts 1988 = ~500 unique states x K=4,
    # responses of ~50 tokens in ~4 steps, prompts of ~11): 40 prompts x 4 responses -> 40 + 40 * 4 * 3 =
    # 520 states (sampled responses share their first steps, so the demo's 64 x 4 dedup to about this).
    # The demo's continuations end at EOS and average ~30 tokens (50 * (4 + 3 + 2 + 1) / 16 left after
    # s_0..s_3); here EOS is suppressed and every continuation has 30, so both methods generate exactly
    # the same tokens.
    states = workload(40, 4, 11, 50, 4, vocab=32)
    K, T = 4, 30
    print(f"CPU ({torch.get_num_threads()} threads): {len(states)} states x K={K}, {T} new tokens each, "
          f"prefixes {min(map(len, states))}-{max(map(len, states))} tokens")
    print("(wall-clock rates; `cpu s` is process CPU time, steadier when other jobs share the cores)")
    print(f"{'model':<26}{'method':<22}{'s':>7}{'cpu s':>7}{'new tok/s':>11}{'prefill tok':>13}")
    for name, model in [("demo Llama 2L d96 V32", make_llama(2, 96, 4, 4, 32, 384, 256)),
                        ("small Llama 4L d256 V32", make_llama(4, 256, 4, 4, 32, 1024, 256))]:
        run_ours(model, states[:8], K, 4)  # warm-ups, one each
        run_generate(model, states[:8], K, 4, batch_states=8)
        ours = run_ours(model, states, K, T)
        gen = run_generate(model, states, K, T, batch_states=len(states))
        for label, r in [("ours", ours), ("generate(nrs=K)", gen)]:
            print(f"{name:<26}{label:<22}{r['seconds']:>7.2f}{r['cpu']:>7.2f}{r['new'] / r['seconds']:>11.0f}"
                  f"{r['prefill']:>13}")
        speed = (ours["new"] / ours["seconds"]) / (gen["new"] / gen["seconds"])
        print(f"{name:<26}{'ratio ours/generate':<22}{'':>7}{gen['cpu'] / ours['cpu']:>6.1f}x{speed:>10.1f}x"
              f"{gen['prefill'] / ours['prefill']:>7.1f}x less")
        if args.compile:   # ours with torch.compile'd decoder layers, after warm-up runs that hold the compile
            default, ks.SAMPLER_COMPILE = ks.SAMPLER_COMPILE, True
            try:
                warm = compile_warm_up(model, states, K)
                r = run_ours(model, states, K, T)
            finally:
                ks.SAMPLER_COMPILE = default
            print(f"{name:<26}{'ours, compiled':<22}{r['seconds']:>7.2f}{r['cpu']:>7.2f}{r['new'] / r['seconds']:>11.0f}"
                  f"{r['prefill']:>13}   (compile warm-up {warm:.1f} s; ours / compiled, cpu s: "
                  f"{ours['cpu'] / r['cpu']:.2f}x)")


def bandwidth_gbs(device):
    x = torch.empty(2 ** 28, dtype=torch.uint8, device=device)  # 256 MiB, read + written per copy
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    sync()
    return 2 * x.numel() * 20 / (time.perf_counter() - t0) / 1e9


# (label, Llama config, prompts for ours (x 8 responses x 8 states), states for generate, states per generate call)
GPU_CONFIGS = [
    ("RhoMath-1.1B", dict(layers=22, d=2048, heads=32, kv_heads=4, vocab=32000, inter=5632, max_pos=2048), 4, 32, 32),
    ("DeepSeekMath-7B", dict(layers=30, d=4096, heads=32, kv_heads=32, vocab=102400, inter=11008, max_pos=4096),
     1, 4, 4),
]


def gpu_rows(args, device="cuda", configs=GPU_CONFIGS, shape=(256, 512, 8), K=9, dtype=torch.bfloat16):
    """shape: (prompt tokens, response tokens, steps per response); continuations of args.new_tokens.
    The rows named "ours" run the decoder layers eager, as every earlier GPU call did; the sampler's default
    on a GPU compiles them (kernels.SAMPLER_COMPILE "auto"), which the "compiled" rows (--compile) time."""
    default = ks.SAMPLER_COMPILE
    ks.SAMPLER_COMPILE = False
    try:
        _gpu_rows(args, device, configs, shape, K, dtype)
    finally:
        ks.SAMPLER_COMPILE = default


def _gpu_rows(args, device, configs, shape, K, dtype):
    bw = bandwidth_gbs(device)
    name = torch.cuda.get_device_name() if device == "cuda" else device
    print(f"GPU {name}: measured copy bandwidth {bw:.0f} GB/s; {dtype}; T=0.6 top_p=0.9; EOS suppressed; "
          f"prompt {shape[0]}, response {shape[1]} in {shape[2]} steps, K={K}, {args.new_tokens} new tokens")
    print(f"{'model':<16}{'method':<28}{'states':>7}{'rows':>7}{'s':>8}{'new tok/s':>11}{'vs eager':>9}{'roofline':>9}")
    T = args.new_tokens
    for label, cfg, ours_prompts, gen_states, gen_batch in configs:
        free = torch.cuda.mem_get_info()[0] if device == "cuda" else 2 ** 34
        weights = 2 * (cfg["vocab"] * cfg["d"] * 2 + cfg["layers"] * (4 * cfg["d"] ** 2 + 3 * cfg["d"] * cfg["inter"]))
        if weights > 0.6 * free:
            print(f"{label:<16}skipped: {weights / 2**30:.0f} GiB of weights, {free / 2**30:.0f} GiB free")
            continue
        model = make_llama(**cfg, dtype=dtype, device=device)
        if args.compile:
            torch._dynamo.reset()  # the last config's compiled layers would make this one's sizes dynamic
        # a decode step reads every weight but the input embedding, of which it reads one row per sequence
        embedding = model.get_input_embeddings().weight
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - embedding.numel() * embedding.element_size()
        kv_tok = 2 * cfg["layers"] * cfg["kv_heads"] * (cfg["d"] // cfg["heads"]) * torch.finfo(dtype).bits // 8
        states = workload(ours_prompts, 8, *shape, cfg["vocab"])
        run_ours(model, states[:9], K, 8)  # warm-up: Triton compile, CUDA graph path
        repeats = [run_ours(model, states, K, T) for _ in range(max(1, args.repeats))]
        for r in repeats:
            measured(label, "ours", r)
        ours = sorted(repeats, key=lambda r: r["seconds"])[(len(repeats) - 1) // 2]  # the median run (lower)
        st = ours["stats"]
        # the bytes a run's decode steps must read (weights once per step, KV as attended) at the copy bandwidth
        roof_s = lambda s: (s["steps"] * weight_bytes + s["kv_read_tokens"] * kv_tok) / (bw * 1e9)  # noqa: E731
        rows = [("ours", ours, len(states))]
        if args.sort_row:  # the same work with the torch top-p draw (a sort) in place of the Triton kernel
            ks.SAMPLER_TOP_P_KERNEL = False
            try:
                rows.append(("ours, sort top-p", run_ours(model, states, K, T), len(states)))
            finally:
                ks.SAMPLER_TOP_P_KERNEL = True
        reports = []   # printed under the table
        # Variants of ours, each beside the default: batches sized to other shares of the free memory (bigger
        # batches: fewer of them, fewer reads of the weights), compiled decoder layers (fused elementwise kernels),
        # and fp32 weights under bf16 autocast, as a full fine-tuning run samples (--fp32-autocast).
        layers = [False, True] if args.compile else [False]
        variants = [(f, c, False) for c in layers for f in [None] + args.memory_fraction][1:]
        variants += [(None, c, True) for c in layers] if args.fp32_autocast else []
        warmed = set()   # compiled under autocast or not: the guards differ, so each is a compile of its own
        for fraction, compiled, fp32 in variants:
            name = ("ours" + (", fp32 + autocast" if fp32 else "") + (", compiled" if compiled else "")
                    + (f", memory {fraction:g}" if fraction else ""))
            old = ks.SAMPLER_MEMORY_FRACTION, ks.SAMPLER_COMPILE
            ks.SAMPLER_MEMORY_FRACTION, ks.SAMPLER_COMPILE = fraction or old[0], compiled
            if fp32:
                model.float()
            try:
                with torch.autocast(device, dtype=torch.bfloat16, enabled=fp32):
                    if compiled and fp32 not in warmed:   # the compile, timed apart (the later rows reuse it)
                        reports.append(f"{label:<16}{name}: the compile's warm-up runs took "
                                       f"{compile_warm_up(model, states, K):.1f} s")
                        warmed.add(fp32)
                    r = run_ours(model, states, K, T)
                measured(label, name, r)
                rows.append((name, r, len(states)))
                reports.append(f"{label:<16}{name}: {r['stats']['batches']} batches, "
                               f"{r['stats']['oom_retries']} OOM retries, {r['stats']['steps']} decode steps")
            except torch.cuda.OutOfMemoryError as e:
                reports.append(f"{label:<16}{name}: out of memory ({e!r})"[:200])
            finally:
                ks.SAMPLER_MEMORY_FRACTION, ks.SAMPLER_COMPILE = old
                model.to(dtype)   # bf16 -> fp32 -> bf16 is exact: every other row sees the same model
                if device == "cuda":
                    torch.cuda.empty_cache()
        if args.greedy_row:  # the same work drawn greedily: the difference is what sampling costs
            rows.append(("ours, greedy", run_ours(model, states, K, T, temperature=0.0), len(states)))
        eager = None
        if not args.no_generate:
            gen_states = gen_batch = args.generate_states or gen_states
            per_prompt = 1 + 8 * (shape[2] - 1)                       # s_0 and 8 responses' s_1 .. s_{n-1}
            gstates = workload(-(-gen_states // per_prompt), 8, *shape, cfg["vocab"], seed=1)[:gen_states]
            run_generate(model, gstates[:1], K, 8, batch_states=1)   # warm-up, as ours had
            eager = run_generate(model, gstates, K, T, batch_states=gen_batch)
            rows.append(("generate eager", eager, len(gstates)))
            try:
                static = run_generate(model, gstates, K, T, batch_states=gen_batch, static=True,
                                      compile=args.compile_baseline)
                rows.append(("generate static" + (" +compile" if args.compile_baseline else ""), static,
                             len(gstates)))
            except Exception as e:  # noqa: BLE001
                print(f"{label:<16}generate static failed: {e!r}"[:200])
        for method, r, n in rows:
            rate = r["new"] / r["seconds"]
            vs_eager = f"{rate / (eager['new'] / eager['seconds']):>8.1f}x" if eager else f"{'-':>9}"
            roof = f"{roof_s(r['stats']) / r['seconds']:>9.0%}" if method.startswith("ours") else ""
            print(f"{label:<16}{method:<28}{n:>7}{n * K:>7}{r['seconds']:>8.1f}{rate:>11.0f}{vs_eager}{roof}")
        if eager:
            per_state = (eager["prefill"] / len(gstates)) / (ours["prefill"] / len(states))
            print(f"{label:<16}prefill tokens: ours {ours['prefill']} for {len(states)} states, generate "
                  f"{eager['prefill']} for {len(gstates)} ({per_state:.0f}x more per state)")
        print(f"{label:<16}ours: {st['batches']} batches, {st['oom_retries']} OOM retries, {st['steps']} decode steps")
        print("".join(line + "\n" for line in reports), end="")
        if len(repeats) > 1:
            print(f"{label:<16}ours, {len(repeats)} runs (the row above is the median"
                  f"{', the faster of the middle two' if len(repeats) % 2 == 0 else ''}), new tok/s: "
                  + ", ".join(f"{r['new'] / r['seconds']:.0f}" for r in repeats))
        if args.profile:
            profile_decode(model, states, K, device)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        sampling_cost(len(states) * K, cfg["vocab"], device)
        if device == "cuda":
            attention_cost(len(states), K, cfg, T, dtype, device)
            top_p_tiles(len(states) * K, cfg["vocab"], device)


def sampling_cost(rows, vocab, device):
    """Where a decode step's time goes, in part: drawing the next tokens of `rows` rows from bf16 logits
    (ms per step): greedy; temperature only; temperature + top-p, by the torch path (a sort over the
    vocabulary) and, on a GPU, by the Triton kernel the sampler uses there (radix selects, no sort)."""
    logits = torch.randn(rows, vocab, device=device, dtype=torch.bfloat16) * 3
    cases = [("greedy", 0.0, 1.0, False), ("T=0.6 torch", 0.6, 1.0, False),
             ("T=0.6 top_p=0.9 torch (sort)", 0.6, 0.9, False)]
    if device == "cuda":
        cases += [("T=0.6 kernel", 0.6, 1.0, True), ("T=0.6 top_p=0.9 kernel", 0.6, 0.9, True)]
    times = [f"{name} {ms_per_call(lambda: ks._sample_next(logits, temperature, top_p, use_kernel)):.2f}"
             for name, temperature, top_p, use_kernel in cases]
    print(f"{'':<16}sampling {rows} rows x V {vocab}, ms per step: " + ", ".join(times))
    if device == "cuda":  # the kernel at full size against the torch path, same u
        u = 1.0 - torch.rand(rows, device=device)
        same = [int((ks._top_p_sample_triton(logits, 0.6, p, u) == ks._sample_next_torch(logits, 0.6, p, u)).sum())
                for p in (0.9, 1.0)]
        print(f"{'':<16}kernel draws the torch path's token (same uniforms) on {same[0]} of {rows} rows at top_p=0.9, "
              f"{same[1]} of {rows} at top_p=1 (they may differ only where float rounding moves an interval edge)")


def top_p_tiles(rows, vocab, device, batches=3, tiles=((512, 8), (1024, 16), (256, 4)), reps=10):
    """The top-p kernel (T=0.6, top_p=0.9, bf16) with other tiles than _sample_tile's, at `rows` rows and at
    the rows of one of `batches` batches (the 7B workload runs 3 on an 80 GB card): one program per row, so
    fewer rows than the card holds programs leave it part idle, and a wider tile shortens each program."""
    out = []
    for n in (rows, max(1, rows // batches)):
        logits = torch.randn(n, vocab, device=device, dtype=torch.bfloat16) * 3
        u = 1.0 - torch.rand(n, device=device)
        for block, warps in tiles:
            tile = dict(BLOCK=block, num_warps=warps)
            ms = ms_per_call(lambda: ks._top_p_sample_triton(logits, 0.6, 0.9, u, tile=tile), reps)
            out.append(f"{n} rows {block}x{warps} {ms:.2f}")
    print(f"{'':<16}top-p kernel by tile (BLOCK x warps), V {vocab}, ms per draw: " + ", ".join(out))


def attention_cost(n_states, K, cfg, T, dtype, device, reps=20):
    """The decode step's attention pieces alone, at the middle step t = T / 2, summed over the layers (ms per
    step): the suffix part (each row over its own t new tokens, the KV bytes no sharing can save, with the
    bandwidth it reaches) and the merge of the two parts, torch ops against the Triton kernel. The profile
    above covers the first steps only, where the suffixes are short."""
    B, Hkv, D, t = n_states * K, cfg["kv_heads"], cfg["d"] // cfg["heads"], T // 2
    nrep = cfg["heads"] // Hkv
    q = torch.randn(B * Hkv, nrep, D, device=device, dtype=dtype)
    sk, sv = (torch.randn(B * Hkv, T, D, device=device, dtype=dtype) for _ in range(2))
    lens = torch.full((1, 1), t, device=device, dtype=torch.int32).expand(1, nrep)
    parts = [torch.randn(*shape, device=device) for shape in
             [(n_states, Hkv, K * nrep, D), (n_states, Hkv, K * nrep), (B, Hkv, nrep, D), (B, Hkv, nrep)]]
    pad_idx = torch.arange(B, device=device)  # row b at slot b: n_states nests of K rows
    cases = {"suffix attention": lambda: ks._partial_attention_triton(q, sk, sv, lens, D ** -0.5, B * Hkv),
             "merge torch": lambda: ks._merge_partials_torch(*parts, pad_idx, K, dtype),
             "merge kernel": lambda: ks._merge_partials_triton(*parts, pad_idx, K, dtype)}
    times = {name: ms_per_call(fn, reps) * cfg["layers"] for name, fn in cases.items()}
    gbs = 2 * B * Hkv * t * D * sk.element_size() * cfg["layers"] / (times["suffix attention"] / 1e3) / 1e9
    print(f"{'':<16}attention at step {t} of {T}, {B} rows x {cfg['layers']} layers, ms per step: "
          + ", ".join(f"{k} {v:.2f}" for k, v in times.items()) + f" (suffix KV read at {gbs:.0f} GB/s)")


# Device-time categories of profile_decode, matched on kernel / op names (first match wins)
PROFILE_CATEGORIES = [("matmul", ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "sm80_", "aten::mm", "aten::addmm",
                                  "aten::bmm", "aten::linear")),
                      ("attention", ("_partial_attention", "scaled_dot_product")),
                      ("top-p draw", ("_top_p_sample", "sort", "cumsum", "softmax", "radix")),
                      ("other (norms, rotary, merges, copies)", ("",))]


def profile_decode(model, states, K, device, new_tokens=16):
    """Where our decode steps' time goes: torch.profiler over one run of `new_tokens` steps (CUDA graphs
    and all, as the rows above run), device time per step by category and the top kernels."""
    from torch.profiler import ProfilerActivity, profile
    on_gpu = device == "cuda"
    run_ours(model, states, K, 2)  # warm-up at this batch size
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        r = run_ours(model, states, K, new_tokens)
    steps = r["stats"]["steps"]
    attr = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    # on a GPU the kernels themselves: an aten:: op also reports its kernels' time as its own self device
    # time, so counting ops too would count each kernel twice; on a CPU the aten:: ops' self time
    from torch.autograd import DeviceType
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0 and
              (e.device_type == DeviceType.CUDA if on_gpu else e.key.startswith("aten::"))]
    spent = {name: 0.0 for name, _ in PROFILE_CATEGORIES}
    for e in events:
        name = next(c for c, pats in PROFILE_CATEGORIES if any(p in e.key for p in pats))
        spent[name] += getattr(e, attr) / 1e3 / steps  # ms per step
    total = sum(spent.values())
    print(f"{'':<16}profile: {len(states) * K} rows, {steps} decode steps, wall {r['seconds'] / steps * 1e3:.2f} ms "
          f"per step, {'device' if on_gpu else 'CPU op'} time {total:.2f} ms per step:")
    for name, ms in spent.items():
        print(f"{'':<18}{name:<40}{ms:>8.2f} ms {ms / max(total, 1e-9):>6.0%}")
    print(f"{'':<18}top {min(8, len(events))} by time per step:")
    for e in sorted(events, key=lambda e: -getattr(e, attr))[:8]:
        print(f"{'':<20}{getattr(e, attr) / 1e3 / steps:>8.3f} ms  {e.key[:90]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="GPU rows only")
    ap.add_argument("--cpu", action="store_true", help="CPU rows only")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--new-tokens", type=int, default=512, help="GPU: continuation length")
    ap.add_argument("--configs", nargs="+", default=[c[0] for c in GPU_CONFIGS],
                    choices=[c[0] for c in GPU_CONFIGS], help="GPU: which model configs to run, in this order")
    ap.add_argument("--no-generate", action="store_true", help="GPU: skip the transformers generate baselines")
    ap.add_argument("--repeats", type=int, default=1, help="GPU: run ours this many times, report the median")
    ap.add_argument("--greedy-row", action="store_true", help="GPU: also time ours drawing greedily (cost of sampling)")
    ap.add_argument("--profile", action="store_true",
                    help="GPU: profile 16 of our decode steps: device time by category and the top kernels")
    ap.add_argument("--sort-row", action="store_true",
                    help="GPU: also time ours drawing top-p with the torch sort instead of the Triton kernel")
    ap.add_argument("--memory-fraction", type=float, nargs="*", default=[],
                    help="GPU: also time ours with batches sized to these shares of the free memory (the sampler's "
                         "kernels.SAMPLER_MEMORY_FRACTION is 0.7)")
    ap.add_argument("--fp32-autocast", action="store_true",
                    help="GPU: also time ours on fp32 weights under bf16 autocast, as full fine-tuning samples (with "
                         "--compile: also compiled; kernels' 'auto' leaves such layers eager)")
    ap.add_argument("--compile", action="store_true",
                    help="also time ours with torch.compile'd decoder layers (kernels.SAMPLER_COMPILE); on a GPU at the "
                         "default memory share and at each --memory-fraction")
    ap.add_argument("--generate-states", type=int, default=None,
                    help="GPU: states (x K rows) that generate runs in one call (default: 32 at 1.1B, 4 at 7B, sized to "
                         "the time budget; its per-token rate grows with the batch, as ours does)")
    ap.add_argument("--compile-baseline", action="store_true",
                    help="GPU: let generate torch.compile its static-cache forward (slow to compile)")
    args = ap.parse_args()
    with torch.no_grad():  # generate() is no-grad itself; ours too
        if not args.gpu:
            cpu_rows(args)
        if args.gpu or (not args.cpu and torch.cuda.is_available()):
            assert torch.cuda.is_available(), "--gpu needs a CUDA device"
            gpu_rows(args, configs=[next(c for c in GPU_CONFIGS if c[0] == label) for label in args.configs])
        elif not args.cpu:
            print("GPU rows: no CUDA device here; run `python benchmarks/bench_sampler.py --gpu` on a GPU machine.")


if __name__ == "__main__":
    main()
