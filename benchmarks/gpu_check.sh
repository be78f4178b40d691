#!/bin/bash
# Everything that needs a GPU, as one run for a short device slot (issue 17's GPU table, issue 9's NCCL
# path, the CUDA-only kernels): the gpu-marked tests, then the benchmark suite on the real shapes.
# Usage, from the repository root on a CUDA machine with torch, transformers and tokenizers installed:
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (about 10 minutes on one H100/H200)
# Logs and the suite's JSON/Markdown report go to OUT_DIR (default: $OUT, else gpu-results).
set -uo pipefail
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"
# CUDA tests: bf16 training, fused AdamW, FlexAttention gradients, compiled decoding with CUDA graphs,
# NCCL DDP and FSDP2 (two processes when the machine has two GPUs, else skipped)
timeout 240 python -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tee "$out/gpu-tests.log"
# the suite: training (Gemma 3 270M at 50k and 262k vocab, Llama 124M, BERT), decoding with the compiled
# static step, the 262k loss (Liger too when installed), data prepare
timeout 420 python -m benchmarks --device cuda --out "$out" 2>&1 | tee "$out/suite.log"
