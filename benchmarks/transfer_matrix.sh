#!/usr/bin/env bash
# Issue 12: the transfer matrix of README "Tickets across tasks" -- three easy tasks + the pre-training ticket,
# at 50/70/80%, from the VL-pretrained θ0 of the main job.
#   benchmarks/transfer_matrix.sh THETA0_DIR OUT [STEPS]
# THETA0_DIR: a `vlsparse pretrain` directory (the main job's OUT/pretrained); OUT: where the runs go.
# Every step resumes: re-running the script skips finished levels and cells.
set -euo pipefail
theta0=${1:?THETA0_DIR}; out=${2:?OUT}; steps=${3:-200}
warmup=$((steps / 5))
train=(--steps "$steps" --batch-size 32 --warmup "$warmup")
for t in easy-vqa easy-nlvr2 easy-retrieval; do          # one IMP run per task, from θ0
  vlsparse find-ticket --model "$theta0" --task "$t" --sparsity 0.8 --levels 0.5,0.7,0.8 "${train[@]}" \
      --out "$out/imp-$t"
done
# IMP on the pre-training objectives from θ0 (rounds of 150 steps, the main job's 10% of pre-training)
vlsparse find-ticket --model "$theta0" --task pretrain --corpus easy-vqa-captions --objectives mlm,mrfr,itm,wra \
    --proportions 2,1,2,1 --sparsity 0.8 --levels 0.5,0.7,0.8 --steps 150 --batch-size 32 --warmup 100 \
    --out "$out/imp-pretrain"
for t in easy-vqa easy-nlvr2 easy-retrieval; do          # one transfer process per target (they may run in parallel)
  vlsparse transfer --source "$out/imp-easy-vqa" --source "$out/imp-easy-nlvr2" --source "$out/imp-easy-retrieval" \
      --source "$out/imp-pretrain" --target "$t" --levels 0.5,0.7,0.8 "${train[@]}" --out "$out/transfer-$t"
done
