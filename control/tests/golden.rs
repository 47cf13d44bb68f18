//! Golden tests: `testdata/NAME.yaml` (Kubernetes YAML, multi-document) is compiled and the
//! table dump compared with `testdata/NAME.golden`. `UPDATE_GOLDEN=1` rewrites the golden
//! files instead (review every diff by eye before committing it).
//!
//! The node context comes from header comments in the YAML:
//!
//! ```text
//! # node: node-1
//! # node-ip: 192.168.1.10      (repeatable)
//! # zone: zone-a
//! ```

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use control::compile::{Compiler, NodeContext};
use control::dump::{dump_policy, dump_with_skips};
use control::skips::Skips;
use control::source::manifests::{parse_documents, replace_events};
use control::store::Store;

fn context(text: &str) -> NodeContext {
    let mut ctx = NodeContext { name: "node-1".into(), ..NodeContext::default() };
    for line in text.lines() {
        let Some(rest) = line.strip_prefix('#') else { continue };
        let Some((k, v)) = rest.split_once(':') else { continue };
        let v = v.trim();
        match k.trim() {
            "node" => ctx.name = v.to_string(),
            "node-ip" => ctx.addresses.push(v.parse::<Ipv4Addr>().expect("node-ip header")),
            "zone" => ctx.zone = Some(v.to_string()),
            _ => {}
        }
    }
    ctx
}

fn render(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let ctx = context(&text);
    let mut skips = Skips::new();
    let objects = parse_documents(&text, &path.display().to_string(), &mut skips);
    let mut store = Store::new();
    store.apply_all(replace_events(objects));
    let mut compiler = Compiler::new(ctx.clone());
    compiler.compile_all(&store);
    skips.merge(store.skips());
    skips.merge(compiler.skips());
    skips.merge(compiler.policy().skips());
    let mut out = format!(
        "# node={} node-ips={:?} zone={:?}\n",
        ctx.name,
        compiler.node_ips(),
        compiler.zone()
    );
    out.push_str(&dump_with_skips(&compiler.tables(1), &skips));
    out.push_str(&dump_policy(compiler.policy()));
    out
}

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

#[test]
fn golden_dumps_match() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let cases = cases();
    assert!(cases.len() >= 15, "expected a golden case per rule, found {}", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let got = render(&case);
        let golden = case.with_extension("golden");
        if update {
            std::fs::write(&golden, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        if got != want {
            failures.push(format!(
                "--- {} (want)\n{want}+++ got\n{got}",
                golden.file_name().unwrap().to_string_lossy()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "golden mismatches (UPDATE_GOLDEN=1 to accept):\n{}",
        failures.join("\n")
    );
}

#[test]
fn golden_output_is_deterministic() {
    for case in cases() {
        assert_eq!(render(&case), render(&case), "{}", case.display());
    }
}
