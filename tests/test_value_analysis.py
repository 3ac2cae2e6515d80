"""The value analysis (vineppo.py section 7b, paper section 7): ground truth on states whose value is
known exactly, the critic read at the right position, and the whole analysis on a model whose values
have a closed form."""
import math

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
    import types
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
