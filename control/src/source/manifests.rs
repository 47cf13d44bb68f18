//! A directory of ordinary Kubernetes YAML as an object source.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in the directory (not in
//! subdirectories, like `kubectl apply -f DIR`) is read as a multi-document stream; a
//! `kind: List` document contributes its `items`. Namespaced objects without a namespace go to
//! `default`, as `kubectl` does. Documents of other kinds are ignored (counted), invalid ones
//! are skipped with a logged reason and a counter; neither stops the rest of the file.
//!
//! Reloading is by polling, once per [`POLL_INTERVAL`]: each pass lists the directory and
//! compares every file's (size, modification time); only changed files (and files modified in
//! the last two seconds, whose timestamps cannot yet be trusted) are re-read, so a pass over a
//! settled directory costs one `readdir` and one `stat` per file. Polling was chosen
//! over inotify (`notify`) because it also sees the atomic symlink swap a mounted ConfigMap
//! uses, needs no watch descriptors, and its cost is bounded and known; the price is up to one
//! interval of delay.
//!
//! The first load yields one [`Event::Replace`] per kind (so the store starts from exactly the
//! directory's content); later loads yield [`Event::Apply`] for new or changed objects and
//! [`Event::Delete`] for objects whose document or file disappeared.
//!
//! With no directory, the embedded demo set (`config/demo/` at build time) is the source.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use crate::skips::Skips;
use crate::store::{Event, Kind, ObjKey, Object};

/// How often the directory is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Largest manifest file read; bigger files are skipped with a reason.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// The demo manifests compiled into the binary: (file name, content).
pub const EMBEDDED_DEMO: &[(&str, &str)] = &[
    ("00-namespace.yaml", include_str!("../../../config/demo/00-namespace.yaml")),
    ("echo.yaml", include_str!("../../../config/demo/echo.yaml")),
    ("idle.yaml", include_str!("../../../config/demo/idle.yaml")),
    ("sticky.yaml", include_str!("../../../config/demo/sticky.yaml")),
    ("web.yaml", include_str!("../../../config/demo/web.yaml")),
];

/// Parses a multi-document YAML (or JSON) text into objects; `origin` names it in logs.
pub fn parse_documents(text: &str, origin: &str, skips: &mut Skips) -> Vec<Object> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc = match serde_yaml::Value::deserialize(de) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(origin, document = i, error = %e, "manifest: invalid YAML, rest of file skipped");
                skips.bump("manifest_invalid_yaml");
                // The YAML stream cannot be resynchronised after a syntax error.
                break;
            }
        };
        parse_value(doc, origin, i, skips, &mut out, 0);
    }
    out
}

fn parse_value(
    mut doc: serde_yaml::Value,
    origin: &str,
    index: usize,
    skips: &mut Skips,
    out: &mut Vec<Object>,
    depth: u8,
) {
    if doc.is_null() {
        return; // an empty document (e.g. a trailing `---`)
    }
    let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_owned();
    if kind == "List" && depth == 0 {
        if let Some(serde_yaml::Value::Sequence(items)) = doc.get_mut("items").map(std::mem::take) {
            for item in items {
                parse_value(item, origin, index, skips, out, 1);
            }
        }
        return;
    }
    let api_version = doc.get("apiVersion").and_then(|k| k.as_str()).unwrap_or_default();
    if let Some(k) = Kind::from_type(api_version, &kind) {
        if k.namespaced() {
            default_namespace(&mut doc);
        }
    }
    match Object::from_yaml(doc) {
        Ok(obj) => out.push(obj),
        Err(crate::store::ParseError::Unsupported { api_version, kind }) => {
            tracing::debug!(origin, document = index, api_version, kind, "manifest: kind not used");
            skips.bump("manifest_unsupported_kind");
        }
        Err(e) => {
            tracing::warn!(origin, document = index, error = %e, "manifest: document skipped");
            skips.bump("manifest_invalid_object");
        }
    }
}

fn default_namespace(doc: &mut serde_yaml::Value) {
    let Some(meta) = doc.get_mut("metadata").and_then(|m| m.as_mapping_mut()) else { return };
    let has = meta.get("namespace").and_then(|n| n.as_str()).is_some_and(|n| !n.is_empty());
    if !has {
        meta.insert("namespace".into(), "default".into());
    }
}

/// The embedded demo set as objects.
pub fn embedded_objects(skips: &mut Skips) -> Vec<Object> {
    EMBEDDED_DEMO.iter().flat_map(|(name, text)| parse_documents(text, name, skips)).collect()
}

/// One `Replace` event per kind holding exactly `objects` (later duplicates win).
pub fn replace_events(objects: Vec<Object>) -> Vec<Event> {
    let mut by_kind: BTreeMap<Kind, Vec<Object>> = Kind::ALL.iter().map(|&k| (k, vec![])).collect();
    for o in objects {
        by_kind.entry(o.kind()).or_default().push(o);
    }
    by_kind.into_iter().map(|(k, v)| Event::Replace(k, v)).collect()
}

/// Whether a file was modified so recently that an edit within the file system's timestamp
/// granularity could hide behind an unchanged (size, mtime): such files are re-read (and their
/// objects compared) on every pass until their stamp is old enough, as git does for "racily
/// clean" files. This costs reading only the files touched in the last [`RACY_WINDOW`].
fn recent(stamp: Stamp) -> bool {
    stamp
        .mtime
        .is_none_or(|m| SystemTime::now().duration_since(m).map_or(true, |age| age < RACY_WINDOW))
}

/// See [`recent`].
const RACY_WINDOW: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: Option<SystemTime>,
}

/// A watched manifest directory.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, (Stamp, Vec<Object>)>,
    /// What the last load published: (kind, key) -> object.
    published: Option<BTreeMap<(Kind, ObjKey), Object>>,
    skips: Skips,
}

impl ManifestDir {
    /// A source for `dir` (nothing is read until [`ManifestDir::load`]).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), files: BTreeMap::new(), published: None, skips: Skips::new() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Input refused so far.
    pub fn skips(&self) -> &Skips {
        &self.skips
    }

    /// Re-reads changed files and returns the store events that bring the store in line with
    /// the directory (empty when nothing changed). An unreadable directory is an error and
    /// changes nothing: the last good content stays in force.
    pub fn load(&mut self) -> std::io::Result<Vec<Event>> {
        let mut present: BTreeMap<PathBuf, Stamp> = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let path = entry.path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
            if !matches!(ext, "yaml" | "yml" | "json") {
                continue;
            }
            // Follows symlinks (ConfigMap volumes link every file through `..data`).
            let Ok(md) = std::fs::metadata(&path) else { continue };
            if !md.is_file() {
                continue;
            }
            present.insert(path, Stamp { len: md.len(), mtime: md.modified().ok() });
        }
        let mut changed = self.published.is_none();
        self.files.retain(|p, _| {
            let keep = present.contains_key(p);
            changed |= !keep;
            keep
        });
        for (path, stamp) in present {
            if self.files.get(&path).is_some_and(|(s, _)| *s == stamp) && !recent(stamp) {
                continue;
            }
            let origin = path.display().to_string();
            let objects = if stamp.len > MAX_FILE_BYTES {
                tracing::warn!(file = origin, len = stamp.len, "manifest: file too large, skipped");
                self.skips.bump("manifest_file_too_large");
                Vec::new()
            } else {
                match std::fs::read_to_string(&path) {
                    Ok(text) => parse_documents(&text, &origin, &mut self.skips),
                    Err(e) => {
                        tracing::warn!(file = origin, error = %e, "manifest: unreadable file skipped");
                        self.skips.bump("manifest_unreadable_file");
                        Vec::new()
                    }
                }
            };
            let same = self.files.get(&path).is_some_and(|(_, old)| *old == objects);
            changed |= !same;
            self.files.insert(path, (stamp, objects));
        }
        if !changed {
            return Ok(Vec::new());
        }
        let mut now: BTreeMap<(Kind, ObjKey), Object> = BTreeMap::new();
        for (path, (_, objects)) in &self.files {
            for o in objects {
                let Ok(key) = o.key() else {
                    // The store counts and logs it; keep it out of the diff.
                    continue;
                };
                if now.insert((o.kind(), key.clone()), o.clone()).is_some() {
                    tracing::warn!(file = %path.display(), kind = %o.kind(), object = %key,
                        "manifest: object defined twice, the later file wins");
                    self.skips.bump("manifest_duplicate_object");
                }
            }
        }
        let events = match self.published.as_ref() {
            None => replace_events(now.values().cloned().collect()),
            Some(prev) => {
                let mut ev = Vec::new();
                for ((kind, key), _) in prev.iter() {
                    if !now.contains_key(&(*kind, key.clone())) {
                        ev.push(Event::Delete(*kind, key.clone()));
                    }
                }
                for (k, o) in &now {
                    if prev.get(k) != Some(o) {
                        ev.push(Event::Apply(o.clone()));
                    }
                }
                ev
            }
        };
        self.published = Some(now);
        Ok(events)
    }

    /// Loads now and then every `interval`, sending the events to `tx`, until `tx` closes.
    /// An unreadable directory is logged (once per failure streak) and retried.
    pub async fn run(mut self, tx: mpsc::Sender<Event>, interval: Duration) {
        let mut failing = false;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match self.load() {
                Ok(events) => {
                    failing = false;
                    for e in events {
                        if tx.send(e).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(dir = %self.dir.display(), error = %e,
                            "manifest directory unreadable; keeping the last content");
                    }
                    failing = true;
                    if tx.is_closed() {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    const SVC: &str =
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1}\n";

    #[test]
    fn multi_doc_list_default_namespace_and_bad_documents() {
        let text = format!(
            "{SVC}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: bad}}\nspec: {{ports: 3}}\n---\n\
             apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  \
             metadata: {{name: ns1}}\n---\n"
        );
        let mut skips = Skips::new();
        let objs = parse_documents(&text, "t", &mut skips);
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[0].key().unwrap(), ObjKey::new("default", "a"));
        assert_eq!(objs[1].key().unwrap(), ObjKey::new("", "ns1"));
        assert_eq!(skips.get("manifest_unsupported_kind"), 1);
        assert_eq!(skips.get("manifest_invalid_object"), 1);
    }

    #[test]
    fn broken_yaml_keeps_documents_before_the_error() {
        let mut skips = Skips::new();
        let objs = parse_documents(&format!("{SVC}---\nkey: [unclosed\n"), "t", &mut skips);
        assert_eq!(objs.len(), 1);
        assert_eq!(skips.get("manifest_invalid_yaml"), 1);
    }

    #[test]
    fn directory_changes_become_apply_and_delete_events() {
        let dir = tempfile::tempdir().unwrap();
        let f1 = dir.path().join("a.yaml");
        let f2 = dir.path().join("b.yml");
        std::fs::write(&f1, SVC).unwrap();
        std::fs::write(&f2, SVC.replace("name: a", "name: b")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not yaml").unwrap();
        let mut src = ManifestDir::new(dir.path());
        let mut store = Store::new();
        let ev = src.load().unwrap();
        assert_eq!(ev.len(), Kind::ALL.len(), "first load: one Replace per kind");
        store.apply_all(ev);
        assert_eq!(store.len(Kind::Service), 2);
        assert!(src.load().unwrap().is_empty(), "unchanged directory: no events");

        // Change a: one Apply. Delete b's file: one Delete.
        std::fs::write(&f1, SVC.replace("10.96.0.1", "10.96.0.2")).unwrap();
        std::fs::remove_file(&f2).unwrap();
        let ev = src.load().unwrap();
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert!(ev.iter().any(|e| matches!(e, Event::Delete(Kind::Service, k) if k.name == "b")));
        assert!(ev.iter().any(|e| matches!(e, Event::Apply(Object::Service(_)))));
        store.apply_all(ev);
        assert_eq!(store.len(Kind::Service), 1);

        // An object removed from a file that stays: Delete.
        std::fs::write(&f1, "# empty now\n").unwrap();
        let ev = src.load().unwrap();
        assert!(matches!(&ev[..], [Event::Delete(Kind::Service, _)]), "{ev:?}");
    }

    #[test]
    fn unreadable_directory_is_an_error_not_an_empty_set() {
        let mut src = ManifestDir::new("/nonexistent/kxdp-manifests");
        assert!(src.load().is_err());
    }

    #[test]
    fn embedded_demo_parses_cleanly() {
        let mut skips = Skips::new();
        let objs = embedded_objects(&mut skips);
        assert!(skips.is_empty(), "{skips}");
        assert_eq!(objs.iter().filter(|o| o.kind() == Kind::Service).count(), 4);
    }
}
