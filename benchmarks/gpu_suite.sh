#!/usr/bin/env bash
# Every GPU benchmark of the project in one call, into ONE results file.
#
#   bash benchmarks/gpu_suite.sh                # on a GPU machine: ~8 minutes at most
#   bash benchmarks/gpu_suite.sh --dry-run      # the same sequence on CPU, tiny settings (GPU_SUITE_DRY_RUN=1)
#   bash benchmarks/gpu_suite.sh --list         # print the steps, their limits and commands; run nothing
#
# What it runs, in this order, each under its own `timeout` (seconds) so one hung benchmark cannot
# eat the budget; a failing or timed-out step is recorded and the suite goes on:
#   sampling-e2e           120  sampling.py: 512 px through base-632m + superres-268m (24 + 8 steps, CFG),
#                               bf16, batch 1 and 8, legacy / lean / compiled loops (--compile both)
#   sampling-paper-memory   30  sampling.py --paper --memory: base-632m one guided step legacy vs lean;
#                               peak memory of one super-res-268m step at batch 1
#   sampling-peer           60  sampling.py --peer: against diffusers' AmusedPipeline (random weights),
#                               equal and small size; --imported: the same aMUSEd-256 weights run by
#                               diffusers and by our pipeline after import, batch 1 and 8 (needs diffusers)
#   forward                 30  model_forward.py: forward tokens/s of base-632m and superres-268m, bf16
#   train                   35  train.py --device cuda: training tokens/s and MFU of base-632m, batch 64
#   train-3b                60  train.py --device cuda: the same for base-3b, batch 32 (~90 GiB: H200 yes,
#                               80 GB H100 likely OOM, which is then recorded as its failure)
#   tokenize                45  tokenize_throughput.py --device cuda: plain loop vs Ray Data, muse-632m VQGANs
#   serve                   85  serve_load.py --device cuda: closed-loop HTTP load at concurrency 1, 4, 16,
#                               batching on vs off, tiny model through super-res (128x128)
# The limits add up to 465 s; a deadline of 470 s from the start (GPU_SUITE_DEADLINE) caps the whole
# run, setup included: a step that would pass it gets only the time left, or is skipped and recorded.
# Most steps end well inside their limits; their wall times are in the results file.
#
# Where the results go: one text file, $OUT/gpu_suite.txt when $OUT is set, else
# benchmarks/gpu_suite_results.txt; --results PATH or GPU_SUITE_RESULTS=PATH overrides. It holds a
# header (date, machine, nvidia-smi, torch/CUDA and package versions) and, per step, the exact
# command, its full stdout/stderr, its exit status and its wall time; a summary table at the end.
# It is written as the steps run, so a run killed from outside keeps the steps already done.
# The console gets one short line per step.
#
# Python: GPU_SUITE_PYTHON (or --python) if given, else .venv/bin/python. Without a .venv, and if pip
# reaches a package index, the script runs `make install` (the README's install: torch 2.13.0, whose
# PyPI Linux wheel is the CUDA build, then -e .[dev]) and adds -e .[bench] (diffusers, for --peer);
# that time counts against the deadline. Offline, or if that fails, and the machine's python3 has a
# CUDA torch, it uses that python3 (the repo on PYTHONPATH) and skips, saying so, the steps whose
# packages it lacks. --wheels DIR (GPU_SUITE_WHEELS) installs the wheels in DIR with no index and no
# dependencies into a temporary folder on PYTHONPATH: the way to bring ray or diffusers to an offline
# machine. In GPU mode, if torch does not see a GPU the script says so and stops: it never
# benchmarks the CPU by accident.
#
# Options: --dry-run, --list, --only STEP[,STEP] (GPU_SUITE_ONLY), --results PATH, --python PY,
#          --wheels DIR, -h/--help.
# Exit status: 0 every step passed (or was skipped), 1 some step failed or timed out, 2 nothing
# could be benchmarked (no Python with torch, no GPU).
#
# Gaps in the scripts' flags (noted where they bite):
#   - serve_load.py has no GPU-fraction flag: with --device cuda it gives every deployment 0.1 GPU
#     (2 apps x 4 models share one GPU), hard-coded in deploy(). It serves the tiny random model: a
#     paper-size root needs real T5-XXL files (--checkpoint ROOT), which a fresh machine lacks.
#   - tokenize_throughput.py has no flags for its actor sizes: on cuda, bench_config() gives each VQGAN
#     pool 0.5 GPU, batch 128 / 64. Its --results flag would rewrite benchmarks/RESULTS.md: not used.
#   - train.py --device cuda runs one worker in-process (no Ray Train); the Ray path is CPU only.
#   - sampling.py --peer and --memory have no size flags: they are paper-size only, so the dry run
#     skips them (minutes per step on a CPU), and --paper too.

set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2

STEPS=(sampling-e2e sampling-paper-memory sampling-peer forward train train-3b tokenize serve)

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

DRY_RUN=${GPU_SUITE_DRY_RUN:-0}
[[ $DRY_RUN == 1 || $DRY_RUN == true || $DRY_RUN == yes ]] && DRY_RUN=1 || DRY_RUN=0
LIST=0
ONLY=${GPU_SUITE_ONLY:-}
PY=${GPU_SUITE_PYTHON:-}
WHEELS=${GPU_SUITE_WHEELS:-}
if [[ -n ${GPU_SUITE_RESULTS:-} ]]; then
    RESULTS=$GPU_SUITE_RESULTS
elif [[ -n ${OUT:-} ]]; then
    RESULTS=$OUT/gpu_suite.txt
else
    RESULTS=$REPO/benchmarks/gpu_suite_results.txt
fi
while (($#)); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --list) LIST=1 ;;
        --only) ONLY=${2:?--only needs step names}; shift ;;
        --results) RESULTS=${2:?--results needs a path}; shift ;;
        --python) PY=${2:?--python needs an interpreter}; shift ;;
        --wheels) WHEELS=${2:?--wheels needs a folder}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ $DRY_RUN == 1 ]]; then
    DEADLINE=${GPU_SUITE_DEADLINE:-900}
else
    DEADLINE=${GPU_SUITE_DEADLINE:-470}
fi
for name in ${ONLY//,/ }; do
    [[ " ${STEPS[*]} " == *" $name "* ]] || { echo "gpu_suite.sh: unknown step '$name'; steps: ${STEPS[*]}" >&2; exit 2; }
done

export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the repo's packages even without an editable install

START=$EPOCHREALTIME
N_PASS=0 N_FAIL=0 N_SKIP=0
SUMMARY=()

elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
rec() { printf '%s\n' "$@" >>"$RESULTS"; }
say() { printf '%s\n' "$*"; }
rule() { rec "" "==============================================================================" "$@" \
             "=============================================================================="; }

# ---------------------------------------------------------------------------------------------
# Python and packages

has_modules() {  # has_modules "ray diffusers": all importable with $PY?
    local code="" m
    for m in $1; do code+="import $m;"; done
    [[ -z $code ]] || "$PY" -c "$code" >/dev/null 2>&1
}

torch_sees_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }

registry_reachable() {  # can pip reach a package index from here? (fails fast when offline)
    timeout 30 python3 -m pip index versions --retries 0 --timeout 5 pip >/dev/null 2>&1
}

setup_python() {
    local log t0
    if [[ -z $PY && -x $REPO/.venv/bin/python ]]; then
        PY=$REPO/.venv/bin/python
    elif [[ -z $PY ]]; then
        log=$(mktemp)
        t0=$EPOCHREALTIME
        if registry_reachable; then
            say "setup: no .venv: running 'make install' (the README's install), then -e .[bench] ..."
            rec "setup: no .venv; running: make install && .venv/bin/python -m pip install -q -e '.[bench]'"
            if timeout 360 make install >"$log" 2>&1; then
                PY=$REPO/.venv/bin/python
                timeout 180 "$PY" -m pip install -q -e '.[bench]' >>"$log" 2>&1 ||
                    echo "pip install -e .[bench] failed: the aMUSEd peer step will be skipped" >>"$log"
            else
                echo "make install failed; removing the half-made .venv" >>"$log"
                rm -rf "$REPO/.venv"
            fi
        else
            echo "no .venv, and pip reaches no package index from here: make install cannot run" >>"$log"
        fi
        if [[ -z $PY && $DRY_RUN == 0 ]] && command -v python3 >/dev/null && torch_sees_cuda python3; then
            PY=$(command -v python3)
            echo "falling back to $PY, whose torch sees the GPU; PYTHONPATH holds the repo, and the steps" \
                 "needing packages it lacks are skipped (--wheels DIR brings them)" >>"$log"
        fi
        rec "setup ($(elapsed "$t0") s):" "$(cat "$log")"
        say "setup: $(tail -n 1 "$log" | cut -c1-160)"
        rm -f "$log"
        [[ -n $PY ]] || { rec "STOPPED: no Python with torch to run the benchmarks."; return 1; }
    fi
    if [[ -n $WHEELS ]]; then
        local site=${TMPDIR:-/tmp}/gpu_suite_site
        rec "setup: installing the wheels in $WHEELS into $site (no index, no dependencies)"
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$WHEELS"/*.whl >>"$RESULTS" 2>&1; then
            export PYTHONPATH="$site:$PYTHONPATH"
        else
            rec "setup: the wheels could not be installed; going on without them"
        fi
    fi
    if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
        rec "STOPPED: $PY cannot import torch (a half-made .venv? remove it, or set GPU_SUITE_PYTHON)."
        say "setup: $PY cannot import torch (a half-made .venv? remove it, or set GPU_SUITE_PYTHON)"
        return 1
    fi
}

# ---------------------------------------------------------------------------------------------
# Header

title() {
    rec "Muse on Ray: GPU benchmark suite ($([[ $DRY_RUN == 1 ]] && echo 'DRY RUN: CPU, tiny settings' || echo 'GPU'))"
    rec "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')   host: $(hostname)   cores: $(nproc)   kernel: $(uname -r)"
    rec "repo: $REPO   commit: $(git rev-parse HEAD 2>/dev/null || echo 'unknown (no .git)')$(
        [[ -n $(git status --porcelain 2>/dev/null | head -1) ]] && echo ' + uncommitted changes')"
    rec "deadline: ${DEADLINE} s from the start, setup included; steps: ${ONLY:-all}"
}

header() {
    rec "python: $PY   PYTHONPATH=$PYTHONPATH"
    rule "nvidia-smi"
    if command -v nvidia-smi >/dev/null; then
        timeout 30 nvidia-smi >>"$RESULTS" 2>&1
        timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm,clocks.max.mem \
            --format=csv >>"$RESULTS" 2>&1
    else
        rec "nvidia-smi: not found"
    fi
    rule "python, torch, CUDA, packages"
    timeout 120 "$PY" - >>"$RESULTS" 2>&1 <<'EOF'
import importlib.metadata as md, platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}; CUDA build {torch.version.cuda}; cuDNN "
      f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}; "
      f"cuda available {torch.cuda.is_available()}; torch threads {torch.get_num_threads()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{p.multi_processor_count} SMs")
for name in ("ray", "diffusers", "transformers", "safetensors", "numpy", "pyarrow", "triton", "fastapi", "httpx"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
EOF
}

# ---------------------------------------------------------------------------------------------
# One step: `step NAME LIMIT_S "MODULES" -- COMMAND...` or `skip NAME "why"`.

INDEX=0
selected() { [[ -z $ONLY || ",$ONLY," == *",$1,"* ]]; }

shquote() {  # the command as one shell line, quoting only the words that need it
    local out="" w
    for w in "$@"; do
        if [[ -n $w && $w =~ ^[A-Za-z0-9_./=,:+@%-]+$ ]]; then out+="$w "; else out+="'${w//\'/\'\\\'\'}' "; fi
    done
    printf '%s' "${out% }"
}

# One console line per step: its name when it starts, its outcome on the same line when it ends.
progress_start() { printf '[%d/%d] %-22s ' "$INDEX" "${#STEPS[@]}" "$1"; }

finish() {  # finish NAME STATUS WALL NOTE
    SUMMARY+=("$(printf '%-22s %-10s %8s s  %s' "$1" "$2" "$3" "$4")")
    printf '%-9s %6s s  %s\n' "$2" "$3" "$4"
}

skip() {
    local name=$1 why=$2
    INDEX=$((INDEX + 1))
    selected "$name" || return 0
    if [[ $LIST == 1 ]]; then printf '%-22s skipped: %s\n' "$name" "$why"; return 0; fi
    skip_recorded "$name" "$why"
}

step() {
    local name=$1 limit=$2 needs=$3 left status note="" rc t0 wall pidfile sid leftovers first_line
    shift 4  # name, limit, modules, --
    INDEX=$((INDEX + 1))
    selected "$name" || return 0
    local cmd
    cmd=$(shquote "$@")
    if [[ $LIST == 1 ]]; then printf '%-22s %4ss  %s\n' "$name" "$limit" "$cmd"; return 0; fi
    # Time left before the deadline, less 12 s for the kill grace and the clean-up below.
    left=$(awk -v s="$START" -v n="$EPOCHREALTIME" -v d="$DEADLINE" 'BEGIN { printf "%d", d - (n - s) - 12 }')
    if ((left < 15)); then
        skip_recorded "$name" "the suite's ${DEADLINE} s deadline is reached ($left s left)"
        return 0
    fi
    if ((left < limit)); then
        note="limit cut from $limit s to the $left s left before the deadline"
        limit=$left
    fi
    if [[ -n $needs ]] && ! has_modules "$needs"; then
        skip_recorded "$name" "$PY lacks a module among: $needs"
        return 0
    fi
    rule "step $INDEX/${#STEPS[@]}: $name   (timeout $limit s${note:+; $note})" \
         "command: cd $REPO && PYTHONPATH=$PYTHONPATH $cmd" "started: $(date -u '+%H:%M:%S UTC')" ""
    progress_start "$name"
    first_line=$(($(wc -l <"$RESULTS") + 1))
    pidfile=$(mktemp)
    t0=$EPOCHREALTIME
    # setsid: the step gets its own session, so whatever it leaves running (Ray's daemons and workers
    # start their own process groups) is found by session id below and ended.
    local launch=()
    command -v setsid >/dev/null && launch=(setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile")
    timeout --kill-after=10 "$limit" "${launch[@]}" "$@" </dev/null >>"$RESULTS" 2>&1
    rc=$?
    wall=$(elapsed "$t0")
    sid=$(cat "$pidfile" 2>/dev/null)
    rm -f "$pidfile"
    if [[ -n $sid ]] && command -v pgrep >/dev/null; then
        leftovers=$(pgrep -s "$sid" | wc -l)
        if ((leftovers > 0)); then
            pkill -TERM -s "$sid"; sleep 2; pkill -KILL -s "$sid"
            note="${note:+$note; }ended $leftovers leftover process(es)"
        fi
    fi
    if ((rc == 0)); then
        status=ok; N_PASS=$((N_PASS + 1))
    elif ((rc == 124)) || { ((rc == 137)) && awk -v w="$wall" -v l="$limit" 'BEGIN { exit !(w >= l) }'; }; then
        status="TIMED-OUT"; N_FAIL=$((N_FAIL + 1)); note="${note:+$note; }killed after $limit s"
    else  # the step's last error line, if any (137 before the limit: SIGKILL, e.g. out of host memory)
        status="FAILED"; N_FAIL=$((N_FAIL + 1))
        note="${note:+$note; }$(tail -n +"$first_line" "$RESULTS" | grep -E 'Error|error:|Exception|Killed' | tail -n 1 | cut -c1-100)"
    fi
    rec "" "--- $name: exit status $rc ($status), wall time $wall s${note:+ ($note)}"
    finish "$name" "$status" "$wall" "rc=$rc${note:+; $note}"
}

skip_recorded() {  # a step that was selected but does not run (INDEX already counted)
    progress_start "$1"
    rule "step $INDEX/${#STEPS[@]}: $1" "SKIPPED: $2"
    N_SKIP=$((N_SKIP + 1))
    finish "$1" skipped - "$2"
}

# ---------------------------------------------------------------------------------------------
# The steps. GPU and dry run list the same steps in the same order.

gpu_steps() {
    local s=benchmarks/sampling.py
    step sampling-e2e 120 "" -- "$PY" $s --model muse-632m --device cuda --dtype bf16 --batches 1,8 \
        --steps 24 --superres-steps 8 --repeats 3 --compile both
    step sampling-paper-memory 30 "" -- "$PY" $s --batches '' --paper --paper-repeats 10 --memory \
        --device cuda --dtype bf16
    step sampling-peer 60 "diffusers" -- "$PY" $s --batches '' --peer --peer-repeats small=5,equal=5 \
        --imported --imported-batches 1,8 --imported-repeats 5 --device cuda --dtype bf16
    step forward 30 "" -- "$PY" benchmarks/model_forward.py --presets base-632m,superres-268m --batch 8 \
        --repeats 10 --device cuda --dtype bf16
    # Separate invocations, so that base-3b running out of memory or time leaves base-632m's result.
    step train 35 "" -- "$PY" benchmarks/train.py --device cuda --presets base-632m --batch-size 64 --steps 20
    step train-3b 60 "" -- "$PY" benchmarks/train.py --device cuda --presets base-3b --batch-size 32 --steps 20
    step tokenize 45 "ray" -- "$PY" benchmarks/tokenize_throughput.py --device cuda --preset muse-632m \
        --n 512 --size 256
    # No GPU-fraction flag: serve_load.py gives each deployment 0.1 GPU when --device is cuda.
    step serve 85 "ray fastapi httpx" -- "$PY" benchmarks/serve_load.py --device cuda --size 128x128 \
        --concurrency 1 4 16 --duration 4 --rounds 2 --warmup 0.5 --num-cpus 16
}

dry_steps() {
    local s=benchmarks/sampling.py
    step sampling-e2e 240 "" -- "$PY" $s --model tiny --device cpu --dtype fp32 --batches 1 \
        --steps 2 --superres-steps 1 --repeats 1 --compile both
    skip sampling-paper-memory "needs a GPU: --paper and --memory are paper-size only (base-632m, super-res-268m at 512 px)"
    skip sampling-peer "needs a GPU: --peer is paper-size only (aMUSEd-256's 604M U-ViT against base-632m)"
    step forward 60 "" -- "$PY" benchmarks/model_forward.py --presets base-tiny,superres-tiny --batch 2 \
        --repeats 2 --device cpu --dtype fp32
    # train.py's CPU path is the Ray Train one (the cuda path is in-process): tiny, 1 worker, 4 steps.
    step train 180 "ray" -- "$PY" benchmarks/train.py --device cpu --presets base-tiny --workers 1 \
        --batch-size 4 --steps 4
    skip train-3b "needs a GPU: base-3b only (the dry run's train step above covers the script)"
    step tokenize 180 "ray" -- "$PY" benchmarks/tokenize_throughput.py --device cpu --preset tiny --n 16 --size 64
    step serve 180 "ray fastapi httpx" -- "$PY" benchmarks/serve_load.py --device cpu --size 128x128 \
        --concurrency 1 4 16 --duration 1 --rounds 1 --warmup 0.5 --steps 2 --superres-steps 1 --num-cpus 4
}

run_steps() { if [[ $DRY_RUN == 1 ]]; then dry_steps; else gpu_steps; fi; }

# ---------------------------------------------------------------------------------------------

if [[ $LIST == 1 ]]; then
    PY=${PY:-.venv/bin/python}
    run_steps
    exit 0
fi

mkdir -p "$(dirname "$RESULTS")" && : >"$RESULTS" || { echo "gpu_suite.sh: cannot write $RESULTS" >&2; exit 2; }
say "gpu_suite: $([[ $DRY_RUN == 1 ]] && echo 'dry run (CPU, tiny settings)' || echo 'GPU run'); results in $RESULTS"

title
setup_python || exit 2
header
if [[ $DRY_RUN == 0 ]] && ! torch_sees_cuda "$PY"; then
    msg="STOPPED: torch in $PY does not see a GPU ($("$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}")' 2>&1 | tail -n 1)). Nothing was benchmarked: this suite never measures the CPU by accident."
    hint="Install a CUDA build of torch into that Python, or point GPU_SUITE_PYTHON at one whose torch sees the GPU; --dry-run runs the CPU check."
    if [[ $PY != "$(command -v python3)" ]] && command -v python3 >/dev/null && torch_sees_cuda python3; then
        hint+=" This machine's python3 ($(command -v python3)) has one: GPU_SUITE_PYTHON=python3."
    fi
    rule "$msg" "$hint"
    say "$msg"
    say "$hint"
    exit 2
fi

run_steps

rule "summary: $N_PASS passed, $N_FAIL failed or timed out, $N_SKIP skipped; total wall time $(elapsed "$START") s"
rec "$(printf '%-22s %-10s %8s    %s' step status wall note)" "${SUMMARY[@]}"
say "gpu_suite: $N_PASS passed, $N_FAIL failed or timed out, $N_SKIP skipped in $(elapsed "$START") s; results in $RESULTS"
((N_FAIL == 0))
