# =====================================================================================
# Section 2: batched prefix sampling -- sample_continuations()
#
# VinePPO's cost is generation: a response of n steps needs K continuations from each of
# its n states s_0 (prompt) ⊂ s_1 ⊂ ... ⊂ s_{n-1}. transformers' generate(num_return_sequences=K)
# would prefill every state K times and keep K copies of every prefix in its KV cache. Here:
#   1. plan:    identical prefixes are merged and nested prefixes are grouped under their longest
#               member (the nest "leader"); one forward over each leader yields the KV of every
#               state in the nest (a state's KV is the leader's KV cut at the state's length);
#   2. decode:  all continuations of all states of a batch of nests decode together, one
#               backbone call on (B, 1) per step. The prefix KV is stored ONCE per nest and read
#               once per step for all of its rows (cascade / Hydragen attention: partial attention
#               over the shared prefix + partial attention over each row's own new tokens, merged
#               with their log-sum-exps); only new tokens get per-row KV.
#   3. stop:    per-row EOS / stop strings / max tokens; finished rows are compacted out of the
#               batch, batches are sized to the free memory, halved on out-of-memory.
# Shape letters: G nests (groups) in a batch, R rows per group, B = G*R rows, Hq / Hkv query / KV
# heads, nrep = Hq // Hkv, D head dim, P prefix columns, T new-token columns, V vocabulary.
# =====================================================================================
import inspect

import torch
from transformers import AttentionInterface, DynamicCache

try:  # Triton is optional: the CPU path uses plain torch ops.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

ATTENTION_BACKEND = "auto"  # "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton" (tests)
_ATTN_NAME = "vineppo_cascade"
_ACTIVE = []  # the _CascadeCache of the decode step in flight (read by the attention function)
# Counters for tests and benchmarks (reset them freely): batches run, prefill tokens computed (real
# leader tokens / incl. right padding), decode steps, row-steps, KV tokens attended over (prefix once per
# nest + each row's new tokens), compactions, OOM retries.
STATS = dict(batches=0, prefill_tokens=0, prefill_padded=0, steps=0, row_steps=0, kv_read_tokens=0, compactions=0,
             oom_retries=0)


# ----------------------------------------------------------------------------- 1. plan
def _nest_leaders(prefixes):
    """Map each distinct prefix (tuple) to the longest distinct prefix that extends it.
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


if triton is not None:
    @triton.jit
    def _partial_attention_kernel(Q, K, V, O, LSE, LENS, scale, M, T, D,
                                  sq_n, sq_m, sk_n, sk_t, sv_n, sv_t, sl_n, sl_m, LEN_DIV,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                  UPCAST: tl.constexpr):
        # One program: BLOCK_M queries of one (group or row, KV head) pair n, streaming its keys once
        # (flash-decoding style online softmax); all BLOCK_M queries share every loaded K/V tile.
        n = tl.program_id(0)
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
            s = tl.dot(q, tl.trans(k)) * scale  # (BLOCK_M, BLOCK_N)
            s = tl.where(offs_t[None, :] < lens[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
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
    on_gpu = q.is_cuda
    bm = 16 if M <= 16 else (64 if on_gpu else 32)
    grid = (N, triton.cdiv(M, bm))
    _partial_attention_kernel[grid](q, k, v, o, lse, lens, scale, M, k.shape[1], D,
                                    q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                    lens.stride(0), lens.stride(1), len_div,
                                    BLOCK_M=bm, BLOCK_N=64 if on_gpu else 16,
                                    BLOCK_D=max(16, triton.next_power_of_2(D)),
                                    UPCAST=not on_gpu or q.dtype == torch.float32)
    return o, lse


def _cascade_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Registered as an HF attention implementation for the decode steps only. query (B, Hq, 1, D);
    key/value are the per-row new-token caches (ignored here: read from the active cache)."""
    c = _ACTIVE[-1]
    layer = module.layer_idx
    B, Hq, _, D = query.shape
    Hkv = c.sk[layer].shape[1]
    nrep, G, R = Hq // Hkv, c.G, c.R
    scale = scaling if scaling is not None else D ** -0.5
    # Prefix part: the R*nrep queries of a group share one read of the group's prefix KV.
    qp = query.reshape(G, R, Hkv, nrep, D).permute(0, 2, 1, 3, 4).reshape(G, Hkv, R * nrep, D)
    pk, pv, sk, sv = c.pk[layer], c.pv[layer], c.sk[layer], c.sv[layer]
    qs = query.reshape(B, Hkv, nrep, D)  # suffix part: each row over its own new tokens
    if c.backend == "triton":
        plens = c.prefix_lens(nrep)  # (G, R*nrep) int32
        o1, l1 = _partial_attention_triton(qp.reshape(G * Hkv, R * nrep, D), pk.view(G * Hkv, -1, D),
                                           pv.view(G * Hkv, -1, D), plens, scale, Hkv)
        o2, l2 = _partial_attention_triton(qs.reshape(B * Hkv, nrep, D), sk.view(B * Hkv, -1, D),
                                           sv.view(B * Hkv, -1, D), c.slen.view(1, 1).expand(1, nrep), scale, B * Hkv)
        o1, l1 = o1.view(G, Hkv, R * nrep, D), l1.view(G, Hkv, R * nrep)
        o2, l2 = o2.view(B, Hkv, nrep, D), l2.view(B, Hkv, nrep)
    else:
        plens = c.prefix_lens(nrep).unsqueeze(1)  # (G, 1, R*nrep)
        o1, l1 = _partial_attention_torch(qp, pk, pv, plens, scale)  # (G, Hkv, R*nrep, D), (G, Hkv, R*nrep)
        t1 = c.t + 1
        o2, l2 = _partial_attention_torch(qs, sk[:, :, :t1], sv[:, :, :t1], torch.full_like(l1[:1, :1, :1], t1, dtype=torch.long).expand(B, Hkv, nrep), scale)
    # Back to row order, then merge the two softmaxes: weights exp(lse_i - max) (l2 is always finite).
    o1 = o1.view(G, Hkv, R, nrep, D).permute(0, 2, 1, 3, 4).reshape(B, Hkv, nrep, D)
    l1 = l1.view(G, Hkv, R, nrep).permute(0, 2, 1, 3).reshape(B, Hkv, nrep)
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m).unsqueeze(-1), torch.exp(l2 - m).unsqueeze(-1)
    out = (o1 * w1 + o2 * w2) / (w1 + w2)  # (B, Hkv, nrep, D)
    return out.to(query.dtype).reshape(B, 1, Hq, D), None


AttentionInterface.register(_ATTN_NAME, _cascade_attention)


class _CascadeCache:
    """Duck-typed HF cache for the decode steps. Per layer: prefix KV pk/pv (G, Hkv, P, D), one copy
    per nest, and new-token KV sk/sv (B, Hkv, T, D), one per row, written at column t each step."""
    is_compileable = False

    def __init__(self, pk, pv, plen, G, R, T, backend):
        self.pk, self.pv, self.plen = pk, pv, plen  # plen (B,): prefix columns row b may read
        self.G, self.R, self.T, self.backend = G, R, T, backend
        self.sk, self.sv = [], []
        self.t = 0  # python step counter; t_idx / slen mirror it on the device for CUDA graphs
        self.t_idx = torch.zeros(1, dtype=torch.long, device=plen.device)
        self.slen = torch.ones(1, dtype=torch.int32, device=plen.device)
        self._plens = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # key (B, Hkv, 1, D)
        if layer_idx == len(self.sk):  # first step: allocate this layer's new-token buffers
            shape = (key_states.shape[0], key_states.shape[1], self.T, key_states.shape[3])
            self.sk.append(torch.zeros(shape, dtype=key_states.dtype, device=key_states.device))
            self.sv.append(torch.zeros(shape, dtype=value_states.dtype, device=value_states.device))
        self.sk[layer_idx].index_copy_(2, self.t_idx, key_states)
        self.sv[layer_idx].index_copy_(2, self.t_idx, value_states)
        return self.sk[layer_idx], self.sv[layer_idx]

    def get_seq_length(self, layer_idx=0):
        return self.t

    def prefix_lens(self, nrep):  # (G, R*nrep) int32: each row's prefix length, once per query head
        if self._plens is None or self._plens.shape[1] != self.R * nrep:
            self._plens = self.plen.view(self.G, self.R).repeat_interleave(nrep, dim=1).to(torch.int32).contiguous()
        return self._plens

    def advance(self):
        self.t += 1
        self.t_idx += 1
        self.slen += 1

    def select(self, groups, rows, R):  # compaction: keep these groups / rows (index tensors)
        self.pk = [x.index_select(0, groups) for x in self.pk]
        self.pv = [x.index_select(0, groups) for x in self.pv]
        self.sk = [x.index_select(0, rows) for x in self.sk]
        self.sv = [x.index_select(0, rows) for x in self.sv]
        self.plen, self.G, self.R, self._plens = self.plen.index_select(0, rows), len(groups), R, None


# ----------------------------------------------------------------------------- 3. prefill
def _cache_kwarg(fn):
    """transformers >= 5.2x calls the cache `cache=`; older versions `past_key_values=`."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def _layer_kv(cache):
    """[(keys, values)] per layer of a DynamicCache, each (B, Hkv, T, D), across transformers versions."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # pragma: no cover (transformers 4.x)


def _prefill(model, leaders, prefill_tokens):
    """KV of every leader minus its last token (that token is fed as the first decode step, so the
    decode loop's own forward produces the first logits and the prefill needs no LM head).
    Leaders are right-padded: causal attention never lets a real token see the padding after it, so
    no mask is needed, and the pad columns are never read (each row's prefix length masks them).
    Returns per layer pk, pv (G, Hkv, P, D) with P = max(len(leader)) - 1 (>= 1)."""
    base = model.base_model
    kw = _cache_kwarg(base.forward)
    dev = next(model.parameters()).device
    P = max(1, max(len(L) for L in leaders) - 1)
    ids = torch.zeros(len(leaders), P, dtype=torch.long, device=dev)  # (G, P), pad id 0
    for g, L in enumerate(leaders):
        ids[g, :len(L) - 1] = torch.tensor(L[:-1], dtype=torch.long)
    pk = pv = None
    STATS["prefill_tokens"] += sum(len(L) - 1 for L in leaders)
    STATS["prefill_padded"] += len(leaders) * P
    rows = max(1, prefill_tokens // P)  # chunk the forward to bound activation memory
    for lo in range(0, len(leaders), rows):
        cache = DynamicCache(config=model.config)
        base(input_ids=ids[lo:lo + rows], use_cache=True, **{kw: cache})
        kv = _layer_kv(cache)
        if pk is None:  # shapes known now: allocate the whole batch's prefix buffers
            pk = [torch.empty((len(leaders),) + k.shape[1:], dtype=k.dtype, device=dev) for k, _ in kv]
            pv = [torch.empty((len(leaders),) + v.shape[1:], dtype=v.dtype, device=dev) for _, v in kv]
        for layer, (k, v) in enumerate(kv):
            pk[layer][lo:lo + rows].copy_(k)
            pv[layer][lo:lo + rows].copy_(v)
    return pk, pv


# ----------------------------------------------------------------------------- 4. sampling
def _sample_next(logits, temperature, top_p):
    """logits (B, V) -> token ids (B,). Greedy at temperature 0; else softmax(logits / T) restricted to
    the smallest set of most likely tokens whose mass reaches top_p (a token is kept when the mass
    strictly before it is < top_p, as transformers' TopPLogitsWarper does), drawn with torch's RNG."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)  # (B, V)
        sp = sp * ((sp.cumsum(-1) - sp) < top_p)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1).squeeze(-1)


class _StopChecker:
    """Stop strings, checked on the decoded tail of each live row. A stop string completed by token e lies
    within the last len(stop) + 4 tokens up to e whenever each token decodes to >= 1 character, so only
    tails are decoded (one batch_decode per check), never whole continuations."""

    def __init__(self, stop):
        self.tok, self.strs = stop
        self.window = max(len(s) for s in self.strs) + 4

    def _hit(self, text):
        return any(s in text for s in self.strs)

    def cut_lengths(self, rows_toks, checked):
        """rows_toks: each live row's tokens so far; tokens [0, checked) were clean at the last check.
        Returns, per row, the length to cut to (the token completing a stop string is kept) or None."""
        lo = max(0, checked + 1 - self.window)
        texts = self.tok.batch_decode([t[lo:] for t in rows_toks])
        out = []
        for toks, text in zip(rows_toks, texts):
            cut = None
            if self._hit(text):  # rare: find the exact completing token
                cut = next((e for e in range(checked + 1, len(toks) + 1)
                            if self._hit(self.tok.decode(toks[max(0, e - self.window):e]))), None)
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
                return self.eager(ids, pos)
        self.graph.replay()
        return self.logits


def _run_batch(model, units, T, temperature, top_p, eos, stopper, backend, results, prefill_tokens):
    """units: [(leader tuple, [(slot, state_len), ...])]. Decodes T new tokens for every row and writes
    results[slot] = (token list, finished)."""
    dev = next(model.parameters()).device
    G, R = len(units), max(len(rows) for _, rows in units)
    B = G * R
    pk, pv = _prefill(model, [L for L, _ in units], prefill_tokens)
    slot, plen, first = [-1] * B, [0] * B, [0] * B  # padding rows of short groups: slot -1
    for g, (L, rows) in enumerate(units):
        for r, (s, n) in enumerate(rows):
            slot[g * R + r], plen[g * R + r], first[g * R + r] = s, n - 1, L[n - 1]
    slot, plen = torch.tensor(slot, device=dev), torch.tensor(plen, device=dev)  # (B,)
    cache = _CascadeCache(pk, pv, plen, G, R, T, backend)
    ids = torch.tensor(first, device=dev).unsqueeze(1)  # (B, 1): each state's last token ...
    pos = plen.unsqueeze(1).clone()  # (B, 1): ... at its own position (no left padding anywhere)
    out = torch.zeros(B, T, dtype=torch.long, device=dev)  # (B, T) new tokens
    alive, fin = slot >= 0, torch.zeros(B, dtype=torch.bool, device=dev)
    length = torch.full((B,), T, device=dev)  # rows still alive at the end hit max_new_tokens
    on_gpu = dev.type == "cuda"
    sync_every = 8 if on_gpu else 1  # host syncs (stop strings, compaction, early exit) cost on a GPU
    stepper = _Stepper(model, cache, on_gpu and backend == "triton")

    def harvest(mask):  # copy finished rows' tokens out, then forget their slots
        idx = (mask & (slot >= 0)).nonzero().squeeze(1)
        for s, toks, n, f in zip(slot[idx].tolist(), out[idx].tolist(), length[idx].tolist(), fin[idx].tolist()):
            results[s] = (toks[:n], f)
        slot[idx] = -1

    checked = 0  # tokens [0, checked) of every live row are known to be free of stop strings
    original_attn = model.config._attn_implementation
    model.config._attn_implementation = _ATTN_NAME
    _ACTIVE.append(cache)
    try:
        STATS["batches"] += 1
        prefix_read = int(plen.view(G, R).max(1).values.sum())
        for t in range(T):
            STATS["steps"] += 1
            STATS["row_steps"] += B
            STATS["kv_read_tokens"] += prefix_read + B * (t + 1)
            logits = stepper(ids, pos)  # (B, V)
            nxt = _sample_next(logits, temperature, top_p)  # (B,)
            out[:, t] = nxt
            if eos is not None:  # EOS on the device: exact without a host sync
                newly = alive & torch.isin(nxt, eos)
                length = torch.where(newly, t + 1, length)
                fin |= newly
                alive &= ~newly
            ids.copy_(nxt.unsqueeze(1))
            pos += 1
            cache.advance()
            if (t + 1) % sync_every and t + 1 < T:
                continue
            if stopper is not None:  # stop strings need the tokenizer: host side
                live = alive.nonzero().squeeze(1)
                cuts = stopper.cut_lengths(out[live, :t + 1].tolist(), checked) if len(live) else []
                hit = [(b, c) for b, c in zip(live.tolist(), cuts) if c is not None]
                if hit:
                    idx = torch.tensor([b for b, _ in hit], device=dev)
                    length[idx] = torch.tensor([c for _, c in hit], device=dev)
                    fin[idx], alive[idx] = True, False
                checked = t + 1
            n_alive = int(alive.sum())
            if n_alive == 0:
                break
            if t + 1 < T and n_alive < 0.6 * B and B > 8:
                # Compaction: drop finished rows (and groups with none alive) so later steps cost less.
                STATS["compactions"] += 1
                harvest(~alive)
                a = alive.view(cache.G, cache.R).cpu()
                keep = [g for g in range(cache.G) if a[g].any()]
                R2 = int(a.sum(1).max())
                rows, dummy = [], []
                for g in keep:  # live rows of each kept group, padded to R2 with dead copies
                    live = (a[g].nonzero().squeeze(1) + g * cache.R).tolist()
                    rows += live + live[:1] * (R2 - len(live))
                    dummy += [False] * len(live) + [True] * (R2 - len(live))
                rows, dummy = torch.tensor(rows, device=dev), torch.tensor(dummy, device=dev)
                cache.select(torch.tensor(keep, device=dev), rows, R2)
                slot = slot[rows].masked_fill(dummy, -1)
                alive, fin, length, out = alive[rows] & ~dummy, fin[rows], length[rows], out[rows]
                ids, pos, B = ids[rows], pos[rows], len(rows)
                prefix_read = int(cache.plen.view(cache.G, cache.R).max(1).values.sum())
                stepper.reset()
        harvest(torch.ones_like(alive))
    finally:
        _ACTIVE.pop()
        model.config._attn_implementation = original_attn


# ----------------------------------------------------------------------------- 6. public API
def _max_positions(config):
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


@torch.no_grad()
def _probe(model):
    """(KV bytes per cached token, vocabulary size), from a one-token forward."""
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
    stop: None or (tokenizer, list_of_stop_strings): a row stops when its decoded continuation contains a stop
    string; its token list is then cut after the token that completed the stop string (the text may thus run a
    few characters past the stop string: the caller strips it).
    Randomness comes from torch's global RNG (torch.manual_seed makes it reproducible on CPU; keep it
    deterministic: same inputs + same seed => same outputs).
    max_batch_tokens: KV budget of one batch in cached tokens (default: from free memory).
    model: any transformers causal LM (eval mode, no grad inside). Works on CPU (no Triton, no CUDA graphs) and GPU."""
    n = len(prefixes)
    if n == 0 or k <= 0 or max_new_tokens <= 0:
        return [[[] for _ in range(k)] for _ in range(n)], [[False] * k for _ in range(n)]
    assert all(len(p) > 0 for p in prefixes), "every prefix needs at least one token (e.g. BOS)"
    limit, longest = _max_positions(model.config), max(len(p) for p in prefixes)
    assert limit is None or longest + max_new_tokens <= limit, (
        f"prefix ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's {limit} positions")
    dev = next(model.parameters()).device
    backend = ATTENTION_BACKEND if ATTENTION_BACKEND != "auto" else (
        "triton" if dev.type == "cuda" and triton is not None else "torch")
    eos = torch.tensor(sorted(set(eos_token_ids)), device=dev) if len(eos_token_ids) else None
    stopper = _StopChecker(stop) if stop is not None and len(stop[1]) else None

    # Plan: every (prefix i, sample j) row joins the nest of its prefix's leader.
    leader = _nest_leaders(prefixes)
    nests = {}
    for i, p in enumerate(prefixes):
        nests.setdefault(leader[tuple(p)], []).extend((i * k + j, len(p)) for j in range(k))
    units = sorted(nests.items(), key=lambda u: -len(u[0]))  # longest first: similar P in a batch

    # Budget: cached tokens per batch (prefix once per nest + T per row + logits/sort scratch per row).
    was_training = model.training
    model.eval()
    try:
        bytes_tok, vocab = _probe(model)
        if max_batch_tokens is None:
            free = torch.cuda.mem_get_info(dev)[0] * 0.6 if dev.type == "cuda" else 2 ** 30
            max_batch_tokens = int(free // bytes_tok)
        per_row = max_new_tokens + -(-24 * vocab // bytes_tok)
        cost = lambda L, rows: len(L) + len(rows) * per_row  # noqa: E731
        batches, cur, used = [], [], 0
        for L, rows in units:
            step = max(1, (max_batch_tokens - len(L)) // per_row)  # a nest too big for one batch is split
            for lo in range(0, len(rows), step):
                part = (L, rows[lo:lo + step])
                if cur and used + cost(*part) > max_batch_tokens:
                    batches.append(cur)
                    cur, used = [], 0
                cur.append(part)
                used += cost(*part)
        batches.append(cur)
        prefill_tokens = 32768 if dev.type == "cuda" else 8192

        results = [None] * (n * k)
        bar = None
        if show_progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=n * k, desc=desc)

        def run(batch):  # retry at half the batch on out-of-memory
            try:
                _run_batch(model, batch, max_new_tokens, temperature, top_p, eos, stopper, backend,
                           results, prefill_tokens)
            except torch.cuda.OutOfMemoryError:
                rows = sum(len(r) for _, r in batch)
                if rows <= 1:
                    raise
                torch.cuda.empty_cache()
                STATS["oom_retries"] += 1
                if len(batch) == 1:
                    (L, r), = batch
                    halves = [[(L, r[:len(r) // 2])], [(L, r[len(r) // 2:])]]
                else:
                    halves = [batch[:len(batch) // 2], batch[len(batch) // 2:]]
                for h in halves:
                    run(h)
                return
            if bar is not None:
                bar.update(sum(len(r) for _, r in batch))

        for batch in batches:
            run(batch)
        if bar is not None:
            bar.close()
    finally:
        model.train(was_training)
    tokens = [[results[i * k + j][0] for j in range(k)] for i in range(n)]
    finished = [[results[i * k + j][1] for j in range(k)] for i in range(n)]
    return tokens, finished
