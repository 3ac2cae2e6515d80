"""Forward+backward time and peak extra memory of ways to get token log-probs + entropy from the lm_head.

    python benchmarks/bench_logprobs.py     # CUDA if present (bf16, the real shapes), else the scaled CPU table
    python benchmarks/bench_logprobs.py --ppo-only    # only the PPO-loss table (below)

Methods (all compute logp and entropy of softmax(hidden @ weight.T / T), then backward of
sum(g1 * logp + g2 * H) with fixed random g1, g2 into hidden and weight):
  chunked kernels.fused_logprobs(backend="chunked"), the default on CUDA: cuBLAS on bounded slabs of the
          logits + two Triton slab kernels (CUDA only)
  fused   kernels.fused_logprobs(backend="triton"): the fused Triton kernels, no slab (CUDA only)
  ours    kernels.fused_logprobs on the CPU: the chunked path with torch slab math (backend="torch")
  naive   matmul -> .float() -> log_softmax -> gather  (full [N, V] logits, as most RL code does)
  trl     TRL's selective log-softmax: full [N, V] logits from the lm_head, then log_softmax / entropy
          one sequence (here: 1024-token chunk) at a time
  liger   Liger-Kernel's fused linear cross entropy (CUDA only, if installed): logp only, no entropy,
          temperature applied by scaling hidden
Effective TFLOP/s counts 8 N d V per forward+backward (logits 2NdV, recomputed logits 2NdV, dX and dW
2NdV each) for every method, so for naive, trl and liger, which do 6 N d V, it is an effective rate
(3/4 of it is their matmul utilisation); the ceiling is torch.matmul on [N, d] x [d, V] in the same dtype, measured here.
A second table times kernels.ppo_loss forward + backward at the largest token count, its gradient computed
in the forward (kernels.PPO_GRADIENT_IN_FORWARD: 6 N d V flops) against the same loss through fused_logprobs,
whose backward recomputes the logits (8 N d V; the default, as the H100 measured it faster).
Peak extra memory: CUDA: torch.cuda.max_memory_allocated() minus the allocation before the call.
CPU: the profiler's tensor-allocation trace (torch.profiler, profile_memory=True): the highest total of
bytes allocated during the call and still alive. Both include the gradients dX and dW themselves.
"""
import argparse
import datetime
import gc
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402

TEMPERATURE = 0.6
TRL_CHUNK_ROWS = 1024


# ----------------------------------------------------------------------------- the methods
def naive_logprobs(hidden, weight, targets, temperature):
    logits = (hidden @ weight.T).float() / temperature                          # [N, V]
    log_p = torch.log_softmax(logits, dim=-1)                                    # [N, V]
    logp = log_p.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logp, entropy


def trl_logprobs(hidden, weight, targets, temperature):
    logits = hidden @ weight.T                                                   # [N, V], input dtype
    logps, entropies = [], []
    for r0 in range(0, logits.shape[0], TRL_CHUNK_ROWS):
        chunk = logits[r0:r0 + TRL_CHUNK_ROWS].float() / temperature             # [C, V]
        log_p = torch.log_softmax(chunk, dim=-1)
        logps.append(log_p.gather(-1, targets[r0:r0 + TRL_CHUNK_ROWS, None]).squeeze(-1))
        entropies.append(-(log_p.exp() * log_p).sum(-1))
    return torch.cat(logps), torch.cat(entropies)


def ours_logprobs(backend):
    return lambda hidden, weight, targets, temperature: kernels.fused_logprobs(hidden, weight, targets, temperature,
                                                                              backend=backend)


def liger_fwd_bwd_fn():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def run(hidden, weight, targets, g1, g2):
        loss_fn(weight, hidden / TEMPERATURE, targets).backward()    # = -sum logp; no entropy
    return run


def make_fwd_bwd(logprob_fn):
    def run(hidden, weight, targets, g1, g2):
        logp, entropy = logprob_fn(hidden, weight, targets, TEMPERATURE)
        ((g1 * logp).sum() + (g2 * entropy).sum()).backward()
    return run


def make_inputs(N, d, V, dtype, device, seed=0):
    torch.manual_seed(seed)                                      # generated on the device: 64k x 4096 is slow on a CPU
    hidden = torch.randn(N, d, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(V, d, device=device) * (3 / d ** 0.5)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), device=device)
    g1, g2 = torch.randn(N, device=device), torch.randn(N, device=device)
    return hidden, weight, targets, g1, g2


def check_against_float64(N, d, V, dtype, device):
    """Print ours' and naive's scaled max error vs a float64 oracle (same inputs): the compiled GPU
    path is not covered by the interpreter tests."""
    hidden, weight, targets, g1, g2 = make_inputs(N, d, V, dtype, device, seed=1)
    rows = []
    for name, fn in [("chunked", ours_logprobs("chunked")), ("fused", ours_logprobs("triton")),
                     ("naive", naive_logprobs), ("float64", kernels.reference_logprobs)]:
        h = (hidden.detach().double() if name == "float64" else hidden.detach()).requires_grad_()
        w = (weight.detach().double() if name == "float64" else weight.detach()).requires_grad_()
        logp, entropy = fn(h, w, targets, TEMPERATURE)
        ((g1.to(logp.dtype) * logp).sum() + (g2.to(logp.dtype) * entropy).sum()).backward()
        rows.append((name, [logp.detach(), entropy.detach(), h.grad, w.grad]))
    exact = rows[-1][1]
    for name, got in rows[:-1]:
        errs = [((a.double() - e).abs().max() / e.abs().max()).item() for a, e in zip(got, exact)]
        print(f"# check N={N} d={d} V={V} {name:<7} scaled max error vs float64: logp {errs[0]:.1e}  "
              f"entropy {errs[1]:.1e}  dX {errs[2]:.1e}  dW {errs[3]:.1e}")


def ppo_table(shapes, N, dtype, device, backend, reps):
    """kernels.ppo_loss forward + backward, gradient in the forward vs through fused_logprobs' backward."""
    print(f"# ppo_loss forward + backward, backend {backend}, N={N}: 'in forward' = dX and dW computed in the forward "
          "(kernels.PPO_GRADIENT_IN_FORWARD), 'recompute' = through fused_logprobs (its backward recomputes the logits; "
          "the default)")
    print(f"{'shape':<26}{'N':>6} {'method':<11}{'fwd+bwd ms':>11}{'peak extra':>12}{'speed-up':>9}")
    for label, d, V in shapes:
        inputs = make_inputs(N, d, V, dtype, device)
        hidden, weight, targets, advantages, noise = inputs
        with torch.no_grad():
            old_logp, _ = kernels.fused_logprobs(hidden, weight, targets, TEMPERATURE, backend=backend)
        old_logp = old_logp + 0.1 * noise                           # ratios around 1, some of them clipped
        results, default = {}, kernels.PPO_GRADIENT_IN_FORWARD
        for name, in_forward in (("in forward", True), ("recompute", False)):
            def run(h, w, t, a, _, in_forward=in_forward):
                kernels.PPO_GRADIENT_IN_FORWARD = in_forward
                loss, _ = kernels.ppo_loss(h, w, t, old_logp, old_logp, a, temperature=TEMPERATURE, clip_eps=0.2,
                                           kl_coef=1e-4, n_tokens=N, n_seqs=max(1, N // 256), backend=backend)
                loss.backward()
            results[name] = time_and_memory(run, inputs, device, reps)
        kernels.PPO_GRADIENT_IN_FORWARD = default
        base = results["recompute"][0]
        for name, (seconds, mem) in results.items():
            print(f"{label + f' d{d} V{V}':<26}{N:>6} {name:<11}{(f'{seconds * 1e3:,.1f}' if seconds else '-'):>11}"
                  f"{fmt_mem(mem):>12}{(f'{base / seconds:.2f}x' if seconds and base else '-'):>9}")
        del inputs


# ----------------------------------------------------------------------------- measurement
def cpu_peak_extra_bytes(fn):
    """Most bytes that CPU tensors allocated during fn() hold at the same time, from the profiler's allocation
    trace (private-ish API: torch._C._profiler event tree). Its total_allocated counts every live CPU tensor
    of the process, so the level just before fn's first allocation event is subtracted."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append(node)
        stack.extend(node.children)
    if not events:
        return 0
    first = min(events, key=lambda e: e.start_time_ns)
    before = first.extra_fields.total_allocated - first.extra_fields.alloc_size   # alloc_size < 0 for a free
    return max(0, max(e.extra_fields.total_allocated for e in events) - before)


def time_and_memory(run, inputs, device, reps):
    """-> (seconds per call, peak extra bytes), (None, 'OOM') or (None, 'error: ...')."""
    hidden, weight = inputs[0], inputs[1]

    def call():
        hidden.grad = weight.grad = None
        run(*inputs)
    failure = None
    try:
        if device == "cuda":
            call()                                                   # warm-up: compile, autotune
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                call()
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3 / reps
            hidden.grad = weight.grad = None
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            call()
            torch.cuda.synchronize()
            return seconds, torch.cuda.max_memory_allocated() - base
        hidden.grad = weight.grad = None     # CPU: one call timed, then one traced (the profiler slows ops down)
        t0 = time.perf_counter()
        call()
        seconds = time.perf_counter() - t0
        hidden.grad = weight.grad = None     # freed before the trace, whose baseline is then the inputs alone
        return seconds, cpu_peak_extra_bytes(call)
    except torch.cuda.OutOfMemoryError:
        failure = "OOM"
    except Exception as e:  # noqa: BLE001 -- one broken method must not cost the whole GPU call
        failure = f"error: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
    # outside the except block, so the traceback no longer pins the failed call's tensors
    hidden.grad = weight.grad = None
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return None, failure


def matmul_tflops(N, d, V, dtype, device, reps):
    a, b = torch.randn(N, d, device=device, dtype=dtype), torch.randn(d, V, device=device, dtype=dtype)
    a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * N * d * V / ((time.perf_counter() - t0) / reps) / 1e12


def fmt_mem(b):
    return b[:5] if isinstance(b, str) else f"{b / 2**20:,.0f} MiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ppo-only", action="store_true", help="print only the PPO-loss table")
    ppo_only = ap.parse_args().ppo_only
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        dtype = torch.bfloat16
        shapes = [("RhoMath-1.1B", 2048, 32000), ("DeepSeekMath-7B", 4096, 102400)]
        token_counts = [4096, 16384, 65536]
        name = torch.cuda.get_device_name()
    else:   # scaled down; the CPU runs the chunked torch path (the Triton interpreter checks, it is not fast)
        dtype = torch.float32
        shapes = [("small (scaled)", 256, 8192), ("large (scaled)", 512, 32000)]
        token_counts = [1024, 4096]
        name = (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                f"load average {os.getloadavg()[0]:.1f} at start")
    # row name -> backend; the CPU never times the Triton interpreter
    ours = {"chunked": "chunked", "fused": "triton"} if device == "cuda" else {"ours": "torch"}
    methods = {name: make_fwd_bwd(ours_logprobs(backend)) for name, backend in ours.items()}
    methods.update(naive=make_fwd_bwd(naive_logprobs), trl=make_fwd_bwd(trl_logprobs))
    if device == "cuda" and liger_fwd_bwd_fn() is not None:
        methods["liger"] = liger_fwd_bwd_fn()
    triton_version = getattr(kernels.triton, "__version__", "absent")
    print(f"# bench_logprobs  {datetime.datetime.now():%Y-%m-%d %H:%M}  device: {name}")
    print(f"# torch {torch.__version__}, triton {triton_version}, python {platform.python_version()}, dtype "
          f"{str(dtype)[6:]}, T={TEMPERATURE}, " + ("chunked = cuBLAS slabs of "
          f"{kernels.CUDA_SLAB_BYTES[0] >> 20}-{kernels.CUDA_SLAB_BYTES[1] >> 20} MiB + Triton slab kernels, fused = "
          "fused Triton kernels" if device == "cuda" else
          f"ours = chunked torch fallback ({kernels.TORCH_CHUNK_BYTES >> 20} MiB fp32 slabs)"))
    print("# peak extra memory: " + ("torch.cuda.max_memory_allocated - baseline" if device == "cuda" else
          "torch.profiler allocation trace") + ", includes dX and dW; liger: "
          + ("logp only (no entropy)" if "liger" in methods else "not run (needs CUDA and liger-kernel)"))
    if device == "cuda":
        check_against_float64(256, 2048, 32000, dtype, device)
    else:
        cpu_peak_extra_bytes(lambda: torch.zeros(1))            # profiler start-up, outside the timings
    if ppo_only:
        return ppo_table(shapes, token_counts[-2 if device == "cuda" else -1], dtype, device, ours[next(iter(ours))],
                         reps=5 if device == "cuda" else 1)
    print(f"{'shape':<26}{'N':>6} {'method':<8}{'fwd+bwd ms':>11}{'peak extra':>12}{'vs naive':>9}"
          f"{'TFLOP/s':>9}{'of matmul':>10}")
    results, failures = {}, []
    for label, d, V in shapes:
        ceiling_n = min(token_counts[-1], 16384)
        ceiling = matmul_tflops(ceiling_n, d, V, dtype, device, reps=3)
        for N in token_counts:
            inputs = make_inputs(N, d, V, dtype, device)
            for method, run in methods.items():
                results[(label, N, method)] = time_and_memory(run, inputs, device, reps=5 if device == "cuda" else 1)
            naive_mem = results[(label, N, "naive")][1]
            for method in methods:
                seconds, mem = results[(label, N, method)]
                if seconds is None:
                    failures.append(f"{label} N={N} {method}: {mem}")
                ratio = f"{naive_mem / mem:.1f}x" if isinstance(mem, int) and isinstance(naive_mem, int) else "-"
                tflops = 8 * N * d * V / seconds / 1e12 if seconds else None
                print(f"{label + f' d{d} V{V}':<26}{N:>6} {method:<8}"
                      f"{(f'{seconds * 1e3:,.1f}' if seconds else '-'):>11}{fmt_mem(mem):>12}{ratio:>9}"
                      f"{(f'{tflops:.2f}' if tflops else '-'):>9}{(f'{tflops / ceiling:.0%}' if tflops else '-'):>10}")
            del inputs
        print(f"{'':<26}matmul ceiling ({str(dtype)[6:]}, N={ceiling_n}): {ceiling:.2f} TFLOP/s")
    for line in failures:
        print(f"# {line}")
    ppo_table(shapes, token_counts[-2 if device == "cuda" else -1], dtype, device, ours[next(iter(ours))],
              reps=5 if device == "cuda" else 1)
    if device == "cuda":   # the goals, checked on what was measured
        for method in ours:
            print_goals(results, shapes, token_counts, method)


def print_goals(results, shapes, token_counts, method):
    ds, ds_d, ds_v = shapes[1]
    for (label, d, V), N, goal in [(shapes[0], 16384, 10), (shapes[1], 16384, 10), (shapes[1], 65536, 20)]:
        naive, ours = results[(label, N, "naive")][1], results[(label, N, method)][1]
        if naive == "OOM" and isinstance(ours, int):   # naive wanted more than the card minus the bf16 inputs
            bound = torch.cuda.get_device_properties(0).total_memory - 2 * (N + V) * d
            naive, label = bound, label + " (naive OOM: vs the memory it could not get, a lower bound)"
        verdict = (f"{naive / ours:.1f}x {'MET' if naive / ours >= goal else 'NOT MET'}"
                   if isinstance(naive, int) and isinstance(ours, int) else f"not measured (naive {naive}, ours {ours})")
        print(f"goal ({method}): {label} N={N}: peak extra memory >= {goal}x below naive: {verdict}")
    for label, _, _ in shapes:
        for N in token_counts:
            ours, naive = results[(label, N, method)][0], results[(label, N, "naive")][0]
            verdict = f"{naive / ours:.2f}x {'MET' if ours <= naive else 'NOT MET'}" if ours and naive else "not measured"
            print(f"goal ({method}): {label} N={N}: no slower than naive: {verdict}")
    rates = [8 * N * ds_d * ds_v / results[(ds, N, method)][0] / 1e12 for N in token_counts if results[(ds, N, method)][0]]
    print(f"goal ({method}): {ds}: >= 400 TFLOP/s: " + (f"best {max(rates):.0f} {'MET' if max(rates) >= 400 else 'NOT MET'}"
                                             if rates else "not measured"))


if __name__ == "__main__":
    main()
