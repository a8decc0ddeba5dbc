#!/usr/bin/env bash
# The GPU checks in one run, for a lent GPU machine that has PyTorch but none of svdserve's other packages and
# no network: the CUDA correctness tests, then every serving benchmark on the GPU. Each step has its own time
# limit, so one that hangs does not cost the others; logs go to $OUT (or ./gpu-out).
#
# Brought along from the developer's machine (ignored by git, passed with the run; `bash scripts/gpu_bundle.sh` builds them):
#   .whl/       wheels of the Python packages the machine lacks (fastapi, pydantic, redis, transformers, peft ...)
#   .devtools/redis/  a redis-server binary and its shared libraries (adapter_load talks to a real Redis)
#   .devtools/smol/   the default model's config and tokenizer files. Its weights (~540 MB) cannot travel, so the
#                     base is the same architecture with seeded random weights: identical shapes and FLOPs, so
#                     identical throughput; only the generated text is meaningless.
#
#   bash bench/gpu_check.sh [quick | final]   (quick: tests and the mixed batch; final: a short run, ~3 min)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SVDSERVE_HOME=/tmp/svdserve-home TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

if [ -x .devtools/redis/redis-server ]; then
  LD_LIBRARY_PATH=.devtools/redis .devtools/redis/redis-server --port 6379 --bind 127.0.0.1 --daemonize yes --save "" --appendonly no
fi

# The default model's architecture with seeded random weights (see above).
BASE=/tmp/smol-random
python3 - <<'EOF'
import shutil, torch
from pathlib import Path
from transformers import AutoConfig, LlamaForCausalLM
src, dst = Path(".devtools/smol"), Path("/tmp/smol-random")
if not (dst / "model.safetensors").exists():
    torch.manual_seed(0)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(src))
    model.save_pretrained(dst)
    for f in src.iterdir():
        if f.name != "config.json":
            shutil.copy(f, dst / f.name)
print("base:", dst, sum(p.numel() for p in LlamaForCausalLM.from_pretrained(dst).parameters()) / 1e6, "M params")
EOF

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, keep going on failure
  local name=$1 secs=$2; shift 2
  echo "=== $name"
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$?" >> "$OUT/$name.log"
  grep -E "^\||passed|failed|error|Error|rc=" "$OUT/$name.log" | grep -v "^| *aten" | tail -25
}
if [ "${1:-}" = final ]; then  # a short run: kernels and graphs checked, the mixed batch and the profile
  step tests 80 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py tests/test_cuda.py -k "not eager"
  step mixed_fp32 60 python3 bench/mixed_batch.py --base $BASE --prefill-reps 5 --decode-reps 8 --no-peft
  step mixed_fp32_fused 60 env SVDSERVE_GPU_FUSED_DECODE=1 python3 bench/mixed_batch.py --base $BASE --prefill-reps 3 --decode-reps 8 --no-peft
  step profile_fp32 40 python3 bench/decode_profile.py --base $BASE
  step mixed_bf16 50 python3 bench/mixed_batch.py --base $BASE --dtype bfloat16 --prefill-reps 5 --decode-reps 8 --no-peft
  exit 0
fi
step tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_gpu_kernels.py tests/test_decode_graphs.py
step mixed_fp32 150 python3 bench/mixed_batch.py --base $BASE --prefill-reps 5 --decode-reps 8
# the decode step's GEMM and core delta as one kernel (gpu_kernels.linear_core, opt-in until this shows it faster)
step mixed_fp32_fused 90 env SVDSERVE_GPU_FUSED_DECODE=1 python3 bench/mixed_batch.py --base $BASE --prefill-reps 3 --decode-reps 8 --no-peft
[ "${1:-}" = quick ] && exit 0
step serve_load 120 python3 bench/serve_load.py --base $BASE --requests 64
step mixed_bf16 90 python3 bench/mixed_batch.py --base $BASE --dtype bfloat16 --prefill-reps 5 --decode-reps 8 --no-peft
step profile_fp32 60 python3 bench/decode_profile.py --base $BASE
step mixed_fp32_eager 90 python3 bench/mixed_batch.py --base $BASE --prefill-reps 3 --decode-reps 6 --no-peft --no-cuda-graphs
step adapter_load 60 python3 bench/adapter_load.py --base $BASE --n 20
# time to first token with the prefix cache against without it (cached blocks copied on the device)
step prefix_cache 90 python3 bench/prefix_cache.py --base $BASE --questions 3 --turns 3
# decoding rows' longest stall while a long prompt arrives, chunked (512, 2048) against whole
step chunked_prefill 90 python3 bench/chunked_prefill.py --base $BASE --prompt-tokens 4096 --chunks 0,512,2048 --rounds 2
# a prefill call's fixed cost on the GPU (its first lines) against service/prefill_groups.py's default of 2048 tokens
step prefill_lengths 90 python3 bench/prefill_lengths.py --base $BASE --reps 3
# speculative steps (the prefill path, no CUDA graph) against graphed decode steps; random weights: the acceptance
# is the random model's, the cost of a verify step is what to read
step speculative 120 python3 bench/speculative.py --base $BASE --repeats 1 --max-tokens 64
