#!/usr/bin/env bash
# Train the three models of the quality table side by side on one GPU machine, within a
# fixed time budget, and pack each run directory into one tar file under $OUT.
# Usage: OUT=/some/dir MINUTES=7 bash bench/gpu/train_all.sh [DATA_ZIP]
set -u
data=${1:-.data/images_background.zip}
minutes=${MINUTES:-7}
out=${OUT:?set OUT}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
common=(--data "$data" --device auto --max-minutes "$minutes" --iterations 1000000 --val-every 400 --val-episodes 500 --checkpoint-minutes 2 --no-progress)
python3 -m models.train "${common[@]}" --out runs/conv --encoder conv --batch-size 256 --lr 2e-3 >"$out/conv.log" 2>&1 &
python3 -m models.train "${common[@]}" --out runs/flatten --encoder flatten --batch-size 256 --lr 2e-3 >"$out/flatten.log" 2>&1 &
python3 -m models.train "${common[@]}" --out runs/lstm --encoder conv --no-memory --batch-size 256 --lr 2e-3 >"$out/lstm.log" 2>&1 &
wait
for run in conv flatten lstm; do
  tar -cf "$out/$run.tar" -C runs "$run" && echo "packed $run"
  tail -3 "$out/$run.log"
done
