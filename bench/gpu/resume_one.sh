#!/usr/bin/env bash
# Continue one training run on the GPU machine for a fixed time; pack the run into $OUT/run.tar.
# Usage: OUT=dir RUN=.data/flatten MINUTES=3 bash bench/gpu/resume_one.sh [extra ntm-train args]
set -u
export PYTHONUNBUFFERED=1
python3 -m models.train --data .data/images_background.zip --out "$RUN" --resume --device auto \
  --stop-after-minutes "${MINUTES:-3}" --val-every 400 --val-episodes 500 --no-progress "$@" >"$OUT/train.log" 2>&1
tail -5 "$OUT/train.log"
tar -cf "$OUT/run.tar" -C "$(dirname "$RUN")" "$(basename "$RUN")" && echo packed
