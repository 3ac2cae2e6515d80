"""Fused kernels for VinePPO.

Section 1, log-probs / entropy / PPO loss without the logits.
Every PPO update needs log pi(token) under the policy, the old policy and the frozen reference, with
the logits divided by the sampling temperature (spec section 1). The naive path builds [N, V] fp32
logits (2.1 GB at 16k tokens x 32000 vocab, 6.7 GB at 102400) plus as much again for log_softmax and
its gradient. Here the lm_head matmul is fused with the softmax statistics, so no [N, V] tensor is
ever held: the Triton kernels keep one [BLOCK_N, BLOCK_V] tile in registers, and the torch fallback
holds one [chunk, V] slab at a time.

Layout of the section (Triton-tutorial style):
  reference_logprobs        pure torch, full logits: the specification and the test oracle
  _logprob_fwd_kernel       @triton.jit forward: online log-sum-exp, target logit, entropy
  _logprob_bwd_kernel       @triton.jit backward: recompute a tile, dX and dW by fp32 atomics
  _triton_forward/backward  launchers with the shape asserts
  _torch_forward/backward   chunked pure-torch fallback (CPU without TRITON_INTERPRET=1)
  FusedLogprobs             the torch.autograd.Function, fused_logprobs its public entry point
  reference_ppo_loss, ppo_loss   the spec's clipped objective + k3 KL on top of fused_logprobs
"""
import os
import types

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # torch-only install: the kernels are defined against a stub and never launched
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
        z = tl.where(col_mask[None, :], z, float("-inf"))                       # padding columns: p = 0

        m_new = tl.maximum(m, tl.max(z, axis=1))                                # [BLOCK_N]
        alpha = tl.exp(m - m_new)
        z_minus_m = z - m_new[:, None]                                          # [BLOCK_N, BLOCK_V]
        e = tl.exp(z_minus_m)                                                   # 0 on padding columns
        s_tile = tl.sum(e, axis=1)
        u_tile = tl.sum(e * tl.where(col_mask[None, :], z_minus_m, 0.0), axis=1)   # not 0 * -inf = nan
        u = alpha * (u + (m - m_new) * s) + u_tile
        s = alpha * s + s_tile
        m = m_new
        is_target = cols[None, :] == target[:, None]                            # [BLOCK_N, BLOCK_V]
        z_target += tl.sum(tl.where(is_target, z, 0.0), axis=1)

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
    # Alternative (Liger): materialise a [chunk, V] dA slab and use cuBLAS; simpler, but holds O(chunk V).
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

    log_p = z - lse[:, None]                                                    # [BLOCK_N, BLOCK_V]
    p = tl.exp(log_p)
    onehot = (cols[None, :] == target[:, None]).to(tl.float32)
    d_z = g_logp[:, None] * (onehot - p) - g_entropy[:, None] * p * (log_p + entropy[:, None])
    # padding rows (x = 0, g = 0) and padding columns (w = 0, masked dW store) contribute nothing below
    d_a = d_z * inv_temperature                                                 # [BLOCK_N, BLOCK_V]
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
# Tiles (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages). CUDA: autotuned once per (D, V, dtype) over
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
    # the backward accumulates with atomics: every trial config must start from zeroed buffers
    _logprob_bwd_autotuned = triton.autotune(_configs(_CUDA_BWD_TILES), key=["D", "V", "COMPUTE_DX", "COMPUTE_DW"],
                                             reset_to_zero=["grad_hidden_ptr", "grad_weight_ptr"])(_logprob_bwd_kernel)


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
    if num_splits is None:   # on a GPU, >= 2 programs per SM even at small N; a power of 2 bounds recompiles
        sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count if _compiled(hidden) else 0
        wanted = triton.cdiv(2 * sms, triton.cdiv(N, _ROWS_PER_PROGRAM_GUESS))
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


def _triton_backward(hidden, weight, targets, temperature, lse, entropy, grad_logp, grad_entropy,
                     compute_dx=True, compute_dw=True):
    """-> (grad_hidden [N, d] fp32 or None, grad_weight [V, d] fp32 or None)."""
    _check_inputs(hidden, weight, targets)
    (N, D), V = hidden.shape, weight.shape[0]
    for t in (lse, entropy, grad_logp, grad_entropy):
        assert t.shape == (N,) and t.dtype == torch.float32 and t.is_contiguous()
    # fp32 accumulators even for bf16 inputs: each element receives V / BLOCK_V (dX) or N / BLOCK_N (dW) adds
    grad_hidden = torch.zeros(N, D, dtype=torch.float32, device=hidden.device) if compute_dx else None  # [N, d]
    grad_weight = torch.zeros(V, D, dtype=torch.float32, device=hidden.device) if compute_dw else None  # [V, d]
    if N > 0 and (compute_dx or compute_dw):
        unused = grad_hidden if compute_dx else grad_weight     # stands in for the buffer a False flag skips
        kernel, tile = _kernel_and_tile(hidden, _logprob_bwd_autotuned, _logprob_bwd_kernel)
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(V, meta["BLOCK_V"]),)  # noqa: E731
        kernel[grid](hidden, weight, targets, lse, entropy, grad_logp, grad_entropy,
                     grad_hidden if compute_dx else unused, grad_weight if compute_dw else unused,
                     N, 1.0 / temperature, D=D, V=V, GROUP_N=8, COMPUTE_DX=compute_dx, COMPUTE_DW=compute_dw,
                     **tile, **_dtype_options(hidden))
    return grad_hidden, grad_weight


# ----------------------------------------------------------------------------- chunked torch fallback
# Same math with torch ops on [chunk, V] row slabs: peak extra memory O(chunk V) instead of O(N V).
TORCH_CHUNK_BYTES = 64 * 2**20      # one fp32 [chunk, V] slab; ~3 such buffers are alive at once


def _chunk_rows(V):
    return max(1, TORCH_CHUNK_BYTES // (4 * V))


def _torch_forward(hidden, weight, targets, temperature):
    _check_inputs(hidden, weight, targets)
    N, V = hidden.shape[0], weight.shape[0]
    logp, entropy, lse = (torch.empty(N, dtype=torch.float32, device=hidden.device) for _ in range(3))
    for r0 in range(0, N, _chunk_rows(V)):
        sl = slice(r0, r0 + _chunk_rows(V))
        z = (hidden[sl] @ weight.T).float().mul_(1.0 / temperature)            # [C, V] fp32
        lse[sl] = torch.logsumexp(z, dim=-1)                                    # [C]
        log_p = z.sub_(lse[sl, None])                                           # [C, V], in place
        logp[sl] = log_p.gather(1, targets[sl, None]).squeeze(1)
        entropy[sl] = -(log_p.exp().mul_(log_p)).sum(-1)
        del z, log_p                     # free the slab before the next matmul allocates one
    return logp, entropy, lse


def _torch_backward(hidden, weight, targets, temperature, lse, entropy, grad_logp, grad_entropy,
                    compute_dx=True, compute_dw=True):
    N, V = hidden.shape[0], weight.shape[0]
    grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if compute_dx else None      # [N, d]
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if compute_dw else None      # [V, d]
    for r0 in range(0, N, _chunk_rows(V)):
        sl = slice(r0, r0 + _chunk_rows(V))
        z = (hidden[sl] @ weight.T).float().mul_(1.0 / temperature)            # [C, V] fp32
        log_p = z.sub_(lse[sl, None])                                           # [C, V]
        p = log_p.exp()                                                         # [C, V]
        # dZ = g_logp (onehot - p) - g_H p (log p + H), written to reuse the two slabs
        d_z = log_p.add_(entropy[sl, None]).mul_(grad_entropy[sl, None]).add_(grad_logp[sl, None])
        d_z = d_z.mul_(p).neg_()                                                # -p (g_logp + g_H (log p + H))
        d_z.scatter_add_(1, targets[sl, None], grad_logp[sl, None])             # + g_logp onehot
        d_a = d_z.mul_(1.0 / temperature).to(hidden.dtype)                      # [C, V], matmul dtype
        if compute_dx:
            grad_hidden[sl] = d_a @ weight                                      # [C, d]
        if compute_dw and d_a.dtype == torch.float32:
            grad_weight.addmm_(d_a.T, hidden[sl])                               # [V, d], no [V, d] temporary
        elif compute_dw:
            grad_weight += d_a.T @ hidden[sl]                                   # bf16 product, fp32 accumulation
        del z, log_p, p, d_z, d_a
    return grad_hidden, grad_weight


# ----------------------------------------------------------------------------- autograd + public API
class FusedLogprobs(torch.autograd.Function):
    """(hidden, weight) -> (logp, entropy); saves only inputs and [N] statistics, recomputes in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, backend):
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        fwd = _triton_forward if backend == "triton" else _torch_forward
        logp, entropy, lse = fwd(hidden, weight, targets, temperature)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.backend = temperature, backend
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float().contiguous()
        grad_entropy = torch.zeros_like(lse) if grad_entropy is None else grad_entropy.float().contiguous()
        bwd = _triton_backward if ctx.backend == "triton" else _torch_backward
        grad_hidden, grad_weight = bwd(hidden, weight, targets, ctx.temperature, lse, entropy, grad_logp,
                                       grad_entropy, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def resolve_backend(hidden, backend="auto"):
    if backend == "auto":
        interpreter = os.environ.get("TRITON_INTERPRET") == "1"
        backend = "triton" if HAS_TRITON and (hidden.is_cuda or interpreter) else "torch"
    assert backend in ("triton", "torch", "reference"), backend
    return backend


def fused_logprobs(hidden, weight, targets, temperature=1.0, backend="auto"):
    """hidden [N, d] (fp32 or bf16), weight [V, d] (lm_head weight, same dtype), targets [N] int64.
    Returns (logp [N] fp32, entropy [N] fp32) of softmax(hidden @ weight.T / temperature); differentiable
    w.r.t. hidden and weight; never materialises [N, V] (except backend "reference", the naive oracle).
    backend: "auto" (triton on CUDA or under TRITON_INTERPRET=1, else torch), "triton", "torch", "reference"."""
    backend = resolve_backend(hidden, backend)
    if backend == "reference":
        logp, entropy = reference_logprobs(hidden, weight, targets, temperature)
        return logp.float(), entropy.float()
    return FusedLogprobs.apply(hidden, weight, targets, float(temperature), backend)


# =====================================================================================================
# 2. The PPO objective (spec section 5) on top of fused_logprobs
# =====================================================================================================
# The PPO terms are elementwise in (logp, H), so dL/dlogp and dL/dH are [N] vectors and the [N, V]
# part of the backward is exactly FusedLogprobs.backward. We therefore compute the terms in torch on
# [N] tensors rather than in the kernel epilogue: it costs ~10 elementwise launches on [N] (microseconds,
# O(N) memory) and keeps the spec's formula readable, backend-independent and differentiated by autograd.


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


def ppo_loss(hidden, weight, targets, old_logp, ref_logp, advantages, *, temperature, clip_eps, kl_coef,
             n_tokens, n_seqs, entropy_coef=0.0, backend="auto"):
    """The spec's PPO objective on the response tokens of one micro-batch (all [N] tensors, fp32):
      rho = exp(logp - old_logp)
      pg_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1-eps, 1+eps))                 # token-mean over the MINI-batch
      kl_t = clamp(exp(ref_logp - logp) - (ref_logp - logp) - 1, 0, 10)          # k3; summed per seq, mean over seqs
      loss = sum_t pg_t / n_tokens + kl_coef * sum_t kl_t / n_seqs - entropy_coef * sum_t H_t / n_tokens
    n_tokens / n_seqs count the whole mini-batch, so micro-batch losses sum to the mini-batch loss.
    ref_logp may be None (kl_coef must then be 0). Returns (loss, stats): stats holds DETACHED [N]
    tensors 'logp', 'ratio', 'clipped' (bool: the gradient is zero because of clipping), 'kl', 'entropy'."""
    assert ref_logp is not None or kl_coef == 0, "kl_coef > 0 needs ref_logp"
    logp, entropy = fused_logprobs(hidden, weight, targets, temperature, backend)      # [N] each
    ratio = torch.exp(logp - old_logp)                                                  # [N]
    # max(-A rho, -A clip(rho)) picks the clipped branch exactly when A > 0 and rho > 1 + eps, or
    # A < 0 and rho < 1 - eps; there clip(rho) is constant and the gradient 0. Written with where so the
    # mask is explicit and ties (rho on the boundary) take the unclipped branch, gradient -A / n_tokens.
    clipped = ((advantages > 0) & (ratio > 1 + clip_eps)) | ((advantages < 0) & (ratio < 1 - clip_eps))
    pg = torch.where(clipped, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps), -advantages * ratio)
    loss = pg.sum() / n_tokens
    if entropy_coef != 0:
        loss = loss - entropy_coef * entropy.sum() / n_tokens
    if ref_logp is not None:
        log_ratio_ref = ref_logp - logp                                                 # [N]
        kl = (torch.exp(log_ratio_ref) - log_ratio_ref - 1).clamp(0.0, 10.0)           # k3, clamped per token
        loss = loss + kl_coef * kl.sum() / n_seqs
    else:
        kl = torch.zeros_like(logp)
    stats = dict(logp=logp.detach(), ratio=ratio.detach(), clipped=clipped, kl=kl.detach(),
                 entropy=entropy.detach())
    return loss, stats
