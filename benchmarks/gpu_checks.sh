#!/usr/bin/env bash
# All GPU checks in one run (device machine: torch, pandas, pyarrow, pytest; no Ray).
# Wheels for pytorchfi, bitstring and tibs travel in .whl/. Writes logs to $OUT (or ./gpu-out).
# QUICK=1: the tests, the campaign trials, the prefix-reuse run and one engine benchmark only.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi -L 2>&1 | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_engine.py tests/test_bitflip.py tests/test_reference.py tests/test_faults.py tests/test_sites.py tests/test_transformer_sites.py tests/test_trial.py 2>&1 | tail -n 15 | tee "$OUT/pytest.txt"
ENGINE_RUNS=("--model demo:vgg --input-shape 1x28x28 --batch-size 4096 --images 65536")
[ "${QUICK:-0}" = 1 ] || ENGINE_RUNS+=(
            "--model torchvision:resnet18 --batch-size 256 --images 16384" \
            "--model torchvision:resnet18 --batch-size 4096 --images 32768" \
            "--model torchvision:vgg11_bn --batch-size 256 --images 16384" \
            "--model torchvision:vgg11_bn --batch-size 4096 --images 32768" \
            "--model torchvision:mobilenet_v2 --batch-size 4096 --images 32768" \
            "--model torchvision:resnet18 --batch-size 4096 --images 32768 --mode tf32" \
            "--model torchvision:resnet18 --batch-size 4096 --images 32768 --mode bf16")
for args in "${ENGINE_RUNS[@]}"; do
  echo "== engine.py $args" | tee -a "$OUT/engine.txt"
  timeout 120 python3 benchmarks/engine.py $args --reference-images 1024 2>&1 | grep -v Warning | tee -a "$OUT/engine.txt"
done
VIT_RUNS=("--model demo:vit --weights none --input-shape 1x28x28 --batch-size 4096 --images 65536")
[ "${QUICK:-0}" = 1 ] || VIT_RUNS+=("--model torchvision:vit_b_16 --input-shape 3x224x224 --batch-size 256 --images 2048")
for args in "${VIT_RUNS[@]}"; do  # transformers: param and tuple-output faults; PyTorchFI cannot run them
  echo "== engine.py $args" | tee -a "$OUT/engine.txt"
  timeout 300 python3 benchmarks/engine.py $args --reference-images 0 2>&1 | grep -v Warning | tee -a "$OUT/engine.txt"
done
for args in "--model demo:vgg --input-shape 1x28x28 --batch-size 4096 --images 65536" \
            "--model torchvision:resnet18 --batch-size 4096 --images 32768"; do  # paired trials under --protect ranger
  echo "== engine.py $args --protect ranger" | tee -a "$OUT/engine.txt"
  timeout 300 python3 benchmarks/engine.py $args --kinds neuron --reference-images 0 --protect ranger 2>&1 \
    | grep -v Warning | tee -a "$OUT/engine.txt"
done
echo "== campaign trials (trial function driven directly, no Ray)" | tee "$OUT/campaign.txt"
timeout 120 python3 benchmarks/campaign.py --no-ray --device cuda --model demo:vgg --images 10000 --batch-size 2048 \
  --bits random,30 --sites neuron 2>&1 | grep -v Warning | tee -a "$OUT/campaign.txt"
timeout 120 python3 benchmarks/campaign.py --no-ray --device cuda --model torchvision:resnet18 --weights none \
  --dataset synthetic:3x32x32:10:10000 --images 10000 --batch-size 2048 --bits random 2>&1 | grep -v Warning | tee -a "$OUT/campaign.txt"
echo "== prefix reuse: full-layer neuron campaign, bits 0-31, with and without (identical_counts: GPU agreement)" | tee "$OUT/prefix.txt"
timeout 300 python3 benchmarks/campaign.py --prefix --device cuda --model demo:vgg --images 10000 --batch-size 2048 \
  2>&1 | grep -v Warning | tee -a "$OUT/prefix.txt"
