#!/usr/bin/env bash
# Build {{module}} with componentize-py (pip install componentize-py==0.25.1).
set -euo pipefail
cd "$(dirname "$0")"
componentize-py -d wit -w handler componentize app -o {{module}}
