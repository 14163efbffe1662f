#!/usr/bin/env bash
# Installs what the test suite needs beyond Rust and nats-server: Node.js (the JavaScript
# SDK's tests, `node --test`) and Chromium (the demo page, driven headless over the
# DevTools protocol). Debian/Ubuntu packages via apt-get, with sudo when not root.
#
# Idempotent: when `node` (>= 20.10; 22+ preferred) and `chromium` are already there,
# nothing is installed. HERALD_NODE / HERALD_CHROMIUM name other binaries to use.
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
if node_ok; then
    log "node $("$node_bin" --version) is present"
else
    missing+=(nodejs)
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

if ! node_ok; then
    log "node is $("$node_bin" --version 2>/dev/null || echo missing): the SDK tests need >= 20.10 (22+ preferred);"
    log "this distribution's nodejs is older — install a newer one (e.g. NodeSource) or set HERALD_NODE"
    exit 1
fi
chromium_ok || { log "chromium is still missing after apt-get"; exit 1; }
log "done"
