#!/usr/bin/env bash
# The GPU check: what the kernels and the trainer do on one GPU, in one command, in under
# 8 minutes on a fresh single-GPU machine with PyTorch and Triton installed; nothing is
# downloaded. See docs/kernels.md ("GPU check").
#
#   bash benchmarks/gpu_check.sh OUTFILE
#
# Sections, each ending in one summary line (all of them also written to OUTFILE):
#   install          pip install --no-deps --no-build-isolation -e . (builds the C++ helpers);
#                    without the pybind11 package, the helpers are compiled against the
#                    pybind11 headers PyTorch ships and the repository goes on PYTHONPATH
#   kernel_tests     pytest tests/kernels -m "slow or not slow", Triton compiling for the GPU
#   flash_attention  benchmarks/kernel_throughput.py --quick: TFLOP/s against SDPA's flash
#   rmsnorm          backend; GB/s against the copy bandwidth measured in the same run
#   train_eager      a ~1.1B LLaMA (22 x 2048, GQA 16/4, vocab 32000), bf16, Triton backends,
#   train_compiled   selective recompute, eager and --compile: tokens/s, MFU, peak memory
#                    against the cost model's peak (examples/pretrain.py --dry-run)
# A failing section writes "FAIL <section>: ..." and the script goes on; it exits 1 at the
# end if any failed. Without a CUDA GPU it says so and exits 0.
#
# Settings (environment):
#   GPU_CHECK_ON_CPU=1     run every section on the CPU at tiny sizes (Triton interpreted, no
#                          installation: the helpers are only built, into the scratch
#                          directory): how tests/test_gpu_check.py tests this script
#   GPU_CHECK_DIR          scratch directory for logs, corpus and results (default: a new one
#                          under $TMPDIR)
#   GPU_CHECK_KERNEL_TESTS a pytest -k expression for the kernel tests (default: all on a GPU,
#                          two quick ones on the CPU)
#   GPU_CHECK_LIMIT_<SECTION>  seconds a section may take (INSTALL 50, KERNEL_TESTS 160,
#                          THROUGHPUT 100, TRAIN_EAGER 70, TRAIN_COMPILED 100: 8 minutes in
#                          all): a section past its limit is stopped and reported as failed
#   PYTHON                 the interpreter (default python3)
set -uo pipefail

if [[ $# -ne 1 || "$1" == -* ]]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTFILE  (the summary lines are written there)" >&2
    exit 2
fi
case "$1" in /*) OUT="$1" ;; *) OUT="$PWD/$1" ;; esac
cd "$(dirname "$0")/.." || exit 2
REPO="$PWD"
PYTHON="${PYTHON:-python3}"
ON_CPU="${GPU_CHECK_ON_CPU:-0}"
if ! : >"$OUT" 2>/dev/null; then
    echo "gpu_check.sh: cannot write the summary file $OUT (its directory must exist)" >&2
    exit 2
fi
START=$(date +%s)
FAILED=0

record() {  # a summary line: to the console and to OUTFILE
    echo ">> $1"
    echo "$1" >>"$OUT"
}

fail() {  # section, why
    record "FAIL $1: $2"
    FAILED=$((FAILED + 1))
}

limit() {  # section name (upper case), default seconds
    local var="GPU_CHECK_LIMIT_$1"
    echo "${!var:-$2}"
}

run_logged() {  # section, seconds, command...: the command's output to the console and the
    # section's log; returns its exit status (124: stopped at the limit)
    local name="$1" seconds="$2"
    shift 2
    echo "== $name (at most ${seconds} s): $*"
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$WORK/$name.log"
    return "${PIPESTATUS[0]}"
}

why() {  # exit status, section, seconds: the reason a failed command gives
    if [[ "$1" == 124 || "$1" == 137 ]]; then
        echo "stopped after $3 s (GPU_CHECK_LIMIT_$2); log $WORK/${2,,}.log"
    else
        echo "exit status $1; log $WORK/${2,,}.log: $(grep -v '^\s*$' "$WORK/${2,,}.log" |
            tail -1 | cut -c1-200)"
    fi
}

# One interpreter start for three questions: torch, a GPU, and what to record about them.
DEVICE_LINE=$("$PYTHON" - <<'EOF'
import importlib.util, sys
try:
    import torch
except ImportError:
    sys.exit(3)
triton = "none"
if importlib.util.find_spec("triton") is not None:
    import triton as t
    triton = t.__version__
gpu = torch.cuda.is_available()
name = torch.cuda.get_device_name().replace(" ", "_") if gpu else "cpu"
print(f"device name={name} torch={torch.__version__} cuda={torch.version.cuda} triton={triton}")
sys.exit(0 if gpu else 4)
EOF
)
case $? in
    0) ON_CPU=0 ;;  # a GPU is there: GPU_CHECK_ON_CPU changes nothing
    4)
        if [[ "$ON_CPU" != 1 ]]; then
            echo "no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing to" \
                "check. GPU_CHECK_ON_CPU=1 runs every section on the CPU at tiny sizes."
            record "gpu_check skipped: no CUDA GPU"
            exit 0
        fi
        echo "GPU_CHECK_ON_CPU=1: every section on the CPU at tiny sizes; the figures mean nothing"
        ;;
    *)
        echo "gpu_check.sh: $PYTHON cannot import torch; install PyTorch first" >&2
        exit 2
        ;;
esac

# The autotuner's choices on disk: the training runs reuse the throughput section's tuning
# and the compiled run the eager run's, instead of compiling every candidate config again.
export TRITON_CACHE_AUTOTUNING=1
WORK="${GPU_CHECK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}"
mkdir -p "$WORK"
echo "scratch: $WORK; summary: $OUT"
record "$DEVICE_LINE"

# == install: the package and its C++ helpers (csrc/helpers.cpp), nothing downloaded ==========
# pybind11's headers ship with PyTorch: the helpers build without the pybind11 package.
BUILD_HELPERS_PY='
import os, subprocess, sys, sysconfig
from torch.utils.cpp_extension import include_paths

target, optimise = sys.argv[1], sys.argv[2]
tmp = f"{target}.tmp.{os.getpid()}"
headers = [sysconfig.get_paths()["include"], *include_paths()]
command = ["c++", optimise, "-shared", "-std=c++17", "-fPIC", *("-I" + p for p in headers),
           "csrc/helpers.cpp", "-o", tmp]
print(" ".join(command), flush=True)
subprocess.run(command, check=True)
os.replace(tmp, target)  # a new file: a process that has the old one loaded keeps it intact
'

section_install() {
    local seconds suffix method began
    seconds=$(limit INSTALL 50)
    began=$(date +%s)
    suffix=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
    printf '%s' "$BUILD_HELPERS_PY" >"$WORK/build_helpers.py"
    if [[ "$ON_CPU" == 1 ]]; then
        # A developer's environment (the test runs in it): build only, into the scratch dir.
        method=build-only
        # -O0: this only checks that the helpers build (5 s instead of 20 on two cores).
        run_logged install "$seconds" "$PYTHON" "$WORK/build_helpers.py" \
            "$WORK/helpers$suffix" -O0 ||
            { fail install "$(why $? INSTALL "$seconds")"; return; }
        HELPERS="$WORK/helpers$suffix"
    else
        method=pip-editable
        if ! "$PYTHON" -c "import pybind11, setuptools" 2>/dev/null ||
            ! run_logged install "$seconds" "$PYTHON" -m pip install --no-deps \
                --no-build-isolation --no-index -e .; then
            method=torch-headers  # no pybind11 package, or pip failed: build in place
            run_logged install "$seconds" "$PYTHON" "$WORK/build_helpers.py" \
                "engine/data/helpers$suffix" -O3 ||
                { fail install "$(why $? INSTALL "$seconds")"; return; }
            export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
        fi
        HELPERS=""
    fi
    local missing
    # From /: what is importable must come from the installation, not the working directory.
    missing=$(cd / && "$PYTHON" - "$HELPERS" 2>"$WORK/install_check.log" <<'EOF'
import importlib.util, sys
if sys.argv[1]:  # load the built file itself: it is not installed
    spec = importlib.util.spec_from_file_location("engine.data.helpers", sys.argv[1])
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
else:
    import engine.data.helpers  # noqa: F401
needed = ["engine", "kernels", "numpy", "yaml", "safetensors", "jinja2", "pytest", "triton"]
print(",".join(m for m in needed if importlib.util.find_spec(m) is None))
EOF
    ) || {
        fail install "the helpers do not import: $(tail -1 "$WORK/install_check.log")"
        return
    }
    if [[ -n "$missing" ]]; then
        fail install "missing Python packages: $missing (pip install them; nothing is downloaded)"
        return
    fi
    record "install method=$method seconds=$(($(date +%s) - began))"
}

# == kernel tests on the GPU (bf16/fp16 cases included), the interpreter off ===================
section_kernel_tests() {
    local seconds selection rc counts
    seconds=$(limit KERNEL_TESTS 160)
    local interpret=(env -u TRITON_INTERPRET)
    selection="${GPU_CHECK_KERNEL_TESTS:-}"
    if [[ "$ON_CPU" == 1 ]]; then
        interpret=(env TRITON_INTERPRET=1)
        selection="${selection:-test_documents_match_separate_sequences or non_contiguous_rows}"
    fi
    local args=(tests/kernels -m "slow or not slow" -q -p no:cacheprovider)
    [[ -n "$selection" ]] && args+=(-k "$selection")
    run_logged kernel_tests "$seconds" "${interpret[@]}" "$PYTHON" -m pytest "${args[@]}"
    rc=$?
    counts=$("$PYTHON" - "$WORK/kernel_tests.log" <<'EOF'
import re, sys
text = open(sys.argv[1], errors="replace").read()
final = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
found = dict.fromkeys(("passed", "failed", "skipped", "errors"), 0)
for count, what in re.findall(r"(\d+) (passed|failed|skipped|errors?)", final[-1] if final else ""):
    found["errors" if what.startswith("error") else what] = int(count)
seconds = re.search(r" in ([\d.]+)s", final[-1]) if final else None
print(" ".join(f"{k}={v}" for k, v in found.items()), f"seconds={seconds[1] if seconds else '?'}")
EOF
    )
    if [[ $rc -ne 0 ]]; then
        fail kernel_tests "$counts; $(why $rc KERNEL_TESTS "$seconds")"
    else
        record "kernel_tests device=$([[ "$ON_CPU" == 1 ]] && echo cpu || echo cuda) $counts"
    fi
}

# == kernel throughput: flash attention and RMSNorm against their ceilings =====================
section_throughput() {
    local seconds mode rc line
    seconds=$(limit THROUGHPUT 100)
    mode=(--quick)
    [[ "$ON_CPU" == 1 ]] && mode=(--cpu)
    run_logged throughput "$seconds" env -u TRITON_INTERPRET "$PYTHON" \
        benchmarks/kernel_throughput.py "${mode[@]}" --out-dir "$WORK/kernels"
    rc=$?
    if [[ $rc -ne 0 ]]; then
        fail throughput "$(why $rc THROUGHPUT "$seconds")"
        return
    fi
    for section in flash_attention rmsnorm; do
        line=$(grep "^$section " "$WORK/throughput.log" | tail -1)
        if [[ -n "$line" ]]; then record "$line"; else fail "$section" "no summary line"; fi
    done
}

# == one-GPU training: a ~1B LLaMA, eager and compiled =========================================
make_corpus() {  # -> $WORK/data/pydoc_text_document.{bin,idx} and $WORK/data/tokenizer.model
    if "$PYTHON" -c "import sentencepiece" 2>/dev/null; then
        "$PYTHON" examples/quickstart_data.py --output-dir "$WORK/data" --vocab-size 2000 &&
            "$PYTHON" tools/preprocess_data.py --input "$WORK/data/pydoc_topics.jsonl" \
                --output-prefix "$WORK/data/pydoc" --tokenizer-type SentencePieceTokenizer \
                --tokenizer-model "$WORK/data/tokenizer.model" --append-eod --workers 2
        return
    fi
    # No sentencepiece: the same text as bytes (ids 0-255), written by the engine's builder.
    echo "no sentencepiece: the corpus is pydoc_data's text as bytes, no tokenizer"
    "$PYTHON" - "$WORK/data/pydoc_text_document" <<'EOF'
import os, sys, numpy as np, pydoc_data.topics
from engine.data.indexed_dataset import IndexedDatasetBuilder
os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
builder = IndexedDatasetBuilder(sys.argv[1] + ".bin", dtype=np.uint16)
for name in sorted(pydoc_data.topics.topics):
    builder.add_document(np.frombuffer(pydoc_data.topics.topics[name].encode(), np.uint8))
builder.finalize(sys.argv[1] + ".idx")
EOF
}

TRAIN_ARGS=()
train_args() {
    if [[ "$ON_CPU" == 1 ]]; then
        TRAIN_ARGS=(--num-layers 2 --hidden-size 64 --ffn-hidden-size 176
            --num-attention-heads 4 --group-query-attention --num-query-groups 2
            --vocab-size 2048 --max-position-embeddings 32 --seq-length 32
            --micro-batch-size 1 --global-batch-size 1 --train-iters 3)
        WARMUP=1
    else
        # TinyLlama's shape with head dim 128 (16 heads, 4 K/V groups): 1.12B parameters,
        # 16K tokens a step; its attention tuning (head dim 128, causal, bf16, sequence
        # bucket 2048) is the throughput section's, read back from Triton's autotuning cache.
        TRAIN_ARGS=(--num-layers 22 --hidden-size 2048 --ffn-hidden-size 5632
            --num-attention-heads 16 --group-query-attention --num-query-groups 4
            --vocab-size 32000 --max-position-embeddings 2048 --seq-length 2048
            --micro-batch-size 8 --global-batch-size 8 --train-iters 20 --bf16)
        WARMUP=5
    fi
    TRAIN_ARGS+=(--untie-embeddings-and-output-weights --attention-backend triton
        --norm-backend triton --recompute-granularity selective --lr 3e-4 --min-lr 3e-5
        --lr-warmup-iters 2 --log-interval 1 --eval-iters 0 --seed 1234
        --data-path "$WORK/data/pydoc_text_document" --split 100,0,0 --num-workers 0)
    if [[ -f "$WORK/data/tokenizer.model" ]]; then
        TRAIN_ARGS+=(--tokenizer-type SentencePieceTokenizer
            --tokenizer-model "$WORK/data/tokenizer.model")
    fi
}

train_summary() {  # section, log, plan log, warm-up iterations: one line from the log
    "$PYTHON" - "$@" <<'EOF'
import re, statistics, sys

name, log, plan_log, warmup = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
lines = open(log, errors="replace").read().splitlines()
PATTERNS = dict(loss=r"\| loss ([\d.E+-]+)", tokens_per_s=r"\| tokens/s ([\d.]+)",
                step_ms=r"\| step time ([\d.]+) ms", tflops=r"\| TFLOP/s/device ([\d.e+-]+)",
                mfu=r"\| MFU ([\d.]+)%", memory=r"\| (?:mem|rss) ([\d.]+) GB")
iterations = []
for line in lines:
    if line.startswith("iteration "):
        found = {k: re.search(p, line) for k, p in PATTERNS.items()}
        iterations.append({k: float(m[1]) for k, m in found.items() if m})
if not iterations:
    sys.exit(f"no iteration lines in {log}")
timed = iterations[warmup:] or iterations[-1:]  # the first iterations tune kernels, compile


def median(key):
    values = [it[key] for it in timed if key in it]
    return statistics.median(values) if values else None


on_gpu = any(re.search(r"\| mem [\d.]+ GB", line) for line in lines)
out = [name, f"tokens_per_s={median('tokens_per_s'):.0f}"]
out.append(f"mfu={median('mfu'):.1f}%" if median("mfu") is not None else "mfu=n/a")
out += [f"tflops_per_device={median('tflops'):.4g}", f"step_ms={median('step_ms'):.0f}"]
peak = iterations[-1].get("memory")  # the trainer reports the running maximum
if peak is not None:
    out.append(f"peak_{'mem' if on_gpu else 'rss'}_gb={peak:.2f}")
plan = re.search(r"peak memory ([\d.]+) GB", open(plan_log, errors="replace").read())
if plan:
    out.append(f"plan_peak_mem_gb={float(plan[1]):.2f}")
    if on_gpu and peak is not None:
        out.append(f"mem_over_plan={peak / float(plan[1]):.2f}")
for line in lines:  # the trainer reports its compile time once
    seconds = re.search(r"compiled in ([\d.]+) s", line)
    if seconds:
        out.append(f"compile_s={seconds[1]}")
        break
out += [f"loss_first={iterations[0]['loss']:.4f}", f"loss_last={iterations[-1]['loss']:.4f}",
        f"iterations={len(iterations)}", f"timed={len(timed)}"]
print(" ".join(out))
EOF
}

section_train() {
    local interpret=(env -u TRITON_INTERPRET)
    [[ "$ON_CPU" == 1 ]] && interpret=(env TRITON_INTERPRET=1)
    if ! make_corpus >"$WORK/corpus.log" 2>&1; then
        fail train_eager "no corpus: log $WORK/corpus.log: $(tail -1 "$WORK/corpus.log")"
        fail train_compiled "no corpus"
        return
    fi
    train_args
    "$PYTHON" examples/pretrain.py "${TRAIN_ARGS[@]}" --dry-run >"$WORK/plan.log" 2>&1 ||
        echo "the cost model's plan failed (log $WORK/plan.log): no plan figure"
    grep "peak memory" "$WORK/plan.log"
    local has_compile=1
    "$PYTHON" examples/pretrain.py --help 2>/dev/null | grep -q -- "--compile" || has_compile=0
    local section flags seconds rc line
    for section in train_eager train_compiled; do
        flags=()
        if [[ $section == train_compiled ]]; then
            if [[ $has_compile == 0 ]]; then
                record "train_compiled skipped: examples/pretrain.py has no --compile flag"
                continue
            fi
            flags=(--compile)
            # Dynamo cannot trace Triton's interpreter (it runs the kernels as Python on
            # numpy): on the CPU the compiled run takes the PyTorch backends.
            [[ "$ON_CPU" == 1 ]] && flags+=(--attention-backend torch --norm-backend torch)
        fi
        seconds=$(limit "${section^^}" "$([[ $section == train_eager ]] && echo 70 || echo 100)")
        run_logged "$section" "$seconds" "${interpret[@]}" "$PYTHON" examples/pretrain.py \
            "${TRAIN_ARGS[@]}" "${flags[@]}"
        rc=$?
        if [[ $rc -ne 0 ]]; then
            fail "$section" "$(why $rc "${section^^}" "$seconds")"
        elif line=$(train_summary "$section" "$WORK/$section.log" "$WORK/plan.log" "$WARMUP"); then
            record "$line"
        else
            fail "$section" "no figures in $WORK/$section.log"
        fi
    done
}

section_install
section_kernel_tests
section_throughput
section_train
record "gpu_check failed=$FAILED seconds=$(($(date +%s) - START))"
echo "summary lines in $OUT; logs in $WORK"
[[ $FAILED -eq 0 ]]
