"""kernels.py section 1: fused log-probs / entropy / PPO loss against a float64 oracle.

The Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1); shapes are kept small
because the interpreter costs ~milliseconds per tile operation. Interpreter tile: 64 rows x 512 vocab
x 128 hidden, so the ragged shapes below cross every tile edge.
"""
import types

import pytest
import torch

import kernels as K
from benchmarks.bench_logprobs import cpu_peak_extra_bytes, naive_logprobs
from conftest import DEVICES

# (N, d, V): tile-aligned small shape; N=1; ragged rows (2 row tiles), odd multiple of 16 for d
# (2 d tiles), V not a multiple of the vocabulary tile
SHAPES = [(128, 128, 4096), (1, 48, 515), (100, 144, 1000)]
BACKENDS = ["triton", "chunked", "torch"]   # fused kernels; cuBLAS slabs + Triton slab kernels; torch slabs


def make_inputs(N, d, V, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)                                  # drawn on the CPU: same values on any device
    hidden = torch.randn(N, d, generator=gen)                                  # [N, d]
    weight = torch.randn(V, d, generator=gen) * (3 / d ** 0.5)                 # [V, d]: logits std ~3
    targets = torch.randint(0, V, (N,), generator=gen)                         # [N]
    grad_logp, grad_entropy = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    return tuple(t.to(device) for t in (hidden.to(dtype), weight.to(dtype), targets, grad_logp, grad_entropy))


def logprobs_and_grads(fn, hidden, weight, targets, grad_logp, grad_entropy, temperature):
    """Run fn(hidden, weight, targets, temperature) -> (logp, entropy), backward of
    sum(g1 logp + g2 H); returns (logp, entropy, d hidden, d weight)."""
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    logp, entropy = fn(hidden, weight, targets, temperature)
    ((grad_logp.to(logp.dtype) * logp).sum() + (grad_entropy.to(logp.dtype) * entropy).sum()).backward()
    return logp.detach(), entropy.detach(), hidden.grad, weight.grad


def float64_oracle(hidden, weight, targets, grad_logp, grad_entropy, temperature):
    return logprobs_and_grads(K.reference_logprobs, hidden.double(), weight.double(), targets,
                              grad_logp.double(), grad_entropy.double(), temperature)


def assert_close(actual, expected, rtol):
    """Elementwise relative error <= rtol, with an absolute floor of rtol x the tensor's max-abs (for
    entries near zero, e.g. dW rows of unlikely tokens)."""
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def scaled_error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def ours(backend):
    return lambda h, w, t, temp: K.fused_logprobs(h, w, t, temp, backend=backend)


@pytest.fixture(autouse=True)
def _one_config_per_kernel_on_a_gpu(request, monkeypatch):
    """On a GPU the autotuners try one config here: each new (d, V) below would otherwise compile all of
    them (minutes in all). Every config is compiled by test_kernels_compile.py and timed at the real
    shapes by benchmarks/bench_logprobs.py; test_gpu_launch_path_autotunes... covers the tuning itself."""
    if getattr(getattr(request.node, "callspec", None), "params", {}).get("device") == "cuda":
        for tuner in (K._logprob_fwd_autotuned, K._logprob_bwd_autotuned):
            monkeypatch.setattr(tuner, "configs", tuner.configs[:1])
            monkeypatch.setattr(tuner, "cache", {})


@pytest.fixture
def small_chunks(monkeypatch):
    """Make the chunked paths use 16-row slabs forward (and slabs of 16 V / N columns backward), on the CPU and
    on a GPU, and the fused backward 512-column vocabulary slices (the minimum), so that several slabs /
    slices, and a ragged last one, run."""
    def set_for_vocab(V):
        monkeypatch.setattr(K, "TORCH_CHUNK_BYTES", 16 * 4 * V)
        monkeypatch.setattr(K, "CUDA_SLAB_BYTES", (16 * 4 * V, 16 * 4 * V))
        monkeypatch.setattr(K, "TRITON_DW_SLICE_BYTES", 1)
    return set_for_vocab


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N, d, V", SHAPES)
def test_fp32_forward_backward_match_float64(backend, N, d, V, small_chunks, device):
    small_chunks(V)
    temperature = 0.6 if N != 1 else 1.0
    inputs = make_inputs(N, d, V, device=device)
    got = logprobs_and_grads(ours(backend), *inputs, temperature)
    expected = float64_oracle(*inputs, temperature)
    for name, a, e in zip(["logp", "entropy", "d hidden", "d weight"], got, expected):
        assert a.dtype == torch.float32, name
        assert_close(a, e, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N, d, V", SHAPES[1:])
def test_bf16_within_error_of_bf16_torch(backend, N, d, V, small_chunks, device):
    small_chunks(V)
    hidden, weight, targets, g1, g2 = make_inputs(N, d, V, torch.bfloat16, seed=1, device=device)
    got = logprobs_and_grads(ours(backend), hidden, weight, targets, g1, g2, 0.6)
    same_dtype_torch = logprobs_and_grads(naive_logprobs, hidden, weight, targets, g1, g2, 0.6)
    expected = float64_oracle(hidden, weight, targets, g1, g2, 0.6)    # exact maths on the bf16 values
    assert got[0].dtype == got[1].dtype == torch.float32
    assert got[2].dtype == got[3].dtype == torch.bfloat16
    # at most naive's error (x 1.25: the slabs and tiles sum in another order); the fused kernels keep the
    # logits in fp32 (naive rounds them to bf16), so their logp and entropy are 10x closer at least
    for name, a, t, e in zip(["logp", "entropy", "d hidden", "d weight"], got, same_dtype_torch, expected):
        assert scaled_error(a, e) <= 1.25 * scaled_error(t, e) + 1e-4, name
        if backend == "triton" and name in ("logp", "entropy"):
            assert scaled_error(a, e) <= 0.1 * scaled_error(t, e), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 2, 3])
def test_triton_forward_writes_every_statistic(num_splits, device):
    # V=1000 is two 512-wide tiles in the interpreter: with 3 splits the last split covers no column and
    # must still write its (empty) statistics, which the merge must ignore (a GPU tile is <= 256 wide)
    N, d, V = 100, 144, 1000
    hidden, weight, targets, _, _ = make_inputs(N, d, V, seed=2, device=device)
    partial = torch.full((4, num_splits, N), float("nan"), device=device)      # poison
    logp, entropy, lse = K._triton_forward(hidden, weight, targets, 0.6, num_splits=num_splits, partial=partial)
    assert torch.isfinite(partial).all()
    z = (hidden.double() @ weight.double().T) / 0.6                             # [N, V]
    assert_close(lse, torch.logsumexp(z, -1), rtol=1e-6)
    ref_logp, ref_entropy = K.reference_logprobs(hidden.double(), weight.double(), targets, 0.6)
    assert_close(logp, ref_logp, rtol=1e-5)
    assert_close(entropy, ref_entropy, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_gradient_only_for_inputs_that_require_it(backend, frozen, device, monkeypatch):
    """The backward is told which of dX, dW to compute (a frozen lm_head under LoRA: no dW work) and computes
    only that one, correctly."""
    hidden, weight, targets, g1, g2 = make_inputs(65, 32, 600, seed=3, device=device)
    hidden.requires_grad_(frozen != "hidden")
    weight.requires_grad_(frozen != "weight")
    calls = []
    for name in ("_triton_backward", "_chunked_backward"):
        def spy(*args, _real=getattr(K, name), **kw):
            grads = _real(*args, **kw)
            calls.append((args[8:10], tuple(g is None for g in grads)))   # (compute_dx, compute_dw), which are None
            return grads
        monkeypatch.setattr(K, name, spy)
    logp, entropy = K.fused_logprobs(hidden, weight, targets, 0.6, backend=backend)
    ((g1 * logp).sum() + (g2 * entropy).sum()).backward()
    wanted = (frozen != "hidden", frozen != "weight")
    assert calls == [(wanted, (not wanted[0], not wanted[1]))]
    expected = float64_oracle(hidden, weight, targets, g1, g2, 0.6)
    if frozen == "weight":
        assert weight.grad is None
        assert_close(hidden.grad, expected[2], rtol=1e-5)
    else:
        assert hidden.grad is None
        assert_close(weight.grad, expected[3], rtol=1e-5)


def test_gpu_launch_path_autotunes_without_corrupting_accumulators(monkeypatch):
    """The CUDA launch path (autotuned kernels, vocabulary split sized from the SM count, dW slices)
    run through the interpreter. Each trial config runs once while tuning, before the real launch; the
    atomically accumulated dX / dW must come out as if only the real launch had run (restore_value), also
    when the ragged last vocabulary slice triggers a second tuning after dX holds the first slice's sum."""

    def one_trial_run(kernel_call, quantiles):
        kernel_call()
        return [1.0, 1.0, 1.0]
    fwd, bwd = K._logprob_fwd_autotuned, K._logprob_bwd_autotuned      # kernels.py's own autotuners, with
    for tuner in (fwd, bwd):                                             # interpreter-sized tiles swapped in
        monkeypatch.setattr(tuner, "configs", K._configs([(64, 512, 128, 1, 1), (64, 256, 128, 1, 1)]))
        monkeypatch.setattr(tuner, "cache", {})
        monkeypatch.setattr(tuner, "_do_bench", one_trial_run)          # the real do_bench needs a GPU driver
    monkeypatch.setattr(K, "_compiled", lambda hidden: True)  # fp32 inputs: no bf16 dot in the interpreter
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"multi_processor_count": 4}))
    monkeypatch.setattr(K, "TRITON_DW_SLICE_BYTES", 1)        # 512-column slices: 512 + 88
    inputs = make_inputs(40, 32, 600, seed=8)
    got = logprobs_and_grads(ours("triton"), *inputs, 0.6)
    assert len(bwd.cache) == 2 and len(fwd.cache) == 1       # backward tuned per slice width (512, 88); forward once
    for a, e in zip(got, float64_oracle(*inputs, 0.6)):
        assert_close(a, e, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_chunked_path_writes_every_output_element(backend, device, small_chunks, monkeypatch):
    """Each buffer the chunked path allocates with torch.empty / empty_like (the statistics, each slab kernel's
    output, dW written slice by slice) comes NaN-filled here, so an element that no slab writes fails the
    comparison. Ragged slabs both ways (3 x 16 rows forward, 3 x 129 columns backward)."""
    N, d, V = 37, 32, 300
    small_chunks(V)
    inputs = make_inputs(N, d, V, seed=9, device=device)
    expected = float64_oracle(*(t.cpu() for t in inputs), 0.6)
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(make):
        def make_nan(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return make_nan
    monkeypatch.setattr(torch, "empty", poisoned(real_empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(real_empty_like))
    got = logprobs_and_grads(ours(backend), *inputs, 0.6)
    monkeypatch.setattr(torch, "empty", real_empty)
    monkeypatch.setattr(torch, "empty_like", real_empty_like)
    for a, e in zip(got, expected):
        assert_close(a.cpu(), e, rtol=1e-5)


def test_fused_backward_grouped_order_with_a_ragged_last_group(monkeypatch):
    """The fused backward walks row blocks in groups of 8 (GROUP_N) across all column blocks; with 16-row
    tiles, N = 149 gives 10 row blocks (a full group and a ragged one of 2) x 3 column blocks. Every dX row
    and dW column must still match float64 (the other shapes here have at most 2 row blocks)."""
    monkeypatch.setattr(K, "_INTERPRETER_TILE", dict(BLOCK_N=16, BLOCK_V=128, BLOCK_D=32))
    inputs = make_inputs(149, 32, 300, seed=4)
    got = logprobs_and_grads(ours("triton"), *inputs, 0.6)
    for a, e in zip(got, float64_oracle(*inputs, 0.6)):
        assert_close(a, e, rtol=1e-5)


# the interpreter (numpy) warns where exp overflows, or -inf - -inf appears, in padding columns that the kernels mask
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_logit_far_below_zero(backend, device):
    """Rows whose logits / T are all below -88 (exp underflows in fp32): the vocabulary's padding columns in a
    tile (V = 300 is no multiple of any block) must not turn into exp(-lse) = inf and make dX NaN."""
    gen = torch.Generator().manual_seed(0)
    N, d, V = 4, 16, 300
    u = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    weight = u * 10 + 0.1 * torch.randn(V, d, generator=gen)                     # [V, d]
    hidden = -u * 10 + 0.1 * torch.randn(N, d, generator=gen)                    # [N, d]: every logit about -100
    targets = torch.tensor([0, 5, 299, 17])
    g1, g2 = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    assert float((hidden @ weight.T).max()) < -88   # the premise: exp(logit) underflows in fp32 for every column
    inputs = tuple(x.to(device) for x in (hidden, weight, targets, g1, g2))
    got = logprobs_and_grads(ours(backend), *inputs, 1.0)
    expected = float64_oracle(*inputs, 1.0)
    assert float(expected[0].max()) < -1 and float(expected[2].abs().max()) > 0.01   # a real case, not all zeros
    for name, a, e in zip(["logp", "entropy", "d hidden", "d weight"], got, expected):
        assert_close(a, e, rtol=1e-3)   # fp32 z - lse at |z| ~ 100 loses ~1e-5: the point is that nothing is NaN


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend, device):
    """An empty micro-batch (N = 0): empty log-probs and dX, and a zero dW, on every backend."""
    hidden, weight, targets, g1, g2 = make_inputs(0, 16, 300, device=device)
    logp, entropy, d_hidden, d_weight = logprobs_and_grads(ours(backend), hidden, weight, targets, g1, g2, 0.6)
    assert logp.shape == entropy.shape == (0,) and d_hidden.shape == (0, 16)
    assert torch.equal(d_weight, torch.zeros_like(weight))


def test_auto_backend_uses_triton_only_for_cuda_tensors(monkeypatch):
    """auto: the chunked path (cuBLAS + Triton slab kernels) for CUDA tensors, the torch fallback otherwise, and
    on a CUDA machine without Triton; the interpreter is only ever asked for explicitly (it is slow)."""
    assert K.resolve_backend(torch.zeros(1)) == "torch"
    assert K.resolve_backend(types.SimpleNamespace(is_cuda=True)) == "chunked"
    monkeypatch.setattr(K, "HAS_TRITON", False)
    assert K.resolve_backend(types.SimpleNamespace(is_cuda=True)) == "torch"
    monkeypatch.undo()
    assert K.resolve_backend(torch.zeros(1), "reference") == "reference"
    with pytest.raises(AssertionError):
        K.resolve_backend(torch.zeros(1), "cuda")


def test_torch_fallback_never_holds_the_full_logits(monkeypatch):
    N, d, V = 1024, 32, 2048
    full_logits_bytes = N * V * 4                                               # 8 MiB
    monkeypatch.setattr(K, "TORCH_CHUNK_BYTES", 2**18)                          # 32-row slabs
    hidden, weight, targets, g1, g2 = make_inputs(N, d, V, seed=4)
    hidden.requires_grad_()
    weight.requires_grad_()

    def run(fn):
        hidden.grad = weight.grad = None
        logp, entropy = fn(hidden, weight, targets, 1.0)
        ((g1 * logp).sum() + (g2 * entropy).sum()).backward()
    naive_peak = cpu_peak_extra_bytes(lambda: run(naive_logprobs))
    ours_peak = cpu_peak_extra_bytes(lambda: run(ours("torch")))
    assert naive_peak >= full_logits_bytes            # the measurement sees the naive [N, V] buffers
    assert ours_peak < full_logits_bytes / 4          # slabs (256 KiB each) + dW, dX: < 1 MiB


# ----------------------------------------------------------------------------- PPO loss
PPO_SHAPE = (48, 64, 700)
PPO_KW = dict(temperature=0.6, clip_eps=0.2)


def ppo_inputs(seed=5, device="cpu"):
    hidden, weight, targets, _, _ = make_inputs(*PPO_SHAPE, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    N = PPO_SHAPE[0]
    logp, _ = K.reference_logprobs(hidden.double(), weight.double(), targets, 0.6)
    # log-ratios spread over [-0.6, 0.6], kept 1e-3 away from the clip edges log(1 -+ 0.2) so that
    # fp32 and fp64 agree on which branch is active
    log_ratio = torch.empty(N).uniform_(-0.6, 0.6, generator=gen).double()
    for edge in (torch.log(torch.tensor(0.8)), torch.log(torch.tensor(1.2))):
        near = (log_ratio - edge).abs() < 1e-3
        log_ratio[near] += 3e-3
    old_logp = (logp - log_ratio).float()
    ref_logp = (logp + torch.randn(N, generator=gen) * 0.5).float()
    ref_logp[:3] = logp[:3].float() + 15.0                                      # k3 > 10: clamped, no gradient
    advantages = torch.randn(N, generator=gen)
    advantages[3:6] = 0.0
    return tuple(t.to(device) for t in (hidden, weight, targets, old_logp, ref_logp, advantages))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_loss_matches_float64_spec(backend, device):
    hidden, weight, targets, old_logp, ref_logp, advantages = ppo_inputs(device=device)
    counts = dict(kl_coef=0.1, entropy_coef=0.01, n_tokens=PPO_SHAPE[0] + 7, n_seqs=5)   # mini-batch > micro-batch
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, stats = K.ppo_loss(h, w, targets, old_logp, ref_logp, advantages, **PPO_KW, **counts, backend=backend)
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref_loss = K.reference_ppo_loss(h64, w64, targets, old_logp.double(), ref_logp.double(), advantages.double(),
                                    **PPO_KW, **counts)
    ref_loss.backward()
    assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5)
    assert_close(h.grad, h64.grad, rtol=1e-5)
    assert_close(w.grad, w64.grad, rtol=1e-5)

    logp, entropy = K.reference_logprobs(hidden.double(), weight.double(), targets, 0.6)
    ratio = torch.exp(logp - old_logp.double())
    kl = (torch.exp(ref_logp.double() - logp) - (ref_logp.double() - logp) - 1).clamp(0, 10)
    clipped = ((advantages > 0) & (ratio > 1.2)) | ((advantages < 0) & (ratio < 0.8))
    assert 0 < clipped.sum() < len(clipped) and (kl == 10).sum() == 3       # the inputs exercise both branches
    for name, expected in dict(logp=logp, ratio=ratio, kl=kl, entropy=entropy).items():
        assert not stats[name].requires_grad and stats[name].dtype == torch.float32, name
        assert_close(stats[name], expected, rtol=1e-5)
    assert torch.equal(stats["clipped"], clipped)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_ppo_gradient_in_the_forward_equals_the_recomputing_backward(backend, device, small_chunks, monkeypatch):
    """PPO_GRADIENT_IN_FORWARD's path (dX, dW computed in ppo_loss's forward, one row slab at a time) against the same loss through
    fused_logprobs: same loss, stats and gradients; the backward scales by the incoming gradient (here 3); a frozen
    lm_head (LoRA) gets no gradient and its dX is still right; ref_logp None; N = 0 on both paths. Ragged slabs:
    45 rows in slabs of 16 (16 + 16 + 13)."""
    small_chunks(PPO_SHAPE[2])
    hidden, weight, targets, old_logp, ref_logp, advantages = ppo_inputs(seed=8, device=device)
    hidden, targets, old_logp, ref_logp, advantages = (x[:45] for x in (hidden, targets, old_logp, ref_logp, advantages))
    counts = dict(kl_coef=0.1, entropy_coef=0.01, n_tokens=60, n_seqs=5)
    results = {}
    for in_forward in (True, False):
        monkeypatch.setattr(K, "PPO_GRADIENT_IN_FORWARD", in_forward)
        for train_weight in (True, False):
            for ref in (ref_logp, None):
                kw = dict(counts, kl_coef=0.0) if ref is None else counts
                h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(train_weight)
                loss, stats = K.ppo_loss(h, w, targets, old_logp, ref, advantages, **PPO_KW, **kw, backend=backend)
                (3 * loss).backward()
                results[in_forward, train_weight, ref is None] = (loss.detach(), stats, h.grad, w.grad)
    for key in [(t, r) for t in (True, False) for r in (True, False)]:
        (loss, stats, dh, dw), (loss0, stats0, dh0, dw0) = results[(True, *key)], results[(False, *key)]
        assert_close(loss, loss0.double(), rtol=1e-6)
        assert_close(dh, dh0.double(), rtol=1e-5)
        assert (dw is None) == (dw0 is None) == (not key[0])
        if dw is not None:
            assert_close(dw, dw0.double(), rtol=1e-5)
        for name in ("logp", "ratio", "kl", "entropy"):
            assert_close(stats[name], stats0[name].double(), rtol=1e-6)
        assert torch.equal(stats["clipped"], stats0["clipped"])
    for in_forward in (True, False):   # N = 0: no slab runs
        monkeypatch.setattr(K, "PPO_GRADIENT_IN_FORWARD", in_forward)
        h, w = hidden[:0].clone().requires_grad_(), weight.clone().requires_grad_()
        loss, stats = K.ppo_loss(h, w, targets[:0], old_logp[:0], ref_logp[:0], advantages[:0], **PPO_KW, **counts,
                                 backend=backend)
        loss.backward()
        assert float(loss.detach()) == 0 and stats["ratio"].shape == (0,) and torch.equal(w.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_gradient_at_ratio_one_is_advantage_weighted_logp_gradient(backend, device):
    hidden, weight, targets, _, _, advantages = ppo_inputs(seed=6, device=device)
    n_tokens = 100
    with torch.no_grad():
        old_logp, _ = K.fused_logprobs(hidden, weight, targets, 0.6, backend=backend)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, stats = K.ppo_loss(h, w, targets, old_logp, None, advantages, **PPO_KW, kl_coef=0.0,
                             n_tokens=n_tokens, n_seqs=4, backend=backend)
    loss.backward()
    assert torch.equal(stats["ratio"], torch.ones_like(stats["ratio"])) and not stats["clipped"].any()
    assert torch.equal(stats["kl"], torch.zeros_like(stats["kl"]))
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp64, _ = K.reference_logprobs(h64, w64, targets, 0.6)
    (-(advantages.double() * logp64).sum() / n_tokens).backward()
    assert_close(loss.detach(), -(advantages.double() * 1.0).sum() / n_tokens, rtol=1e-6)
    assert_close(h.grad, h64.grad, rtol=1e-5)
    assert_close(w.grad, w64.grad, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_clipped_tokens_get_exactly_zero_gradient(backend, device):
    hidden, weight, targets, old_logp, _, advantages = ppo_inputs(seed=7, device=device)
    h = hidden.clone().requires_grad_()
    loss, stats = K.ppo_loss(h, weight, targets, old_logp, None, advantages, **PPO_KW, kl_coef=0.0,
                             n_tokens=48, n_seqs=4, backend=backend)
    loss.backward()
    row_has_grad = h.grad.abs().sum(1) > 0                                     # row t depends only on token t
    assert stats["clipped"].any()
    assert torch.equal(row_has_grad, ~stats["clipped"] & (advantages != 0))


def test_kl_needs_reference_logprobs():
    hidden, weight, targets, old_logp, _, advantages = ppo_inputs()
    with pytest.raises(AssertionError):
        K.ppo_loss(hidden, weight, targets, old_logp, None, advantages, **PPO_KW, kl_coef=1e-4,
                   n_tokens=48, n_seqs=4, backend="torch")
