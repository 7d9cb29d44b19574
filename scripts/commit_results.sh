#!/usr/bin/env bash
# Stage and commit the finished runs under results/ (a run is finished once metrics.json exists;
# started ones are left out), a snapshot of the sweeps' study database and the selection file the sweeps
# write (configs/selected.yaml); weights and wandb folders are ignored by .gitignore.
set -euo pipefail
cd "$(dirname "$0")/.."
finished=$(find results -name metrics.json -printf '%h\n' 2>/dev/null | sort)
[ -n "$finished" ] || { echo "no finished runs"; exit 0; }
echo "$finished" | xargs git add --
if [ -f results/sweeps/studies.db ]; then
  # Stage a consistent snapshot (SQLite's backup API), not the file's bytes: workers may be writing it.
  snapshot=$(mktemp)
  .venv/bin/python -c 'import sqlite3, sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))' \
    results/sweeps/studies.db "$snapshot"
  git update-index --add --cacheinfo "100644,$(git hash-object -w "$snapshot"),results/sweeps/studies.db"
  rm -f "$snapshot"
fi
[ -f configs/selected.yaml ] && git add configs/selected.yaml
git diff --cached --quiet && { echo "nothing new"; exit 0; }
git commit -qm "Results: $(echo "$finished" | wc -l) finished runs under results/" && git log --oneline -1
