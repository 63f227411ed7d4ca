#!/usr/bin/env bash
# Indexing throughput on an 8B-class shape (Llama-3-8B: hidden 4096, 32 layers, intermediate 14336,
# vocab 128256; random bf16 weights; 2^16 dimensions; a few hundred documents) vs. a training pass
# (forward + backward with weight gradients) on the same batches. Needs a CUDA GPU; skips otherwise.
#
#     bash bench/gpu.sh            # DOCS=256 ROUNDS=2 BATCH_TOKENS=8192 MAX_LEN=1024 may be overridden
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(python -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)" != "True" ]; then
  echo "bench/gpu.sh: no CUDA GPU, skipped"
  exit 0
fi
# SmolLM2-135M's shape (random weights, 300 short documents): fp32 and bf16 autocast
python bench/index_throughput.py --arch llama --preset smollm2 --device cuda --proj-dim 65536 --docs 300 \
  --min-len 16 --max-len 48 --rounds "${ROUNDS:-2}" --autocast none,bfloat16 --no-memory
exec python bench/index_throughput.py --arch llama --preset 8b --device cuda --dtype bfloat16 \
  --proj-dim 65536 --docs "${DOCS:-256}" --rounds "${ROUNDS:-2}" --batch-tokens "${BATCH_TOKENS:-8192}" \
  --max-len "${MAX_LEN:-1024}" --no-memory "$@"
