#!/usr/bin/env bash
# Everything a lent GPU session should run, in one call, within about 5 minutes: build sparsenet for
# this device's architecture only, run the GPU tests, compute-sanitizer (memcheck) on a short
# subset, then the benchmark table. Logs go under $OUT (the device tool brings them back).
#
#   bash benchmarks/gpu/check.sh            # from the repository root, on the device machine
set -uo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
out="${OUT:-/tmp/sparsenet-gpu}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')"
arch="${cap}-real"
[ "$cap" = "90" ] && arch="90a-real"  # Hopper: the architecture-specific target (wgmma)

echo "== build (${arch})"
start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -q \
    -Ccmake.define.SPARSENET_CUDA=ON -Ccmake.define.SPARSENET_CUDA_ARCHITECTURES="${arch}" \
    "$repo" > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  exit 1
fi
echo "built in $(( $(date +%s) - start )) s"

cd /tmp  # the installed package, never the source tree
echo "== pytest -m gpu"
python3 -m pytest -q -m gpu -p no:cacheprovider "$repo/tests" > "$out/pytest.log" 2>&1
echo "pytest rc=$?"
tail -25 "$out/pytest.log"

echo "== compute-sanitizer memcheck (short subset)"
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 3 \
  python3 -m pytest -q -x -p no:cacheprovider "$repo/tests/ops/test_cuda_backend.py" -k "fp16 or streams" \
  > "$out/sanitizer.log" 2>&1
echo "compute-sanitizer rc=$? (3: errors found; other non-zero: see sanitizer.log)"
grep -E "ERROR SUMMARY|passed|failed|not supported" "$out/sanitizer.log" | tail -5

echo "== benchmark"
timeout 180 python3 "$repo/benchmarks/gpu/bench_cuda.py" 2>&1 | tee "$out/bench.md"
