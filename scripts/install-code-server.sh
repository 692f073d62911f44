#!/usr/bin/env bash
# Installs code-server (VS Code in the browser) from the npm registry for the IDE-profile
# tests, on a machine that reaches package registries only. code-server's own npm
# postinstall downloads ripgrep from GitHub; instead, this runs the same steps with
# install scripts off, takes ripgrep from Debian, and builds the native modules from
# source. Result: `code-server` on PATH (/usr/local/bin).
set -euo pipefail
VERSION=${CODE_SERVER_VERSION:-4.100.3} # the newest line that runs on Node 20
PREFIX=${CODE_SERVER_PREFIX:-/opt/kcloud-code-server}

need=()
for tool in g++ make python3 rg pkg-config; do command -v "$tool" >/dev/null || need+=("$tool"); done
dpkg -s libkrb5-dev >/dev/null 2>&1 || need+=(libkrb5-dev)
if ((${#need[@]})); then
  pkgs=()
  for n in "${need[@]}"; do
    case $n in rg) pkgs+=(ripgrep) ;; *) pkgs+=("$n") ;; esac
  done
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi
command -v node >/dev/null || { echo "code-server needs Node.js 20 (apt-get install nodejs npm)" >&2; exit 1; }

export npm_config_yes=true npm_config_build_from_source=true
mkdir -p "$PREFIX"
cd "$PREFIX"
npm install --no-audit --no-fund --ignore-scripts --loglevel=error "code-server@$VERSION"
npm rebuild --loglevel=error argon2
cd node_modules/code-server/lib/vscode
npm install --omit=dev --no-audit --no-fund --ignore-scripts --loglevel=error
mkdir -p node_modules/@vscode/ripgrep/bin
ln -sf "$(command -v rg)" node_modules/@vscode/ripgrep/bin/rg
npm rebuild --loglevel=error kerberos node-pty @parcel/watcher @vscode/spdlog native-watchdog @vscode/deviceid
# What code-server's postinstall.sh does after its npm install.
ln -sfn node_modules node_modules.asar
(cd bin/remote-cli && ln -sf code-linux.sh code-server)
(cd bin/helpers && ln -sf browser-linux.sh browser.sh)
(cd extensions && npm install --omit=dev --no-audit --no-fund --ignore-scripts --loglevel=error)
ln -sf "$PREFIX/node_modules/.bin/code-server" /usr/local/bin/code-server
code-server --version | head -1
