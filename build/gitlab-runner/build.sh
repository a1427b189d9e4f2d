#!/bin/sh
# Builds FireRunner's test/demo gitlab-runner (upstream gitlab-runner pinned in
# go.mod, shell, custom and docker executors; see README.md) into
#   $FIRERUNNER_CACHE/gitlab-runner/<input-hash>/gitlab-runner
# and, beside it, gitlab-runner-helper (upstream apps/gitlab-runner-helper of
# the same module: the docker executor's helper image binary), and prints the
# gitlab-runner path. The build is skipped when both files exist.
#   build.sh --print-path   only print the path (no build)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
cache=${FIRERUNNER_CACHE:-/var/cache/firerunner}

export GOWORK=off GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 GOOS=linux
GO=${GO:-go}

# Inputs: every file of this directory except docs and go.sum (derived from go.mod and
# written by the build itself), plus the Go toolchain and target arch.
hash=$(
	cd "$here"
	{
		find . -type f ! -name go.sum ! -name "*.md" | LC_ALL=C sort | while read -r f; do
			printf '%s\n' "$f"
			sha256sum <"$f"
		done
		"$GO" version
		"$GO" env GOARCH
	} | sha256sum | cut -c1-16
)
out="$cache/gitlab-runner/$hash/gitlab-runner"

if [ "${1:-}" = "--print-path" ]; then
	echo "$out"
	exit 0
fi

helper="$(dirname "$out")/gitlab-runner-helper"
if [ -x "$out" ] && [ -x "$helper" ]; then
	echo "$out"
	exit 0
fi

mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
htmp="$helper.tmp.$$"
trap 'rm -f "$tmp" "$htmp"' EXIT
pkg=gitlab.com/gitlab-org/gitlab-runner/common
echo "building gitlab-runner (cold: ~6+ min on 2 cores) -> $out" >&2
start=$(date +%s)
(
	cd "$here"
	"$GO" build -trimpath -o "$tmp" -ldflags "-s -w \
		-X $pkg.VERSION=19.4.0 \
		-X $pkg.REVISION=fc1f1862 \
		-X $pkg.BRANCH=firerunner-shell-custom-docker \
		-X $pkg.BUILT=2026-09-03T21:47:10+0000" .
	"$GO" build -trimpath -o "$htmp" -ldflags "-s -w \
		-X $pkg.VERSION=19.4.0 \
		-X $pkg.REVISION=fc1f1862 \
		-X $pkg.BRANCH=firerunner-shell-custom-docker \
		-X $pkg.BUILT=2026-09-03T21:47:10+0000" gitlab.com/gitlab-org/gitlab-runner/apps/gitlab-runner-helper
)
"$tmp" --version >/dev/null
"$htmp" --version >/dev/null
mv "$htmp" "$helper"
mv "$tmp" "$out"
echo "built gitlab-runner in $(($(date +%s) - start))s" >&2
echo "$out"
