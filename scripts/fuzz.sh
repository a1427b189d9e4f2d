#!/usr/bin/env bash
# `make fuzz`: runs every fuzz target in the module (every `func FuzzX` in a
# _test.go file) for an equal share of FUZZ_TOTAL executions (default
# 1,000,000), then prints each target's count and the total. It fails if a
# target fails or the total falls short.
#
# A failing input is kept by Go under <package>/testdata/fuzz/<FuzzX>/, where
# every later `go test` runs it as a regression case: fix the bug and commit
# the file with the fix. The run lists such files at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
total_wanted=${FUZZ_TOTAL:-1000000}
minimize=${FUZZ_MINIMIZE_TIME:-10s}

# Targets as "dir name", from the test files (build/ is its own module).
mapfile -t targets < <(grep -rE --include='*_test.go' -o '^func Fuzz[A-Za-z0-9_]*\(' --exclude-dir=build --exclude-dir=.git . |
	sed -E 's#^\./(.*)/[^/]*_test\.go:func (Fuzz[A-Za-z0-9_]*)\($#\1 \2#' | sort -u)
if [ ${#targets[@]} -eq 0 ]; then
	echo "fuzz: no fuzz targets found" >&2
	exit 1
fi
per=$(( (total_wanted + ${#targets[@]} - 1) / ${#targets[@]} ))
echo "fuzz: ${#targets[@]} targets, ${per} executions each (FUZZ_TOTAL=${total_wanted})"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
sum=0
failed=()
summary=()
for t in "${targets[@]}"; do
	dir=${t% *}; name=${t#* }
	echo "=== ${name} (./${dir})"
	start=$(date +%s)
	if "$GO" test -run '^$' -fuzz "^${name}\$" -fuzztime "${per}x" -fuzzminimizetime "$minimize" "./${dir}" >"$log" 2>&1; then
		status=ok
	else
		status=FAIL
		failed+=("${name}")
		cat "$log"
	fi
	# The last progress line carries the target's execution count.
	execs=$(grep -oE 'execs: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || echo 0)
	sum=$(( sum + execs ))
	grep -E '^fuzz: elapsed: .*execs' "$log" | tail -1 || true
	summary+=("$(printf '  %-22s %-28s %10d execs  %4ds  %s' "$name" "./$dir" "$execs" $(( $(date +%s) - start )) "$status")")
done

echo
echo "fuzz summary:"
printf '%s\n' "${summary[@]}"
echo "fuzz: total ${sum} executions across ${#targets[@]} targets (wanted at least ${total_wanted})"
new=$(git status --porcelain --untracked-files=all -- '*/testdata/fuzz/*' || true)
if [ -n "$new" ]; then
	echo "fuzz: new failing inputs (regression cases; commit them with the fix):"
	echo "$new"
fi
if [ ${#failed[@]} -gt 0 ]; then
	echo "fuzz: FAILED: ${failed[*]}" >&2
	exit 1
fi
if [ "$sum" -lt "$total_wanted" ]; then
	echo "fuzz: FAILED: only ${sum} executions, fewer than ${total_wanted}" >&2
	exit 1
fi
