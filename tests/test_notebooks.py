"""CI executes both notebooks headless and fails on any error.

01_credit_assignment runs in its fast mode (VINEPPO_NOTEBOOK_FAST=1: the same cells at small sizes) and
02_colab_gsm8k in smoke mode (VINEPPO_SMOKE=1: the built-in task and tiny model on the CPU). Both read the demo's
SFT model from the session's $XDG_CACHE_HOME (the demo_cache fixture trains it once, with vineppo's own
demo_sft_model, the code a cold notebook runs), as a reader's notebook would after a demo run. Together ~1 min on
2 CPU cores.
"""
import os
import re
import textwrap
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT = 300   # seconds per cell


@pytest.fixture(scope="module")
def notebook_env(demo_cache, monkeypatch_module):
    """Environment of the notebook kernels (a kernel inherits os.environ when it starts)."""
    monkeypatch_module.setenv("XDG_CACHE_HOME", str(demo_cache))   # the demo's SFT model, trained once per session
    # The kernel runs alone (pytest waits for it), so it gets two threads where there are two cores.
    monkeypatch_module.setenv("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))
    monkeypatch_module.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return monkeypatch_module


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def execute(name: str, env, tmp_path, **variables) -> nbformat.NotebookNode:
    """Run every cell of notebooks/<name> in a fresh kernel (cwd = notebooks/); a cell error fails the test."""
    for key, value in variables.items():
        env.setenv(key, value)
    env.setenv("VINEPPO_NOTEBOOK_OUT", str(tmp_path / "run"))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def cell(nb, tag: str):
    [c] = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    return c


def text(c) -> str:
    return "".join(o.get("text", "") for o in c.outputs if o.output_type == "stream")


def has_image(c) -> bool:
    return any("image/png" in o.get("data", {}) for o in c.outputs)


def test_notebooks_are_stripped():
    """Committed notebooks hold no outputs, so diffs show code and prose only."""
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for c in nb.cells:
            if c.cell_type == "code":
                assert c.outputs == [] and c.execution_count is None, f"{path.name}: strip the outputs"


def test_credit_assignment_notebook(notebook_env, tmp_path):
    nb = execute("01_credit_assignment.ipynb", notebook_env, tmp_path, VINEPPO_NOTEBOOK_FAST="1",
                 VINEPPO_NOTEBOOK_FIGURES=str(tmp_path))
    # the step table: one row per step, values in [0, 1]
    m = re.search(r"(\d+) rows, (\d+) steps, V in \[([-\d.]+), ([-\d.]+)\]", text(cell(nb, "value-table")))
    assert m, text(cell(nb, "value-table"))
    rows, steps, v_min, v_max = int(m[1]), int(m[2]), float(m[3]), float(m[4])
    assert rows == steps >= 1 and 0.0 <= v_min <= v_max <= 1.0
    # MC error per K, the critic beside MC, both training runs
    assert re.search(r"K=\s*1: mean \|V_hat - V_truth\| = [\d.]+", text(cell(nb, "fig-values")))
    assert re.search(r"MAE  MC \(K=9\) [\d.]+ +critic [\d.]+", text(cell(nb, "critic")))
    assert re.search(r"VinePPO +test accuracy [\d.]+ -> [\d.]+", text(cell(nb, "fig-training")))
    for tag in ("fig-values", "critic", "fig-training"):
        assert has_image(cell(nb, tag)), tag
    for png in ("value_along_chain.png", "critic_vs_mc.png", "training_curves.png"):
        assert (tmp_path / png).stat().st_size > 10_000, png


def test_colab_notebook_smoke(notebook_env, tmp_path):
    nb = execute("02_colab_gsm8k.ipynb", notebook_env, tmp_path, VINEPPO_SMOKE="1")
    assert "before training" in text(cell(nb, "eval-before"))
    m = re.search(r"(\d+) rows, (\d+) steps, V in \[([-\d.]+), ([-\d.]+)\]", text(cell(nb, "steps")))
    assert m and int(m[1]) == int(m[2]) >= 1 and 0.0 <= float(m[3]) <= float(m[4]) <= 1.0, text(cell(nb, "steps"))
    assert re.search(r"2 iterations in [\d.]+ min", text(cell(nb, "train")))
    assert has_image(cell(nb, "plot"))
    assert (tmp_path / "run" / "curves.png").is_file() and (tmp_path / "run" / "metrics.jsonl").is_file()


def test_colab_install_cell_gives_pip_valid_requirements(monkeypatch):
    """The Colab notebook's install cell (never run by CI: smoke mode finds the checkout) turns requirements.txt
    into pip arguments. A comment after a requirement (peft's) made pip fail on a fresh runtime; now every
    argument must parse as a requirement, torch as its GPU line `torch>=2.9` (the file's comment), no triton."""
    from packaging.requirements import Requirement
    nb = nbformat.read(NOTEBOOKS / "02_colab_gsm8k.ipynb", as_version=4)
    [install] = [c.source for c in nb.cells if c.cell_type == "code" and "requirements.txt" in c.source]
    block = install[install.index("    reqs = "):install.index("    subprocess.run([sys.executable")]
    monkeypatch.chdir(NOTEBOOKS.parent)
    scope = {"re": re, "Path": Path}
    exec(textwrap.dedent(block), scope)
    names = [Requirement(r).name for r in scope["reqs"]]              # raises on anything pip cannot read
    wanted = [Requirement(line.split("#")[0]).name for line in (NOTEBOOKS.parent / "requirements.txt").read_text().splitlines()
              if line.split("#")[0].strip()]
    assert "torch>=2.9" in scope["reqs"] and names == [n for n in wanted if n != "triton"]
