#!/usr/bin/env bash
# Builds, on this (networked) machine, what bench/gpu_check.sh brings to a lent GPU machine, which has PyTorch
# but no network and not all of svdserve's packages. All git-ignored; carried with the run:
#   .whl/             wheels for the GPU image's Python (3.12) of the packages it lacks, at the versions tested here
#                     (its image holds transformers, peft, tokenizers ... at other versions: ours travel too)
#   .devtools/redis/  this machine's redis-server and the shared libraries it links (adapter_load needs a Redis)
#   .devtools/smol/   the default model's config and tokenizer (its weights cannot travel: see gpu_check.sh)
# Then, with the device tool: command "bash bench/gpu_check.sh quick" (or "final"), carry [".whl", ".devtools"].
#
#   bash scripts/gpu_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
PY=.venv/bin/python

# What the GPU image lacks (fastapi's stack, redis, multipart) or holds at versions other than ours.
PACKAGES="fastapi starlette pydantic pydantic_core annotated-types typing-inspection redis python-multipart uvicorn
transformers peft tokenizers huggingface_hub safetensors"
rm -rf .whl && mkdir -p .whl
for name in $PACKAGES; do
  version=$($PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  echo "wheel: $name==$version"
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name==$version"
done

mkdir -p .devtools/redis .devtools/smol
redis=$(command -v redis-server)
cp "$redis" .devtools/redis/
# its libraries but the C runtime's own (the GPU machine's loader brings those)
ldd "$redis" | awk '/=> \// {print $3}' | grep -v -E '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*)\.so' \
  | xargs -r -I{} cp -L {} .devtools/redis/

model=$($PY -c "from svd_adapters.base_model import ensure_default_model; print(ensure_default_model())" 2>/dev/null | tail -1)
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
  [ -f "$model/$f" ] && cp "$model/$f" .devtools/smol/
done
du -sh .whl .devtools
echo "carry [\".whl\", \".devtools\"] (64 MiB in all with the working tree)"
