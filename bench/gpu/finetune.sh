#!/usr/bin/env bash
# Fine-tune a shipped checkpoint on the GPU machine for a fixed time (cosine schedule over that
# time), then pack the run directory into $OUT/run.tar.
# Usage: OUT=dir INIT=models/pretrained RUN=runs/gpu-ft MINUTES=7 bash bench/gpu/finetune.sh [ntm-train args]
set -u
out=${OUT:?set OUT}
run=${RUN:-runs/gpu-ft}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 -m models.train --data .data/images_background.zip --out "$run" --init-from "${INIT:-models/pretrained}" \
  --device auto --max-minutes "${MINUTES:-7}" --iterations 1000000 --checkpoint-minutes 2 --no-progress "$@" \
  >"$out/train.log" 2>&1
echo "exit $?"
tail -12 "$out/train.log"
tar -cf "$out/run.tar" -C "$(dirname "$run")" "$(basename "$run")" && echo packed
