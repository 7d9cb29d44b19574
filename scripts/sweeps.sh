#!/usr/bin/env bash
# The validation protocol's evidence (issue 23), cheapest cells first: each sweep, then the protocol
# grid's runs at the selected settings (configs/grids/protocol.yaml: test evaluated once per run).
# Resumable: studies continue, finished runs are skipped. Long: start it detached,
#   setsid nohup scripts/sweeps.sh > results/sweeps.log 2>&1 &
set -uo pipefail
cd "$(dirname "$0")/.."
for model in minilm mpnet; do
  for cell in acl_sup-full acl_sup-lora-r16 restaurant_sup-full restaurant_sup-lora-r16; do
    scripts/sweep.sh "configs/sweeps/$model-$cell.yaml"
    .venv/bin/python -m peftlab.experiments configs/grids/protocol.yaml --only model=$model
  done
done
