#!/usr/bin/env bash
# Train several configurations side by side on one GPU machine within a fixed time budget,
# each with the whole training step as a CUDA graph when a smoke test shows capture works,
# and pack each run directory into $OUT/<name>.tar.
# Usage: OUT=dir MINUTES=7 bash bench/gpu/sweep.sh "name ntm-train args..." ["name args..." ...]
# Training libraries missing on the machine are installed from the wheelhouse .data/wheels, made
# here beforehand (the GPU machine has no internet) with:
#   pip download --python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 \
#     --platform manylinux2014_x86_64 tqdm safetensors matplotlib pillow -d .data/wheels
# and carried there with the Omniglot zip (run's carry: [".data"]).
set -u
out=${OUT:?set OUT}
minutes=${MINUTES:-7}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the repository root, for bench/gpu/graph_smoke.py
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for module in tqdm safetensors matplotlib PIL; do
  python3 -c "import $module" 2>/dev/null || missing="${missing:-} $module"
done
if [ -n "${missing:-}" ]; then
  echo "installing:$missing"
  pip install -q --no-index --find-links .data/wheels --target /tmp/pylib tqdm safetensors matplotlib pillow
  export PYTHONPATH="$PYTHONPATH:/tmp/pylib"
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
graph=--cuda-graph
timeout 120 python3 bench/gpu/graph_smoke.py >"$out/smoke.log" 2>&1 || graph=""
cat "$out/smoke.log"
echo "cuda graph flag: '${graph}'"
names=()
for spec in "$@"; do
  read -r name args <<<"$spec"
  names+=("$name")
  # shellcheck disable=SC2086
  python3 -m models.train --data .data/images_background.zip --out "runs/$name" --device auto $graph \
    --max-minutes "$minutes" --iterations 10000000 --checkpoint-minutes 2 --no-progress $args \
    >"$out/$name.log" 2>&1 &
done
wait
for name in "${names[@]}"; do
  tar -cf "$out/$name.tar" -C runs "$name" && echo "packed $name"
  tail -4 "$out/$name.log"
done
