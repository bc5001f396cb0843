#!/usr/bin/env bash
# One GPU session's validation (docs/design.md §5, issue 8): build against the machine's
# torch, run the whole test suite with the CUDA tests, compute-sanitizer over the
# op kernels, then the benchmarks. Logs go to $OUT (default ./gpu_out).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
$PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
$PY -m rlhf_ext info | tee -a "$OUT/device.txt"
status=0
# Does a C++ exception from a custom op reach Python on this machine? (seen segfaulting here)
$PY -c "import torch, rlhf_ext; torch.ops.rlhf_ext.gae(torch.randn(2,3), torch.randn(2,4), None, None, None, None, None, 1., 1.)" > "$OUT/exception_probe.log" 2>&1
echo "C++ exception probe: rc=$? $(tail -1 "$OUT/exception_probe.log")"
timeout ${PYTEST_S:-400} $PY -m pytest python_tests -q -p no:cacheprovider --durations=10 ${PYTEST_ARGS:-} > "$OUT/pytest.log" 2>&1 || status=1
tail -5 "$OUT/pytest.log"
for tool in ${SANITIZER_TOOLS:-memcheck racecheck synccheck initcheck}; do
  timeout 120 compute-sanitizer --tool $tool --error-exitcode 9 $PY tools/sanitize_ops.py > "$OUT/sanitizer_$tool.log" 2>&1
  echo "compute-sanitizer $tool: rc=$? $(tail -1 "$OUT/sanitizer_$tool.log")"
done
timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 $PY tools/sanitize_ops.py --backend triton > "$OUT/sanitizer_memcheck_triton.log" 2>&1
echo "compute-sanitizer memcheck (Triton kernels): rc=$? $(tail -1 "$OUT/sanitizer_memcheck_triton.log")"
for op in ${BENCH_OPS:-gae logprobs logit_transforms losses linear_logprobs group_advantages grpo}; do
  $PY -m bench $op --device cuda --csv "$OUT/bench.csv" ${BENCH_ARGS:-} > "$OUT/bench_$op.log" 2>&1 || status=1
  tail -25 "$OUT/bench_$op.log"
done
timeout ${SANITIZER_PYTEST_S:-240} compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest python_tests -q -p no:cacheprovider -m cuda -x ${PYTEST_ARGS:-} > "$OUT/sanitizer_pytest.log" 2>&1
echo "compute-sanitizer memcheck over pytest -m cuda: rc=$? $(tail -1 "$OUT/sanitizer_pytest.log")"
exit $status
