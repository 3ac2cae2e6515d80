"""The compiled GPU kernels, checked on a machine without a GPU.

The other kernel tests run the Triton kernels in the interpreter, which checks their arithmetic but not
what only the GPU compiler sees: a tile that does not lower (tl.dot shapes, dtypes, layouts) or that
needs more shared memory than a block may have, which Triton reports only when the kernel is loaded on
the GPU (OutOfResources). Triton compiles for a target named in the call with the ptxas bundled in its
wheel, no driver needed, so this file compiles every tile the launchers can choose for an A100 (sm_80)
and an H100/H200 (sm_90), the sampler's attention and top-p draw also for a T4 (sm_75), and checks the shared memory
each needs against those cards' limits.

It runs in a child process because conftest.py sets TRITON_INTERPRET=1 before triton is imported, and
under the interpreter @triton.jit functions cannot be compiled.
"""
import json
import os
import subprocess
import sys
import types
from concurrent.futures import ProcessPoolExecutor

import torch

# Shared memory one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin): T4 (Colab's free GPU,
# where notebook 02 samples) 64 KiB, A100 163 KiB, H100/H200 227 KiB
SHARED_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 90: 227 * 1024}
TRAINING_TARGETS = (80, 90)     # the log-prob kernels train; only the sampler's attention runs on a T4


def _signature(fn, arg_types):
    return {name: arg_types.get(name, "constexpr") for name in fn.arg_names}


def _compile(job):
    """Compile one (kernel, target, constants, launch options); -> shared bytes, or the compiler's error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernels
    name, cc, arg_types, constants, options = job
    fn = getattr(kernels, name)
    try:
        compiled = triton.compile(ASTSource(fn, _signature(fn, arg_types), constants),
                                  target=GPUTarget("cuda", cc, 32), options=options)
        return dict(kernel=name, cc=cc, constants=constants, options=options, shared=compiled.metadata.shared)
    except Exception as e:  # noqa: BLE001 -- reported and asserted on by the parent
        return dict(kernel=name, cc=cc, constants=constants, options=options, error=f"{type(e).__name__}: {e}"[:500])


def compile_jobs():
    """-> (jobs that must each compile and fit, groups of which at least the first fitting one must).
    bf16 is what vineppo.py runs on a GPU: every autotune config of the log-prob kernels must fit. fp32
    is supported but not the fast path: the autotuner drops configs that do not fit, so one per kernel
    must (checked on sm_90; its configs are slow to compile). The attention tile is not autotuned:
    _attention_tile picks one per (dtype, head dim, M <= 16 or not), and that one must fit, in bf16 and fp32."""
    import kernels
    fwd_types = dict(targets_ptr="*i64", partial_ptr="*fp32", N="i32", inv_temperature="fp32")
    bwd_types = dict(targets_ptr="*i64", lse_ptr="*fp32", entropy_ptr="*fp32", grad_logp_ptr="*fp32",
                     grad_entropy_ptr="*fp32", grad_hidden_ptr="*fp32", grad_weight_ptr="*fp32", N="i32",
                     inv_temperature="fp32")
    attn_types = dict(O="*fp32", LSE="*fp32", LENS="*i32", scale="fp32",
                      **{n: "i32" for n in ["M", "T", "D", "sq_n", "sq_m", "sk_n", "sk_t", "sv_n", "sv_t", "sl_n",
                                            "sl_m", "LEN_DIV"]})
    dtype_options = {"bf16": dict(CAST_TO_FP32=False, DOT_PRECISION=None),
                     "fp32": dict(CAST_TO_FP32=True, DOT_PRECISION="ieee")}
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}

    def logprob_jobs(cc, dtype, flags):
        """The autotune configs of the forward (flags None) or of the backward with (dX, dW) = flags."""
        io = dict(hidden_ptr=f"*{dtype}", weight_ptr=f"*{dtype}")
        if flags is None:
            return [("_logprob_fwd_kernel", cc, dict(fwd_types, **io),
                     dict(D=4096, V=102400, NUM_SPLITS=2, BLOCK_N=n, BLOCK_V=v, BLOCK_D=d, **dtype_options[dtype]),
                     dict(num_warps=w, num_stages=st)) for n, v, d, w, st in kernels._CUDA_FWD_TILES]
        return [("_logprob_bwd_kernel", cc, dict(bwd_types, **io),
                 dict(D=4096, V=16384, BLOCK_N=n, BLOCK_V=v, BLOCK_D=d, GROUP_N=8, COMPUTE_DX=flags[0],
                      COMPUTE_DW=flags[1], **dtype_options[dtype]),
                 dict(num_warps=w, num_stages=st)) for n, v, d, w, st in kernels._CUDA_BWD_TILES]

    slab_tile = dict(kernels._SLAB_TILE)
    slab_warps = slab_tile.pop("num_warps")
    slab_stats_types = dict(logits_ptr="*fp32", targets_ptr="*i64", logp_ptr="*fp32", entropy_ptr="*fp32",
                            lse_ptr="*fp32", M="i32", inv_temperature="fp32")
    slab_grad_types = dict(logits_ptr="*fp32", targets_ptr="*i64", lse_ptr="*fp32", entropy_ptr="*fp32",
                           grad_logp_ptr="*fp32", grad_entropy_ptr="*fp32", N="i32", C="i32", col0="i32",
                           inv_temperature="fp32")

    each, first_fit = [], []
    for cc in SHARED_LIMIT:
        if cc in TRAINING_TARGETS:
            # the chunked path's slab kernels (the GPU default), dA in bf16 (training) and fp32
            each.append(("_slab_stats_kernel", cc, slab_stats_types, dict(V=102400, **slab_tile),
                         dict(num_warps=slab_warps)))
            each += [("_slab_grad_kernel", cc, dict(slab_grad_types, d_logits_ptr=f"*{dtype}"), slab_tile,
                      dict(num_warps=slab_warps)) for dtype in ("bf16", "fp32")]
            # backward (dX, dW): full fine-tuning trains the lm_head; with LoRA it is frozen (only dX)
            for flags in (None, (True, True), (True, False)):
                each += logprob_jobs(cc, "bf16", flags)
                if cc == 90 and flags != (True, False):
                    first_fit.append(logprob_jobs(cc, "fp32", flags))
        # M queries per program: up to 16 (BLOCK_M 16) for each decode step's own-KV part (M = query heads per KV
        # head), 64 for the shared-prefix part of a nest's rows
        for head_dim, M, dtype in [(h, m, t) for h in (64, 128) for m in (8, 64) for t in ("bf16", "fp32")]:
            q = types.SimpleNamespace(is_cuda=True, dtype=torch_dtype[dtype])
            tile = kernels._attention_tile(M=M, D=head_dim, element_size=q.dtype.itemsize, on_gpu=True)
            each.append(("_partial_attention_kernel", cc,
                         dict(Q=f"*{dtype}", K=f"*{dtype}", V=f"*{dtype}", **attn_types),
                         dict(tile, **kernels._attention_dtype_options(q)), dict(num_warps=4, num_stages=3)))
        # the sampler's merge of the two attention parts, into the model's dtype: GQA (RhoMath: 8 query heads
        # per KV head, head dim 64) in 16 bits, MHA (DeepSeekMath: 1, 128) in fp32
        for nrep, head_dim, dtype in ((8, 64, "fp16" if cc == 75 else "bf16"), (1, 128, "fp32")):
            each.append(("_merge_partials_kernel", cc,
                         dict(O1="*fp32", L1="*fp32", O2="*fp32", L2="*fp32", PAD="*i64", OUT=f"*{dtype}",
                              R="i32", Hkv="i32", NREP="i32", D="i32"),
                         dict(BLOCK_J=nrep, BLOCK_D=head_dim), dict(num_warps=max(1, min(4, nrep * head_dim // 256)))))
        # the sampler's top-p draw: bf16 logits (vineppo.py on a GPU), fp16 (a T4 has no bf16), fp32 (any
        # card); the nucleus variant for each dtype once (each takes ~3 s to compile), the other everywhere
        sample_tile = dict(kernels._sample_tile(compiled=True))
        sample_warps = sample_tile.pop("num_warps")
        nucleus_dtype = {75: "fp16", 80: "bf16", 90: "fp32"}[cc]
        for dtype, passes in (("bf16", 4), ("fp16", 5), ("fp32", 8)):
            for top_p in (True, False) if dtype == nucleus_dtype or (cc, dtype) == (90, "bf16") else (False,):
                each.append(("_top_p_sample_kernel", cc,
                             dict(X=f"*{dtype}", U="*fp32", OUT="*i64", stride_x="i32", V="i32", inv_t="fp32",
                                  top_p="fp32"),
                             dict(TOP_P=top_p, KEY_PASSES=passes, **sample_tile), dict(num_warps=sample_warps)))
    return each, first_fit


def _first_fitting(group):
    """An autotuned kernel's configs in the autotuner's order, compiled up to the first that fits."""
    results = []
    for job in group:
        results.append(_compile(job))
        if results[-1].get("shared", float("inf")) <= SHARED_LIMIT[job[1]]:
            break
    return results


def compile_all():
    """-> {"each": one result per job, "first_fit": the results of each group}, compiled 2 at a time."""
    each, first_fit = compile_jobs()
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        return {"each": list(pool.map(_compile, each)), "first_fit": list(pool.map(_first_fitting, first_fit))}


def test_gpu_kernels_compile_and_fit_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    each, first_fit = compile_jobs()
    assert len(results["each"]) == len(each) and len(results["first_fit"]) == len(first_fit) == 2
    assert {(r["kernel"], r["cc"]) for r in results["each"]} >= {("_partial_attention_kernel", 75),
                                                                 ("_logprob_bwd_kernel", 80), ("_logprob_fwd_kernel", 90)}
    assert {("_slab_stats_kernel", 90), ("_slab_grad_kernel", 80), ("_top_p_sample_kernel", 75),
            ("_top_p_sample_kernel", 90), ("_merge_partials_kernel", 75),
            ("_merge_partials_kernel", 90)} <= {(r["kernel"], r["cc"]) for r in results["each"]}
    for r in results["each"]:
        assert "error" not in r, r
        assert r["shared"] <= SHARED_LIMIT[r["cc"]], r
        # dots and reductions stage in shared memory; the elementwise kernels need none
        assert r["shared"] > 0 or r["kernel"] in ("_slab_grad_kernel", "_merge_partials_kernel"), r
    for group in results["first_fit"]:
        assert "shared" in group[-1] and group[-1]["shared"] <= SHARED_LIMIT[group[-1]["cc"]], group


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps(compile_all()))
