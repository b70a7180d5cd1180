#!/usr/bin/env bash
# The GPU measurements of issue #14, in under 5 minutes on one GPU (BERT-base + CLIP ViT-B/32 sizes, random weights):
#   1. training: one optimizer step at batch 16 with 4 images per tweet, bf16 autocast and float32: seconds per step
#      and peak memory, BGA-MNER and BERT-CRF;
#   2. inference: batch-1 latency and batch-32 throughput, float32 and bfloat16, BGA-MNER against BERT-CRF, with FLOPs;
#   3. gradient checkpointing under bf16 autocast: peak memory and step time with and without it;
#   4. the data pipeline's tweets/s at 0, 4 and 8 loader workers, beside the training step's rate.
# Run from the repository root:  bash bench/gpu.sh   (results in bench/results/speed_gpu*.json and the printout)
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python bench/speed.py --device cuda --cases bga_train bert_crf_train --train_dtype bfloat16 --train_steps 2 \
  --json bench/results/speed_gpu_train_bf16.json
python bench/speed.py --device cuda --cases bga_train --train_dtype float32 --train_steps 2 \
  --json bench/results/speed_gpu_train_fp32.json
python bench/speed.py --device cuda --cases bga_infer bert_crf_infer --precisions float32 bfloat16 \
  --sentences 90 --repeats 3 --batches 5 --json bench/results/speed_gpu.json
python bench/checkpointing.py --device cuda --bf16 --steps 2
python bench/loading.py --workers 0 4 8 --batches 20 --json bench/results/loading_gpu.json
