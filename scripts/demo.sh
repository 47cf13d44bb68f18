#!/usr/bin/env bash
# The demo: builds kxdp, creates a node and pod network namespaces, runs the dataplane on the
# node's veths with the demo services of config/demo/, sends TCP and UDP traffic through the
# ClusterIPs, prints what happened per service and per backend, and tears everything down.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export CARGO_TERM_COLOR=never
cargo build --release --workspace --bins
exec target/release/kxdp-demo --manifests config/demo "$@"
