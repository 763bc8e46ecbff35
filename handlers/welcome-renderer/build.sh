#!/usr/bin/env bash
# Build welcome_renderer.wasm from handler.js with componentize-js (installed from npm
# into node_modules on first use; needs node and npm).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x node_modules/.bin/componentize-js ]; then
  echo "installing @bytecodealliance/componentize-js (npm install, versions from package-lock.json)..." >&2
  # (Not `npm ci`: npm 11 rejects this lock file for lacking other platforms' optional
  # packages, which it never installs here anyway.)
  npm install --no-audit --no-fund --loglevel=error
fi
node_modules/.bin/componentize-js handler.js --wit ../../wit -n handler -d http -d fetch-event -o welcome_renderer.wasm
