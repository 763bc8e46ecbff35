#!/usr/bin/env bash
# Build welcome_renderer.wasm from handler.js with componentize-js (installed from npm
# into node_modules on first use; needs node and npm).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x node_modules/.bin/componentize-js ]; then
  echo "installing @bytecodealliance/componentize-js (npm ci: the versions in package-lock.json)..." >&2
  # `npm ci`, not `npm install`: it installs exactly what the lock file says and never
  # rewrites it, so building leaves the checkout clean.
  npm ci --no-audit --no-fund --loglevel=error
fi
node_modules/.bin/componentize-js handler.js --wit ../../wit -n handler -d http -d fetch-event -o welcome_renderer.wasm
