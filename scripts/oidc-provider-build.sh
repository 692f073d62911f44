#!/usr/bin/env bash
# Builds the OpenID Provider the single sign-on tests run against
# (tests/oidc-provider: github.com/zitadel/oidc/v3 from the Go module proxy at the
# version its go.mod pins) into a cache directory keyed by its sources, and prints
# the binary's path. A cached build is reused; concurrent callers wait (flock).
#
# Usage: scripts/oidc-provider-build.sh   env: KCLOUD_TOOLS_CACHE (default
#        ~/.cache/kcloud-tools)
# Needs: go (1.26), flock (util-linux).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v go >/dev/null || { echo "go is needed to build the test identity provider" >&2; exit 1; }
KEY=$(cat tests/oidc-provider/go.mod tests/oidc-provider/go.sum tests/oidc-provider/main.go "$0" |
  sha256sum | cut -c1-12)
CACHE=${KCLOUD_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kcloud-tools}/oidc-provider
OUT=$CACHE/oidc-provider-$KEY
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if [[ ! -x $OUT ]]; then
  start=$(date +%s)
  # Output to a log, not to our stdout: whatever the go command leaves running in the
  # background must not hold the pipe our caller reads the path from.
  if ! (cd tests/oidc-provider && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" \
    -o "$OUT.tmp" .) </dev/null >"$CACHE/build.log" 2>&1 9>&-; then
    cat "$CACHE/build.log" >&2
    exit 1
  fi
  mv "$OUT.tmp" "$OUT"
  printf '==> oidc-provider built in %s s\n' "$(($(date +%s) - start))" >&2
fi
echo "$OUT"
