#!/usr/bin/env python
"""The paper's comparison on the built-in task: VinePPO vs PPO with a value network vs GRPO vs RLOO.

    python benchmarks/compare_methods.py --methods vine critic grpo rloo --seeds 1 2 3 --iterations 40 --jobs 2 --analysis

Every (method, seed) is one `python vineppo.py --advantage M --seed S --out <out>/M-sS --iterations N`
run: the same PPO loop, the demo's settings (vineppo.DEMO_DEFAULTS) and the same cached SFT model, so
the advantage is the only difference. Runs already finished are skipped and killed ones resume, so the
command can be repeated. Then it writes <out>/compare.md (test accuracy and KL to the reference per
evaluated iteration, mean +- std over seeds, how many seeds; wall-clock; iterations to reach the
critic's best), a plot (docs/figures/compare_accuracy.png; matplotlib is an optional extra) and, with
--analysis, the value analysis (paper section 7) of the trained critic and the MC estimate:
<out>/value_analysis.json and docs/figures/compare_value_mae.png.
Arguments after `--` go to every vineppo.py run (e.g. `-- --lr 2e-4`).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def read_metrics(run: str) -> list:
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def finished(run: str, iterations: int) -> bool:
    records = read_metrics(run)
    return bool(records) and records[-1]["iteration"] == iterations and "eval/accuracy" in records[-1]


def run_all(opts, extra: list) -> None:
    """Launch the missing runs, `opts.jobs` at a time (one thread each when several run at once)."""
    import vineppo as vp
    if "--model" not in extra:   # train the shared SFT model once, before the runs race for it
        vp.demo_sft_model(vp.parse_args(extra))
    queue = [(m, s) for s in opts.seeds for m in opts.methods]     # seed-major: an early stop still covers every method
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if opts.jobs > 1:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    running = []
    while queue or running:
        while queue and len(running) < opts.jobs:
            method, seed = queue.pop(0)
            run = os.path.join(opts.out, f"{method}-s{seed}")
            if finished(run, opts.iterations):
                print(f"{method} seed {seed}: done already", flush=True)
                continue
            cmd = [sys.executable, os.path.join(ROOT, "vineppo.py"), "--advantage", method, "--seed", str(seed),
                   "--out", run, "--iterations", str(opts.iterations), "--eval-every", str(opts.eval_every),
                   "--resume", *([] if "--task" in extra else ["--task", "arith"]), *extra]   # the built-in task
            os.makedirs(run, exist_ok=True)
            log = open(f"{run}.log", "a")
            print(f"{time.strftime('%H:%M:%S')} start {method} seed {seed}: {' '.join(cmd[1:])}", flush=True)
            running.append((method, seed, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log))
        time.sleep(2)
        for item in list(running):
            method, seed, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                print(f"{time.strftime('%H:%M:%S')} end {method} seed {seed}: exit {proc.returncode}", flush=True)


# ------------------------------------------------------------------------------------------ aggregation
def mean_std(xs: list) -> tuple:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def fmt(xs: list, digits: int = 3) -> str:
    if not xs:
        return "-"
    m, s = mean_std(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def collect(opts) -> dict:
    """Per method: the seeds that finished, their eval curves, KL and timings."""
    out = {}
    for method in opts.methods:
        runs = {}
        for seed in opts.seeds:
            records = read_metrics(os.path.join(opts.out, f"{method}-s{seed}"))
            if not records or not finished(os.path.join(opts.out, f"{method}-s{seed}"), opts.iterations):
                continue
            train = [r for r in records if r["iteration"] > 0]
            runs[seed] = {
                "eval": {r["iteration"]: r["eval/accuracy"] for r in records if "eval/accuracy" in r},
                "greedy": {r["iteration"]: r["eval/greedy_accuracy"] for r in records if "eval/accuracy" in r},
                "worked": {r["iteration"]: r.get("eval/worked_share") for r in records if "eval/accuracy" in r},
                "kl": {0: 0.0, **{r["iteration"]: r.get("loss/kl", 0.0) for r in train}},
                "reward": {r["iteration"]: r["train/reward"] for r in train},
                "s_per_iter": sum(r["time/sample"] + r["time/mc"] + r["time/update"] for r in train) / len(train),
                "mc_share": sum(r["time/mc"] for r in train) / max(1e-9, sum(r["time/sample"] + r["time/mc"] + r["time/update"] for r in train)),
                "wall": sum(r["time/sample"] + r["time/mc"] + r["time/update"] + r.get("time/eval", 0.0) for r in train),
            }
        if runs:
            its = sorted(set.intersection(*(set(r["eval"]) for r in runs.values())))
            out[method] = {"runs": runs, "its": its,
                           "acc": {i: [r["eval"][i] for r in runs.values()] for i in its},
                           "greedy": {i: [r["greedy"][i] for r in runs.values()] for i in its},
                           "worked": {i: [r["worked"][i] for r in runs.values() if r["worked"][i] is not None] for i in its},
                           # KL at an eval point: the mean over the iterations since the previous eval point
                           # (one iteration's KL is noisy: it is measured during that iteration's 4 optimizer steps)
                           "kl": {i: [window_mean(r["kl"], prev, i) for r in runs.values()] for prev, i in zip([0] + its, its)}}
    return out


def window_mean(series: dict, after: int, upto: int) -> float:
    xs = [v for i, v in series.items() if after < i <= upto]
    return sum(xs) / len(xs) if xs else 0.0


def first_reaching(curve: dict, target: float):
    """The first trained iteration (> 0) whose mean accuracy reaches `target`."""
    return next((i for i in sorted(curve) if i > 0 and curve[i] >= target - 1e-12), None)


def table(opts, data: dict, analysis: dict = None) -> str:
    its = sorted(set.intersection(*(set(d["its"]) for d in data.values())))
    lines = [f"Built-in arith task, {opts.iterations} iterations per run, seeds {' '.join(map(str, opts.seeds))}; "
             f"accuracy = mean fraction correct of the demo's eval samples on its test problems; mean ± std over the seeds that finished.",
             "", "Test accuracy (sampled, pass@1 estimate) by iteration:", "",
             "| method | seeds | " + " | ".join(f"it {i}" for i in its) + " |", "|---|---|" + "---|" * len(its)]
    for m, d in data.items():
        lines.append(f"| {m} | {len(d['runs'])} | " + " | ".join(fmt(d["acc"][i]) for i in its) + " |")
    lines += ["", "KL to the reference (k3, summed over the response, mean over sequences; mean over the iterations since the previous column):", "",
              "| method | seeds | " + " | ".join(f"it {i}" for i in its) + " |", "|---|---|" + "---|" * len(its)]
    for m, d in data.items():
        lines.append(f"| {m} | {len(d['runs'])} | " + " | ".join(fmt(d["kl"][i], 4) for i in its) + " |")
    if all(d["worked"][i] for d in data.values() for i in its):   # eval/worked_share: what RL changes on this task
        lines += ["", "Share of the multiplications in the sampled test responses that are worked out rather than recalled:", "",
                  "| method | seeds | " + " | ".join(f"it {i}" for i in its) + " |", "|---|---|" + "---|" * len(its)]
        for m, d in data.items():
            lines.append(f"| {m} | {len(d['runs'])} | " + " | ".join(fmt(d["worked"][i], 2) for i in its) + " |")
    critic_best = None
    if "critic" in data:
        curve = {i: mean_std(data["critic"]["acc"][i])[0] for i in its}
        critic_best = max((v, -i) for i, v in curve.items() if i > 0)   # best over training, earliest on ties
    head = "| method | seeds | final acc | final - start | greedy final | best acc (iteration) | s / iteration | MC share | wall-clock per run |"
    if critic_best:
        head += f" first iteration at critic's best ({critic_best[0]:.3f}) | training time to it (s / iteration x iterations, evaluations excluded) |"
    lines += ["", "Summary (time measured with the runs sharing the machine; compare methods, not absolute speed):", "",
              head, "|" + "---|" * (head.count("|") - 1)]
    for m, d in data.items():
        curve = {i: mean_std(d["acc"][i])[0] for i in its}
        best_v, best_i = max((v, -i) for i, v in curve.items())
        runs = list(d["runs"].values())
        gain = [r["eval"][its[-1]] - r["eval"][0] for r in runs]   # paired by seed: the start is the same SFT model
        row = (f"| {m} | {len(runs)} | {fmt(d['acc'][its[-1]])} | {fmt(gain)} | {fmt(d['greedy'][its[-1]])} | {best_v:.3f} ({-best_i}) "
               f"| {fmt([r['s_per_iter'] for r in runs], 2)} | {fmt([r['mc_share'] for r in runs], 2)} "
               f"| {fmt([r['wall'] / 60 for r in runs], 1)} min |")
        if critic_best:
            reach = first_reaching(curve, critic_best[0])
            per_it = mean_std([r["s_per_iter"] for r in runs])[0]
            row += (f" {reach if reach is not None else 'not reached'} | "
                    f"{'-' if reach is None else f'{reach * per_it / 60:.1f} min'} |")
        lines.append(row)
    if analysis:
        lines += ["", "Value analysis (paper section 7): MAE against a many-rollout ground truth, by position i/n in the chain;"
                  " top-1: how often the estimator's highest-valued of 5 sampled next steps is truly best:", ""]
        for name, res in analysis.items():
            bins = res["mae_by_position"]
            edges = bins["bin_edges"]
            lines.append(f"*{name}* ({res['states']} states, K = {res['k']}, truth from {res['n_truth']} rollouts, its standard error {res['truth_se_mean']:.3f}; "
                         f"a K-rollout mean's expected MAE {res['mc_mae_expected']:.3f})")
            lines += ["", "| estimator | MAE | " + " | ".join(f"i/n in [{a:.1f}, {b:.1f})" for a, b in zip(edges, edges[1:]))
                      + " | top-1 of alternatives |", "|---|---|" + "---|" * (len(edges) - 1) + "---|",
                      "| (states) | | " + " | ".join(str(c) for c in bins["count"]) + f" | {res['ranking']['states']} states |"]
            for est, mae in res["mae"].items():
                label = {"mc": f"MC, K = {res['k']}", "critic": "critic"}.get(est, est)
                lines.append(f"| {label} | {mae:.3f} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in bins[est])
                             + f" | {res['ranking']['top1'].get(est) or 0:.2f} |")
            lines.append("| random pick | " + " | " * (len(edges) - 1) + f" | {res['ranking']['top1']['chance'] or 0:.2f} |")
            lines.append("")
    return "\n".join(lines)


def plot(opts, data: dict, analysis: dict = None) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -r requirements-notebooks.txt): no figure", file=sys.stderr)
        return
    os.makedirs(os.path.dirname(opts.figure), exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for m, d in data.items():
        its = d["its"]
        mu = [mean_std(d["acc"][i])[0] for i in its]
        sd = [mean_std(d["acc"][i])[1] for i in its]
        line, = ax1.plot(its, mu, marker="o", label=f"{m} ({len(d['runs'])} seeds)")
        ax1.fill_between(its, [a - b for a, b in zip(mu, sd)], [a + b for a, b in zip(mu, sd)], color=line.get_color(), alpha=0.15)
        kl = [mean_std(d["kl"][i])[0] for i in its]
        ax2.plot(kl, mu, marker="o", color=line.get_color(), label=m)
    ax1.set_xlabel("iteration"); ax1.set_ylabel("test accuracy"); ax1.set_title("accuracy vs iteration (mean ± std)")
    ax2.set_xlabel("KL to the reference"); ax2.set_ylabel("test accuracy"); ax2.set_title("accuracy vs KL")
    ax2.set_xscale("symlog", linthresh=1e-3)
    ax1.legend(); ax1.grid(alpha=0.3); ax2.grid(alpha=0.3)
    fig.tight_layout(); fig.savefig(opts.figure, dpi=120); plt.close(fig)
    print(f"wrote {opts.figure}")
    if analysis:
        fig, ax = plt.subplots(figsize=(6, 4))
        width, x0 = 0.8 / sum(len(r["mae"]) for r in analysis.values()), 0
        for name, res in analysis.items():
            edges = res["mae_by_position"]["bin_edges"]
            centers = list(range(len(edges) - 1))
            for est in res["mae"]:
                vals = [v if v is not None else float("nan") for v in res["mae_by_position"][est]]
                ax.bar([c - 0.4 + width * (x0 + 0.5) for c in centers], vals, width,
                       label=f"{'critic' if est == 'critic' else 'MC K=' + str(res['k'])} ({name}): {res['mae'][est]:.3f}")
                x0 += 1
        ax.set_xticks(centers, [f"{a:.1f}-{b:.1f}" for a, b in zip(edges, edges[1:])])
        top = max(v for r in analysis.values() for est in r["mae"] for v in r["mae_by_position"][est] if v is not None)
        ax.set_ylim(0, 1.5 * top)   # room for the legend above the bars
        ax.set_xlabel("position in the chain (i / n)"); ax.set_ylabel("MAE vs many-rollout truth"); ax.legend(fontsize=8, loc="upper left")
        ax.set_title("value prediction error")
        path = os.path.join(os.path.dirname(opts.figure), "compare_value_mae.png")
        fig.tight_layout(); fig.savefig(path, dpi=120); plt.close(fig)
        print(f"wrote {path}")


# ------------------------------------------------------------------------------------------ value analysis
def load_run(run: str):
    """The final policy of a run, its Args, and its trained critic (None unless --advantage critic)."""
    import dataclasses

    import torch

    import vineppo as vp
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    args = vp.Args(**{f.name: config[f.name] for f in dataclasses.fields(vp.Args) if f.name in config})
    ckpt = vp.find_checkpoint(run)
    policy, tokenizer = vp.load_policy(ckpt, torch.device("cpu"), args)
    critic = None
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
    if state.get("critic"):
        critic = vp.make_critic(config["resolved_model"], torch.device("cpu"))
        critic.load_state_dict(state["critic"]["model"])
        critic.eval()
    return policy, tokenizer, critic, args


def run_analysis(opts) -> dict:
    import vineppo as vp
    rows = vp.load_problems("arith", "test")
    seed = opts.analysis_seed
    results = {}
    for method, label in (("critic", f"policy and critic of the critic run, seed {seed}"),
                          ("vine", f"policy of the vine run, seed {seed}")):
        run = os.path.join(opts.out, f"{method}-s{seed}")
        if method not in opts.methods or vp.find_checkpoint(run) is None:
            continue
        policy, tokenizer, critic, args = load_run(run)
        t0 = time.time()
        res = vp.value_analysis(policy, tokenizer, rows, args, "arith", critic=critic, n_states=opts.analysis_states,
                                n_truth=opts.analysis_truth, n_rank=opts.analysis_rank)
        print(f"value analysis on the {label}: MAE " + ", ".join(f"{k} {v:.3f}" for k, v in res["mae"].items() if v is not None)
              + f"; top-1 " + ", ".join(f"{k} {v:.2f}" for k, v in res["ranking"]["top1"].items() if v is not None)
              + f" ({time.time() - t0:.0f}s)", flush=True)
        results[label] = res
    with open(os.path.join(opts.out, "value_analysis.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["vine", "critic", "grpo", "rloo"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--iterations", type=int, default=40, help="PPO iterations of every run (the same budget for all methods)")
    p.add_argument("--eval-every", type=int, default=None, help="default: iterations / 5")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each with one thread when > 1)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "compare"))
    p.add_argument("--figure", default=os.path.join(ROOT, "docs", "figures", "compare_accuracy.png"))
    p.add_argument("--aggregate-only", action="store_true", help="no new runs: table and plot from what finished")
    p.add_argument("--analysis", action="store_true", help="value analysis of the critic run's critic and the MC estimate")
    p.add_argument("--analysis-seed", type=int, default=None, help="whose runs (default: the first seed)")
    p.add_argument("--analysis-states", type=int, default=100)
    p.add_argument("--analysis-truth", type=int, default=256, help="rollouts of the ground truth")
    p.add_argument("--analysis-rank", type=int, default=50, help="states whose alternative next steps are ranked")
    opts = p.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")   # progress bars of the runs and the analysis: logs stay readable
    opts.eval_every = opts.eval_every or max(1, opts.iterations // 5)
    opts.analysis_seed = opts.analysis_seed or opts.seeds[0]
    os.makedirs(opts.out, exist_ok=True)
    t0 = time.time()
    if not opts.aggregate_only:
        run_all(opts, extra)
    data = collect(opts)
    if not data:
        sys.exit("no finished runs to compare")
    analysis = None
    path = os.path.join(opts.out, "value_analysis.json")
    if opts.analysis:
        analysis = run_analysis(opts)
    elif os.path.isfile(path):
        with open(path) as f:
            analysis = json.load(f)
    text = table(opts, data, analysis)
    with open(os.path.join(opts.out, "compare.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    plot(opts, data, analysis)
    print(f"{time.time() - t0:.0f}s; table in {os.path.join(opts.out, 'compare.md')}")


if __name__ == "__main__":
    main()
