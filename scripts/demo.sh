#!/usr/bin/env bash
# The main job on the embedded digits data: train a VQ tokenizer, train a next-token
# model on its ids, sample an image grid and print the FID. About 3 minutes on 2 cores after setup.
# Re-running continues finished or interrupted runs (train.resume=true) instead of
# starting over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
start=$(date +%s)
$PY train.py --config configs/digits_vq.yaml train.resume=true
$PY train.py --config configs/digits_ar.yaml train.resume=true
$PY sample.py --ckpt runs/digits_ar num_samples=1000 batch_size=250 fid=true sampler.cfg_scale=1.5 \
    sampler.top_k=0 out=runs/digits_ar/samples
echo "image grid: runs/digits_ar/samples/samples.png   (one class per column)"
echo "main job took $(( $(date +%s) - start )) s after setup"
