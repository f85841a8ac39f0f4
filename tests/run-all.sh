#!/usr/bin/env bash
# Runs every hiveseed test: unit, property and integration tests of the workspace, the agent
# against the real seeder, the Terraform rendering, and the lab's node primitives (chroots).
# For a fresh Debian 12 machine, as root: installs what it needs (Debian packages; the lab's
# trixie rootfs is built once into ${HIVESEED_CACHE:-/var/cache/hiveseed}).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "run as root: the lab tests mount overlays and chroot into node roots" >&2
  exit 1
fi

log "host packages"
missing=()
for p in debootstrap postgresql systemd ca-certificates curl; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v terraform >/dev/null && [ "${HIVESEED_SKIP_TERRAFORM:-}" != 1 ]; then
  echo "terraform is not on PATH (HashiCorp's packages are not in Debian): install it, or set HIVESEED_SKIP_TERRAFORM=1" >&2
  exit 1
fi

log "toolchain"
cargo --version
terraform version 2>/dev/null | head -n 1 || true

log "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

log "binaries the lab boots"
cargo build --locked -p hiveseed-seeder
RUSTFLAGS="-C target-feature=+crt-static" cargo build --locked --profile agent \
  --target x86_64-unknown-linux-gnu -p hiveseed-bootstrap
export HIVESEED_SEEDER_BIN="$PWD/target/debug/seeder"
export HIVESEED_BOOTSTRAP_BIN="$PWD/target/x86_64-unknown-linux-gnu/agent/bootstrap"

log "workspace tests"
export TF_CLI_CONFIG_FILE=/dev/null
cargo test --workspace --locked
