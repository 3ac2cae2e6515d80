"""Advantages (vineppo.py section 5) and the PPO loss as vineppo.py uses it (section 6)."""
import itertools
import math
import random

import pytest
import torch

import vineppo as vp
from conftest import save_random_model


# ---------------------------------------------------------------- Eq. (6) on hand-computed cases
def test_step_advantages_hand_computed():
    # V_hat(s_0..s_2) = 0.5, 0.25, 1.0; R = 1: A = [0.25-0.5, 1-0.25, 1+0-1]
    assert vp.step_advantages([0.5, 0.25, 1.0], 1.0) == pytest.approx([-0.25, 0.75, 0.0])
    # a wrong final answer: the last step gets R - V(s_{n-1}) = -0.75
    assert vp.step_advantages([0.5, 0.75], 0.0) == pytest.approx([0.25, -0.75])
    assert vp.step_advantages([0.3], 1.0) == pytest.approx([0.7])


@pytest.mark.parametrize("seed", range(5))
def test_step_advantages_telescope_to_R_minus_V0(seed):
    g = torch.Generator().manual_seed(seed)
    V = torch.rand(7, generator=g).tolist()
    for R in (0.0, 1.0):
        assert sum(vp.step_advantages(V, R)) == pytest.approx(R - V[0])


def _episodes(rewards_by_group):
    return [vp.Episode(prompt_ids=[1], response_ids=[5, 6, 7], group=g, reward=r)
            for g, rs in enumerate(rewards_by_group) for r in rs]


def test_grpo_hand_computed():
    eps = _episodes([[1, 0, 0, 1], [1, 1, 1, 1]])
    adv, _ = vp.grpo_advantages(None, None, eps, None, "arith")
    std = torch.tensor([1.0, 0, 0, 1]).std().item()            # unbiased std of the group, as GRPO
    expected = [0.5 / (std + 1e-6), -0.5 / (std + 1e-6)] * 2
    assert [float(a[0]) for a in adv[:4]] == pytest.approx([expected[0], expected[1], expected[1], expected[0]])
    assert all(float(a.abs().max()) == 0 for a in adv[4:])     # all correct: no signal
    assert all(len(a) == 3 and torch.all(a == a[0]) for a in adv)


def test_rloo_hand_computed():
    eps = _episodes([[1, 0, 0, 1]])
    adv, _ = vp.rloo_advantages(None, None, eps, None, "arith")
    assert [float(a[0]) for a in adv] == pytest.approx([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3])


# ---------------------------------------------------------------- MC values are unbiased
def _exact_value(model, prefix, written_len, max_new, vocab, reward_fn, T):
    """V(s) = sum over every continuation c that ends in EOS within the length cap of p(c | s) R(c),
    by enumerating all token sequences (float64 forward passes)."""
    eos = 1
    total = 0.0
    budget = max_new - written_len
    for length in range(1, budget + 1):
        for body in itertools.product([t for t in range(vocab) if t != eos], repeat=length - 1):
            c = list(body) + [eos]
            ids = torch.tensor([prefix + c])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double() / T, -1)     # [T, V]
            lp = sum(float(logp[len(prefix) - 1 + i, tok]) for i, tok in enumerate(c))
            total += math.exp(lp) * reward_fn(c)
    return total


def test_mc_values_match_exact_values(tmp_path, monkeypatch):
    folder = save_random_model(tmp_path / "m", alphabet="ab\n", layers=1, width=32)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():   # sharpen the random model a little so values are far from 0 and 1 and differ by state
        model.get_output_embeddings().weight.mul_(3)
    model = model.float()
    tok = vp.build_char_tokenizer("ab\n")
    V = len(tok)
    # reward: the whole solution (written steps + continuation) has an odd number of "b"
    monkeypatch.setattr(vp, "grade", lambda text, gold, task: text.count("b") % 2 == 1)
    prompt = tok("a").input_ids
    response = tok("a\nb", add_special_tokens=False).input_ids + [tok.eos_token_id]
    e = vp.Episode(prompt_ids=prompt, response_ids=response, text="a\nb", gold="", finished=True, reward=1.0)
    e.steps = vp.split_steps("a\nb", "arith")
    e.step_starts = vp.step_token_starts(response, e.steps, lambda ids: vp.decode(tok, ids))
    assert e.steps == ["a\n", "b"] and e.step_starts == [0, 2]
    max_new = 5
    exact = []
    for i, start in enumerate(e.step_starts):
        written = response[:start]
        reward_fn = lambda c, w=written: vp.decode(tok, w + c).count("b") % 2 == 1
        exact.append(_exact_value(model.double(), prompt + written, len(written), max_new, V, reward_fn, T=1.0))
    model.float()
    assert 0.05 < exact[0] < 0.95 and 0.05 < exact[1] < 0.95
    for K, seed in ((64, 1), (512, 2), (4096, 3)):
        torch.manual_seed(seed)
        args = vp.Args(k=K, temperature=1.0, top_p=1.0, max_new_tokens=max_new)
        (V_hat,), rollouts = vp.vine_values(model, tok, [e], args, "arith")
        assert rollouts == 2 * K
        for v_hat, v in zip(V_hat, exact):
            se = math.sqrt(v * (1 - v) / K)
            assert abs(v_hat - v) < 4 * se, (K, v_hat, v, se)


def test_vine_advantages_per_token(tmp_path, monkeypatch):
    """Eq. (6) token by token, with the rollouts' outcomes fixed: from s_0 (the prompt) 2 of 3 continuations
    are right, from s_1 all 3, so V = (2/3, 1), A_0 = V(s_1) - V(s_0) = 1/3, A_1 = R - V(s_1) = 0; step 0 is
    "3+1=4\n" (6 tokens), step 1 "4*2=8\n#### 8" plus EOS (13 tokens)."""
    folder = save_random_model(tmp_path / "m", alphabet="0123456789+-*=# \n", layers=1, width=32)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = vp.build_char_tokenizer()
    text = "3+1=4\n4*2=8\n#### 8"
    prompt = tok("3+1*2\n").input_ids
    response = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    eps = []
    for g in range(2):
        e = vp.Episode(prompt_ids=prompt, response_ids=response, group=g, text=text, gold="8", finished=True,
                       reward=1.0)
        e.steps = vp.split_steps(text, "arith")
        e.step_starts = vp.step_token_starts(response, e.steps, lambda ids: vp.decode(tok, ids))
        eps.append(e)
    right, wrong = (tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in ("#### 8", "#### 7"))
    asked = []

    def fake_generate(model, tokenizer, prefixes, k, max_new_tokens, temperature, top_p, desc):
        asked.append((prefixes, k, max_new_tokens))
        conts = [[right, right, wrong] if len(p) == len(prompt) else [right] * 3 for p in prefixes]
        return conts, [[True] * k for _ in prefixes]

    monkeypatch.setattr(vp, "generate", fake_generate)
    args = vp.Args(k=3, temperature=1.0, top_p=1.0, max_new_tokens=24)
    token_adv, stats = vp.vine_advantages(model, tok, eps, args, "arith")
    # identical states are sampled once: 2 episodes x 2 states, 2 distinct; budgets = cap - tokens written
    [(prefixes, k, budgets)] = asked
    assert prefixes == [prompt, prompt + response[:6]] and k == 3 and budgets == [24, 18]
    assert stats["mc/rollouts"] == 2 * 3 and stats["mc/value_s0"] == pytest.approx(2 / 3)
    for adv in token_adv:
        torch.testing.assert_close(adv, torch.tensor([1 / 3] * 6 + [0.0] * 13))


@pytest.mark.parametrize("reward", [0.0, 1.0])
def test_states_past_the_cap_get_zero_advantage(tmp_path, reward):
    folder = save_random_model(tmp_path / "m", alphabet="0123456789+-*=# \n", layers=1, width=32)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = vp.build_char_tokenizer()
    text = "1\n2\n3\n4\n#### 4"
    response = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    e = vp.Episode(prompt_ids=tok("1\n").input_ids, response_ids=response, text=text, gold="4", finished=True,
                   reward=reward)
    e.steps = vp.split_steps(text, "arith")
    e.step_starts = vp.step_token_starts(response, e.steps, lambda ids: vp.decode(tok, ids))
    torch.manual_seed(0)
    args = vp.Args(k=2, temperature=1.0, top_p=1.0, max_new_tokens=20, max_states=2)
    (V,), rollouts = vp.vine_values(model, tok, [e], args, "arith")
    assert rollouts == 2 * 2 and V[2:] == [reward, reward]
    A = vp.step_advantages(V, e.reward)
    assert A[2:] == [0.0, 0.0] and A[1] == pytest.approx(reward - V[1])


# ---------------------------------------------------------------- the critic (PPO baseline)
def test_critic_gae_and_value_loss_closed_form(tmp_path):
    folder = save_random_model(tmp_path / "m", alphabet="0123456789+-*=# \n", layers=1, width=32)
    tok = vp.build_char_tokenizer()
    critic = vp.make_critic(folder, torch.device("cpu"))
    torch.nn.init.normal_(critic["head"].weight, std=0.5)
    eps = [vp.Episode(prompt_ids=[3, 4], response_ids=[5, 6, 7, 1], reward=1.0),
           vp.Episode(prompt_ids=[3], response_ids=[8, 1], reward=0.0)]
    args = vp.Args(micro_batch=1)
    adv, stats = vp.critic_advantages(None, tok, eps, args, "arith", critic=critic)
    V_old, G = stats["V_old"], stats["G"]
    assert G.tolist() == [1.0] * 4 + [0.0] * 2
    # generic GAE with gamma = lambda = 1, reward only at the last token, V after the last token = 0
    for e, a, v in zip(eps, adv, V_old.split([4, 2])):
        r = torch.zeros(len(v)); r[-1] = e.reward
        v_next = torch.cat([v[1:], torch.zeros(1)])
        delta = r + v_next - v
        gae = torch.flip(torch.cumsum(torch.flip(delta, [0]), 0), [0])
        assert torch.allclose(a, gae, atol=1e-6) and torch.allclose(a, e.reward - v, atol=1e-6)
    # clipped value loss after the head moved up, then down, then a little: closed form on the same numbers
    # (+0.5 and -0.5 leave the +-0.2 trust region, each on its own side; +0.1 stays inside it)
    for shift, bias in ((0.5, 0.5), (-0.5, -1.0), (0.1, 0.6)):
        with torch.no_grad():
            critic["head"].bias.add_(bias)
        loss = vp.critic_loss(critic, eps, tok.pad_token_id, V_old, G, clip=0.2, n_tokens=6)
        V_new, V_clip = V_old + shift, V_old + max(-0.2, min(0.2, shift))
        expected = 0.5 * torch.maximum((V_new - G) ** 2, (V_clip - G) ** 2).mean()
        assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5), shift
    # a micro-batch's loss is a share of its MINI-batch's token mean: these 6 tokens of a 10-token mini-batch
    loss = vp.critic_loss(critic, eps, tok.pad_token_id, V_old, G, clip=0.2, n_tokens=10)
    assert float(loss.detach()) == pytest.approx(float(expected) * 6 / 10, rel=1e-5)


def test_whiten():
    """(x - mean) / (population std + 1e-8): x = (1, 2, 3, 6) has mean 3 and std sqrt(3.5). The eps is the spec's
    1e-8: (0, 2e-8) has std 1e-8, so it whitens to (-0.5, 0.5) (an eps of 1e-6 would give +-0.01). One token
    whitens to 0."""
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    torch.testing.assert_close(vp.whiten(x), (x - 3) / (3.5 ** 0.5 + 1e-8))
    torch.testing.assert_close(vp.whiten(torch.tensor([0.0, 2e-8])), torch.tensor([-0.5, 0.5]), rtol=1e-3, atol=1e-4)
    assert vp.whiten(torch.tensor([0.7])).tolist() == [0.0]


# ---------------------------------------------------------------- the PPO loss as the loop calls it
def _setup(N=6, d=8, V=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(V, d, generator=g).float()
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, targets


def _logp(hidden, weight, targets, T):
    return torch.log_softmax(hidden @ weight.T / T, -1).gather(1, targets[:, None]).squeeze(1)


def test_ppo_gradient_at_ratio_one_is_policy_gradient():
    hidden, weight, targets = _setup()
    A = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0])
    with torch.no_grad():
        lp = _logp(hidden, weight, targets, 0.6)
    loss, stats = vp.kernels.ppo_loss(hidden, weight, targets, lp, lp, A, temperature=0.6, clip_eps=0.2, kl_coef=0.1,
                                      n_tokens=6, n_seqs=2)
    (g_ppo,) = torch.autograd.grad(loss, hidden)
    pg = -(A * _logp(hidden, weight, targets, 0.6)).sum() / 6          # -A grad log pi, token mean
    (g_pg,) = torch.autograd.grad(pg, hidden)
    assert torch.allclose(g_ppo, g_pg, atol=1e-5)
    assert torch.allclose(stats["ratio"], torch.ones(6), atol=1e-6) and not stats["clipped"].any()


def test_ppo_clipping_only_outside_the_trust_region():
    hidden, weight, targets = _setup(N=8)
    eps = 0.2
    delta = torch.tensor([0.1, -0.1, 0.3, -0.3, 0.3, -0.3, 0.15, -0.15])   # log rho
    A = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, 1.0, -1.0, -1.0])
    with torch.no_grad():
        lp = _logp(hidden, weight, targets, 1.0)
    old = lp - delta                                                     # rho = exp(delta)
    loss, stats = vp.kernels.ppo_loss(hidden, weight, targets, old, lp, A, temperature=1.0, clip_eps=eps, kl_coef=0.0,
                                      n_tokens=8, n_seqs=1)
    (g,) = torch.autograd.grad(loss, hidden)
    rho = delta.exp()
    # the clipped branch is active (no gradient) exactly when rho left [1-eps, 1+eps] in the direction A pushes
    should_clip = ((A > 0) & (rho > 1 + eps)) | ((A < 0) & (rho < 1 - eps))
    assert stats["clipped"].tolist() == should_clip.tolist() == [False, False, True, True, False, False, False, False]
    for t in range(8):
        lp_t = _logp(hidden, weight, targets, 1.0)[t]
        (g_t,) = torch.autograd.grad(-A[t] * rho[t] * lp_t / 8, hidden)
        expected = torch.zeros_like(g_t) if should_clip[t] else g_t
        assert torch.allclose(g[t], expected[t], atol=1e-5), t


def test_k3_kl_expectation_is_the_exact_kl():
    """E_{y ~ pi}[exp(l_ref - l) - (l_ref - l) - 1] = KL(pi || ref) exactly (spec 1's k3 estimator)."""
    V, d = 5, 8
    g = torch.Generator().manual_seed(3)
    h = torch.randn(1, d, generator=g)
    W = torch.randn(V, d, generator=g)
    W_ref = W + 0.3 * torch.randn(V, d, generator=g)             # close enough that the [0, 10] clamp is idle
    hidden = h.expand(V, d).contiguous()
    targets = torch.arange(V)
    logp = _logp(hidden, W, targets, 1.0).detach()
    ref_logp = _logp(hidden, W_ref, targets, 1.0).detach()
    _, stats = vp.kernels.ppo_loss(hidden, W, targets, logp, ref_logp, torch.zeros(V), temperature=1.0, clip_eps=0.2,
                                   kl_coef=1.0, n_tokens=V, n_seqs=1)
    pi = logp.exp()
    exact = float((pi * (logp - ref_logp)).sum())
    assert float((pi * stats["kl"]).sum()) == pytest.approx(exact, rel=1e-5)
    assert (stats["kl"] < 10).all() and (stats["kl"] >= 0).all()
    # far from the reference the per-token clamp engages: 10 at most
    _, far = vp.kernels.ppo_loss(hidden, W, targets, logp, ref_logp + 30 * (targets == 0), torch.zeros(V), temperature=1.0,
                                 clip_eps=0.2, kl_coef=1.0, n_tokens=V, n_seqs=1)
    assert float(far["kl"][0]) == 10.0 and torch.allclose(far["kl"][1:], stats["kl"][1:])


# ---------------------------------------------------------------- episodes: reward, group, steps
def test_sample_episodes_reward_group_and_steps(monkeypatch):
    """sample_episodes grades each sampled response: a right answer scores 1 only if the response finished (a
    response cut at --max-new-tokens scores 0 even if its text holds the answer), each response is grouped by its
    prompt (what GRPO / RLOO average over), and its steps start at their first tokens."""
    tok = vp.build_char_tokenizer()
    rows = [vp.make_arith_problem(random.Random(s)) for s in (1, 2)]
    ids = lambda text: tok(text, add_special_tokens=False).input_ids   # noqa: E731
    wrong = "1+1=3\n#### 3\n"
    eos = [tok.eos_token_id]
    conts = [[ids(rows[0]["solution"]) + eos, ids(rows[0]["solution"]), ids(wrong) + eos],
             [ids(rows[1]["solution"]) + eos] * 3]
    fins = [[True, False, True], [True] * 3]
    monkeypatch.setattr(vp, "generate", lambda *a, **k: (conts, fins))
    args = vp.Args(samples_per_prompt=3)
    episodes = vp.sample_episodes(None, tok, rows, args, "arith")
    assert [e.reward for e in episodes] == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert [e.group for e in episodes] == [0, 0, 0, 1, 1, 1] and [e.finished for e in episodes] == fins[0] + fins[1]
    e = episodes[0]
    assert [vp.decode(tok, e.response_ids[s:]).startswith(step) for s, step in zip(e.step_starts, e.steps)] == \
        [True] * len(e.steps) and e.steps == vp.split_steps(e.text, "arith")
