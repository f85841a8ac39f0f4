#!/usr/bin/env bash
# Runs every hiveseed test: unit, property and integration tests of the workspace, the agent
# against the real seeder, the Terraform rendering, the fleet suite against real ai-memory
# daemons, the lab's node primitives (chroots), and then the lab's acceptance scenarios on the
# whole 3-region fleet (bring-up, secrets, redeploy, replace, faults, `seeder test`).
# For a fresh Debian 12 machine, as root: installs what it needs (Debian packages; the lab cache
# — trixie rootfs with PostgreSQL .debs, ai-memory 0.7.0 built from crates.io, the MiniLM
# files — is built once into ${HIVESEED_CACHE:-/var/cache/hiveseed} and reused while valid).
# Everything the scenarios start is stopped and unmounted on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

# No incremental caches: CI builds each crate once, and they would double target/'s size.
export CARGO_INCREMENTAL=0

log() { printf '\n== %s\n' "$*"; }

# Every test runs against its real dependency here: a HIVESEED_SKIP_* variable is refused
# (tests/deps), and so is a golden rewrite, which would pass without comparing.
skips=$(env | grep -oE '^(HIVESEED_SKIP_[A-Z_]*|HIVESEED_UPDATE_GOLDEN)=' || true)
if [ -n "$skips" ]; then
  echo "refused: $(echo $skips | tr -d =) set; tests/run-all.sh runs every test (unset it)" >&2
  exit 1
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "run as root: the lab tests mount overlays and chroot into node roots" >&2
  exit 1
fi

log "host packages"
missing=()
for p in debootstrap postgresql systemd ca-certificates curl python3-pip build-essential pkg-config iproute2; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v terraform >/dev/null; then
  echo "terraform is not on PATH (HashiCorp's packages are not in Debian): install it" >&2
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
cargo build --locked --release -p hiveseed-seeder -p hiveseed-lab
RUSTFLAGS="-C target-feature=+crt-static" cargo build --locked --profile agent \
  --target x86_64-unknown-linux-gnu -p hiveseed-bootstrap
export HIVESEED_SEEDER_BIN="$PWD/target/debug/seeder"
export HIVESEED_BOOTSTRAP_BIN="$PWD/target/x86_64-unknown-linux-gnu/agent/bootstrap"

log "lab cache (${HIVESEED_CACHE:-/var/cache/hiveseed})"
./target/release/lab cache
export HIVESEED_AI_MEMORY_BIN="${HIVESEED_CACHE:-/var/cache/hiveseed}/ai-memory-0.7.0-sal/bin/ai-memory"

log "workspace tests"
export TF_CLI_CONFIG_FILE=/dev/null
# Tests write only under temp dirs: the work tree must be as it was before them.
before=$(git status --porcelain --untracked-files=all 2>/dev/null || true)
cargo test --workspace --locked
after=$(git status --porcelain --untracked-files=all 2>/dev/null || true)
if [ "$before" != "$after" ]; then
  echo "the workspace tests changed the work tree (tests write only under temp dirs):" >&2
  diff <(echo "$before") <(echo "$after") >&2 || true
  exit 1
fi

log "lab scenarios (the acceptance gate)"
LAB_DIR=${HIVESEED_LAB_DIR:-/var/tmp/hiveseed-lab}
trap './target/release/lab down --dir "$LAB_DIR" --purge >/dev/null 2>&1 || true' EXIT
./target/release/lab scenarios --dir "$LAB_DIR" \
  --fleet roles/fleet.lab.toml --roles roles --terraform terraform \
  --seeder target/release/seeder \
  --bootstrap target/x86_64-unknown-linux-gnu/agent/bootstrap
