#!/usr/bin/env bash
# The open speed questions, one process after another (the GPU is theirs alone), most wanted first:
#   1. the floor under any adapter: iLoRA's training step against the same step with the adapters off;
#   2. full ranking with the fused log-probabilities, and with the adapters off (what the LoRA branch costs);
#   3. inductor's max-autotune (Triton GEMM templates, with prologue/epilogue fusion of dropout and LoRA adds);
#   4. CUDA graphs over the compiled layers.
# Each writes its JSON and log to $1 (default outputs/results/speed-probes) as soon as it finishes:
#   setsid nohup bash benchmarks/speed_probes.sh /tmp/probes > /tmp/probes.log 2>&1 &
# Rehearsal on a CPU: LLM=tiny-random-llama BATCH=4 EXTRA="--steps=2 --warmup=1 --fullrank_users=4
#   --synthetic_measure_users=2 --fullrank_batch_users=2" bash benchmarks/speed_probes.sh /tmp/probes
set -u
out=${1:-outputs/results/speed-probes}
mkdir -p "$out"
bench=benchmarks/throughput.py
llm="--llm_path=${LLM:-smollm2-135m}"
read -r -a extra <<< "${EXTRA:-}"
train="$llm --compile=only --sections=train --batch_size=${BATCH:-128}"
probe() {  # name, arguments
    local name=$1; shift
    python "$bench" "$@" "${extra[@]}" --out="$out/$name.json" > "$out/$name.log" 2>&1 ||
        echo "$name failed (see $out/$name.log)"
}
probe train-floor $train --variants=iLoRA,frozen
probe fullrank $llm --compile=only --sections=fullrank --fullrank_users=256 --synthetic_measure_users=128 \
    --fullrank_floor
probe train-autotune $train --variants=iLoRA --torch_config='{"inductor.max_autotune": true}'
probe train-cudagraphs $train --variants=iLoRA --compile_options='{"mode": "reduce-overhead"}'
echo finished > "$out/done"
