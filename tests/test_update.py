"""The PPO update (vineppo.py sections 4, 6 and 8) on a small random Llama: token log-probs against a forward of
each episode alone, gradient accumulation over micro-batches, the ratio at the first step, the skip rule; the
learning-rate schedule, the data order and the checkpoint lookup that resume relies on."""
import copy
import itertools
import types

import pytest
import torch

import vineppo as vp
from conftest import save_random_model

# Three episodes of different lengths, so that a micro-batch pads two of them.
EPISODES = [vp.Episode(prompt_ids=[5, 6, 7], response_ids=[8, 9, 10, 11, 12]),
            vp.Episode(prompt_ids=[20, 21, 22, 23, 24, 25], response_ids=[30, 31]),
            vp.Episode(prompt_ids=[40], response_ids=[41, 42, 43, 44])]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    folder = save_random_model(tmp_path_factory.mktemp("update") / "llama", "llama")
    model, tok = vp.load_policy(folder, torch.device("cpu"), vp.parse_args(["--model", folder, "--task", "gsm8k"]))
    return model.eval(), tok.pad_token_id


def per_episode_logprobs(model, episodes, temperature):
    """The oracle: each episode alone through the model's own forward and lm_head, in float64."""
    out = []
    for e in episodes:
        P, L = len(e.prompt_ids), len(e.response_ids)
        with torch.no_grad():
            logits = model(torch.tensor([e.prompt_ids + e.response_ids])).logits[0].double() / temperature
        out.append(torch.log_softmax(logits[P - 1:P + L - 1], -1).gather(1, torch.tensor(e.response_ids)[:, None])[:, 0])
    return torch.cat(out)


@pytest.mark.parametrize("micro_batch", [1, 2, 3])
def test_token_logprobs_match_each_episode_alone(policy, micro_batch):
    model, pad = policy
    got = vp.token_logprobs(model, EPISODES, pad, 0.6, micro_batch)
    assert got.shape == (sum(len(e.response_ids) for e in EPISODES),)
    torch.testing.assert_close(got.double(), per_episode_logprobs(model, EPISODES, 0.6), rtol=1e-5, atol=1e-5)


def update_args(micro_batch, **flags):
    return vp.parse_args(["--task", "gsm8k", "--model", "someone/any-model", "--mini-batch", "3", "--micro-batch",
                          str(micro_batch), "--epochs", "1", "--lr", "1.0",
                          *[f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]])


def update(model, pad, micro_batch, reference=None, token_adv=None, **flags):
    """One ppo_update of a copy of `model` (its own frozen copy as the reference unless given) on EPISODES with
    fixed advantages."""
    policy = copy.deepcopy(model)
    reference = copy.deepcopy(model).requires_grad_(False) if reference is None else reference
    args = update_args(micro_batch, **flags)
    # SGD, not the run's AdamW: its step is linear in the gradient, so equal gradients give equal steps (AdamW's
    # first step is about lr * sign(g), which a rounding difference in a near-zero gradient flips)
    optimizer = torch.optim.SGD(policy.parameters(), lr=args.lr)
    scheduler = vp.warmup_linear_schedule(optimizer, 10, 0.0)
    if token_adv is None:
        token_adv = [torch.linspace(-1, 1, len(e.response_ids)) * (i + 1) for i, e in enumerate(EPISODES)]
    torch.manual_seed(0)
    stats = vp.ppo_update(policy, reference, optimizer, scheduler, EPISODES, token_adv, args, pad)
    return policy, stats, scheduler


def test_micro_batches_accumulate_to_the_mini_batch_gradient(policy):
    """micro-batch losses are scaled by the MINI-batch's token and sequence counts, so accumulating 3 micro-batches
    of 1 episode takes the same optimizer step as 1 micro-batch of 3. At the first step the policy is the one that
    gave the old log-probs: ratio 1, nothing clipped, KL 0."""
    model, pad = policy
    one, stats_one, _ = update(model, pad, micro_batch=3)
    split, stats_split, _ = update(model, pad, micro_batch=1)
    assert stats_one["update/steps"] == stats_split["update/steps"] == 1
    for s in (stats_one, stats_split):
        assert s["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and s["loss/clipfrac"] == 0.0
        assert s["loss/kl"] == pytest.approx(0.0, abs=1e-9)
    assert stats_one["update/grad_norm"] == pytest.approx(stats_split["update/grad_norm"], rel=1e-5)
    assert stats_one["loss/total"] == pytest.approx(stats_split["loss/total"], rel=1e-5, abs=1e-7)
    moved = 0.0
    for a, b, p0 in zip(one.parameters(), split.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        moved = max(moved, float((a - p0).detach().abs().max()))
    assert moved > 1e-3   # the step happened


def test_skip_rule_leaves_the_policy_and_the_schedule_alone(policy):
    """A mini-batch whose mean ratio exceeds --skip-ratio is skipped: no optimizer step, no schedule step."""
    model, pad = policy
    skipped, stats, scheduler = update(model, pad, micro_batch=2, skip_ratio=0.5)   # the ratio is 1 > 0.5
    assert stats["update/steps"] == 0 and stats["update/skipped"] == 1
    assert scheduler.last_epoch == 0
    assert all(torch.equal(a, b) for a, b in zip(skipped.parameters(), model.parameters()))
    assert all(p.grad is None for p in skipped.parameters())   # nothing left to leak into the next mini-batch


@pytest.mark.parametrize("big,skipped", [(40.0, 0), (60.0, 1)])
def test_skip_rule_takes_the_token_mean_ratio_of_the_mini_batch(policy, monkeypatch, big, skipped):
    """Spec 1 skips on the mini-batch's MEAN ratio over tokens, however it is split into micro-batches: the
    2-token episode's ratio set to `big`, the other 9 tokens' to 1, is a mean of (2 big + 9) / 11 = 8.1 (kept)
    or 11.7 (skipped); its max (40) is over 10 either way, and so is its micro-batch's own mean."""
    model, pad = policy
    real = vp.kernels.ppo_loss

    def ratios_set(*a, **kw):
        loss, stats = real(*a, **kw)
        return loss, dict(stats, ratio=torch.where(torch.isin(a[2], torch.tensor([30, 31])), big, 1.0))
    monkeypatch.setattr(vp.kernels, "ppo_loss", ratios_set)
    _, stats, _ = update(model, pad, micro_batch=1)
    assert stats["update/skipped"] == skipped


@pytest.mark.parametrize("advantage,whitened", [("vine", True), ("critic", True), ("grpo", False), ("rloo", False)])
def test_advantages_are_whitened_per_mini_batch(policy, monkeypatch, advantage, whitened):
    """Spec 1: VinePPO's and PPO's advantages are whitened over each mini-batch's tokens (mean 0, population std 1),
    not over the iteration; GRPO's and RLOO's reach the loss as they are. The loss gets the run's clip, KL
    coefficient and temperature."""
    model, pad = policy
    calls, real = [], vp.kernels.ppo_loss
    monkeypatch.setattr(vp.kernels, "ppo_loss", lambda *a, **kw: (calls.append((a[5].clone(), kw)), real(*a, **kw))[1])
    token_adv = [torch.linspace(-1, 1, len(e.response_ids)) * (i + 1) + i for i, e in enumerate(EPISODES)]
    policy_copy = copy.deepcopy(model)
    optimizer = torch.optim.SGD(policy_copy.parameters(), lr=0.0)
    args = update_args(2, mini_batch=2, advantage=advantage, samples_per_prompt=2, clip_eps=0.3, kl_coef=0.01)
    vp.ppo_update(policy_copy, copy.deepcopy(model), optimizer, vp.warmup_linear_schedule(optimizer, 10, 0.0),
                  EPISODES, token_adv, args, pad)
    assert len(calls) == 2   # mini-batches of 2 and 1 episodes, one micro-batch each
    raw = [torch.cat([token_adv[i] for i in order]) for n in (1, 2) for order in itertools.permutations(range(3), n)]
    for A, kw in calls:
        assert (kw["clip_eps"], kw["kl_coef"], kw["temperature"]) == (0.3, 0.01, args.temperature)
        if whitened:
            assert abs(float(A.mean())) < 1e-5 and float(A.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
        else:
            assert any(A.shape == r.shape and torch.equal(A, r) for r in raw)


def perturbed_reference(model):
    """A frozen reference that differs from the policy: its weights plus 0.05 N(0, 1) noise."""
    reference = copy.deepcopy(model).requires_grad_(False)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return reference


def test_kl_to_the_reference_in_the_update(policy):
    """With a reference that differs from the policy and advantages 0, the step is the KL term's gradient alone:
    loss/kl is the k3 estimator (clamped to [0, 10]) summed over each response and averaged over the mini-batch's
    sequences, computed here from each episode's own float64 forward; 1 or 3 micro-batches take the same step.
    (No gradient clipping: it would hide a uniformly scaled gradient.)"""
    model, pad = policy
    reference = perturbed_reference(model)
    zeros = [torch.zeros(len(e.response_ids)) for e in EPISODES]
    runs = [update(model, pad, micro_batch=m, reference=reference, token_adv=zeros, kl_coef=1.0, max_grad_norm=1e9,
                   lr=1e-3) for m in (1, 3)]
    logp, ref_logp = (per_episode_logprobs(m, EPISODES, vp.Args().temperature) for m in (model, reference))
    k3 = (torch.exp(ref_logp - logp) - (ref_logp - logp) - 1).clamp(0, 10)
    for _, stats, _ in runs:
        assert stats["loss/kl"] == pytest.approx(float(k3.sum()) / len(EPISODES), rel=1e-4)
    assert runs[0][1]["update/grad_norm"] == pytest.approx(runs[1][1]["update/grad_norm"], rel=1e-4)
    assert max(float((a - b).detach().abs().max()) for a, b in zip(runs[1][0].parameters(), model.parameters())) > 1e-7
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_critic_micro_batches_accumulate_to_the_mini_batch_step(policy, tmp_path):
    """--advantage critic: the value loss of 1 or 3 micro-batches is scaled by the mini-batch's tokens, so the
    critic takes the same step (and the logged loss is the same)."""
    model, pad = policy
    folder = save_random_model(tmp_path / "m", "llama")
    episodes = [vp.Episode(prompt_ids=e.prompt_ids, response_ids=e.response_ids, reward=float(i % 2))
                for i, e in enumerate(EPISODES)]
    runs = []
    for micro in (1, 3):
        critic = vp.make_critic(folder, torch.device("cpu"))
        torch.manual_seed(0)
        torch.nn.init.normal_(critic["head"].weight, std=0.5)
        init = [p.detach().clone() for p in critic.parameters()]
        args = update_args(micro, advantage="critic", max_grad_norm=1e9)
        adv, stats = vp.critic_advantages(None, types.SimpleNamespace(pad_token_id=pad), episodes, args, "gsm8k",
                                          critic=critic)
        policy_copy = copy.deepcopy(model)
        optimizer, critic_optimizer = torch.optim.SGD(policy_copy.parameters(), lr=0.0), torch.optim.SGD(
            critic.parameters(), lr=1e-2)
        torch.manual_seed(0)
        out = vp.ppo_update(policy_copy, copy.deepcopy(model), optimizer, vp.warmup_linear_schedule(optimizer, 10, 0.0),
                            episodes, adv, args, pad, critic, critic_optimizer,
                            vp.warmup_linear_schedule(critic_optimizer, 10, 0.0), {"V_old": stats["V_old"], "G": stats["G"]})
        runs.append((critic, out))
    assert runs[0][1]["loss/total"] == pytest.approx(runs[1][1]["loss/total"], rel=1e-5)
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert max(float((a - b).detach().abs().max()) for a, b in zip(runs[1][0].parameters(), init)) > 1e-4   # it did step


def test_warmup_then_linear_decay_closed_form():
    """3% warm-up then linear decay to 0 (spec 1): 100 steps -> 3 warm-up steps, lr(s) = lr (s + 1) / 3 for
    s < 3, then lr (100 - s) / 97."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = vp.warmup_linear_schedule(optimizer, 100, 0.03)
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step(); scheduler.step()
    expected = [2.0 * (s + 1) / 3 for s in range(3)] + [2.0 * (100 - s) / 97 for s in range(3, 100)]
    assert lrs == pytest.approx(expected) and scheduler.get_last_lr()[0] == 0.0


def test_iteration_rows_cover_every_row_once_per_pass():
    """The data position is a function of the iteration alone: 10 rows, 4 per iteration -> each pass of 10
    consecutive draws (iterations 0-4 hold passes 0 and 1) is a permutation, and a resumed run asks the same."""
    train = list(range(10))
    draws = [r for it in range(5) for r in vp.iteration_rows(train, it, 4, seed=7)]
    assert sorted(draws[:10]) == train and sorted(draws[10:]) == train and draws[:10] != draws[10:]
    assert vp.iteration_rows(train, 3, 4, seed=7) == draws[12:16]
    assert vp.iteration_rows(train, 0, 4, seed=8) != draws[:4]


def test_find_checkpoint_falls_back_to_the_old_one(tmp_path):
    """A kill between save_checkpoint's two renames leaves ckpt.old complete and no ckpt."""
    assert vp.find_checkpoint(str(tmp_path)) is None
    (tmp_path / "ckpt.old").mkdir()
    assert vp.find_checkpoint(str(tmp_path)) is None                      # not COMPLETE: half written
    (tmp_path / "ckpt.old" / "COMPLETE").touch()
    assert vp.find_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt.old")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "COMPLETE").touch()
    assert vp.find_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt")


@pytest.mark.parametrize("config_eos,expected", [(None, [2]), (5, [2, 5]), ([7, 5, 2], [2, 5, 7])])
def test_generate_stops_on_the_tokenizers_and_the_models_eos(config_eos, expected, monkeypatch):
    """vineppo.generate passes the sampler the union of the tokenizer's EOS and the generation config's (an int
    or a list: Llama-3-style models end turns with several), and the stop strings."""
    import types
    seen = {}
    monkeypatch.setattr(vp.kernels, "sample_continuations",
                        lambda model, prefixes, k, budget, **kw: seen.update(kw) or ([[[]] * k] * len(prefixes),) * 2)
    model = types.SimpleNamespace(generation_config=types.SimpleNamespace(eos_token_id=config_eos),
                                  eval=lambda: None, device=torch.device("cpu"), config=types.SimpleNamespace())
    tok = types.SimpleNamespace(eos_token_id=2)
    vp.generate(model, tok, [[1, 2, 3]], 2, 8, 0.6, 0.9, desc="test")
    assert seen["eos_token_ids"] == expected and seen["stop"] == (tok, vp.STOP_STRINGS)
    assert seen["temperature"] == 0.6 and seen["top_p"] == 0.9


# ---------------------------------------------------------------- the update against plain autograd; dropout
def test_update_step_is_minus_lr_times_the_autograd_gradient(policy):
    """One SGD step of ppo_update (zero advantages, KL to a perturbed reference, no clipping) equals -lr times the
    gradient of the spec's loss computed by plain autograd on full logits, for every parameter, lm_head included."""
    model, pad = policy
    reference = perturbed_reference(model)
    updated, _, _ = update(model, pad, micro_batch=3, reference=reference,
                           token_adv=[torch.zeros(len(e.response_ids)) for e in EPISODES], kl_coef=1.0, max_grad_norm=1e9)
    args = update_args(3)
    oracle = copy.deepcopy(model)
    loss = 0.0
    for e in EPISODES:
        P, L = len(e.prompt_ids), len(e.response_ids)
        ids = torch.tensor([e.prompt_ids + e.response_ids])
        logp = torch.log_softmax(oracle(ids).logits[0, P - 1:P + L - 1] / args.temperature, -1)
        logp = logp.gather(1, torch.tensor(e.response_ids)[:, None])[:, 0]
        with torch.no_grad():
            ref = torch.log_softmax(reference(ids).logits[0, P - 1:P + L - 1] / args.temperature, -1)
            ref = ref.gather(1, torch.tensor(e.response_ids)[:, None])[:, 0]
        loss = loss + ((ref - logp).exp() - (ref - logp) - 1).clamp(0, 10).sum() / len(EPISODES)
    loss.backward()
    head = oracle.get_output_embeddings().weight
    assert float(head.grad.abs().max()) > 0
    for (name, a), p0, b in zip(updated.named_parameters(), model.parameters(), oracle.parameters()):
        want = -args.lr * b.grad
        assert float((a - p0 - want).detach().norm()) <= 1e-3 * float(want.norm()) + 1e-12, name


def test_without_dropout_zeroes_rates_named_pdrop():
    """DBRX reads its residual dropout from a float attribute `resid_pdrop` at every forward."""
    from transformers import DbrxConfig, DbrxForCausalLM
    torch.manual_seed(0)
    model = DbrxForCausalLM(DbrxConfig(d_model=32, n_heads=4, n_layers=1, max_seq_len=64, vocab_size=50,
                                       resid_pdrop=0.5, emb_pdrop=0.5,
                                       attn_config=dict(kv_n_heads=2, attn_pdrop=0.5, rope_theta=1e4, clip_qkv=8.0),
                                       ffn_config=dict(ffn_hidden_size=32, moe_num_experts=2, moe_top_k=1),
                                       rope_parameters=dict(rope_type="default", rope_theta=1e4)))
    vp.without_dropout(model)
    ids = torch.arange(3, 20).unsqueeze(0)
    model.eval()
    want = model(ids).logits
    model.train()
    torch.manual_seed(0)
    assert torch.equal(model(ids).logits, want)
