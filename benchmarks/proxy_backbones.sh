#!/usr/bin/env bash
# The backbone lever of the proxy suite (issue 26, BENCHMARKS.md "The proxy suite"): pre-train candidate
# embedded backbones on FractalDB-1k-style data (1,000 IFS classes) and run the proxy suite with each, beside
# the two shipped pico backbones (pretrained: 100 classes; pretrained:fractal1k: the proxy's own, which
# pico1k below re-makes), all in one go.  Sized for one GPU with 16 cores: each pre-training about 4 minutes
# (78 s rendering, 4.3 s an epoch on an H200), one after another — three at once on one GPU ran at 16 s an
# epoch each, slower than in turn.  The benches need the sweep extra (optuna) and pick the GPU themselves.
#
#   benchmarks/proxy_backbones.sh OUT [SECONDS]      # SECONDS: the whole run's deadline (default 3600)
#
# Every phase stops at the deadline and what finished stays in OUT: the weights, each pre-training's log and
# each bench's folder, which `rlrr bench ... --output OUT/bench_NAME` continues (finished cells are reused)
# and `--agreement-only` scores.  A dry run: CLASSES=20 PER_CLASS=10 EPOCHS=1 BATCH=16 SEEDS=0 METHODS=linear
# BENCH_EXTRA=--smoke.
set -u
OUT=${1:?usage: benchmarks/proxy_backbones.sh OUT [SECONDS]}
END=$((SECONDS + ${2:-3600}))
RLRR="${RLRR:-python3 -m rlrr.cli}"
METHODS=${METHODS:-linear,full,bitfit,ssf,lora,adapter,vpt,rlrr,hta}
PRE="--classes ${CLASSES:-1000} --per-class ${PER_CLASS:-150} --epochs ${EPOCHS:-30} --batch-size ${BATCH:-1024} --warmup-epochs 3"
mkdir -p "$OUT"
left() { echo $((END - SECONDS - ${1:-0})); }

pretrain() {  # NAME MODEL [FLAGS]: OUT/NAME/MODEL.fractal.safetensors
    local name=$1 model=$2; shift 2
    [ "$(left 600)" -gt 0 ] || { echo "pretrain $name: too little time"; return; }
    timeout "$(left 600)" $RLRR pretrain --model "$model" $PRE "$@" --workers 16 --output "$OUT/$name" \
        > "$OUT/$name.pretrain.log" 2>&1
    echo "pretrain $name: exit $? at ${SECONDS}s"
}
pretrain pico1k vit_pico_patch4_32
pretrain nano1k vit_nano_patch4_32
pretrain pico1k_upright vit_pico_patch4_32 --upright

bench() {  # NAME MODEL WEIGHTS SEEDS
    local name=$1 model=$2 weights=$3 seeds=$4
    case $weights in pretrained*) ;; *) [ -f "$weights" ] || { echo "bench $name: no weights"; return; } ;; esac
    [ "$(left 30)" -gt 0 ] || { echo "bench $name seeds $seeds: past the deadline"; return; }
    timeout "$(left 30)" $RLRR bench --suite proxy --methods $METHODS --seeds "$seeds" --workers 4 \
        --model "$model" --weights "$weights" --output "$OUT/bench_$name" ${BENCH_EXTRA:-} >> "$OUT/bench_$name.log" 2>&1
    echo "bench $name seeds $seeds: exit $? at ${SECONDS}s"
}
seeds=${SEEDS:-0,1,2}  # one pass: the proxy tunes on its first two seeds, so a seed-0 pass first would tune apart
bench shipped vit_pico_patch4_32 pretrained "$seeds" &
bench fractal1k vit_pico_patch4_32 pretrained:fractal1k "$seeds" &
bench pico1k vit_pico_patch4_32 "$OUT/pico1k/vit_pico_patch4_32.fractal.safetensors" "$seeds" &
bench nano1k vit_nano_patch4_32 "$OUT/nano1k/vit_nano_patch4_32.fractal.safetensors" "$seeds" &
bench pico1k_upright vit_pico_patch4_32 "$OUT/pico1k_upright/vit_pico_patch4_32.fractal.safetensors" "$seeds" &
wait
