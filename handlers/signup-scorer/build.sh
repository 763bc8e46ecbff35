#!/usr/bin/env bash
# Build signup-scorer.wasm from app.py with componentize-py (pip install componentize-py).
set -euo pipefail
cd "$(dirname "$0")"
componentize-py -d ../../wit -w handler componentize app -o signup_scorer.wasm
