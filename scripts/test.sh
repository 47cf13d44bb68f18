#!/usr/bin/env bash
# Runs every test of the workspace: unit, fixture, property, golden, BPF (BPF_PROG_TEST_RUN) and
# network-namespace end-to-end tests (the privileged ones skip themselves when not root).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export CARGO_TERM_COLOR=never
# Build the binaries the end-to-end tests start, then run everything.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast -- --test-threads=2
