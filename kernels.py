"""Fused kernels for VinePPO.

Section 1, log-probs / entropy / PPO loss without the logits.
Every PPO update needs log pi(token) under the policy, the old policy and the frozen reference, with
the logits divided by the sampling temperature (spec section 1). The naive path builds [N, V] fp32
logits (2.1 GB at 16k tokens x 32000 vocab, 6.7 GB at 102400) plus as much again for log_softmax and
its gradient. Here at most one bounded block of it is held at a time (a slab of 32 MiB on the CPU, 64 MiB-1 GiB
on a GPU, which is all of [N, V] only when that is smaller; or one tile in registers). Two ways, both below:
  fused    the lm_head matmul and the softmax statistics in one Triton kernel per pass, one
           [BLOCK_N, BLOCK_V] tile in registers at a time: the least memory, the textbook algorithm;
  chunked  cuBLAS computes the logits one slab (a bounded [rows, V] or [N, cols] block) at a time and
           two small Triton kernels do the softmax algebra on it: faster, because cuBLAS reaches the chip's
           matmul rate, with less memory than fused at small N and more at large N (the default on a GPU;
           torch ops on the CPU).

Layout of the section (Triton-tutorial style):
  reference_logprobs        pure torch, full logits: the specification and the test oracle
  _online_softmax_update,   @triton.jit helpers shared by the fused kernels and the slab kernels: one tile into
  _d_logits                 the running log-sum-exp statistics; one tile's dA (the backward derivation above it)
  _logprob_fwd_kernel       @triton.jit forward: online log-sum-exp, target logit, entropy
  _logprob_bwd_kernel       @triton.jit backward: recompute a tile, dX and dW by fp32 atomics
  _triton_forward/backward  launchers with the shape asserts
  _slab_*_torch / _kernel   the chunked path's softmax algebra on one slab: torch ops, Triton kernel
  _slab_*_triton            (and _grad_from_log_p_torch, the torch backward from log p), their launchers
  _chunked_forward/backward the chunked path: cuBLAS slabs (torch ops on the CPU, the fallback)
  FusedLogprobs             the torch.autograd.Function, fused_logprobs its public entry point
  reference_ppo_loss        (1b) the spec's clipped objective + k3 KL on full logits: the test oracle
  ppo_terms                 the same objective on [N] log-probs, differentiated by autograd
  FusedPPOLoss, ppo_loss    ppo_terms on top of fused_logprobs (the default), or with dX, dW computed slab by
                            slab in the forward (PPO_GRADIENT_IN_FORWARD); ppo_loss is the public entry point

Section 2, batched prefix sampling: sample_continuations(model, prefixes, k, ...) draws k continuations of
every prefix, prefilling identical and nested prefixes once and reading each shared prefix once per
decode step for all its continuations (cascade attention), and drawing each step's tokens on a GPU
with a Triton kernel that finds the top-p nucleus without sorting the vocabulary (radix selects).
vineppo.py uses it for the training samples, the MC rollouts and evaluation.
"""
import contextlib
import inspect
import os
import types
import warnings

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # torch-only install: section 1's kernels are defined against a stub and never launched;
    # section 2's exist only with Triton (`if HAS_TRITON:` blocks), and the sampler uses its torch paths
    HAS_TRITON = False
    triton = types.SimpleNamespace(jit=lambda fn: fn, cdiv=lambda a, b: -(-a // b))
    tl = types.SimpleNamespace(constexpr=None)

# =====================================================================================================
# 1. Log-probs and entropy of softmax(hidden @ weight.T / T)
# =====================================================================================================
# Notation (per row, one token): a = W h (raw logits [V]), z = a / T, lse = logsumexp(z),
# p = softmax(z), logp = z[target] - lse, H = -sum_j p_j log p_j = lse - sum_j p_j z_j.
# Gradients (standard softmax calculus, d p_j / d z_k = p_j (delta_jk - p_k)):
#   d logp / d z = onehot(target) - p
#   d H    / d z = -p * (log p + H)
# so for an upstream (g_logp, g_H) per row: dZ = g_logp (onehot - p) - g_H p (log p + H), dA = dZ / T,
# dX = dA @ W [N, d] and dW = dA^T @ X [V, d]. dA is [N, V]: it only ever exists one tile at a time.


def reference_logprobs(hidden, weight, targets, temperature=1.0):
    """Naive full-logits log-probs and entropy. Computes in fp32 (fp64 for fp64 inputs): the oracle."""
    compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = (hidden.to(compute_dtype) @ weight.to(compute_dtype).T) / temperature   # [N, V]
    log_p = torch.log_softmax(logits, dim=-1)                                          # [N, V]
    logp = log_p.gather(-1, targets[:, None]).squeeze(-1)                              # [N]
    entropy = -(log_p.exp() * log_p).sum(-1)                                           # [N]
    return logp, entropy


@triton.jit
def _online_softmax_update(m, s, u, z_target, z, cols, col_mask, target):
    """One vocabulary tile z [rows, cols] into the running (max m, s = sum e^(z-m), u = sum e^(z-m)(z-m),
    z[target]) of each row; shared by the fused forward and the chunked path's slab kernel."""
    z = tl.where(col_mask[None, :], z, float("-inf"))                           # padding columns: p = 0
    m_new = tl.maximum(m, tl.max(z, axis=1))                                    # [rows]
    alpha = tl.exp(m - m_new)
    z_minus_m = z - m_new[:, None]                                              # [rows, cols]
    e = tl.exp(z_minus_m)                                                       # 0 on padding columns
    s_tile = tl.sum(e, axis=1)
    u_tile = tl.sum(e * tl.where(col_mask[None, :], z_minus_m, 0.0), axis=1)   # not 0 * -inf = nan
    u = alpha * (u + (m - m_new) * s) + u_tile
    s = alpha * s + s_tile
    is_target = cols[None, :] == target[:, None]                                # [rows, cols]
    z_target += tl.sum(tl.where(is_target, z, 0.0), axis=1)
    return m_new, s, u, z_target


@triton.jit
def _d_logits(z, lse, entropy, g_logp, g_entropy, is_target, inv_temperature):
    """dA = [g_logp (onehot - p) - g_H p (log p + H)] / T for a tile z = a / T with log p = z - lse (lse,
    H, g_logp, g_H per row); shared by the fused backward and the chunked path's slab kernel."""
    log_p = z - lse[:, None]                                                    # [rows, cols]
    p = tl.exp(log_p)
    d_z = g_logp[:, None] * (is_target.to(tl.float32) - p) - g_entropy[:, None] * p * (log_p + entropy[:, None])
    return d_z * inv_temperature


@triton.jit
def _logprob_fwd_kernel(
    hidden_ptr,         # [N, D] fp32 or bf16, contiguous: final hidden states of the response tokens
    weight_ptr,         # [V, D] same dtype, contiguous: lm_head weight
    targets_ptr,        # [N] int64: token whose log-prob we want, 0 <= target < V
    partial_ptr,        # [4, NUM_SPLITS, N] fp32 out: per vocabulary split, for each row
                        #   m = max z, s = sum exp(z - m), u = sum exp(z - m)(z - m), z[target] (0 if not in split)
    N,                  # number of rows (runtime: changes every call)
    inv_temperature,    # 1 / T, fp32
    D: tl.constexpr,    # hidden size (constexpr: fixed per model, makes every loop bound static)
    V: tl.constexpr,    # vocabulary size
    NUM_SPLITS: tl.constexpr,       # vocabulary split in this many ranges, one program each (parallelism at small N)
    BLOCK_N: tl.constexpr,          # rows per program
    BLOCK_V: tl.constexpr,          # vocabulary columns per tile
    BLOCK_D: tl.constexpr,          # hidden dims per tl.dot step
    CAST_TO_FP32: tl.constexpr,     # cast tiles to fp32 after loading (interpreter: its bf16 math is wrong)
    DOT_PRECISION: tl.constexpr,    # "ieee" for fp32 inputs (tf32 would miss 1e-5), None (default) for bf16
):
    # Program (row block, vocabulary split) streams over the split's tiles of z = X W^T / T, keeping an
    # online log-sum-exp (Milakov & Gimelshein 2018) extended with u = sum e^(z-m) (z-m) for the entropy:
    # when the running max moves m -> m' (alpha = e^(m - m')):
    #   s' = alpha s,   u' = alpha (u + (m - m') s)      [since e^(z-m')(z-m') = alpha e^(z-m)((z-m) + (m-m'))]
    # and at the end lse = m + log s, H = log s - u / s. u keeps values relative to the max, so H does
    # not come from cancelling two large numbers (lse - E[z]) as the textbook formula would.
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                             # [BLOCK_N]
    row_mask = rows < N
    rows64 = rows.to(tl.int64)                                                  # N * D may pass 2^31
    target = tl.load(targets_ptr + rows, mask=row_mask, other=-1)               # [BLOCK_N] int64

    # running max starts finite, not at -inf, so that rescaling an empty accumulator, (m - m') * s,
    # is finite * 0 = 0 rather than -inf * 0 = nan; no real logit comes near -1e30
    m = tl.full([BLOCK_N], -1e30, tl.float32)                                   # running max of z
    s = tl.zeros([BLOCK_N], tl.float32)                                         # sum e^(z - m)
    u = tl.zeros([BLOCK_N], tl.float32)                                         # sum e^(z - m) (z - m)
    z_target = tl.zeros([BLOCK_N], tl.float32)

    TILES_PER_SPLIT: tl.constexpr = ((V + BLOCK_V - 1) // BLOCK_V + NUM_SPLITS - 1) // NUM_SPLITS
    for tile in range(TILES_PER_SPLIT):
        cols = (split * TILES_PER_SPLIT + tile) * BLOCK_V + tl.arange(0, BLOCK_V)   # [BLOCK_V]
        col_mask = cols < V
        cols64 = cols.to(tl.int64)
        # logits tile: acc = X[rows, :] @ W[cols, :]^T, accumulated over D in fp32
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)                                   # [BLOCK_D]
            x = tl.load(hidden_ptr + rows64[:, None] * D + dims[None, :],
                        mask=row_mask[:, None] & (dims[None, :] < D), other=0.0)    # [BLOCK_N, BLOCK_D]
            w = tl.load(weight_ptr + cols64[:, None] * D + dims[None, :],
                        mask=col_mask[:, None] & (dims[None, :] < D), other=0.0)    # [BLOCK_V, BLOCK_D]
            if CAST_TO_FP32:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)   # [BLOCK_N, BLOCK_V]
        z = acc * inv_temperature                                               # [BLOCK_N, BLOCK_V]
        m, s, u, z_target = _online_softmax_update(m, s, u, z_target, z, cols, col_mask, target)

    # partial_ptr[k, split, row]: four [NUM_SPLITS, N] planes
    out = partial_ptr + split * N + rows
    tl.store(out + 0 * NUM_SPLITS * N, m, mask=row_mask)
    tl.store(out + 1 * NUM_SPLITS * N, s, mask=row_mask)
    tl.store(out + 2 * NUM_SPLITS * N, u, mask=row_mask)
    tl.store(out + 3 * NUM_SPLITS * N, z_target, mask=row_mask)


@triton.jit
def _logprob_bwd_kernel(
    hidden_ptr,         # [N, D] fp32 or bf16, contiguous
    weight_ptr,         # [V, D] same dtype, contiguous
    targets_ptr,        # [N] int64
    lse_ptr,            # [N] fp32: log-sum-exp of z, saved by the forward
    entropy_ptr,        # [N] fp32: H, saved by the forward
    grad_logp_ptr,      # [N] fp32: dL/dlogp
    grad_entropy_ptr,   # [N] fp32: dL/dH
    grad_hidden_ptr,    # [N, D] fp32, zero on entry: dX is atomically accumulated here
    grad_weight_ptr,    # [V, D] fp32, zero on entry: dW is atomically accumulated here
    N,                  # number of rows
    inv_temperature,    # 1 / T
    D: tl.constexpr,    # hidden size
    V: tl.constexpr,    # vocabulary size
    BLOCK_N: tl.constexpr,          # rows per tile
    BLOCK_V: tl.constexpr,          # vocabulary columns per tile
    BLOCK_D: tl.constexpr,          # hidden dims per tl.dot step
    GROUP_N: tl.constexpr,          # row blocks per launch group (L2 reuse + spreads atomic contention)
    COMPUTE_DX: tl.constexpr,       # hidden needs a gradient
    COMPUTE_DW: tl.constexpr,       # weight needs a gradient (False for a frozen lm_head)
    CAST_TO_FP32: tl.constexpr,     # interpreter: fp32 math throughout
    DOT_PRECISION: tl.constexpr,    # "ieee" for fp32 inputs
):
    # One program per (row block, vocabulary block) tile, like a matmul grid. It recomputes the logits
    # tile (2 BN BV D flops), forms dA = [g_logp (onehot - p) - g_H p (log p + H)] / T from the saved
    # lse and H, and adds dA @ W_tile to dX[rows] and dA^T @ X_rows to dW[cols] (2 x 2 BN BV D flops):
    # 8 N V D flops for forward + backward, the count the benchmark uses.
    # Why atomics: a program cannot own a [BLOCK_N, D] dX block in registers (D up to 4096), and owning
    # it in a loop over V would mean recomputing the logits once per D block. fp32 atomic adds to L2 cost
    # (BN + BV) D adds per 6 BN BV D flops; the price is non-deterministic summation order (ulp-level).
    # Alternative: materialise a bounded dA slab and use cuBLAS, as the chunked path below does; it holds
    # O(slab) more memory, and on an H200 its forward + backward ran 1.8-2.1x faster than these kernels'
    # (README, Performance).
    # Not done: skipping tiles whose |dA| is below bf16 resolution (Cut Cross-Entropy's gradient
    # filtering), a large speed-up on peaked distributions that changes numerics slightly.
    pid = tl.program_id(0)
    num_row_blocks = tl.cdiv(N, BLOCK_N)
    NUM_COL_BLOCKS: tl.constexpr = (V + BLOCK_V - 1) // BLOCK_V
    # grouped ordering (Triton matmul tutorial): consecutive programs walk GROUP_N row blocks x all columns
    programs_per_group = GROUP_N * NUM_COL_BLOCKS
    group = pid // programs_per_group
    first_row_block = group * GROUP_N
    group_rows = min(num_row_blocks - first_row_block, GROUP_N)
    pid_n = first_row_block + (pid % programs_per_group) % group_rows
    pid_v = (pid % programs_per_group) // group_rows

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                             # [BLOCK_N]
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)                             # [BLOCK_V]
    row_mask = rows < N
    col_mask = cols < V
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)

    # recompute the logits tile (same loop as the forward)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(hidden_ptr + rows64[:, None] * D + dims[None, :],
                    mask=row_mask[:, None] & (dims[None, :] < D), other=0.0)        # [BLOCK_N, BLOCK_D]
        w = tl.load(weight_ptr + cols64[:, None] * D + dims[None, :],
                    mask=col_mask[:, None] & (dims[None, :] < D), other=0.0)        # [BLOCK_V, BLOCK_D]
        if CAST_TO_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    z = acc * inv_temperature                                                   # [BLOCK_N, BLOCK_V]

    target = tl.load(targets_ptr + rows, mask=row_mask, other=-1)               # [BLOCK_N]
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    entropy = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
    g_logp = tl.load(grad_logp_ptr + rows, mask=row_mask, other=0.0)
    g_entropy = tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0)

    # padding rows (x = 0, g = 0) contribute nothing below. Padding columns have z = 0, so p = exp(-lse) there,
    # which is inf once every real logit / T is below about -88: they are zeroed, else dX = inf * (w = 0) = NaN.
    d_a = _d_logits(z, lse, entropy, g_logp, g_entropy, cols[None, :] == target[:, None],
                    inv_temperature)                                            # [BLOCK_N, BLOCK_V]
    d_a = tl.where(col_mask[None, :], d_a, 0.0)
    if not CAST_TO_FP32:
        d_a = d_a.to(weight_ptr.dtype.element_ty)    # bf16 tensor-core dots on the GPU, fp32 accumulate

    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_mask = dims < D
        if COMPUTE_DX:
            w = tl.load(weight_ptr + cols64[:, None] * D + dims[None, :],
                        mask=col_mask[:, None] & dim_mask[None, :], other=0.0)      # [BLOCK_V, BLOCK_D]
            if CAST_TO_FP32:
                w = w.to(tl.float32)
            d_x = tl.dot(d_a, w, input_precision=DOT_PRECISION)                  # [BLOCK_N, BLOCK_D]
            tl.atomic_add(grad_hidden_ptr + rows64[:, None] * D + dims[None, :], d_x,
                          mask=row_mask[:, None] & dim_mask[None, :], sem="relaxed")
        if COMPUTE_DW:
            x = tl.load(hidden_ptr + rows64[:, None] * D + dims[None, :],
                        mask=row_mask[:, None] & dim_mask[None, :], other=0.0)      # [BLOCK_N, BLOCK_D]
            if CAST_TO_FP32:
                x = x.to(tl.float32)
            d_w = tl.dot(tl.trans(d_a), x, input_precision=DOT_PRECISION)        # [BLOCK_V, BLOCK_D]
            tl.atomic_add(grad_weight_ptr + cols64[:, None] * D + dims[None, :], d_w,
                          mask=col_mask[:, None] & dim_mask[None, :], sem="relaxed")


# ----------------------------------------------------------------------------- launchers
# Tiles (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages). CUDA: autotuned once per key (the forward's D, V,
# NUM_SPLITS; the backward's D, slice width V and its COMPUTE_DX/DW flags; Triton adds the dtypes) over
# a few bf16 matmul-style tiles (fp32 inputs may exceed shared memory on some; the autotuner skips
# those). Elsewhere, i.e. the interpreter, which cannot autotune over several configs: one tile,
# large because the interpreter's cost is per tile operation, not per flop.
_CUDA_FWD_TILES = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 4, 4), (128, 128, 128, 8, 2)]
_CUDA_BWD_TILES = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3)]
_INTERPRETER_TILE = dict(BLOCK_N=64, BLOCK_V=512, BLOCK_D=128)
_ROWS_PER_PROGRAM_GUESS = 128    # to size the vocabulary split before the autotuner picks BLOCK_N

if HAS_TRITON:
    def _configs(tiles):
        return [triton.Config(dict(BLOCK_N=n, BLOCK_V=v, BLOCK_D=d), num_warps=w, num_stages=s)
                for n, v, d, w, s in tiles]

    _logprob_fwd_autotuned = triton.autotune(_configs(_CUDA_FWD_TILES), key=["D", "V", "NUM_SPLITS"])(
        _logprob_fwd_kernel)
    # the backward accumulates with atomics (and dX over vocabulary slices, see below), so every trial
    # config must see, and leave, the buffers as they were: restore_value, not reset_to_zero
    _logprob_bwd_autotuned = triton.autotune(_configs(_CUDA_BWD_TILES), key=["D", "V", "COMPUTE_DX", "COMPUTE_DW"],
                                             restore_value=["grad_hidden_ptr", "grad_weight_ptr"])(_logprob_bwd_kernel)


def _compiled(hidden):
    """True when the kernels are compiled for a GPU, False under the interpreter (CPU or TRITON_INTERPRET=1)."""
    return hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


def _kernel_and_tile(hidden, autotuned, plain):
    return (autotuned, {}) if _compiled(hidden) else (plain, _INTERPRETER_TILE)


def _dtype_options(hidden):
    return dict(CAST_TO_FP32=not _compiled(hidden) or hidden.dtype == torch.float32,
                DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else None)


def _check_inputs(hidden, weight, targets):
    assert hidden.dim() == 2 and weight.dim() == 2, "hidden [N, d], weight [V, d]"
    assert hidden.shape[1] == weight.shape[1], f"hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)}"
    assert targets.shape == (hidden.shape[0],) and targets.dtype == torch.int64, "targets [N] int64"
    assert hidden.dtype == weight.dtype and hidden.dtype in (torch.float32, torch.bfloat16)
    assert hidden.device == weight.device == targets.device


def _triton_forward(hidden, weight, targets, temperature, num_splits=None, partial=None):
    """-> (logp [N], entropy [N], lse [N]) fp32. partial: optional [4, num_splits, N] fp32 buffer for
    the per-split statistics (tests pass a NaN-poisoned one)."""
    _check_inputs(hidden, weight, targets)
    assert hidden.is_contiguous() and weight.is_contiguous() and targets.is_contiguous()
    (N, D), V = hidden.shape, weight.shape[0]
    if num_splits is None:   # on a GPU, aim at >= 2 programs per SM at small N (at most 16 splits, at least 256
        # columns each); a power of 2 (below V = 4096: V / 256) bounds the recompiles
        sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count if _compiled(hidden) else 0
        wanted = triton.cdiv(2 * sms, triton.cdiv(max(N, 1), _ROWS_PER_PROGRAM_GUESS))  # N = 0: empty micro-batch
        num_splits = min(1 << max(wanted - 1, 0).bit_length(), 16, triton.cdiv(V, 256))
    if partial is None:
        partial = torch.empty(4, num_splits, N, dtype=torch.float32, device=hidden.device)
    assert partial.shape == (4, num_splits, N) and partial.dtype == torch.float32 and partial.is_contiguous()
    if N > 0:
        kernel, tile = _kernel_and_tile(hidden, _logprob_fwd_autotuned, _logprob_fwd_kernel)
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), num_splits)  # noqa: E731
        kernel[grid](hidden, weight, targets, partial, N, 1.0 / temperature, D=D, V=V, NUM_SPLITS=num_splits,
                     **tile, **_dtype_options(hidden))
    # merge the splits (elementwise on [num_splits, N], negligible next to the kernel)
    m_k, s_k, u_k, z_target_k = partial.unbind(0)                               # each [S, N]
    m = m_k.max(dim=0).values                                                   # [N]
    scale = torch.exp(m_k - m)                                                  # [S, N]
    s = (scale * s_k).sum(0)                                                    # [N]
    u = (scale * (u_k + (m_k - m) * s_k)).sum(0)                                # [N]
    lse = m + torch.log(s)
    entropy = torch.log(s) - u / s
    logp = z_target_k.sum(0) - lse
    return logp, entropy, lse


# The fp32 dW buffer would be [V, d] (1.7 GB at the 7B shape, next to a 0.8 GB bf16 gradient). The backward
# therefore runs over vocabulary slices weight[v0:v1], each with its own fp32 buffer that is cast into the
# output right after: the slice is an ordinary [V', d] problem with targets shifted by -v0 (targets outside
# never match a column) and the same global lse and H. Every logits tile is still computed exactly once.
TRITON_DW_SLICE_BYTES = 256 * 2**20


def _triton_backward(hidden, weight, targets, temperature, lse, entropy, grad_logp, grad_entropy,
                     compute_dx=True, compute_dw=True):
    """-> (grad_hidden [N, d] fp32 or None, grad_weight [V, d] in weight's dtype or None)."""
    _check_inputs(hidden, weight, targets)
    (N, D), V = hidden.shape, weight.shape[0]
    for t in (lse, entropy, grad_logp, grad_entropy):
        assert t.shape == (N,) and t.dtype == torch.float32 and t.is_contiguous()
    # fp32 accumulation even for bf16 inputs: each element receives V / BLOCK_V (dX) or N / BLOCK_N (dW) adds
    grad_hidden = torch.zeros(N, D, dtype=torch.float32, device=hidden.device) if compute_dx else None  # [N, d]
    grad_weight = torch.zeros_like(weight) if compute_dw else None     # [V, d] output, weight's dtype
    if N == 0 or not (compute_dx or compute_dw):
        return grad_hidden, grad_weight
    kernel, tile = _kernel_and_tile(hidden, _logprob_bwd_autotuned, _logprob_bwd_kernel)
    cols_per_slice = V if not compute_dw else max(512, TRITON_DW_SLICE_BYTES // (4 * D) // 512 * 512)
    for v0 in range(0, V, cols_per_slice):
        weight_slice = weight[v0:v0 + cols_per_slice]                                   # [V', d] view
        V_slice = weight_slice.shape[0]
        if compute_dw and weight.dtype == torch.float32:
            grad_weight_slice = grad_weight[v0:v0 + V_slice]                            # accumulate in place
        elif compute_dw:
            grad_weight_slice = torch.zeros(V_slice, D, dtype=torch.float32, device=hidden.device)
        unused = grad_hidden if compute_dx else grad_weight_slice    # stands in for a buffer a False flag skips
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(V_slice, meta["BLOCK_V"]),)  # noqa: E731
        kernel[grid](hidden, weight_slice, targets - v0, lse, entropy, grad_logp, grad_entropy,
                     grad_hidden if compute_dx else unused, grad_weight_slice if compute_dw else unused,
                     N, 1.0 / temperature, D=D, V=V_slice, GROUP_N=8, COMPUTE_DX=compute_dx,
                     COMPUTE_DW=compute_dw, **tile, **_dtype_options(hidden))
        if compute_dw and weight.dtype != torch.float32:
            grad_weight[v0:v0 + V_slice] = grad_weight_slice                            # round to bf16
    return grad_hidden, grad_weight


# ----------------------------------------------------------------------------- chunked path
# Same math on slabs of the logits: the matmuls go to cuBLAS (torch.mm), the softmax algebra to two
# small Triton kernels ("chunked" backend) or to torch ops ("torch" backend: the CPU fallback). Peak
# extra memory is one slab, bounded (_slab_bytes): O(N V) only while N V is below the slab's floor. Why this is the default on a GPU although the fused kernels
# hold less at large N: cuBLAS runs the 8 N d V flops near the chip's matmul rate, which the fused Triton tiles do
# not reach (README, Performance: measured side by side on an H200).
#   forward:  row slabs   a = X[rows] W^T [C, V] fp32 -> logp, H, lse of those rows (complete rows)
#   backward: vocab slabs a = X W[cols]^T [N, C] fp32 -> dA [N, C] (matmul dtype), then
#             dW[cols] = dA^T X  (one matmul over all N rows: exact fp32 accumulation, one rounding)
#             dX      += dA W[cols]  (fp32 accumulator [N, d]; each slab's product is in the matmul dtype)
# Vocabulary slabs in the backward because dW [V, d] is the larger gradient at V >> d: each of its
# slices is written once instead of accumulated over row slabs.
TORCH_CHUNK_BYTES = 32 * 2**20                   # CPU: fp32 bytes of one slab (1024 rows at V = 8192)
CUDA_SLAB_BYTES = (64 * 2**20, 2**30)            # GPU: slab bytes between these bounds, ...
CUDA_SLABS = 16                                  # ... aiming at this many slabs (fewer re-reads of dX)
_MM_FP32_OUT = None                              # torch.mm(..., out_dtype=float32) works here (probed once)


def _slab_bytes(hidden, N, V):
    if not hidden.is_cuda:
        return TORCH_CHUNK_BYTES
    low, high = CUDA_SLAB_BYTES
    return min(max(4 * N * V // CUDA_SLABS, low), high)


def _logits_fp32(x, w):
    """x [M, d] @ w.T [d, C] -> fp32 [M, C]. On a GPU with bf16 inputs cuBLAS writes fp32 directly
    (out_dtype, torch >= 2.9): bf16-rounded logits would cost ~1e-3 of log-prob accuracy, as naive has."""
    global _MM_FP32_OUT
    if x.is_cuda and x.dtype != torch.float32:
        if _MM_FP32_OUT is None:
            try:
                torch.mm(x[:1], w[:1].T, out_dtype=torch.float32)
                _MM_FP32_OUT = True
            except (TypeError, RuntimeError, NotImplementedError):
                _MM_FP32_OUT = False
                warnings.warn("torch.mm(..., out_dtype=torch.float32) is unavailable (torch < 2.9): the chunked "
                              "log-probs round the logits to bf16 before the softmax (~1e-3 error, as naive has)")
        if _MM_FP32_OUT:
            return torch.mm(x, w.T, out_dtype=torch.float32)
    return (x @ w.T).float()


def _slab_stats_torch(a, targets, temperature):
    """a [C, V] fp32 raw logits of C complete rows -> (logp, entropy, lse), each [C]. `a` is overwritten with
    log p, which FusedPPOLoss's torch branch then turns into dA (_grad_from_log_p_torch)."""
    z = a.mul_(1.0 / temperature)                                               # [C, V]
    lse = torch.logsumexp(z, dim=-1)                                            # [C]
    log_p = z.sub_(lse[:, None])                                                # [C, V], in place
    logp = log_p.gather(1, targets[:, None]).squeeze(1)
    entropy = -(log_p.exp().mul_(log_p)).sum(-1)
    return logp, entropy, lse


def _slab_grad_torch(a, col0, targets, temperature, lse, entropy, grad_logp, grad_entropy, out_dtype):
    """a [N, C] fp32 raw logits of vocabulary columns col0 .. col0 + C (overwritten) -> dA [N, C]."""
    log_p = a.mul_(1.0 / temperature).sub_(lse[:, None])                        # [N, C]
    return _grad_from_log_p_torch(log_p, col0, targets, temperature, entropy, grad_logp, grad_entropy, out_dtype)


def _grad_from_log_p_torch(log_p, col0, targets, temperature, entropy, grad_logp, grad_entropy, out_dtype):
    """log_p [N, C] fp32 log-probabilities of columns col0 .. col0 + C (overwritten) -> dA [N, C]."""
    p = log_p.exp()                                                             # [N, C]
    # dZ = g_logp (onehot - p) - g_H p (log p + H), written to reuse the two slabs
    d_z = log_p.add_(entropy[:, None]).mul_(grad_entropy[:, None]).add_(grad_logp[:, None])
    d_z = d_z.mul_(p).neg_()                                                    # -p (g_logp + g_H (log p + H))
    inside = (targets >= col0) & (targets < col0 + p.shape[1])                  # [N]: target in this slab
    local = (targets - col0).clamp_(0, p.shape[1] - 1)
    d_z.scatter_add_(1, local[:, None], (grad_logp * inside)[:, None])          # + g_logp onehot
    return d_z.mul_(1.0 / temperature).to(out_dtype)


@triton.jit
def _slab_stats_kernel(
    logits_ptr,         # [M, V] fp32, contiguous: raw logits a = X W^T of M complete rows
    targets_ptr,        # [M] int64
    logp_ptr,           # [M] fp32 out: z[target] - lse
    entropy_ptr,        # [M] fp32 out: H
    lse_ptr,            # [M] fp32 out: logsumexp(z), z = a / T
    M,                  # rows in the slab
    inv_temperature,    # 1 / T
    V: tl.constexpr,    # columns (constexpr: a static loop bound)
    BLOCK_M: tl.constexpr,          # rows per program
    BLOCK_C: tl.constexpr,          # columns per step
):
    # The fused forward's online softmax, reading the logits from memory instead of computing them:
    # one pass over the slab (4 bytes per logit), a memory-bound reduction.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)                   # [BLOCK_M]
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    target = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    m = tl.full([BLOCK_M], -1e30, tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    u = tl.zeros([BLOCK_M], tl.float32)
    z_target = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, V, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)                                       # [BLOCK_C]
        col_mask = cols < V
        a = tl.load(logits_ptr + rows64[:, None] * V + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)      # [BLOCK_M, BLOCK_C]
        m, s, u, z_target = _online_softmax_update(m, s, u, z_target, a * inv_temperature, cols, col_mask,
                                                   target)
    lse = m + tl.log(s)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(entropy_ptr + rows, tl.log(s) - u / s, mask=row_mask)
    tl.store(logp_ptr + rows, z_target - lse, mask=row_mask)


@triton.jit
def _slab_grad_kernel(
    logits_ptr,         # [N, C] fp32, contiguous: raw logits of vocabulary columns col0 .. col0 + C
    d_logits_ptr,       # [N, C] out, the matmul dtype (bf16 / fp32): dA = dL/da
    targets_ptr,        # [N] int64
    lse_ptr,            # [N] fp32: saved by the forward
    entropy_ptr,        # [N] fp32: saved by the forward
    grad_logp_ptr,      # [N] fp32: dL/dlogp
    grad_entropy_ptr,   # [N] fp32: dL/dH
    N,                  # rows
    C,                  # columns in this slab
    col0,               # vocabulary index of column 0
    inv_temperature,    # 1 / T
    BLOCK_M: tl.constexpr,          # rows per program
    BLOCK_C: tl.constexpr,          # columns per program
):
    # Elementwise: read a (4 bytes), write dA (2 bytes in bf16); the formula is the fused backward's.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)                   # [BLOCK_M]
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)                   # [BLOCK_C]
    row_mask = rows < N
    mask = row_mask[:, None] & (cols[None, :] < C)
    offsets = rows.to(tl.int64)[:, None] * C + cols[None, :]                    # [BLOCK_M, BLOCK_C]
    a = tl.load(logits_ptr + offsets, mask=mask, other=0.0)
    target = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    entropy = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
    g_logp = tl.load(grad_logp_ptr + rows, mask=row_mask, other=0.0)
    g_entropy = tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0)
    d_a = _d_logits(a * inv_temperature, lse, entropy, g_logp, g_entropy,
                    (col0 + cols)[None, :] == target[:, None], inv_temperature)
    tl.store(d_logits_ptr + offsets, d_a.to(d_logits_ptr.dtype.element_ty), mask=mask)


# Slab kernel tiles: GPU, one row x 2048 columns per program (8 KiB of fp32 per step, 8 warps: 16-byte
# loads), one program per row so that even a 500-row slab gives every SM several programs to overlap;
# the interpreter, bigger tiles because it pays per program.
_SLAB_TILE = dict(BLOCK_M=1, BLOCK_C=2048, num_warps=8)
_SLAB_TILE_INTERPRETER = dict(BLOCK_M=16, BLOCK_C=512)


def _slab_tile(a):
    return _SLAB_TILE if _compiled(a) else _SLAB_TILE_INTERPRETER


def _slab_stats_triton(a, targets, temperature):
    M, V = a.shape
    assert a.dtype == torch.float32 and a.is_contiguous() and targets.shape == (M,)
    logp, entropy, lse = (torch.empty(M, dtype=torch.float32, device=a.device) for _ in range(3))
    tile = _slab_tile(a)
    _slab_stats_kernel[(triton.cdiv(M, tile["BLOCK_M"]),)](a, targets, logp, entropy, lse, M, 1.0 / temperature,
                                                          V=V, **tile)
    return logp, entropy, lse


def _slab_grad_triton(a, col0, targets, temperature, lse, entropy, grad_logp, grad_entropy, out_dtype):
    N, C = a.shape
    assert a.dtype == torch.float32 and a.is_contiguous()
    for t in (targets, lse, entropy, grad_logp, grad_entropy):
        assert t.shape == (N,) and t.is_contiguous()
    d_a = torch.empty(N, C, dtype=out_dtype, device=a.device)                   # [N, C]
    tile = _slab_tile(a)
    grid = (triton.cdiv(N, tile["BLOCK_M"]), triton.cdiv(C, tile["BLOCK_C"]))
    _slab_grad_kernel[grid](a, d_a, targets, lse, entropy, grad_logp, grad_entropy, N, C, col0, 1.0 / temperature,
                            **tile)
    return d_a


def _chunked_forward(hidden, weight, targets, temperature, triton_slabs):
    _check_inputs(hidden, weight, targets)
    N, V = hidden.shape[0], weight.shape[0]
    slab_stats = _slab_stats_triton if triton_slabs else _slab_stats_torch
    logp, entropy, lse = (torch.empty(N, dtype=torch.float32, device=hidden.device) for _ in range(3))
    rows = max(1, _slab_bytes(hidden, N, V) // (4 * V))
    for r0 in range(0, N, rows):
        sl = slice(r0, r0 + rows)
        a = _logits_fp32(hidden[sl], weight)                                    # [C, V] fp32
        logp[sl], entropy[sl], lse[sl] = slab_stats(a, targets[sl], temperature)
        del a                            # free the slab before the next matmul allocates one
    return logp, entropy, lse


def _chunked_backward(hidden, weight, targets, temperature, lse, entropy, grad_logp, grad_entropy,
                      compute_dx=True, compute_dw=True, triton_slabs=False):
    """-> (grad_hidden [N, d] fp32 or None, grad_weight [V, d] in weight's dtype or None)."""
    N, V = hidden.shape[0], weight.shape[0]
    slab_grad = _slab_grad_triton if triton_slabs else _slab_grad_torch
    grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if compute_dx else None     # [N, d]
    grad_weight = torch.empty_like(weight) if compute_dw else None                         # [V, d]
    if N == 0:                           # no rows: dW is zero, and there is nothing to recompute
        return grad_hidden, grad_weight.zero_() if compute_dw else None
    cols = max(1, _slab_bytes(hidden, N, V) // (4 * N))
    for c0 in range(0, V, cols):
        w = weight[c0:c0 + cols]                                                # [C, d] view
        a = _logits_fp32(hidden, w)                                             # [N, C] fp32
        d_a = slab_grad(a, c0, targets, temperature, lse, entropy, grad_logp, grad_entropy,
                        hidden.dtype)                                           # [N, C], matmul dtype
        del a
        if compute_dw:
            torch.mm(d_a.T, hidden, out=grad_weight[c0:c0 + w.shape[0]])        # [C, d]
        if compute_dx:
            grad_hidden += d_a @ w                                              # [N, d]
        del d_a
    return grad_hidden, grad_weight


# ----------------------------------------------------------------------------- autograd + public API
class FusedLogprobs(torch.autograd.Function):
    """(hidden, weight) -> (logp, entropy); saves only inputs and [N] statistics, recomputes in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, backend):
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        if backend == "triton":
            logp, entropy, lse = _triton_forward(hidden, weight, targets, temperature)
        else:
            logp, entropy, lse = _chunked_forward(hidden, weight, targets, temperature, backend == "chunked")
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.backend = temperature, backend
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float().contiguous()
        grad_entropy = torch.zeros_like(lse) if grad_entropy is None else grad_entropy.float().contiguous()
        args = (hidden, weight, targets, ctx.temperature, lse, entropy, grad_logp, grad_entropy,
                ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if ctx.backend == "triton":
            grad_hidden, grad_weight = _triton_backward(*args)
        else:
            grad_hidden, grad_weight = _chunked_backward(*args, triton_slabs=ctx.backend == "chunked")
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def resolve_backend(hidden, backend="auto"):
    if backend == "auto":
        # the interpreter runs kernels ~1000x slower than torch: tests ask for the Triton backends explicitly
        backend = "chunked" if HAS_TRITON and hidden.is_cuda else "torch"
    assert backend in ("chunked", "triton", "torch", "reference"), backend
    return backend


def fused_logprobs(hidden, weight, targets, temperature=1.0, backend="auto"):
    """hidden [N, d] (fp32 or bf16), weight [V, d] (lm_head weight, same dtype), targets [N] int64.
    Returns (logp [N] fp32, entropy [N] fp32) of softmax(hidden @ weight.T / temperature); differentiable
    w.r.t. hidden and weight; holds one bounded slab of the [N, V] logits at a time (backend "reference",
    the naive oracle, holds them all).
    backend: "auto" (chunked for CUDA tensors, else torch); "chunked" (cuBLAS on slabs + Triton slab
    kernels), "triton" (the fused kernels: least memory), "torch" (chunked, torch slab math: the CPU
    fallback), "reference" (naive full logits). The Triton ones run on the CPU only in the interpreter
    (TRITON_INTERPRET=1), for tests."""
    backend = resolve_backend(hidden, backend)
    if backend == "reference":
        logp, entropy = reference_logprobs(hidden, weight, targets, temperature)
        return logp.float(), entropy.float()
    return FusedLogprobs.apply(hidden, weight, targets, float(temperature), backend)


# =====================================================================================================
# 1b. The PPO objective (spec section 5) on top of the log-probs
# =====================================================================================================
# The PPO terms are elementwise in (logp, H), so dL/dlogp and dL/dH are [N] vectors: they are computed
# in torch on [N] tensors (ppo_terms: ~10 elementwise launches, O(N) memory), which keeps the spec's
# formula readable, backend-independent and differentiated by autograd. Two ways to get the [N, V] part:
#   - through fused_logprobs: its backward recomputes the logits (8 N d V matmul flops in all);
#   - gradient in the forward (FusedPPOLoss, the chunked and torch backends, PPO_GRADIENT_IN_FORWARD):
#     dL/dlogp_t depends only on token t's own logp, so one row slab's logits give its loss terms, dL/dlogp
#     by autograd on the slab's [C] vectors, and dZ at once; dX and dW follow, and the backward only scales
#     them (6 N d V flops; 4 with a frozen lm_head, as under LoRA). Liger-Kernel does the same for its
#     cross-entropy. Cost: dW accumulates over the row slabs in an fp32 [V, d] buffer.
# Off by default: on an H100 (2026-11-27, bf16, N=16384) it took 37.0 ms against the recomputing path's 17.8
# at the 1.1B shape and 98.9 against 93.6 at 7B, with 1.7-2.6x its memory. Why was not profiled. Per row slab
# (16 of them) it runs ppo_terms and autograd.grad from the host, and writes a fresh fp32 [V, d] product that
# it adds to the buffer (the recomputing backward writes dW once); both costs grow with the slab count. On a
# CPU it was 1.07-1.3x faster.
PPO_GRADIENT_IN_FORWARD = False
PPO_STATS = ("logp", "ratio", "clipped", "kl", "entropy")   # the [N] tensors ppo_loss returns beside the loss


def reference_ppo_loss(hidden, weight, targets, old_logp, ref_logp, advantages, *, temperature, clip_eps,
                       kl_coef, n_tokens, n_seqs, entropy_coef=0.0):
    """The spec, written literally on full logits (the test oracle). Returns the loss only."""
    logp, entropy = reference_logprobs(hidden, weight, targets, temperature)
    ratio = torch.exp(logp - old_logp)
    pg = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    loss = pg.sum() / n_tokens - entropy_coef * entropy.sum() / n_tokens
    if ref_logp is not None:
        log_ratio_ref = ref_logp - logp
        kl = (torch.exp(log_ratio_ref) - log_ratio_ref - 1).clamp(0.0, 10.0)
        loss = loss + kl_coef * kl.sum() / n_seqs
    return loss


def ppo_terms(logp, entropy, old_logp, ref_logp, advantages, *, clip_eps, kl_coef, n_tokens, n_seqs, entropy_coef):
    """The loss of ppo_loss from the tokens' logp and entropy ([N] fp32, differentiable) -> (loss, stats)."""
    ratio = torch.exp(logp - old_logp)                                                  # [N]
    # max(-A rho, -A clip(rho)) picks the clipped branch exactly when A > 0 and rho > 1 + eps, or
    # A < 0 and rho < 1 - eps; there clip(rho) is constant and the gradient 0. Written with where so the
    # mask is explicit and ties (rho on the boundary) take the unclipped branch: d pg / d logp = -A rho / n_tokens.
    clipped = ((advantages > 0) & (ratio > 1 + clip_eps)) | ((advantages < 0) & (ratio < 1 - clip_eps))
    pg = torch.where(clipped, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps), -advantages * ratio)
    loss = pg.sum() / n_tokens
    if entropy_coef != 0:
        loss = loss - entropy_coef * entropy.sum() / n_tokens
    if ref_logp is not None:
        log_ratio_ref = ref_logp - logp                                                 # [N]
        # k3, clamped per token: d kl / d logp = 1 - exp(ref_logp - logp), and 0 where the clamp holds it at 10
        kl = (torch.exp(log_ratio_ref) - log_ratio_ref - 1).clamp(0.0, 10.0)
        loss = loss + kl_coef * kl.sum() / n_seqs
    else:
        kl = torch.zeros_like(logp)
    stats = dict(logp=logp.detach(), ratio=ratio.detach(), clipped=clipped, kl=kl.detach(),
                 entropy=entropy.detach())
    return loss, stats


class FusedPPOLoss(torch.autograd.Function):
    """(hidden, weight) -> ppo_terms' loss and stats, with dL/dhidden and dL/dweight computed in the forward,
    one row slab of logits at a time. Backward: dL/dhidden = g * the saved dX, likewise dW (g: the loss's
    incoming gradient, 1 for loss.backward())."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, old_logp, ref_logp, advantages, temperature, terms, triton_slabs):
        _check_inputs(hidden, weight, targets)
        N, V = hidden.shape[0], weight.shape[0]
        need_dx, need_dw = ctx.needs_input_grad[:2]
        slab_stats = _slab_stats_triton if triton_slabs else _slab_stats_torch
        grad_hidden = torch.zeros_like(hidden) if need_dx else None                              # [N, d]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        loss, stats = torch.zeros((), dtype=torch.float32, device=hidden.device), []
        rows = max(1, _slab_bytes(hidden, N, V) // (4 * V))          # the slabs of fused_logprobs' forward
        for r0 in range(0, N, rows):
            sl = slice(r0, r0 + rows)
            a = _logits_fp32(hidden[sl], weight)                                        # [C, V] fp32
            logp, entropy, lse = slab_stats(a, targets[sl], temperature)                # [C] each (torch: a = log p)
            with torch.enable_grad():   # dL/dlogp and dL/dH of this slab's tokens: autograd on [C] vectors
                logp, entropy = logp.requires_grad_(), entropy.requires_grad_()
                part, part_stats = ppo_terms(logp, entropy, old_logp[sl], None if ref_logp is None else ref_logp[sl],
                                             advantages[sl], **terms)
                g_logp, g_entropy = torch.autograd.grad(part, (logp, entropy), allow_unused=True)  # H unused: coef 0
            g_logp = g_logp.contiguous()
            g_entropy = torch.zeros_like(lse) if g_entropy is None else g_entropy.contiguous()
            if triton_slabs:
                d_a = _slab_grad_triton(a, 0, targets[sl], temperature, lse, entropy.detach(), g_logp, g_entropy,
                                        hidden.dtype)                                   # [C, V]
            else:
                d_a = _grad_from_log_p_torch(a, 0, targets[sl], temperature, entropy.detach(), g_logp, g_entropy,
                                             hidden.dtype)                              # [C, V]
            del a
            if need_dx:
                grad_hidden[sl] = d_a @ weight                                          # [C, d]
            if need_dw and d_a.dtype == torch.float32:
                grad_weight.addmm_(d_a.T, hidden[sl])                                   # [V, d] += dA^T X, in place
            elif need_dw:
                grad_weight += _logits_fp32(d_a.T, hidden[sl].T)     # bf16 in; fp32 out on a GPU with torch >= 2.9
            del d_a
            loss += part.detach()
            stats.append(part_stats)
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        if stats:
            cat = {k: torch.cat([st[k] for st in stats]) for k in PPO_STATS}
        else:                                                                       # N = 0: no slab ran
            cat = {k: torch.zeros(0, device=hidden.device, dtype=torch.bool if k == "clipped" else torch.float32)
                   for k in PPO_STATS}
        ctx.mark_non_differentiable(*cat.values())
        return (loss, *cat.values())

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad_hidden, grad_weight = ctx.saved_tensors
        # dX and dW were saved in the inputs' dtypes; the scale is applied in fp32 and rounded back once (a
        # bf16 copy of grad_loss would round a scale like 1/3 to 8 bits)
        return (None if grad_hidden is None else (grad_hidden.float() * grad_loss).to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight.float() * grad_loss).to(grad_weight.dtype),
                None, None, None, None, None, None, None)


def ppo_loss(hidden, weight, targets, old_logp, ref_logp, advantages, *, temperature, clip_eps, kl_coef,
             n_tokens, n_seqs, entropy_coef=0.0, backend="auto"):
    """The spec's PPO objective on the response tokens of one micro-batch (all [N] tensors, fp32):
      rho = exp(logp - old_logp)
      pg_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1-eps, 1+eps))                 # token-mean over the MINI-batch
      kl_t = clamp(exp(ref_logp - logp) - (ref_logp - logp) - 1, 0, 10)          # k3; summed per seq, mean over seqs
      loss = sum_t pg_t / n_tokens + kl_coef * sum_t kl_t / n_seqs - entropy_coef * sum_t H_t / n_tokens
    n_tokens / n_seqs count the whole mini-batch, so micro-batch losses sum to the mini-batch loss.
    ref_logp may be None (kl_coef must then be 0). Returns (loss, stats): stats holds DETACHED [N]
    tensors 'logp', 'ratio', 'clipped' (bool: the gradient is zero because of clipping), 'kl', 'entropy'.
    backend as fused_logprobs'; with PPO_GRADIENT_IN_FORWARD, "chunked" and "torch" compute the gradient in
    the forward when one is needed."""
    assert ref_logp is not None or kl_coef == 0, "kl_coef > 0 needs ref_logp"
    assert not any(t is not None and t.requires_grad for t in (old_logp, ref_logp, advantages)), \
        "old_logp, ref_logp and advantages are constants of the loss"
    terms = dict(clip_eps=clip_eps, kl_coef=kl_coef, n_tokens=n_tokens, n_seqs=n_seqs, entropy_coef=entropy_coef)
    backend = resolve_backend(hidden, backend)
    if PPO_GRADIENT_IN_FORWARD and backend in ("chunked", "torch") and torch.is_grad_enabled() \
            and (hidden.requires_grad or weight.requires_grad):
        loss, *stats = FusedPPOLoss.apply(hidden.contiguous(), weight.contiguous(), targets.contiguous(),
                                          old_logp, ref_logp, advantages, float(temperature), terms,
                                          backend == "chunked")
        return loss, dict(zip(PPO_STATS, stats))
    logp, entropy = fused_logprobs(hidden, weight, targets, temperature, backend)      # [N] each
    return ppo_terms(logp, entropy, old_logp, ref_logp, advantages, **terms)


# =====================================================================================
# Section 2: batched prefix sampling -- sample_continuations()
#
# VinePPO's cost is generation: a response of n steps needs K continuations from each of
# its n states s_0 (prompt) ⊂ s_1 ⊂ ... ⊂ s_{n-1}. transformers' generate(num_return_sequences=K)
# would prefill every state K times and keep K copies of every prefix in its KV cache. Here:
#   1. plan:    identical prefixes are merged and nested prefixes are grouped under a longest
#               member (the nest "leader"); one forward over each leader yields the KV of every
#               state in the nest (a state's KV is the leader's KV cut at the state's length);
#   2. decode:  all continuations of all states of a batch of nests decode together, one
#               backbone call on (B, 1) per step. The prefix KV is stored ONCE per nest and read
#               once per step for all of its rows (cascade / Hydragen attention: partial attention
#               over the shared prefix + partial attention over each row's own new tokens, merged
#               with their log-sum-exps); only new tokens get per-row KV.
#   3. stop:    per-row EOS / stop strings / max tokens; finished rows are compacted out of the
#               batch, batches are sized to the free memory, halved on out-of-memory.
# Why finished rows are compacted out rather than replaced by waiting work: a refill would need a
# prefill in mid-batch, a per-row step offset in the new-token cache and (GPU) a new CUDA graph per
# refill. Compaction gets most of the gain (later steps cost only live rows) and the planner packs all
# waiting work into the next batch; the cost is each batch's tail running below full size. On the CPU
# demo all work fits in one batch (nothing waits), and with EOS suppressed (benchmark) there is no tail.
# On a GPU the decode step (HF layers + the Triton cascade kernels) has static shapes between
# compactions, so it is captured once as a CUDA graph; the step counter lives on the device.
# Shape letters: B rows (continuations) in a batch, G nests (groups), R = most rows of any nest, Hq / Hkv
# query / KV heads, nrep = Hq // Hkv, D head dim, P prefix columns, T new-token columns, V vocabulary.
# =====================================================================================
# (transformers is imported inside functions, not at the top of this file: transformers probes for the
# hub's `kernels` package, finds this repo's kernels.py and imports it while transformers is half initialised.)

# Attention backend of the decode steps: "auto" = "triton" on CUDA (with Triton installed), "cpu" (torch's CPU
# flash attention) on a CPU, "torch" (plain matmuls) elsewhere; tests force each one.
SAMPLER_BACKEND = "auto"
SAMPLER_SYNC_EVERY = None  # decode steps between host syncs (stop strings, compaction); None: 8 on CUDA, else 1
SAMPLER_TOP_P_KERNEL = True  # with the "triton" backend, draw with _top_p_sample_kernel (False: the torch sort)
# Share of the free GPU memory one batch's KV may take; the rest is headroom for the prefill's transient cache,
# the logits and sampling scratch, the CUDA graph's pool and fragmentation after a PPO update. On an H100 at
# the 7B config 0.95 ran 2 batches instead of 3 (12-14% more tokens/s) for a freshly loaded model; the default
# stays 0.7 until a run shows the larger batches fit after a PPO update too (if not, a batch retries at half).
SAMPLER_MEMORY_FRACTION = 0.7
# torch.compile each decoder layer for the decode steps: True, False, or "auto" (the default: what an H100
# timed, bf16 weights on a GPU of compute capability 8.0 or newer; _compiles_layers).
# HF runs a layer's norms, rotary embedding, SiLU gate and residual adds as many small kernels per step; on an
# H100 they fall in the "other" profile bucket (with the merges and copies): 43% of the 1.1B decode's device
# time and 31% of the 7B's. Inductor fuses them: on an H100 (2026-11-27) the 1.1B config went from 94k to 121k
# new tokens/s and the 7B from 8.6-8.7k to 9.9-10.0k, after a compile warm-up of 4-12 s. On a CPU it gave no
# steady gain (and 8-23 s of warm-up), hence "auto". The cascade attention and the cache write stay eager
# (_CompiledStepCache), so the Triton kernels and the CUDA graph are unchanged; the compile happens in a
# batch's eager first step. A compile that fails (so far seen only with a stand-in that fails on purpose, on
# the CPU) warns once, and the process decodes with eager layers from then on (_COMPILE_FAILED).
SAMPLER_COMPILE = "auto"
_ATTN_NAME = "vineppo_cascade"
_ACTIVE = []  # the _CascadeCache of the decode step in flight (read by the attention function)
# Counters for tests and benchmarks (reset them freely): batches run, prefill tokens computed (real
# leader tokens / incl. right padding), decode steps, row-steps, KV tokens attended over (prefix once per
# nest + each row's new tokens), compactions, OOM retries.
SAMPLER_STATS = dict(batches=0, prefill_tokens=0, prefill_padded=0, steps=0, row_steps=0, kv_read_tokens=0,
                     compactions=0, oom_retries=0)


# ----------------------------------------------------------------------------- 1. plan
def _nest_leaders(prefixes):
    """Map each distinct prefix (tuple) to its nest leader: a prefix that extends it and is extended by none.
    In lexicographic order every sequence between p and an extension q of p also starts with p, so
    p is extended by something iff it is a prefix of its successor, whose leader is then p's."""
    uniq = sorted(set(map(tuple, prefixes)))
    leader = {}
    for i in range(len(uniq) - 1, -1, -1):
        p = uniq[i]
        nxt = uniq[i + 1] if i + 1 < len(uniq) else ()
        leader[p] = leader[nxt] if nxt[:len(p)] == p and len(nxt) > len(p) else p
    return leader


# ----------------------------------------------------------------------------- 2. attention
def _partial_attention_torch(q, k, v, lens, scale):
    """Attention of q (..., M, D) over the first lens (..., M) columns of k, v (..., T, D).
    Returns the normalised output (..., M, D) fp32 and its log-sum-exp (..., M) (-inf if lens == 0)."""
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # (..., M, T)
    cols = torch.arange(k.shape[-2], device=k.device)
    s = s.masked_fill(cols >= lens.unsqueeze(-1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (..., M)
    p = torch.exp(s - lse.clamp(min=-1e30).unsqueeze(-1))  # all-masked rows -> exp(-inf) = 0
    return torch.matmul(p.to(v.dtype), v).float(), lse


if HAS_TRITON:
    @triton.jit
    def _partial_attention_kernel(Q, K, V, O, LSE, LENS, scale, M, T, D,
                                  sq_n, sq_m, sk_n, sk_t, sv_n, sv_t, sl_n, sl_m, LEN_DIV,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                  UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
        # One program: BLOCK_M queries of one (group or row, KV head) pair n, streaming its keys once
        # (flash-decoding style online softmax); all BLOCK_M queries share every loaded K/V tile.
        n = tl.program_id(0).to(tl.int64)  # int64 offsets: B * Hkv * T * D can pass 2**31
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < M
        q = tl.load(Q + n * sq_n + offs_m[:, None] * sq_m + offs_d[None, :],
                    mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        lens = tl.load(LENS + (n // LEN_DIV) * sl_n + offs_m * sl_m, mask=m_ok, other=0)
        hi = tl.max(lens, axis=0)  # runtime bound: columns past every query's length are skipped
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, hi, BLOCK_N):
            offs_t = start + tl.arange(0, BLOCK_N)
            kv_ok = (offs_t < T)[:, None] & (offs_d[None, :] < D)
            k = tl.load(K + n * sk_n + offs_t[:, None] * sk_t + offs_d[None, :], mask=kv_ok, other=0.0)
            v = tl.load(V + n * sv_n + offs_t[:, None] * sv_t + offs_d[None, :], mask=kv_ok, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # (BLOCK_M, BLOCK_N)
            s = tl.where(offs_t[None, :] < lens[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(O + (n * M + offs_m[:, None]) * D + offs_d[None, :], out, mask=m_ok[:, None] & (offs_d[None, :] < D))
        tl.store(LSE + n * M + offs_m, lse, mask=m_ok)


def _partial_attention_triton(q, k, v, lens, scale, len_div):
    """q (N, M, D), k/v (N, T, D) with unit stride on D; lens int32 indexed [n // len_div, m] via its
    strides (a stride of 0 broadcasts one length to every query). Returns o (N, M, D) fp32, lse (N, M)."""
    N, M, D = q.shape
    o = torch.empty(N, M, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(N, M, device=q.device, dtype=torch.float32)
    tile = _attention_tile(M, D, q.element_size(), q.is_cuda)
    grid = (N, triton.cdiv(M, tile["BLOCK_M"]))
    _partial_attention_kernel[grid](q, k, v, o, lse, lens, scale, M, k.shape[1], D,
                                    q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                    lens.stride(0), lens.stride(1), len_div, **tile, **_attention_dtype_options(q))
    return o, lse


def _attention_dtype_options(q):
    """UPCAST: fp32 math (fp32 inputs; CPU tensors, which only the interpreter runs, and its bf16 math is wrong;
    the tests never give the interpreter CUDA tensors: conftest.py runs `cuda` cases only without it). fp32 inputs get ieee
    dots: tf32's 10-bit mantissa would flip near-tied greedy tokens against the model's own attention."""
    upcast = not q.is_cuda or q.dtype == torch.float32
    return dict(UPCAST=upcast, DOT_PRECISION="ieee" if upcast else None)


def _attention_tile(M, D, element_size, on_gpu):
    """BLOCK_M queries x BLOCK_N keys per tile. On a GPU the K and V tiles live in shared memory (several
    stages deep where Triton pipelines the loads): BLOCK_N x BLOCK_D x element_size is kept <= 16 KiB. With
    that, bf16 and fp32 inputs at head dims 64 and 128 fit a T4's 64 KiB, an A100's 163 KiB and an H100's
    227 KiB: tests/test_kernels_compile.py compiles each tile for sm_75 / sm_80 / sm_90 and checks the shared
    memory it asks for. (BLOCK_N = 64 for fp32 at head dim 128 would need 224 KiB on sm_90, more than an
    A100 has.) The interpreter pays per tile operation; its tiles are small only to bound the padded work."""
    block_d = max(16, triton.next_power_of_2(D))
    if not on_gpu:
        return dict(BLOCK_M=16 if M <= 16 else 32, BLOCK_N=16, BLOCK_D=block_d)
    return dict(BLOCK_M=16 if M <= 16 else 64, BLOCK_N=max(16, min(64, 16384 // (block_d * element_size))),
                BLOCK_D=block_d)


_cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _partial_attention_cpu(q, k, v, mask, empty, scale):
    """torch's CPU flash attention, which also returns the log-sum-exp: q (..., M, D), k/v (..., T, D),
    additive mask (..., M, T) or None; `empty` (..., M) marks queries with no columns (flash gives lse 0)."""
    o, lse = _cpu_flash(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    if empty is not None:
        lse = lse.masked_fill(empty, float("-inf"))
        o = o.masked_fill(empty.unsqueeze(-1), 0.0)
    return o.float(), lse.float()


def _merge_partials_torch(o1, l1, o2, l2, pad_idx, R, out_dtype):
    """One row's attention from its two parts: o1 (G, Hkv, R*nrep, D) / l1 (G, Hkv, R*nrep) over the
    prefix, in the (G, R) slot layout, and o2 (B, Hkv, nrep, D) / l2 (B, Hkv, nrep) over the row's own
    new tokens; row b sits at slot pad_idx[b]. Each part is softmax-normalised over its own columns, so
    the whole is their mix weighted by each part's share of the total exp-mass, exp(lse_i - max):
        out = (o1 w1 + o2 w2) / (w1 + w2),  w_i = exp(l_i - max(l1, l2))
    (l2 is always finite: a row attends to its own last token). Returns (B, Hkv, nrep, D) in out_dtype."""
    G, Hkv, _, D = o1.shape
    nrep = o2.shape[2]
    o1 = o1.view(G, Hkv, R, nrep, D).permute(0, 2, 1, 3, 4).reshape(G * R, Hkv, nrep, D).index_select(0, pad_idx)
    l1 = l1.view(G, Hkv, R, nrep).permute(0, 2, 1, 3).reshape(G * R, Hkv, nrep).index_select(0, pad_idx)
    m = torch.maximum(l1, l2)  # (B, Hkv, nrep)
    w1, w2 = torch.exp(l1 - m).unsqueeze(-1), torch.exp(l2 - m).unsqueeze(-1)
    return ((o1 * w1 + o2 * w2) / (w1 + w2)).to(out_dtype)  # (B, Hkv, nrep, D)


if HAS_TRITON:
    @triton.jit
    def _merge_partials_kernel(O1, L1, O2, L2, PAD, OUT, R, Hkv, NREP, D,
                               BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program: the nrep query heads of one (row b, KV head h). The torch path above makes ~10
        # passes over (B, Hq, D) fp32 tensors per layer (a gather, products, a sum, a division, a cast);
        # this reads o1 (through the slot) and o2 once and writes the output once, in the model's dtype.
        # On an H100 at the 1.1B decode shape (2052 rows, 22 layers): 6.1 ms per step down to 0.70 ms.
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        slot = tl.load(PAD + b)
        g, r = slot // R, slot % R
        j, d = tl.arange(0, BLOCK_J), tl.arange(0, BLOCK_D)
        j_ok = j < NREP
        ok = j_ok[:, None] & (d[None, :] < D)
        i1 = ((g * Hkv + h) * R + r) * NREP + j  # (BLOCK_J,) rows of o1 / l1: slot (g, r), head h
        i2 = (b * Hkv + h) * NREP + j            # (BLOCK_J,) rows of o2 / l2 / OUT
        l1 = tl.load(L1 + i1, mask=j_ok, other=float("-inf"))
        l2 = tl.load(L2 + i2, mask=j_ok, other=0.0)
        m = tl.maximum(l1, l2)
        w1, w2 = tl.exp(l1 - m), tl.exp(l2 - m)
        o1 = tl.load(O1 + i1[:, None] * D + d[None, :], mask=ok, other=0.0)
        o2 = tl.load(O2 + i2[:, None] * D + d[None, :], mask=ok, other=0.0)
        out = (o1 * w1[:, None] + o2 * w2[:, None]) / (w1 + w2)[:, None]
        tl.store(OUT + i2[:, None] * D + d[None, :], out.to(OUT.dtype.element_ty), mask=ok)


def _merge_partials_triton(o1, l1, o2, l2, pad_idx, R, out_dtype):
    """_merge_partials_torch in one kernel; o1, l1, o2, l2 contiguous fp32 as the attention kernel
    writes them."""
    B, Hkv, nrep, D = o2.shape
    out = torch.empty(B, Hkv, nrep, D, device=o2.device, dtype=out_dtype)
    block_j, block_d = triton.next_power_of_2(nrep), triton.next_power_of_2(D)
    _merge_partials_kernel[(B, Hkv)](o1, l1, o2, l2, pad_idx, out, R, Hkv, nrep, D, BLOCK_J=block_j,
                                     BLOCK_D=block_d, num_warps=max(1, min(4, block_j * block_d // 256)))
    return out


def _cascade_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Registered as an HF attention implementation for the decode steps only. query (B, Hq, 1, D);
    key/value are this layer's new-token caches sk/sv (B, Hkv, T, D) from _CascadeCache.update."""
    # Attention variants the cascade does not compute must fail loudly, not be dropped (gpt-oss's sinks, Gemma 2's
    # soft-capping): sample_continuations checks the config, this catches what a config does not say.
    unsupported = [name for name in ("s_aux", "sinks", "softcap", "position_bias") if kwargs.get(name) is not None]
    assert not unsupported, f"the sampler's cascade attention does not support {unsupported}"
    c = _ACTIVE[-1]
    layer = module.layer_idx
    out_dtype, query = query.dtype, query.to(c.pk[layer].dtype)   # _kv_dtype: bf16 under autocast, like SDPA
    B, Hq, _, D = query.shape
    Hkv = c.sk[layer].shape[1]
    nrep, G, R = Hq // Hkv, c.G, c.R
    scale = scaling if scaling is not None else D ** -0.5
    # Prefix part: the queries of a nest's rows are gathered into its slot of a (G, R) layout (holes
    # repeat row 0 with prefix length 0), so the R*nrep queries of a group share one read of its prefix.
    qp = query.reshape(B, Hq, D).index_select(0, c.gather_idx)  # (G*R, Hq, D)
    qp = qp.view(G, R, Hkv, nrep, D).permute(0, 2, 1, 3, 4).reshape(G, Hkv, R * nrep, D)
    pk, pv, sk, sv = c.pk[layer], c.pv[layer], c.sk[layer], c.sv[layer]
    qs = query.reshape(B, Hkv, nrep, D)  # suffix part: each row over its own new tokens
    t1 = c.t + 1
    if c.backend == "triton":
        # reshape, not view: with one query per KV head (nrep 1, e.g. GPT-2) the permuted gather above is
        # not contiguous, and the kernel wants unit stride on D (a copy of the queries only, never the cache)
        o1, l1 = _partial_attention_triton(qp.reshape(G * Hkv, R * nrep, D), pk.view(G * Hkv, -1, D),
                                           pv.view(G * Hkv, -1, D), c.prefix_lens(nrep), scale, Hkv)
        o2, l2 = _partial_attention_triton(qs.reshape(B * Hkv, nrep, D).contiguous(), sk.view(B * Hkv, -1, D),
                                           sv.view(B * Hkv, -1, D), c.slen.view(1, 1).expand(1, nrep), scale, B * Hkv)
        o1, l1 = o1.view(G, Hkv, R * nrep, D), l1.view(G, Hkv, R * nrep)
        o2, l2 = o2.view(B, Hkv, nrep, D), l2.view(B, Hkv, nrep)
    elif c.backend == "cpu":
        mask, empty = c.prefix_mask(nrep)  # (G, 1, R*nrep, P) additive, (G, 1, R*nrep) bool
        o1, l1 = _partial_attention_cpu(qp, pk, pv, mask, empty, scale)  # (G, Hkv, R*nrep, D), (G, Hkv, R*nrep)
        o2, l2 = _partial_attention_cpu(qs, sk[:, :, :t1], sv[:, :, :t1], None, None, scale)  # (B, Hkv, nrep, .)
    else:
        plens = c.prefix_lens(nrep).unsqueeze(1)  # (G, 1, R*nrep)
        o1, l1 = _partial_attention_torch(qp, pk, pv, plens, scale)  # (G, Hkv, R*nrep, D), (G, Hkv, R*nrep)
        o2, l2 = _partial_attention_torch(qs, sk[:, :, :t1], sv[:, :, :t1], plens.new_full((1, 1, 1), t1), scale)
    merge = _merge_partials_triton if c.backend == "triton" else _merge_partials_torch
    return merge(o1, l1, o2, l2, c.pad_idx, R, out_dtype).reshape(B, 1, Hq, D), None



class _CascadeCache:
    """Duck-typed HF cache for the decode steps. Per layer: prefix KV pk/pv (G, Hkv, P, D), one copy
    per nest, and new-token KV sk/sv (B, Hkv, T, D), one per row, written at column t each step.
    Rows are sorted by nest: grp (B,) is each row's nest, plen (B,) the prefix columns it may read."""
    is_compileable = False

    def __init__(self, pk, pv, grp, plen, T, backend):
        self.pk, self.pv, self.grp, self.plen, self.T, self.backend = pk, pv, grp, plen, T, backend
        self.sk, self.sv = [], []
        self.t = 0  # python step counter; t_idx / slen mirror it on the device for CUDA graphs
        self.t_idx = torch.zeros(1, dtype=torch.long, device=plen.device)
        self.slen = torch.ones(1, dtype=torch.int32, device=plen.device)
        self._layout()

    def _layout(self):
        """Place row b at slot pad_idx[b] of a (G, R) grid, R = most rows of any nest."""
        B, dev = len(self.grp), self.grp.device
        self.G = len(self.pk[0])
        counts = torch.bincount(self.grp, minlength=self.G)  # (G,)
        self.R = int(counts.max())
        first = torch.cumsum(counts, 0) - counts  # (G,) first row of each nest
        self.pad_idx = self.grp * self.R + torch.arange(B, device=dev) - first[self.grp]  # (B,)
        self.gather_idx = torch.zeros(self.G * self.R, dtype=torch.long, device=dev)
        self.gather_idx[self.pad_idx] = torch.arange(B, device=dev)  # (G*R,) row in each slot (holes: 0)
        self.grid_plen = torch.zeros(self.G * self.R, dtype=torch.int32, device=dev)
        self.grid_plen[self.pad_idx] = self.plen.to(torch.int32)  # (G*R,) holes read nothing
        self.prefix_read = int(self.grid_plen.view(self.G, self.R).max(1).values.sum())  # for SAMPLER_STATS
        self._plens = self._mask = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # key (B, Hkv, 1, D)
        if layer_idx == len(self.sk):  # first step: allocate this layer's new-token buffers
            shape = (key_states.shape[0], key_states.shape[1], self.T, key_states.shape[3])
            self.sk.append(torch.zeros(shape, dtype=self.pk[0].dtype, device=key_states.device))
            self.sv.append(torch.zeros(shape, dtype=self.pk[0].dtype, device=value_states.device))
        key_states, value_states = key_states.to(self.pk[0].dtype), value_states.to(self.pk[0].dtype)  # _kv_dtype
        if self.backend == "triton":  # device-side column index: CUDA-graph safe
            self.sk[layer_idx].index_copy_(2, self.t_idx, key_states)
            self.sv[layer_idx].index_copy_(2, self.t_idx, value_states)
        else:
            self.sk[layer_idx][:, :, self.t] = key_states[:, :, 0]
            self.sv[layer_idx][:, :, self.t] = value_states[:, :, 0]
        return self.sk[layer_idx], self.sv[layer_idx]

    def get_seq_length(self, layer_idx=0):
        return self.t

    def prefix_lens(self, nrep):  # (G, R*nrep) int32: each slot's prefix length, once per query head
        if self._plens is None or self._plens.shape[1] != self.R * nrep:
            self._plens = self.grid_plen.view(self.G, self.R).repeat_interleave(nrep, dim=1).contiguous()
        return self._plens

    def prefix_mask(self, nrep):  # additive (G, 1, R*nrep, P) mask + (G, 1, R*nrep) "no prefix" flags
        if self._mask is None or self._mask[0].shape[2] != self.R * nrep:
            lens = self.prefix_lens(nrep).unsqueeze(1)  # (G, 1, R*nrep)
            cols = torch.arange(self.pk[0].shape[2], device=lens.device)
            mask = torch.zeros(lens.shape + cols.shape, dtype=self.pk[0].dtype, device=lens.device)
            self._mask = (mask.masked_fill(cols >= lens.unsqueeze(-1), float("-inf")), lens == 0)
        return self._mask

    def advance(self):
        self.t += 1
        self.t_idx += 1
        self.slen += 1

    def select(self, rows):
        """Compaction: keep these rows (sorted index tensor); nests left without rows are dropped."""
        grp = self.grp[rows]
        kept = torch.unique(grp)  # (G',) sorted
        self.pk = [x.index_select(0, kept) for x in self.pk]
        self.pv = [x.index_select(0, kept) for x in self.pv]
        self.sk = [x.index_select(0, rows) for x in self.sk]
        self.sv = [x.index_select(0, rows) for x in self.sv]
        self.grp, self.plen = torch.searchsorted(kept, grp), self.plen[rows]
        self._layout()


# SAMPLER_COMPILE: the attention and the cache write stay out of the compiled layers (graph breaks), so the step's
# python state (_ACTIVE, c.t, the Triton launches) never enters a graph. Only then: the disable wrapper would
# add its own python work to every eager call.
_cascade_attention_eager = torch.compiler.disable(_cascade_attention)


class _CompiledStepCache(_CascadeCache):
    update = torch.compiler.disable(_CascadeCache.update)


# ----------------------------------------------------------------------------- 3. prefill
def _cache_kwarg(fn):
    """transformers >= 5.2x calls the cache `cache=`; older versions `past_key_values=`."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def _layer_kv(cache):
    """[(keys, values)] per layer of a DynamicCache, each (B, Hkv, T, D), across transformers versions."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # pragma: no cover (transformers 4.x)


def _kv_dtype(model, dev):
    """The dtype of every cached key and value, and of the decode attention: the autocast dtype under
    autocast (SDPA would run in it), else the weights'. Under autocast the layers' outputs disagree: an
    fp32 model keeps an fp32 residual stream, its rotary embedding promotes q and k (not v) to fp32, and
    some transformers versions' DynamicCache promotes v too; fp32 keys would also cost 1.5x the memory."""
    if torch.is_autocast_enabled(dev.type):
        return torch.get_autocast_dtype(dev.type)
    return next(model.parameters()).dtype


def _prefill(model, leaders, prefill_tokens):
    """KV of every leader minus its last token (that token is fed as the first decode step, so the
    decode loop's own forward produces the first logits and the prefill needs no LM head).
    Leaders are right-padded: causal attention never lets a real token see the padding after it, so
    no mask is needed, and the pad columns are never read (each row's prefix length masks them).
    Returns per layer pk, pv (G, Hkv, P, D) with P = max(len(leader)) - 1 (>= 1)."""
    from transformers import DynamicCache
    base = model.base_model
    kw = _cache_kwarg(base.forward)
    dev = next(model.parameters()).device
    P = max(1, max(len(L) for L in leaders) - 1)
    ids = torch.zeros(len(leaders), P, dtype=torch.long, device=dev)  # (G, P), pad id 0
    for g, L in enumerate(leaders):
        ids[g, :len(L) - 1] = torch.tensor(L[:-1], dtype=torch.long)
    pk = pv = None
    kv_dtype = _kv_dtype(model, dev)
    SAMPLER_STATS["prefill_tokens"] += sum(len(L) - 1 for L in leaders)
    SAMPLER_STATS["prefill_padded"] += len(leaders) * P
    rows = max(1, prefill_tokens // P)  # chunk the forward to bound activation memory
    for lo in range(0, len(leaders), rows):
        cache = DynamicCache(config=model.config)
        base(input_ids=ids[lo:lo + rows], use_cache=True, **{kw: cache})
        kv = _layer_kv(cache)
        assert all(k.shape[-2] == P for k, _ in kv), "a cache layer dropped prefix columns (sliding window?)"
        if pk is None:  # shapes known now: allocate the whole batch's prefix buffers
            pk = [torch.empty((len(leaders),) + k.shape[1:], dtype=kv_dtype, device=dev) for k, _ in kv]
            pv = [torch.empty((len(leaders),) + v.shape[1:], dtype=kv_dtype, device=dev) for _, v in kv]
        for layer, (k, v) in enumerate(kv):
            pk[layer][lo:lo + rows].copy_(k)
            pv[layer][lo:lo + rows].copy_(v)
    return pk, pv


# ----------------------------------------------------------------------------- 4. sampling
# The next token of every row: greedy at temperature 0; else softmax(logits / T) restricted to the
# top-p nucleus, drawn by inverse CDF with one uniform per row. The nucleus is the smallest set of most
# likely tokens whose mass reaches top_p: walking the tokens in descending order (ties by lower index,
# a stable sort), a token is kept when the mass strictly before it is < top_p, as transformers'
# TopPLogitsWarper does. The inverse CDF walks the same order.
#   _sample_next_torch    the specification: a stable sort, cumsums (the CPU path and the test oracle)
#   _top_p_sample_kernel  the same draw with no sort: radix selects on the logits' bits (GPU)
#   _top_p_sample_triton  its launcher (no autograd: sampling has no gradient)
#   _sample_next          dispatch: greedy, the kernel, or the torch path
def _sample_next_torch(logits, temperature, top_p, u):
    """logits (B, V), u (B,) uniforms in (0, 1] -> token ids (B,)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)  # (B, V)
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)
    cdf = probs.cumsum(-1)  # (B, V)
    target = u.unsqueeze(1) * cdf[:, -1:]  # (B, 1), in (0, kept mass]
    pick = (cdf < target).sum(-1).clamp_(max=cdf.shape[1] - 1)  # first index with cdf >= u; never a 0-mass token
    return pick if order is None else order.gather(-1, pick.unsqueeze(-1)).squeeze(-1)


# Sorting B x V probabilities costs more than the rest of the draw: measured on an H200 at 513 x 102400,
# 6.1 ms per step with top-p against 1.3 ms without. The kernel below needs no sort. With w_j = exp(z_j - max z)
# (z = logits / T) and M(x) = sum of w_j over tokens with logit >= x, the walk in descending order
# crosses a target mass tau inside the group of tokens whose logit is
#     x(tau) = the largest logit x with M(x) >= tau,
# so "find the token where the cumulative mass reaches tau" is a selection, not a sort. It is found
# digit by digit on the logits' bits (a radix select, 4 bits per pass, most significant first): each
# pass reads the row once and builds a 16-bin histogram of mass over the next digit among the tokens
# that match the digits fixed so far, and fixes the digit where the mass from the top reaches tau.
# bf16 logits have 16 significant bits, so 4 passes; fp16 19 (sign, 8 exponent and 10 mantissa bits of its fp32
# key), 5 passes; fp32 32 bits, 8 passes. Ties are
# resolved the way the stable sort does: within the group at x(tau), by index.
#   1. one pass: max z and Z = sum_j w_j
#   2. nucleus (top_p < 1): x* = x(top_p Z); of its group, the first c tokens are kept, c the fewest
#      that reach top_p Z; kept mass Zp = M(above x*) + c w(x*)
#   3. the draw: x(u Zp), and within its group the i-th token by index, i = ceil((u Zp - above) / w) - 1
#   4. one pass: the index of that token
# Without a nucleus (top_p = 1) the torch path walks by index, and so does the kernel: steps 2-4 become
# one cumulative pass. Every pass after the first reads a row the program has just read, which an L2
# cache may still hold. Measured on an H100 (benchmarks/bench_sampler.py): 2052 x 32000 bf16 logits,
# 1.91 ms per step against the sort's 8.41; 513 x 102400, 1.83 ms against 6.84.
if HAS_TRITON:
    @triton.jit
    def _key_to_logit(key, LOW: tl.constexpr):
        # inverse of the order key (below) for a key whose LOW low bits were never selected (zero for a
        # 16-bit input's fp32 upcast); key < 0 as int32 means the sign bit is set: a non-negative logit
        low = (1 << LOW) - 1
        bits = tl.where(key < 0, key ^ -2147483648, ~(key | low))
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _radix_select(row, V, inv_t, z_max, tau, KEY_PASSES: tl.constexpr, BLOCK: tl.constexpr):
        # -> (key of x(tau), mass of the tokens strictly above it, mass of its group)
        digits = tl.arange(0, 16)
        prefix = tl.zeros([], tl.int32)
        above = tl.zeros([], tl.float32)
        group = tl.zeros([], tl.float32)
        for p in tl.static_range(KEY_PASSES):
            shift = 28 - 4 * p
            # mass per value of this digit, per lane: one reduction across lanes after the loop, not per block.
            # [16, BLOCK], not [BLOCK, 16]: with the block on the fast axis the compiler gives each thread its
            # tokens' 16 bins (sm_90 TTGIR: the [BLOCK] vectors need no layout conversion in the loop, while
            # [BLOCK, 16] spread each token over 16 threads and moved it through shared memory every block)
            lanes = tl.zeros([16, BLOCK], tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                # the order key: int32 bits whose unsigned order is x's order (positives get the sign bit
                # set, negatives are bit-flipped so a larger magnitude ranks lower). Inline, not a helper:
                # the interpreter pays ~1 ms for every call of a @triton.jit function
                bits = x.to(tl.int32, bitcast=True)
                key = bits ^ ((bits >> 31) | -2147483648)
                w = tl.exp(x * inv_t - z_max)  # 0 on padding columns (x = -inf), as in step 1
                if p > 0:  # only tokens whose higher digits equal the ones fixed so far
                    w = tl.where((key >> (shift + 4)) == (prefix >> (shift + 4)), w, 0.0)
                d = (key >> shift) & 15
                lanes += tl.where(digits[:, None] == d[None, :], w[None, :], 0.0)
            hist = tl.sum(lanes, axis=1)  # [16]
            at_or_above = tl.cumsum(hist, axis=0, reverse=True)  # [16]: mass with digit >= d
            # the largest digit whose mass from the top reaches tau; it always holds mass (else the next
            # digit up would reach tau too), and requiring that keeps a rounding error from descending into
            # an empty digit. If rounding leaves tau above every digit's, the last digit with mass.
            nonempty = hist > 0
            d_star = tl.max(tl.where((above + at_or_above >= tau) & nonempty, digits, -1), axis=0)
            d_star = tl.where(d_star >= 0, d_star, tl.min(tl.where(nonempty, digits, 16), axis=0))
            group = tl.sum(tl.where(digits == d_star, hist, 0.0), axis=0)
            above += tl.sum(tl.where(digits > d_star, hist, 0.0), axis=0)
            prefix = prefix | (d_star << shift)
        return prefix, above, group

    @triton.jit
    def _top_p_sample_kernel(X, U, OUT, stride_x, V, inv_t, top_p,
                             TOP_P: tl.constexpr, KEY_PASSES: tl.constexpr, BLOCK: tl.constexpr):
        # One program per row.
        r = tl.program_id(0).to(tl.int64)
        row = X + r * stride_x
        low: tl.constexpr = 32 - 4 * KEY_PASSES
        # 1. z_max and Z, online per lane (rescale a lane's sum when its max grows), reduced once at the end
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
            m_new = tl.maximum(m, z)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with no token yet: exp(-inf) = 0
            s = s * tl.exp(m - m_safe) + tl.exp(z - m_safe)
            m = m_new
        z_max = tl.max(m, axis=0)
        Z = tl.sum(s * tl.exp(m - z_max), axis=0)
        u = tl.load(U + r)
        if TOP_P:
            # 2. the nucleus
            tau = top_p * Z
            key_p, above_p, group_p = _radix_select(row, V, inv_t, z_max, tau, KEY_PASSES, BLOCK)
            w_p = tl.exp(_key_to_logit(key_p, low) * inv_t - z_max)  # one token's mass in the boundary group
            n_p = tl.maximum(tl.floor(group_p / w_p + 0.5), 1.0)  # the group's size
            c = tl.minimum(tl.maximum(tl.ceil((tau - above_p) / w_p), 1.0), n_p)
            kept = above_p + c * w_p  # Zp
            # 3. the draw: the group holding u Zp, and the token's rank i in it
            tau = u * kept
            key_u, above_u, _ = _radix_select(row, V, inv_t, z_max, tau, KEY_PASSES, BLOCK)
            w_u = tl.exp(_key_to_logit(key_u, low) * inv_t - z_max)
            i = tl.maximum(tl.ceil((tau - above_u) / w_u) - 1.0, 0.0)
            i = tl.where(key_u == key_p, tl.minimum(i, c - 1.0), i).to(tl.int32)  # never past the kept part
            # 4. the index of the i-th token (by index) of the group; the group's last if rounding overshoots
            seen = tl.zeros([], tl.int32)
            pick = tl.full([], -1, tl.int32)
            last = tl.full([], -1, tl.int32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                bits = x.to(tl.int32, bitcast=True)
                key = bits ^ ((bits >> 31) | -2147483648)  # the order key, as in _radix_select
                member = ((key >> low) == (key_u >> low)) & (cols < V)
                rank = seen + tl.cumsum(member.to(tl.int32), axis=0) - 1  # [BLOCK]: rank within the group
                pick = tl.maximum(pick, tl.max(tl.where(member & (rank == i), cols, -1), axis=0))
                last = tl.maximum(last, tl.max(tl.where(member, cols, -1), axis=0))
                seen += tl.sum(member.to(tl.int32), axis=0)
        else:
            # 2-4 without a nucleus the inverse CDF walks the tokens by index, as the torch path does: one
            # pass, the first index whose running mass reaches u Z; the last token with mass if rounding
            # leaves the target just above the total
            tau = u * Z
            run = tl.zeros([], tl.float32)
            pick = tl.full([], -1, tl.int32)
            last = tl.full([], -1, tl.int32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                z = tl.load(row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
                w = tl.exp(z - z_max)
                reached = (run + tl.cumsum(w, axis=0) >= tau) & (w > 0)
                first = tl.min(tl.where(reached, cols, V), axis=0)
                pick = tl.where((pick < 0) & (first < V), first, pick)
                last = tl.maximum(last, tl.max(tl.where(w > 0, cols, -1), axis=0))
                run += tl.sum(w, axis=0)
        tl.store(OUT + r, tl.where(pick >= 0, pick, last).to(tl.int64))


_KEY_PASSES = {torch.bfloat16: 4, torch.float16: 5, torch.float32: 8}  # significant bits / 4, rounded up


def _top_p_sample_triton(logits, temperature, top_p, u, tile=None):
    """The kernel's launcher: logits (B, V) bf16 / fp16 / fp32 with unit stride on V, u (B,) fp32.
    tile: dict(BLOCK=, num_warps=) to override _sample_tile (bench_sampler times the alternatives)."""
    assert logits.dim() == 2 and logits.stride(1) == 1 and logits.dtype in _KEY_PASSES, (logits.shape, logits.dtype)
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    _top_p_sample_kernel[(B,)](logits, u.float().contiguous(), out, logits.stride(0), V, 1.0 / temperature,
                               float(top_p), TOP_P=top_p < 1.0, KEY_PASSES=_KEY_PASSES[logits.dtype],
                               **(tile or _sample_tile(_compiled(logits))))
    return out


def _sample_tile(compiled):
    """A row is read in BLOCK-wide pieces into [16, BLOCK] histogram accumulators, 2 tokens x 16 bins per
    thread at 8 warps: ptxas (sm_90) gives 58 registers and no spills, so 4 programs (rows) fit an SM.
    Chosen from the compiler's report; the draw with it was timed on an H100 (1.91 ms at 2052 x 32000),
    other tiles not yet (bench_sampler.top_p_tiles times them). The interpreter's blocks are small: it
    pays per operation, and its test rows are short."""
    return dict(BLOCK=512, num_warps=8) if compiled else dict(BLOCK=128, num_warps=4)


def _sample_next(logits, temperature, top_p, use_kernel=False):
    """logits (B, V) -> token ids (B,). One torch.rand per row (cheaper than torch.multinomial on a CPU,
    same distribution), drawn the same way on both paths, so they pick the same tokens up to rounding."""
    if temperature == 0:
        return logits.argmax(-1)
    u = 1.0 - torch.rand(logits.shape[0], device=logits.device)  # (B,) in (0, 1]
    if use_kernel:
        return _top_p_sample_triton(logits, temperature, top_p, u)
    return _sample_next_torch(logits, temperature, top_p, u)


class _StopChecker:
    """Stop strings, checked on the decoded tail of each live row. A stop string of B UTF-8 bytes completed by
    token e lies within the last B + 4 tokens up to e whenever each token holds >= 1 byte of the text (a
    byte-level tokenizer may spend 4 tokens on one character; the first token may also start before the stop
    string: the 4 are slack for it), so only tails are decoded (one batch_decode per check), never whole
    continuations. A stop string may begin in the prefix: VinePPO resets to states that end mid-way through
    one (a GSM8K state ending in "\n\n\n", continued with "Problem:"), so a row's first tokens are checked
    behind the last tokens of its prefix. Only a stop string that ends in the new tokens counts; one wholly
    inside the prefix does not."""

    def __init__(self, stop):
        self.tok, self.strs = stop
        self.window = max(len(s.encode("utf-8")) for s in self.strs) + 4   # tokens; = len(s) + 4 for ASCII

    def contexts(self, prefixes):
        """Each prefix's context: the fewest last tokens whose text holds the prefix's longest tail that begins a
        stop string (none: no stop string can begin in the prefix; GSM8K states end in "\n", one token)."""
        tails = [list(p[-self.window:]) for p in prefixes]
        out = []
        for tail, text in zip(tails, self.tok.batch_decode(tails)):
            need = max((n for s in self.strs for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            j = len(tail)   # need = 0: no token, the loop never runs
            while j > 0 and len(self.tok.decode(tail[j:])) < need:
                j -= 1
            out.append(tail[j:])
        return out

    def _hit(self, pre, new):
        """Does decode(pre + new) hold a stop string that ends past decode(pre)?"""
        start = len(self.tok.decode(pre)) if pre else 0
        text = self.tok.decode(pre + new)
        return any(text.find(s, max(0, start - len(s) + 1)) >= 0 for s in self.strs)

    def tail_start(self, checked):
        """First token to decode when tokens [0, checked) are known clean: a stop string completed by a
        later token starts at most window - 1 tokens before it."""
        return max(0, checked + 1 - self.window)

    def cut_lengths(self, tails, lo, checked, contexts):
        """tails: each row's tokens [lo, now), lo = tail_start(checked); contexts: each row's from contexts().
        Returns, per row, the length to cut the row to (the token completing a stop string is kept) or None."""
        ctxs = [c if lo == 0 else [] for c in contexts]  # lo > 0: the window up to any new token is all new tokens
        out = []
        for toks, ctx, text in zip(tails, ctxs, self.tok.batch_decode([c + t for c, t in zip(ctxs, tails)])):
            cut = None
            if any(s in text for s in self.strs) and self._hit(ctx, toks):
                # rare: find the exact completing token e (absolute index + 1); while e < window, the window
                # up to e reaches back window - e tokens into the prefix (none from e = window on)
                cut = next((e for e in range(checked + 1, lo + len(toks) + 1)
                            if self._hit(ctx[max(0, len(ctx) - max(0, self.window - e)):],
                                         toks[max(0, e - self.window - lo):e - lo])), None)
            out.append(cut)
        return out


# ----------------------------------------------------------------------------- 5. decode one batch
class _Stepper:
    """One decode step: the HF model on (B, 1) tokens with the cascade cache -> logits (B, V).
    On CUDA with the Triton attention the step has static shapes (the step counter lives on the
    device), so it is captured once into a CUDA graph and replayed: the eager step 0 doubles as
    warm-up, step 1 captures. A compaction changes the shapes and calls reset() to re-capture."""

    def __init__(self, model, cache, use_graph):
        self.model, self.cache, self.use_graph = model, cache, use_graph
        self.kw = _cache_kwarg(model.forward)
        self.reset()

    def reset(self):
        self.graph, self.logits, self.calls = None, None, 0

    def eager(self, ids, pos):
        out = self.model(input_ids=ids, position_ids=pos, use_cache=True, **{self.kw: self.cache})
        return out.logits[:, -1]  # (B, V)

    def __call__(self, ids, pos):  # ids, pos: (B, 1), updated in place between calls
        self.calls += 1
        if not self.use_graph or self.calls == 1:
            return self.eager(ids, pos)
        if self.graph is None:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.logits = self.eager(ids, pos)
                self.graph = graph
            except Exception as e:  # pragma: no cover (GPU only): fall back to eager steps
                print(f"[sample_continuations] CUDA graph capture failed ({e!r}); decoding eagerly")
                self.use_graph = False
            if not self.use_graph:   # outside the except block, which would keep the failed capture alive
                return self.eager(ids, pos)
        self.graph.replay()
        return self.logits


_COMPILED_FORWARD = {}  # decoder layer class -> its torch.compile'd forward (SAMPLER_COMPILE)
_COMPILE_FAILED = []    # why the layers' compile failed in this process, if it did: the decode stays eager then


def _decoder_layers(model):
    """The model's decoder layers: the ModuleList of num_hidden_layers modules in its backbone."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    lists = [m for m in model.base_model.modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == cfg.num_hidden_layers]
    assert lists, "SAMPLER_COMPILE: no ModuleList of num_hidden_layers decoder layers in the model"
    return list(lists[0])


def _compiles_layers(model):
    """Whether SAMPLER_COMPILE has the decode steps of `model` run compiled decoder layers. Never after a failed
    compile (_COMPILE_FAILED), nor for layers with a forward of their own (accelerate's hooks for a model split
    over devices: the compiled class forward would skip them). "auto" compiles what an H100 timed: mostly bf16
    weights (LoRA: its bf16 base) on a GPU of compute capability >= 8.0 (native bf16). Not fp32 weights under
    autocast (full fine-tuning's master weights): compiled code casts every weight to bf16 in every step (eager
    autocast caches the casts), which no GPU has timed; nor fp16, not timed either."""
    if SAMPLER_COMPILE == "auto":
        params = list(model.parameters())
        bf16, dev = sum(p.numel() for p in params if p.dtype == torch.bfloat16), params[0].device
        on = (dev.type == "cuda" and 2 * bf16 > sum(p.numel() for p in params)
              and torch.cuda.get_device_capability(dev) >= (8, 0))
    else:
        on = SAMPLER_COMPILE is True
    return on and not _COMPILE_FAILED and not any("forward" in vars(layer) for layer in _decoder_layers(model))


@contextlib.contextmanager
def _compiled_layers(model):
    """SAMPLER_COMPILE: each decoder layer's forward is its torch.compile'd version inside the block (the
    decode steps only: the prefill and training use the model as it is). One compiled code serves every
    layer: their layer_idx (an int attribute passed to the cache) is traced as a symbol, not a constant
    to recompile for; a new batch size recompiles once with the size dynamic. The compiled function is the
    class's forward, bound to each layer inside the block only, so no compiled code keeps a model alive."""
    layers = _decoder_layers(model)
    for layer in layers:
        cls = type(layer)
        if cls not in _COMPILED_FORWARD:
            _COMPILED_FORWARD[cls] = torch.compile(cls.forward)
        layer.forward = types.MethodType(_COMPILED_FORWARD[cls], layer)  # shadows the class's forward
    try:
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
            yield
    finally:
        for layer in layers:
            del layer.forward


def _run_batch(model, units, budgets, temperature, top_p, eos, stopper, backend, results, prefill_tokens,
               compile_layers):
    """units: [(leader tuple, [(slot, state_len), ...])]; budgets[slot]: that row's max new tokens.
    Decodes up to budget new tokens for every row and writes results[slot] = (token list, finished);
    compile_layers: with torch.compile'd decoder layers (_compiles_layers)."""
    dev = next(model.parameters()).device
    pk, pv = _prefill(model, [L for L, _ in units], prefill_tokens)
    rows = [(g, s, n, L[n - 1]) for g, (L, members) in enumerate(units) for s, n in members]  # sorted by nest
    contexts = None
    if stopper is not None:  # one per state: the k rows of a state share it
        states = sorted({(g, n) for g, _, n, _ in rows})
        of_state = dict(zip(states, stopper.contexts([units[g][0][:n] for g, n in states])))
        contexts = [of_state[g, n] for g, _, n, _ in rows]
    grp, slot, plen, first = (torch.tensor(col, device=dev) for col in zip(*rows))  # (B,) each
    plen = plen - 1  # the state's last token is fed at step 0, so the cached prefix is one shorter
    B = len(rows)
    budget = torch.tensor([budgets[s] for _, s, _, _ in rows], device=dev)  # (B,) max new tokens per row
    T = int(budget.max())
    cache = (_CompiledStepCache if compile_layers else _CascadeCache)(pk, pv, grp, plen, T, backend)
    ids = first.unsqueeze(1)  # (B, 1): each state's last token ...
    pos = plen.unsqueeze(1).clone()  # (B, 1): ... at its own position (no left padding anywhere)
    # a row past its budget still steps until compaction: its position stops at its last one, which the model
    # has (learned position tables have no entry beyond; its tokens are discarded anyway)
    pos_max = (plen + budget - 1).unsqueeze(1)  # (B, 1)
    out = torch.zeros(B, T, dtype=torch.long, device=dev)  # (B, T) new tokens
    alive, fin = torch.ones(B, dtype=torch.bool, device=dev), torch.zeros(B, dtype=torch.bool, device=dev)
    length = budget.clone()  # rows still alive at their budget hit max_new_tokens: unfinished
    on_gpu = dev.type == "cuda"
    sync_every = SAMPLER_SYNC_EVERY or (8 if on_gpu else 1)  # a host sync stalls a GPU: batch them
    stepper = _Stepper(model, cache, on_gpu and backend == "triton")
    draw_kernel = backend == "triton" and SAMPLER_TOP_P_KERNEL

    def harvest(mask):  # copy these rows' tokens out
        idx = mask.nonzero().squeeze(1)
        for s, toks, n, f in zip(slot[idx].tolist(), out[idx].tolist(), length[idx].tolist(), fin[idx].tolist()):
            results[s] = (toks[:n], f)

    checked = 0  # tokens [0, checked) of every live row are known to be free of stop strings
    original_attn = model.config._attn_implementation
    model.config._attn_implementation = _ATTN_NAME + ("_compiled" if compile_layers else "")
    _ACTIVE.append(cache)
    compiled = contextlib.ExitStack()
    try:
        if compile_layers:
            compiled.enter_context(_compiled_layers(model))
        SAMPLER_STATS["batches"] += 1
        for t in range(T):
            SAMPLER_STATS["steps"] += 1
            SAMPLER_STATS["row_steps"] += B
            SAMPLER_STATS["kv_read_tokens"] += cache.prefix_read + B * (t + 1)
            logits = stepper(ids, pos)  # (B, V)
            nxt = _sample_next(logits, temperature, top_p, use_kernel=draw_kernel)  # (B,)
            out[:, t] = nxt
            if eos is not None:  # EOS on the device: exact without a host sync
                newly = alive & torch.isin(nxt, eos)
                length = torch.where(newly, t + 1, length)
                fin |= newly
                alive &= ~newly
            alive &= budget > t + 1  # a row at its own budget stops, unfinished (length = budget)
            ids.copy_(nxt.unsqueeze(1))
            torch.minimum(pos + 1, pos_max, out=pos)  # in place: the CUDA graph reads pos's storage
            cache.advance()
            if (t + 1) % sync_every and t + 1 < T:
                continue
            if stopper is not None:  # stop strings need the tokenizer: host side
                # Every row that produced tokens since the last check: live rows and rows that hit EOS
                # since then (a stop string may have completed before that EOS).
                rows, lo = (length > checked).nonzero().squeeze(1), stopper.tail_start(checked)
                cuts = stopper.cut_lengths(out[rows, lo:t + 1].tolist(), lo, checked,
                                           [contexts[b] for b in rows.tolist()]) if len(rows) else []
                hit = [(b, c) for b, c, n in zip(rows.tolist(), cuts, length[rows].tolist())
                       if c is not None and c <= n]  # a cut past an EOS seen since is not a stop
                if hit:
                    idx = torch.tensor([b for b, _ in hit], device=dev)
                    length[idx] = torch.tensor([c for _, c in hit], device=dev)
                    fin[idx], alive[idx] = True, False
                checked = t + 1
            n_alive = int(alive.sum())
            if n_alive == 0:
                break
            if t + 1 < T and n_alive < 0.6 * B:
                # Compaction: drop finished rows (and nests with none left) so later steps cost less.
                SAMPLER_STATS["compactions"] += 1
                harvest(~alive)
                keep = alive.nonzero().squeeze(1)  # (B',) ascending: rows stay sorted by nest
                cache.select(keep)
                slot, alive, fin, length, out = slot[keep], alive[keep], fin[keep], length[keep], out[keep]
                budget = budget[keep]
                if contexts is not None:
                    contexts = [contexts[b] for b in keep.tolist()]
                ids, pos, pos_max, B = ids[keep], pos[keep], pos_max[keep], len(keep)
                stepper.reset()
        harvest(torch.ones_like(alive))
    finally:
        compiled.close()
        _ACTIVE.pop()
        model.config._attn_implementation = original_attn


# ----------------------------------------------------------------------------- 6. public API
def max_positions(config):
    """The most positions (prefix + new tokens) the model has, or None where the config sets no limit."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


@torch.no_grad()
def _probe(model):
    """(KV bytes per cached token, vocabulary size), from a one-token forward."""
    from transformers import DynamicCache
    dev = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=dev), use_cache=True,
                **{_cache_kwarg(model.forward): cache})
    return sum(k.nbytes + v.nbytes for k, v in _layer_kv(cache)), out.logits.shape[-1]


@torch.no_grad()
def sample_continuations(model, prefixes, k, max_new_tokens, temperature=1.0, top_p=1.0, stop=None, *,
                         eos_token_ids=(), max_batch_tokens=None, show_progress=False, desc="sampling"):
    """prefixes: list[list[int]] (token ids; may include duplicates and prefixes that nest).
    Returns (tokens, finished): tokens[i][j] is the list of new token ids of the j-th of k continuations
    of prefixes[i] (j < k); finished[i][j] is True when that row stopped on an EOS id (the EOS id is the
    last element of its list) or on a stop string, False when it hit max_new_tokens.
    temperature 0 = greedy. top_p nucleus sampling applied after dividing logits by temperature.
    stop: None or (tokenizer, list_of_stop_strings): a row stops when a stop string ends in its decoded continuation
    (it may begin in the prefix: a state can end part-way through one); its token list is then cut after the token
    that completed the stop string (the text may thus run a few characters past it: the caller strips it).
    A prefix whose budget is 0 gets k empty, unfinished rows.
    Randomness comes from torch's global RNG (torch.manual_seed makes it reproducible on CPU; keep it
    deterministic: same inputs + same seed => same outputs).
    max_new_tokens: an int, or a list with one budget per prefix (VinePPO's continuation of a state may
    only use what the response cap leaves after the written steps).
    max_batch_tokens: KV budget of one batch in cached tokens (default: from free memory).
    model: a transformers causal LM with full causal attention (Llama, Qwen2, Mistral within its sliding window,
    GPT-2 ...; eval mode, no grad inside). Works on CPU (no Triton, no CUDA graphs) and GPU."""
    n = len(prefixes)
    if n == 0:
        return [], []
    budgets = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * n
    assert len(budgets) == n, "max_new_tokens: one int, or one per prefix"
    if k <= 0 or max(budgets) <= 0:
        return [[[] for _ in range(k)] for _ in range(n)], [[False] * k for _ in range(n)]
    assert all(len(p) > 0 for p in prefixes), "every prefix needs at least one token (e.g. BOS)"
    live = [i for i in range(n) if budgets[i] > 0]   # the prefixes decoded; the others get k empty rows
    limit = max_positions(model.config)
    longest = max(live, key=lambda i: len(prefixes[i]) + budgets[i])
    assert limit is None or len(prefixes[longest]) + budgets[longest] <= limit, (
        f"prefix ({len(prefixes[longest])} tokens) + max_new_tokens ({budgets[longest]}) exceeds the model's {limit} positions")
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    assert not window or len(prefixes[longest]) + budgets[longest] <= window, (
        f"prefix + max_new_tokens exceed the model's sliding window ({window}); the cascade attention is full")
    assert not getattr(cfg, "attn_logit_softcapping", None), "attention logit soft-capping is not supported"
    row_budgets = [b for b in budgets for _ in range(k)]   # per (prefix, sample) row
    max_new_tokens = max(budgets)
    from transformers import AttentionInterface
    AttentionInterface.register(_ATTN_NAME, _cascade_attention)  # idempotent
    AttentionInterface.register(_ATTN_NAME + "_compiled", _cascade_attention_eager)  # SAMPLER_COMPILE's
    dev = next(model.parameters()).device
    backend = SAMPLER_BACKEND
    if backend == "auto":
        backend = ("triton" if dev.type == "cuda" and HAS_TRITON else
                   "cpu" if dev.type == "cpu" and _cpu_flash is not None else "torch")
    eos = torch.tensor(sorted(set(eos_token_ids)), device=dev) if len(eos_token_ids) else None
    stopper = _StopChecker(stop) if stop is not None and len(stop[1]) else None

    # Plan: every (prefix i, sample j) row joins the nest of its prefix's leader; a prefix with no budget
    # left gets k empty, unfinished rows without a decode step (a step would draw one token past its budget).
    results = [([], False) if b <= 0 else None for b in row_budgets]
    leader = _nest_leaders([prefixes[i] for i in live])   # a prefix not decoded leads nothing
    nests = {}
    for i in live:
        nests.setdefault(leader[tuple(prefixes[i])], []).extend((i * k + j, len(prefixes[i])) for j in range(k))
    units = sorted(nests.items(), key=lambda u: -len(u[0]))  # longest first: similar P in a batch

    # Budget: cached tokens per batch (prefix once per nest + T per row + logits/sort scratch per row).
    was_training = model.training
    model.eval()
    try:
        bytes_tok, vocab = _probe(model)
        if max_batch_tokens is None:
            # free = the device's free memory + what torch's allocator holds cached but unused (after a
            # PPO update that is most of the activations' memory, which mem_get_info counts as taken)
            if dev.type == "cuda":
                cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
                free = (torch.cuda.mem_get_info(dev)[0] + cached) * SAMPLER_MEMORY_FRACTION
            else:
                free = 2 ** 30
            max_batch_tokens = int(free // bytes_tok)
        per_row = max_new_tokens + -(-24 * vocab // bytes_tok)
        # A nest costs its prefix buffer, padded to the batch's longest leader (its first: units come longest
        # first), plus per_row for each of its rows. Each batch is filled to the budget: the nest that overflows
        # it is split, and its other rows open the next batch (that nest's prefix is prefilled in both). Every
        # batch re-reads the weights at each decode step, so fewer batches beat whole nests: at DeepSeekMath-7B's
        # shape (bench_sampler) a batch holds ~4 nests of 63-72 rows, and packing whole nests can take 3
        # batches where 2 hold all the rows.
        batches, cur, used = [], [], 0
        for L, rows in units:
            while rows:
                P = len(cur[0][0]) if cur else len(L)  # this nest's prefix buffer in the current batch
                fit = (max_batch_tokens - used - P) // per_row
                if fit < 1 and cur:  # full: the next batch
                    batches.append(cur)
                    cur, used = [], 0
                    continue
                part, rows = rows[:max(fit, 1)], rows[max(fit, 1):]  # >= 1 row, even over budget (OOM: halved)
                cur.append((L, part))
                used += P + len(part) * per_row
        batches.append(cur)
        # Prefill chunks: bounded in tokens (activations) and in bytes (its DynamicCache is a transient copy).
        prefill_tokens = min(32768 if dev.type == "cuda" else 8192, max(2048, 2 ** 31 // bytes_tok))

        bar = None
        if show_progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=n * k, initial=sum(r is not None for r in results), desc=desc)

        def run(batch):  # retry at half the batch on out-of-memory; with eager layers if their compile fails
            compiled, compile_failed = _compiles_layers(model), None
            try:
                _run_batch(model, batch, row_budgets, temperature, top_p, eos, stopper, backend,
                           results, prefill_tokens, compiled)
            # a compile's failure comes as a TorchDynamoException (tracing, or the backend: Inductor, Triton); one
            # that ran out of memory carries the OutOfMemoryError, and is handled as any
            except (torch.cuda.OutOfMemoryError, torch._dynamo.exc.TorchDynamoException) as e:
                oom = torch.cuda.OutOfMemoryError
                if isinstance(e, oom) or isinstance(getattr(e, "inner_exception", None), oom):
                    if sum(len(r) for _, r in batch) <= 1:
                        raise
                elif compiled:
                    compile_failed = f"{type(e).__name__}: {e}"[:300]
                else:
                    raise
            else:
                if bar is not None:
                    bar.update(sum(len(r) for _, r in batch))
                return
            if compile_failed:  # the whole batch again, eager; so is every later decode of this process
                _COMPILE_FAILED.append(compile_failed)
                warnings.warn("kernels.sample_continuations: torch.compile of the decoder layers failed, decoding "
                              f"with eager layers from now on (SAMPLER_COMPILE): {compile_failed}")
                return run(batch)
            # Retried after the except block: inside it, the exception's traceback keeps the failed call's
            # frames, hence its KV cache and activations, alive, and empty_cache() could free none of them.
            torch.cuda.empty_cache()
            SAMPLER_STATS["oom_retries"] += 1
            if len(batch) == 1:
                (L, r), = batch
                halves = [[(L, r[:len(r) // 2])], [(L, r[len(r) // 2:])]]
            else:
                halves = [batch[:len(batch) // 2], batch[len(batch) // 2:]]
            for h in halves:
                run(h)

        for batch in batches:
            run(batch)
        if bar is not None:
            bar.close()
    finally:
        model.train(was_training)
    tokens = [[results[i * k + j][0] for j in range(k)] for i in range(n)]
    finished = [[results[i * k + j][1] for j in range(k)] for i in range(n)]
    return tokens, finished
