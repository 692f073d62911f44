#!/usr/bin/env bash
# Runs kcloud in the local shape on this machine: builds and starts the aggregator with
# the arguments given (e.g. --simulate dgx-a100-mig --listen 127.0.0.1:8080).
#
# Servers run sandboxed as their owners (--isolation sandbox, the default), which needs
# root, bubblewrap and setpriv: as root, this installs bubblewrap when it is missing.
# As another user, pass --isolation none (servers then run unconfined as you).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) == 0 ]] && ! command -v bwrap >/dev/null; then
  echo "==> installing: bubblewrap (the servers' sandbox)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null
fi
exec cargo run --release -p kcloud-aggregator -- "$@"
