#!/usr/bin/env bash
# The CUDA path end to end on a GPU machine, by hand (CI has no GPU):
#   1. the PyTorch backend's tests on the GPU (RLAIF_TEST_TORCH_DEVICE=cuda);
#   2. the offline quickstart with device auto (= cuda);
#   3. the RL step vs TRL's GRPOTrainer on the GPU (bench_step.py --device cuda).
# Usage: bash benchmarks/cuda_check.sh OUT_DIR   (logs and reports go there)
set -u
out=${1:?usage: cuda_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu.txt"

echo "== 1. backend tests on cuda"
RLAIF_TEST_TORCH_DEVICE=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider \
    tests/backends/test_torch_backend.py tests/backends/test_torch_speedups.py 2>&1 | tee "$out/tests_cuda.log" | tail -25

echo "== 2. quickstart on cuda"
timeout 240 python3 -m rlaif_mlx.cli train --config configs/quickstart.yaml --backend torch --no-dashboard \
    --output-dir "$out/quickstart" 2>&1 | tee "$out/quickstart.log" | grep -E "device|step +(1|20|40|60)\b|done|Error|error" | head -20

echo "== 3. RL step vs TRL on cuda"
timeout 300 python3 benchmarks/bench_step.py --device cuda --model tiny --model 30m --steps 5 --rounds 1 \
    --profile never --out "$out/step_cuda.md" 2>&1 | tail -30
