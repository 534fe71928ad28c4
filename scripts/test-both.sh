#!/usr/bin/env bash
# `make test`'s last step: the Node client's suite and pytest side by side. Both spend much
# of their time waiting on daemons they started, so on two cores together they take little
# more than pytest alone. Node's output goes to a log, shown after pytest's (in full when it
# failed, else its summary), so the two never interleave. Fails when either fails.
#   scripts/test-both.sh PYTHON [pytest args...]
set -uo pipefail
py=$1
shift
node_log=$(mktemp /tmp/limiterd-node-test.XXXXXX)
(cd clients/node && exec npm test --silent) >"$node_log" 2>&1 &
node_pid=$!
trap 'kill "$node_pid" 2>/dev/null; rm -f "$node_log"' EXIT

"$py" -m pytest "$@"
py_rc=$?

wait "$node_pid"
node_rc=$?
if [ "$node_rc" -eq 0 ]; then
  echo "== Node client suite (clients/node, node --test): passed"
  grep -E '^# (tests|pass|fail|cancelled|skipped|todo|duration_ms) ' "$node_log"
else
  echo "== Node client suite (clients/node, node --test): FAILED (exit $node_rc), its output:"
  cat "$node_log"
fi
[ "$py_rc" -eq 0 ] && [ "$node_rc" -eq 0 ]
