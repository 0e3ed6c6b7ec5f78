#!/usr/bin/env bash
# Prints the tests that skipped in the last run (the lines tests append to $SKIP_LOG, default
# target/test-skips.log) with their count. With STRICT_SKIPS=1 (as .ci/run sets it), fails
# unless every skipped test is listed in README.md between the markers
# `<!-- expected-skips -->` and `<!-- /expected-skips -->` (a line "- `test_name`: why").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log="${SKIP_LOG:-$root/target/test-skips.log}"
expected="$(sed -n '/<!-- expected-skips -->/,/<!-- \/expected-skips -->/p' "$root/README.md" |
  grep -o '^- `[^`]*`' | sed 's/^- `//; s/`$//' || true)"
if [ ! -s "$log" ]; then
  echo "skips: 0 tests skipped"
  exit 0
fi
n=$(wc -l < "$log")
echo "skips: $n test(s) skipped:"
sed 's/^/  /' "$log"
unexpected=0
while read -r line; do
  name="${line#SKIPPED: }"
  name="${name%%:*}"
  name="${name%% (*}"
  if ! grep -qxF -- "$name" <<<"$expected"; then
    echo "skips: UNEXPECTED skip of $name (README.md lists the skips expected on this kind of machine)"
    unexpected=$((unexpected + 1))
  fi
done < "$log"
echo "skips: $unexpected unexpected"
if [ "${STRICT_SKIPS:-0}" = 1 ] && [ "$unexpected" -gt 0 ]; then
  exit 1
fi
