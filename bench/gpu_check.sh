#!/usr/bin/env bash
# The GPU check of issue 14: full bf16 and QLoRA 4-bit on a ~1B Llama built in code; one JSON line per arm.
set -euo pipefail; cd "$(dirname "$0")/.." && PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 timeout 540 python bench/gpu_scale.py --size large --device cuda "$@"
