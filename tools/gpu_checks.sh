#!/usr/bin/env bash
# The GPU checks of the training-efficiency work, as one script for a lent GPU machine
# (about 8 minutes on an H100; every result under ${OUT:-results/gpu}). Run from the
# repository root with the test environment built (`make .venv/.installed-test`):
#
#   bash tools/gpu_checks.sh
#
# 1. The Pallas grouped-matmul tests, compiled through Triton instead of interpreted
#    (tests/nn/test_grouped_matmul.py; the shapes there are CPU-sized: a failure on a block
#    under 16 rows or columns is Triton's minimum for a dot, not a wrong number).
# 2. The train step of the default config per variant, with packing: the capacity path
#    ('sorted'), dropless with ragged_dot ('ragged') and with the kernel ('pallas'), dense.
# 3. The MoE layer at D=2048, T=32768, E=64 against dense, the kernel beside ragged_dot.
set -u
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
timeout 180 $PY -m pytest -q -p no:cacheprovider tests/nn/test_grouped_matmul.py \
  > "$OUT/grouped_matmul_tests.txt" 2>&1
echo "grouped-matmul tests: exit $?" | tee -a "$OUT/gpu.txt"
timeout 240 $PY -m tools.benchmark_train --config=experiments/configs/multitask.py \
  --variants=sorted,ragged,pallas,dense --steps=10 --repeats=3 --warmup=2 \
  --out="$OUT/train_step_gpu_pack.jsonl" > "$OUT/train_step_gpu_pack.log" 2>&1
echo "train-step benchmark: exit $?" | tee -a "$OUT/gpu.txt"
timeout 180 $PY -m tools.benchmark_moe --tokens=32768 --experts=64 --d_model=2048 \
  --dense_hidden=8192 --ragged_max_groups=64 --einsum_groups=1024 --modern=false \
  --breakdown=false --forward_only=false --repeats=3 \
  --output="$OUT/benchmark_moe_gpu_kernel.json" > "$OUT/benchmark_moe_gpu_kernel.log" 2>&1
echo "MoE layer benchmark: exit $?" | tee -a "$OUT/gpu.txt"
