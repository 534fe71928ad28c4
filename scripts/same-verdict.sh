#!/usr/bin/env bash
# Does `make test` give the same verdict every time, on a fresh clone as CI sees it?
#   scripts/same-verdict.sh N [REPO [COMMIT]]     (default: this repo, its HEAD)
# Each run clones REPO at COMMIT into a new temp dir and runs `bash .ci/run` there (venv and
# node packages included, as on CI), then prints pass/fail, its duration and, on failure,
# the failing test ids and where its full log is kept. Exits non-zero if any run failed.
set -uo pipefail

# All in one block, read whole before it runs: a checkout or merge in this repo during the
# series (bash reads a script as it goes) cannot change it halfway.
{
runs=${1:?usage: scripts/same-verdict.sh N [REPO [COMMIT]]}
repo=${2:-$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)}
commit=${3:-$(git -C "$repo" rev-parse HEAD)}
logs=$(mktemp -d /tmp/same-verdict.XXXXXX)
echo "same-verdict: $runs runs of $repo at ${commit:0:12}; logs in $logs"

failed=0
for i in $(seq 1 "$runs"); do
  dir=$(mktemp -d /tmp/same-verdict-clone.XXXXXX)
  log=$logs/run-$i.log
  start=$(date +%s)
  if git clone -q "$repo" "$dir" && git -C "$dir" checkout -q "$commit" \
      && (cd "$dir" && CI=true bash .ci/run </dev/null) >"$log" 2>&1; then
    verdict=pass
  else
    verdict=FAIL
    failed=$((failed + 1))
  fi
  secs=$(( $(date +%s) - start ))
  printf 'run %d/%d: %s in %dm%02ds\n' "$i" "$runs" "$verdict" $((secs / 60)) $((secs % 60))
  if [ "$verdict" = FAIL ]; then
    # pytest's summary lines, and Node's failing subtests (`not ok N - name`); else (a
    # failure before the tests, say an install) the log's last lines.
    grep -E '^(FAILED|ERROR) |^ *not ok [0-9]+ - ' "$log" | sed 's/^/    /' | head -40 | grep . \
      || tail -5 "$log" | sed 's/^/    /'
    echo "    full log: $log"
  else
    rm -f "$log"
  fi
  rm -rf "$dir"
done
echo "same-verdict: $((runs - failed)) of $runs passed"
[ "$failed" -eq 0 ]
exit
}
