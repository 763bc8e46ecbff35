#!/usr/bin/env bash
# Build {{module}} with componentize-js (installed into node_modules on first use).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x node_modules/.bin/componentize-js ]; then
  echo "installing @bytecodealliance/componentize-js (npm install)..." >&2
  npm install --no-audit --no-fund --loglevel=error
fi
# -d http -d fetch-event: leave out the HTTP imports the handler world does not offer.
node_modules/.bin/componentize-js handler.js --wit wit -n handler -d http -d fetch-event -o {{module}}
