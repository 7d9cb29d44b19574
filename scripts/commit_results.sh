#!/usr/bin/env bash
# Stage and commit the finished runs under results/ (a run is finished once metrics.json exists);
# weights and wandb folders are ignored by .gitignore, in-flight runs are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
finished=$(find results -name metrics.json -printf '%h\n' 2>/dev/null | sort)
[ -n "$finished" ] || { echo "no finished runs"; exit 0; }
echo "$finished" | xargs git add --
git diff --cached --quiet && { echo "nothing new"; exit 0; }
git commit -qm "Results: $(echo "$finished" | wc -l) finished runs under results/" && git log --oneline -1
