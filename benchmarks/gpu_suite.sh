#!/usr/bin/env bash
# The GPU suite: on a machine with a CUDA GPU and no network, build fastattr._C in place
# against the torch that is there, run the CUDA tests, run `fastattr bench --device cuda` and
# the studies, and leave logs, JSON and the plots in one directory.
#
#   benchmarks/gpu_suite.sh [OUT_DIR]        (default OUT_DIR: benchmarks/out)
#
# Needs: python3 with a CUDA build of torch, numpy, pytest; nvcc; ninja (optional, faster).
# PYTHON=... picks another interpreter. Exit status: 0 when every step passed, 2 when there is
# no GPU, 1 when a step failed (the others still ran; see OUT_DIR/summary.txt).
#
# Captum and the test tools come as wheels in .whl/ at the repository root (the machine has no
# network); the suite installs them into /tmp/site and puts that on PYTHONPATH. Fetch them on a
# machine that has network, for the GPU machine's Python (3.12 here), and copy .whl/ over:
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux_2_28_x86_64 -d .whl \
#       captum==0.9.0 matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0 \
#       kiwisolver==1.5.1 pillow==13.0.0 pyparsing==3.3.3 python-dateutil==4.0.0 six \
#       packaging==26.3 tqdm==4.70.1 hypothesis==6.170.15 sortedcontainers==2.4.0 \
#       zennit==0.5.1 click torchvision==0.26.0
#
# captum.attr imports matplotlib and tqdm, hence their wheels; the LRP tests compare with zennit,
# which imports torchvision: take the torchvision release that matches the machine's torch
# (0.26 for torch 2.11) and leave it out if the machine has one. numpy and torch are never
# downloaded: the machine's own are used. Without .whl/ the suite still runs: test modules that
# cannot import captum, hypothesis or zennit are reported as collection errors (the tests step
# then fails, the others run), and the benchmark has no Captum column.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/benchmarks/out}" && cd "${1:-$ROOT/benchmarks/out}" && pwd)"
PYTHON="${PYTHON:-python3}"
SITE="${FASTATTR_WHEEL_SITE:-/tmp/site}"
cd "$ROOT" || exit 1

exec > >(tee "$OUT/suite.log") 2>&1
echo "gpu_suite: $(date -u +%FT%TZ) in $ROOT, results in $OUT"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: no CUDA GPU is visible to torch ($PYTHON); this suite needs one." >&2
    echo "no GPU" > "$OUT/summary.txt"
    exit 2
fi
"$PYTHON" - > "$OUT/environment.txt" <<'EOF'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda)
for i in range(torch.cuda.device_count()):
    print("gpu", i, torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
EOF
nvidia-smi >> "$OUT/environment.txt" 2>&1 || true
cat "$OUT/environment.txt"

shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
    echo "gpu_suite: installing ${#wheels[@]} wheels from .whl/ into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "${wheels[@]}" || exit 1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu_suite: no .whl/ wheels; captum and hypothesis only if already installed"
fi

for module in captum hypothesis zennit; do
    if "$PYTHON" -c "import $module" > /dev/null 2>&1; then
        echo "gpu_suite: $module: available"
    else
        echo "gpu_suite: $module: NOT importable; tests that need it cannot run"
    fi
done

# Compile for exactly the visible GPUs unless the caller chose.
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c "import torch
caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
print(';'.join(f'{a}.{b}' for a, b in sorted(caps)))")"
    export TORCH_CUDA_ARCH_LIST
fi
echo "gpu_suite: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"

failed=()
step() {
    local name="$1"
    shift
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    local status="${PIPESTATUS[0]}"
    echo "$name: exit $status" >> "$OUT/summary.txt"
    if ((status != 0)); then
        failed+=("$name")
    fi
    return "$status"
}

: > "$OUT/summary.txt"
if ! step build env FASTATTR_CUDA=1 "$PYTHON" setup.py build_ext --inplace; then
    echo "gpu_suite: the build failed; see $OUT/build.log" >&2
    exit 1
fi
step info "$PYTHON" -m fastattr info
"$PYTHON" -c "import fastattr, sys; sys.exit(0 if fastattr.build_info()['cuda'] else 1)" || {
    echo "gpu_suite: fastattr._C was built without its CUDA kernels" >&2
    exit 1
}

# `-m cuda` are the CUDA-only tests; `-k cuda` adds the tests parametrized over devices whose
# id names cuda (pytest's -k also matches marker names, so one run covers both). A module that
# cannot be imported here (a missing wheel) must not hide the others' results.
step tests-cuda "$PYTHON" -m pytest -q -p no:cacheprovider -k cuda \
    --continue-on-collection-errors --junitxml="$OUT/tests-cuda.xml" tests

step bench "$PYTHON" -m fastattr bench --device cuda --no-progress --out "$OUT"

# The studies of benchmarks/RESULTS.md, each in a directory of its own: layer and neuron IG on
# a deeper MLP and a masked text model; LRP against Captum and zennit at large batches; IG's
# peak memory where Captum (and the floor) run out of GPU memory.
step study-layer-neuron "$PYTHON" -m fastattr bench --device cuda --no-progress \
    --cases benchmarks/cases/layer_neuron_ig.py --batch-sizes 32,64,512 --out "$OUT/layer_neuron_ig"
step study-lrp-large "$PYTHON" -m fastattr bench --device cuda --no-progress \
    --methods lrp --models mlp,cnn --batch-sizes 64,256,1024,16384 --out "$OUT/lrp_large"
step study-ig-memory "$PYTHON" -m fastattr bench --device cuda --no-progress \
    --methods ig --models cnn --batch-sizes 2048,8192,16384 --repeats 3 --out "$OUT/ig_memory"

if ((${#failed[@]})); then
    echo "gpu_suite: failed steps: ${failed[*]} (results in $OUT)"
    exit 1
fi
echo "gpu_suite: all steps passed (results in $OUT)"
