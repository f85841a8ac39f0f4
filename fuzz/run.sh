#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) until 10 million executions or one hour, whichever
# comes first, and prints libFuzzer's final stats for each. Needs nightly and cargo-fuzz:
#   cargo install cargo-fuzz --locked
#   fuzz/run.sh [target...]
# New inputs go to a working corpus outside the clone (FUZZ_WORK, default
# /var/cache/hiveseed/fuzz-corpus); the committed seeds in fuzz/corpus/ are only read. A crash
# leaves its input in fuzz/artifacts/<target>/: add it to fuzz/corpus/<target>/ once fixed, so
# the stable corpus-replay tests keep it as a regression test.
set -euo pipefail
cd "$(dirname "$0")"
work=${FUZZ_WORK:-/var/cache/hiveseed/fuzz-corpus}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/hiveseed/fuzz-target}
runs=${FUZZ_RUNS:-10000000}
secs=${FUZZ_SECONDS:-3600}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(join_token signed_envelope manifest status_report fleet_toml csr)
cargo +nightly fuzz build -O
failed=0
for t in "${targets[@]}"; do
    mkdir -p "$work/$t"
    log="$work/$t.log"
    start=$(date +%s)
    rc=0
    cargo +nightly fuzz run -O "$t" "$work/$t" "corpus/$t" -- \
        -runs="$runs" -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1 || rc=$?
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|Done )|SUMMARY|panicked' "$log" || true
    echo "fuzz $t: $(( $(date +%s) - start )) s, exit $rc (log $log)"
    [ "$rc" -eq 0 ] || failed=1
done
exit "$failed"
