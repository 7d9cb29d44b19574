#!/usr/bin/env bash
# Stage and commit the finished runs under results/ (a run is finished once metrics.json exists;
# started ones are left out) and the sweeps' study database; weights and wandb folders are ignored
# by .gitignore.
set -euo pipefail
cd "$(dirname "$0")/.."
finished=$(find results -name metrics.json -printf '%h\n' 2>/dev/null | sort)
[ -n "$finished" ] || { echo "no finished runs"; exit 0; }
echo "$finished" | xargs git add --
[ -f results/sweeps/studies.db ] && git add results/sweeps/studies.db
git diff --cached --quiet && { echo "nothing new"; exit 0; }
git commit -qm "Results: $(echo "$finished" | wc -l) finished runs under results/" && git log --oneline -1
