#!/usr/bin/env bash
# The local lab: `tests/lab.sh up` brings the 3-region reference fleet up on this machine (one
# Debian trixie chroot per node, booted from its Terraform-rendered user_data) and prints
# `seeder status` and the validation report; `tests/lab.sh down` stops and unmounts everything;
# `tests/lab.sh status` prints the fleet view. For a fresh Debian 12 machine, as root.
set -euo pipefail
cd "$(dirname "$0")/.."
LAB_DIR=${HIVESEED_LAB_DIR:-/var/tmp/hiveseed-lab}

build() {
  for p in debootstrap ca-certificates curl python3-pip build-essential pkg-config iproute2; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || {
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap ca-certificates curl python3-pip build-essential pkg-config iproute2 >/dev/null
      break
    }
  done
  command -v terraform >/dev/null || { echo "terraform is not on PATH" >&2; exit 1; }
  cargo build --release --locked -p hiveseed-seeder -p hiveseed-lab
  RUSTFLAGS="-C target-feature=+crt-static" cargo build --locked --profile agent \
    --target x86_64-unknown-linux-gnu -p hiveseed-bootstrap
}

case "${1:-up}" in
  up)
    build
    exec ./target/release/lab up --dir "$LAB_DIR" --with-ai-memory \
      --fleet roles/fleet.lab.toml --roles roles --terraform terraform \
      --seeder target/release/seeder \
      --bootstrap target/x86_64-unknown-linux-gnu/agent/bootstrap "${@:2}"
    ;;
  scenarios)
    build
    exec ./target/release/lab scenarios --dir "$LAB_DIR" \
      --fleet roles/fleet.lab.toml --roles roles --terraform terraform \
      --seeder target/release/seeder \
      --bootstrap target/x86_64-unknown-linux-gnu/agent/bootstrap "${@:2}"
    ;;
  down) exec ./target/release/lab down --dir "$LAB_DIR" "${@:2}" ;;
  status) exec ./target/release/lab status --dir "$LAB_DIR" --seeder target/release/seeder ;;
  *) echo "usage: tests/lab.sh up|scenarios|down|status" >&2; exit 2 ;;
esac
