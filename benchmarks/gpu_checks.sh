#!/usr/bin/env bash
# Everything that needs a GPU, as one prepared command per step, each under its own time limit so that
# a hang in one step still leaves the others' output:
#
#   bash benchmarks/gpu_checks.sh [steps...]      steps: logprobs sampler tests (default: all three)
#
#   tests     the tests' GPU cases (-k cuda): compiled Triton kernels against the float64 oracle, the
#             sampler (Triton cascade attention, CUDA-graph decode) against HF generate, one training
#             iteration per architecture on cuda (bf16 autocast, LoRA)
#   logprobs  python benchmarks/bench_logprobs.py       (issue #4's table and goals)
#   sampler   python benchmarks/bench_sampler.py --gpu  (issue #5's table and goals)
#
# Output goes to the terminal and to $OUT (the device tool's folder) or runs/gpu_checks. Time limits per
# step: logprobs 160 s, sampler 480 s, tests 300 s. On an H100 (2026-11-27) the sampler step took about 220 s
# and the sampler's test cases 51 s (one call); logprobs and the other test cases 307 s (a second call): the fused
# log-prob kernels' cases compile slowly (205 s of tests). So run `sampler` in one call and `logprobs tests` in
# another. Overrides: TESTS_K (pytest -k, default cuda),
# SAMPLER_ARGS (when unset, "--configs DeepSeekMath-7B RhoMath-1.1B --no-generate --memory-fraction 0.95
# --compile": the 7B config first, so that a call cut short still times it; ours with eager decoder layers
# at the default share of the free memory (0.7) and at 0.95, and with torch.compile'd layers (the default on a
# GPU) at both. The generate baselines, measured in the H100's first call of 2026-11-26, are left out so that
# the step fits its limit. A set SAMPLER_ARGS replaces all of that: SAMPLER_ARGS="" gives the plain table
# with the generate baselines; "--sort-row --profile" adds ours with the sort draw and a per-category
# profile of 16 decode steps), TESTS_LIMIT / LOGPROBS_LIMIT / SAMPLER_LIMIT (seconds).
# Needs torch, triton, transformers, peft, tokenizers, pytest.
# Extra wheels in .whl/ (e.g. Liger-Kernel for bench_logprobs' comparison row, which the lent GPU
# machines lack: `pip download --no-deps -d .whl liger-kernel==0.8.5` on a machine with a registry)
# are installed first, without a registry; so are math-verify and its two dependencies (the MATH-task
# training test grades with it; the lent machines' image lacks it).
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_checks}
mkdir -p "$out"
py=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_INTERPRET=0   # compiled kernels (tests/conftest.py defaults to the interpreter)
steps=${*:-logprobs sampler tests}
status=0
if compgen -G ".whl/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_checks_site .whl/*.whl &&
        export PYTHONPATH=/tmp/gpu_checks_site${PYTHONPATH:+:$PYTHONPATH}
fi


nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv \
    2>&1 | tee "$out/versions.txt"
"$py" - <<'EOF' 2>&1 | tee -a "$out/versions.txt"
import datetime, platform, torch, triton, transformers
print(datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), torch.cuda.get_device_name() if torch.cuda.is_available()
      else "NO CUDA DEVICE", f"python {platform.python_version()} torch {torch.__version__} triton {triton.__version__}"
      f" transformers {transformers.__version__}")
try:
    import importlib.metadata as md
    print("liger-kernel", md.version("liger-kernel"))
except Exception:  # noqa: BLE001
    print("liger-kernel not installed: bench_logprobs runs without its row")
EOF

run() {  # run NAME LIMIT_S CMD...: tee to $out/NAME.txt, remember a failure, go on
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "=== $name FAILED (exit $rc; 124 = time limit)"; status=1; }
}

for step in $steps; do
    case $step in
        tests)    run gpu_tests "${TESTS_LIMIT:-300}" "$py" -m pytest -v -p no:cacheprovider -k "${TESTS_K:-cuda}" -rfE --durations=8 \
                      tests/test_kernels_logprobs.py tests/test_sampler.py tests/test_train.py ;;
        logprobs) run bench_logprobs "${LOGPROBS_LIMIT:-160}" "$py" benchmarks/bench_logprobs.py ;;
        sampler)  run bench_sampler "${SAMPLER_LIMIT:-480}" "$py" benchmarks/bench_sampler.py --gpu \
                      ${SAMPLER_ARGS---configs DeepSeekMath-7B RhoMath-1.1B --no-generate --memory-fraction 0.95 --compile} ;;
        *)        echo "unknown step $step (tests, logprobs, sampler)"; status=2 ;;
    esac
done
exit $status
