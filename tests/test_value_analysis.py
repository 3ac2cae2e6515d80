"""The value analysis (vineppo.py section 7b, paper section 7): ground truth on states whose value is
known exactly, the critic read at the right position, and the whole analysis on a model whose values
have a closed form."""
import math
import types

import pytest
import torch

import vineppo as vp
from conftest import save_random_model

ARITH = "0123456789+-*=# \n"


def context_free_model(tmp_path, probs: dict):
    """A Llama whose next-token distribution is `probs` ({token id: p}) at every position, whatever the
    context: attention and MLP outputs are zeroed (the residual stream is the embedding), every token
    has the same embedding, and the lm_head reads one coordinate. Also saved (for make_critic)."""
    from transformers import AutoModelForCausalLM
    folder = save_random_model(tmp_path / "context_free", alphabet=ARITH, layers=1, width=32)
    model = AutoModelForCausalLM.from_pretrained(folder)
    d = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.get_input_embeddings().weight.zero_()
        model.get_input_embeddings().weight[:, 0] = 1.0        # after RMSNorm: h = (sqrt(d), 0, ..., 0) everywhere
        head = model.get_output_embeddings().weight
        head.zero_()
        head[:, 0] = -100.0 / math.sqrt(d)                      # logit -100: never sampled
        for t, p in probs.items():
            head[t, 0] = math.log(p) / math.sqrt(d)             # logit log p: softmax gives exactly p
    model.save_pretrained(folder)
    return model.eval(), vp.build_char_tokenizer(ARITH), folder


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_ground_truth_is_exact_when_the_continuation_is_forced(tmp_path):
    tok = vp.build_char_tokenizer(ARITH)
    model, tok, _ = context_free_model(tmp_path, {tok.eos_token_id: 1.0})   # every continuation is EOS alone
    prompt = tok("3+4\n").input_ids
    states = [(prompt, ids(tok, "3+4=7\n#### 7"), "7"),      # a finished correct solution: V = 1
              (prompt, ids(tok, "3+4=7\n#### 8"), "7"),      # a wrong one: V = 0
              (prompt, [], "7")]                             # the prompt: an empty response has no answer, V = 0
    torch.manual_seed(0)
    args = vp.Args(temperature=1.0, top_p=1.0, max_new_tokens=20)
    assert vp.mc_state_values(model, tok, states, 256, args, "arith") == [1.0, 0.0, 0.0]


def test_ground_truth_on_a_state_of_value_one_quarter(tmp_path):
    tok = vp.build_char_tokenizer(ARITH)
    seven = ids(tok, "7")[0]
    # from "#### " the continuation is 7^j EOS with probability 2^-(j+1); only j = 1 answers "7": V = 1/4
    model, tok, _ = context_free_model(tmp_path, {tok.eos_token_id: 0.5, seven: 0.5})
    state = (tok("3+4\n").input_ids, ids(tok, "3+4=7\n#### "), "7")
    torch.manual_seed(0)
    args = vp.Args(temperature=1.0, top_p=1.0, max_new_tokens=24)
    (truth,) = vp.mc_state_values(model, tok, [state], 256, args, "arith")
    assert abs(truth - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 256), truth
    (tight,) = vp.mc_state_values(model, tok, [state], 8192, args, "arith")
    assert abs(tight - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 8192), tight


def test_critic_is_read_at_the_state_before_each_step(tmp_path):
    """critic_state_values(s) must equal what training uses for V(s_t): critic_values at token t."""
    folder = save_random_model(tmp_path / "m", alphabet=ARITH, layers=1, width=32)
    tok = vp.build_char_tokenizer(ARITH)
    critic = vp.make_critic(folder, torch.device("cpu"))
    torch.manual_seed(0)
    torch.nn.init.normal_(critic["head"].weight, std=0.5)
    prompt, response = tok("5*3\n").input_ids, ids(tok, "5*3=15\n#### 15") + [tok.eos_token_id]
    along = vp.critic_values(critic, [vp.Episode(prompt_ids=prompt, response_ids=response)], tok.pad_token_id)   # [L]
    states = [(prompt, response[:t], "15") for t in range(len(response))]
    got = vp.critic_state_values(critic, states, tok.pad_token_id, micro_batch=4)
    assert torch.allclose(torch.tensor(got), along.detach(), atol=1e-5)
    assert len(set(round(v, 4) for v in got)) > 1        # the head is not constant: positions are really checked


def parity_value(written: str, max_new: int, p7: float, pnl: float, peos: float) -> float:
    """Exact V of a state under the context-free model when the reward is `odd number of 7s in the whole
    solution`: the continuation is m non-EOS tokens (7 or newline) then EOS, m + 1 <= max_new - len(written)."""
    budget, q = max_new - len(written), p7 / (p7 + pnl)
    need_odd = written.count("7") % 2 == 0
    total = 0.0
    for m in range(budget):           # m tokens before the EOS
        odd = (1 - (1 - 2 * q) ** m) / 2
        total += (p7 + pnl) ** m * peos * (odd if need_odd else 1 - odd)
    return total


def test_value_analysis_on_closed_form_values(tmp_path, monkeypatch):
    tok = vp.build_char_tokenizer(ARITH)
    seven, newline = ids(tok, "7")[0], ids(tok, "\n")[0]
    p7, pnl, peos = 0.3, 0.5, 0.2
    model, tok, folder = context_free_model(tmp_path, {seven: p7, newline: pnl, tok.eos_token_id: peos})
    monkeypatch.setattr(vp, "grade", lambda text, gold, task: text.count("7") % 2 == 1)
    critic = vp.make_critic(folder, torch.device("cpu"))    # zero head: predicts 0 everywhere
    args = vp.Args(k=4, temperature=1.0, top_p=1.0, max_new_tokens=14, micro_batch=16)
    rows = [{"problem": f"{i}+1", "answer": ""} for i in range(40)]
    out = vp.value_analysis(model, tok, rows, args, "arith", critic=critic, n_states=40, n_truth=256, n_rank=15, alternatives=5)
    assert out["states"] == len(out["per_state"]) == sum(out["mae_by_position"]["count"]) <= 40
    assert any(s["i"] > 0 for s in out["per_state"])        # responses of several steps: positions along the chain
    for s in out["per_state"]:
        exact = parity_value(s["written"], 14, p7, pnl, peos)
        assert abs(s["truth"] - exact) <= 4 * math.sqrt(exact * (1 - exact) / 256) + 1e-9, (s, exact)
        assert s["mc"] * 4 == round(s["mc"] * 4)                    # a mean of K = 4 rewards
        assert s["critic"] == pytest.approx(0.0, abs=1e-6)
    truths = [s["truth"] for s in out["per_state"]]
    assert out["mae"]["critic"] == pytest.approx(sum(truths) / len(truths))   # |0 - V| averaged
    assert out["mae"]["mc"] == pytest.approx(sum(abs(s["mc"] - s["truth"]) for s in out["per_state"]) / len(truths))
    # the floors in closed form from the truths: the truth's standard error, and a K = 4 mean's expected |error|
    expected_mae = [sum(math.comb(4, j) * v ** j * (1 - v) ** (4 - j) * abs(j / 4 - v) for j in range(5)) for v in truths]
    assert out["mc_mae_expected"] == pytest.approx(sum(expected_mae) / len(truths))
    assert out["truth_se_mean"] == pytest.approx(sum(math.sqrt(v * (1 - v) / 256) for v in truths) / len(truths))
    # the MAE by position i/n in the chain, recomputed from the per-state rows (5 bins)
    bins = len(out["mae_by_position"]["count"])
    for b in range(bins):
        errs = [abs(s["mc"] - s["truth"]) for s in out["per_state"] if min(int(s["i"] / s["n"] * bins), bins - 1) == b]
        assert out["mae_by_position"]["count"][b] == len(errs)
        assert out["mae_by_position"]["mc"][b] == (pytest.approx(sum(errs) / len(errs)) if errs else None)
    rank = out["ranking"]
    assert rank["states"] + rank["skipped"] > 0 and rank["states"] > 0
    for name in ("mc", "critic", "chance"):
        assert 0 <= rank["top1"][name] <= 1


def test_value_analysis_leaves_the_rng_alone(tmp_path):
    tok = vp.build_char_tokenizer(ARITH)
    model, tok, _ = context_free_model(tmp_path, {tok.eos_token_id: 1.0})
    torch.manual_seed(123)
    before = torch.get_rng_state()
    vp.value_analysis(model, tok, [{"problem": "1+1", "answer": "2"}], vp.Args(k=2, max_new_tokens=8), "arith",
                      n_states=1, n_truth=4)
    assert torch.equal(before, torch.get_rng_state())


def test_train_writes_value_analysis_with_the_trained_critic(demo_cache, tmp_path):
    import json
    import os
    small = ["--prompts-per-iteration", "8", "--samples-per-prompt", "2", "--mini-batch", "16",   # the demo's SFT model
             "--micro-batch", "16", "--eval-problems", "10", "--eval-samples", "1"]
    out = tmp_path / "run"
    vp.train(vp.parse_args(["--out", str(out), "--advantage", "critic", "--iterations", "1", "--value-analysis", "6", *small]))
    with open(os.path.join(out, "value_analysis.json")) as f:
        result = json.load(f)
    assert result["states"] == 6 and result["n_truth"] == 256 and set(result["mae"]) == {"mc", "critic"}
    assert all(0 <= s["truth"] <= 1 and s["critic"] is not None for s in result["per_state"])
    assert any(abs(s["critic"]) > 1e-6 for s in result["per_state"])   # the trained critic (a fresh one says 0)


def test_compare_methods_table_on_synthetic_runs(tmp_path):
    """benchmarks/compare_methods.py: mean +- std over seeds, seed counts, iterations to the critic's best."""
    import importlib.util
    import json
    import os
    spec = importlib.util.spec_from_file_location("compare_methods", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "compare_methods.py"))
    cm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cm)
    curves = {"vine": {1: [0.5, 0.6, 0.7], 2: [0.5, 0.7, 0.8]}, "critic": {1: [0.5, 0.55, 0.6], 2: [0.5, 0.65, 0.6]}}
    for method, seeds in curves.items():
        for seed, acc in seeds.items():
            os.makedirs(tmp_path / f"{method}-s{seed}")
            with open(tmp_path / f"{method}-s{seed}" / "metrics.jsonl", "w") as f:
                for it in range(5):
                    r = {"iteration": it}
                    if it:
                        r.update({"train/reward": 0.5, "loss/kl": 0.01 * it, "time/sample": 1.0, "time/mc": 2.0 if method == "vine" else 0.0,
                                  "time/update": 1.0})
                    if it % 2 == 0:
                        r.update({"eval/accuracy": acc[it // 2], "eval/greedy_accuracy": acc[it // 2],
                                  "eval/worked_share": 0.5 + 0.1 * it + 0.1 * seed})
                    f.write(json.dumps(r) + "\n")
    opts = types.SimpleNamespace(methods=["vine", "critic"], seeds=[1, 2, 3], iterations=4, out=str(tmp_path))
    data = cm.collect(opts)
    assert len(data["vine"]["runs"]) == 2 and data["vine"]["its"] == [0, 2, 4]     # seed 3 never ran
    assert data["vine"]["kl"][2] == [pytest.approx(0.015)] * 2                    # mean over iterations 1-2
    text = cm.table(opts, data)
    assert "| vine | 2 | 0.500 ± 0.000 | 0.650 ± 0.071 | 0.750 ± 0.071 |" in text
    assert "| vine | 2 | 0.65 ± 0.07 | 0.85 ± 0.07 | 1.05 ± 0.07 |" in text.split("worked out rather than recalled")[1]
    # the critic's best mean is 0.6 (iterations 2 and 4): vine's mean curve first reaches it at iteration 2
    row = next(line for line in text.splitlines() if line.startswith("| vine | 2 | 0.750"))
    assert row.split("|")[-3].strip() == "2" and "critic's best (0.600)" in text


# ---------------------------------------------------------------- the analysis's bookkeeping, with the sampler and estimators as tables
class _FakePolicy(torch.nn.Linear):
    def __init__(self, positions):
        super().__init__(1, 1)
        self.config = types.SimpleNamespace(max_position_embeddings=positions)


def _va_fakes(monkeypatch, tok, responses, alternatives, truth, mc, critic):
    """generate / mc_state_values / critic_state_values replaced by tables keyed by decoded text."""
    dec = lambda ids: vp.decode(tok, ids)  # noqa: E731
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    seen = {}

    def fake_generate(model, tokenizer, prefixes, k, max_new_tokens, temperature, top_p, desc):
        seen.setdefault(desc, []).append((list(map(dec, prefixes)), max_new_tokens))
        if desc == "sampling":
            return [[enc(responses[dec(p)]) + [tok.eos_token_id]] for p in prefixes], [[True] for _ in prefixes]
        out, fin = [], []
        for p in prefixes:
            conts = alternatives.get(dec(p), [("#### 2", True), ("#### 3", True)] * 3)[:k]
            out.append([enc(c) for c, _ in conts])
            fin.append([d for _, d in conts])
        return out, fin

    def values(table):
        return lambda states: [table[dec(p + w)] for p, w, _ in states]

    monkeypatch.setattr(vp, "generate", fake_generate)
    monkeypatch.setattr(vp, "mc_state_values", lambda m, t, states, k, a, task: values(truth if k == 256 else mc)(states))
    monkeypatch.setattr(vp, "critic_state_values", lambda c, states, pad, mb: values(critic)(states))
    return seen


def test_value_analysis_ranking_bookkeeping_exact(monkeypatch):
    """value_analysis with the sampler and the estimators replaced by tables: states, alternatives (cut after
    their first new step, duplicates merged, a finished one worth its reward, one cut at the cap worth 0),
    ranking (ties within `tie`, ties in the estimate averaged, uninformative states skipped), all exact."""
    tok = vp.build_char_tokenizer(ARITH)
    responses = {"1+1\n": "1\n2\n3\n#### 2", "2+2\n": "33\n4\n#### 4"}
    alternatives = {
        "1+1\n": [("4\n9\n8\n", True), ("5\n9\n", True), ("#### 2", False), ("6\n7\n", True), ("1\n5\n6\n", True)],
        "1+1\n1\n": [("7\n1\n", True), ("8\n1\n", True), ("#### 5", True), ("7\n2\n", True), ("9\n3\n", True)],
        "2+2\n": [("7\n1\n", True), ("8\n1\n", True), ("9\n1\n", True), ("7\n5\n", True), ("8\n5\n", True)],
    }
    truth = {"1+1\n": 0.5, "1+1\n1\n": 0.6, "1+1\n1\n2\n": 0.8, "2+2\n": 0.3,
             "1+1\n4\n": 0.3, "1+1\n5\n": 0.9, "1+1\n6\n": 0.2,
             "1+1\n1\n7\n": 0.1, "1+1\n1\n8\n": 0.42, "1+1\n1\n9\n": 0.45,
             "2+2\n7\n": 0.5, "2+2\n8\n": 0.52, "2+2\n9\n": 0.49}
    mc = {"1+1\n": 0.25, "1+1\n1\n": 0.75, "1+1\n1\n2\n": 1.0, "2+2\n": 0.5,
          "1+1\n4\n": 0.75, "1+1\n5\n": 0.5, "1+1\n6\n": 0.5,
          "1+1\n1\n7\n": 0.75, "1+1\n1\n8\n": 0.25, "1+1\n1\n9\n": 0.75,
          "2+2\n7\n": 0.0, "2+2\n8\n": 0.25, "2+2\n9\n": 0.5}
    critic = {"1+1\n": 0.1, "1+1\n1\n": 0.2, "1+1\n1\n2\n": 0.3, "2+2\n": 0.4,
              "1+1\n4\n": 0.8, "1+1\n5\n": 0.1, "1+1\n6\n": 0.2,
              "1+1\n1\n7\n": 0.3, "1+1\n1\n8\n": 0.6, "1+1\n1\n9\n": 0.1,
              "2+2\n7\n": 0.0, "2+2\n8\n": 0.0, "2+2\n9\n": 0.0}
    seen = _va_fakes(monkeypatch, tok, responses, alternatives, truth, mc, critic)
    args = vp.Args(k=4, max_new_tokens=30, temperature=1.0, top_p=1.0)
    rows = [{"problem": "1+1", "answer": "2"}, {"problem": "2+2", "answer": "4"}]
    out = vp.value_analysis(_FakePolicy(1000), tok, rows, args, "arith", critic=object(), n_states=4, n_truth=256,
                            alternatives=5)
    # 5 states (3 + 2), the first 4 kept; the ranked ones are those before a response's last step
    assert [(s["i"], s["n"], s["written"]) for s in out["per_state"]] == [(0, 3, ""), (1, 3, "1\n"), (2, 3, "1\n2\n"),
                                                                          (0, 2, "")]
    assert seen["alternatives"] == [(["1+1\n", "1+1\n1\n", "2+2\n"], [30, 28, 30])]
    assert [s["truth"] for s in out["per_state"]] == [0.5, 0.6, 0.8, 0.3]
    assert out["mae"]["mc"] == pytest.approx((0.25 + 0.15 + 0.2 + 0.2) / 4)
    assert out["mae"]["critic"] == pytest.approx((0.4 + 0.4 + 0.5 + 0.1) / 4)
    assert out["mae_by_position"]["count"] == [2, 1, 0, 1, 0]
    # 4 states + 10 alternatives, one of which ("1+1\n" + "1\n") is the state s_1 itself: 13 distinct
    assert out["rollouts"] == 13 * (256 + 4)
    rank = out["ranking"]
    # s_0 of 1+1: true [0.3, 0.9, 0 (cut at the cap), 0.2, 0.6]; s_1: [0.1, 0.42, 0 (finished, wrong), 0.45];
    # s_0 of 2+2: [0.5, 0.52, 0.49], all within the tie: skipped
    assert (rank["states"], rank["skipped"]) == (2, 1)
    assert rank["top1"]["chance"] == pytest.approx((1 / 5 + 2 / 4) / 2)
    # mc: s_0's top estimate 0.75 is shared by "4" (0.3) and "1" (0.6): 0; s_1's by "7" (0.1) and "9" (0.45): 1/2
    assert rank["top1"]["mc"] == pytest.approx((0 + 1 / 2) / 2)
    # critic: s_0's top is "4" (0.3): 0; s_1's is "8" (0.42, within the tie of 0.45): 1
    assert rank["top1"]["critic"] == pytest.approx((0 + 1) / 2)


def test_value_analysis_states_respect_max_states_and_the_position_limit(monkeypatch):
    tok = vp.build_char_tokenizer(ARITH)
    responses = {"1+1\n": "1\n22\n3\n4\n#### 2"}            # steps start at 0, 2, 5, 7
    table = {"1+1\n" + w: 0.5 for w in ("", "1\n", "1\n22\n", "1\n22\n3\n")}
    _va_fakes(monkeypatch, tok, responses, {}, table, table, table)
    rows = [{"problem": "1+1", "answer": "2"}]
    P = len(vp.encode_prompt(tok, "1+1", "arith"))
    capped = vp.value_analysis(_FakePolicy(1000), tok, rows, vp.Args(k=4, max_new_tokens=30, max_states=2), "arith",
                               n_states=10, n_truth=256, n_rank=0)
    assert [s["written"] for s in capped["per_state"]] == ["", "1\n"]
    # a state at the end of the model's positions (prompt + 5 tokens = the limit) has nothing to continue
    limited = vp.value_analysis(_FakePolicy(P + 5), tok, rows, vp.Args(k=4, max_new_tokens=30), "arith",
                                n_states=10, n_truth=256, n_rank=0)
    assert [s["written"] for s in limited["per_state"]] == ["", "1\n"]
