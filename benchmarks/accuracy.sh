#!/usr/bin/env bash
# Accuracy vs KV budget on the shipped tiny model (issue: "budgets and methods fixed before running").
# Fixed before the first run: 500 held-out images (seeds 0-499), methods full, sparsemm, snapkv, pyramidkv,
# adakv and random (seeds 0, 1, 2; averaged), budgets B = 12, 16, 24, 32, 48, 64 tokens per KV head with the
# profile's window (8) included. The prompt is 229 tokens, 128 of them image tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
sparsemm eval --model tiny --methods full,sparsemm,snapkv,pyramidkv,adakv,random \
    --budgets 12,16,24,32,48,64 --seeds 0,1,2 --num 500 \
    --out benchmarks/results/accuracy_tiny.json --plot benchmarks/results/accuracy_tiny.png "$@"
