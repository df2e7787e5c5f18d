//! The directory source: every `*.yaml` / `*.yml` / `*.json` file under a
//! directory (recursively), multi-document files allowed.
//!
//! Change detection is polling, chosen over inotify for portability
//! (bind-mounted ConfigMaps, network filesystems and editors that replace
//! files all behave the same): every [`POLL_INTERVAL`] (250 ms) each file is
//! read and a hash of its content compared with the last one, so a change
//! is applied within ~250 ms plus parse time, well inside 1 s, even when an
//! edit keeps the size and mtime. Reading every file each tick is meant for
//! the local mode's tens of files, not thousands.
//!
//! A file that fails to parse is reported as `path:line: message` (log at
//! warn, `weft_controller_manifest_errors_total`), and the objects from its
//! last good version stay in the index. Deleting a file removes its
//! objects. Routes and policies are more forgiving, because one bad route
//! must not freeze a file of many: an HTTPRoute, GRPCRoute, BackendPolicy,
//! Server or AuthorizationPolicy document that does not decode (or, for the
//! last two, does not convert: a field that cannot be used) is reported once (`path:line: document N:
//! KIND ns/name: message`, same metric) and skipped, and the rest of the
//! file loads. For an HTTPRoute or GRPCRoute, its last good version from
//! that file stays in force (as kube mode keeps an object that stops
//! converting), and one never loaded stays out; a Server or
//! AuthorizationPolicy is left out (fail closed: its Server denies), a
//! BackendPolicy too (the defaults apply). One that decodes but cannot be used (a bad regex, an
//! unsupported filter) loads, and the compilation marks it not Accepted
//! (see [`crate::status`]); its last accepted version stays in force
//! ([`crate::index::State::held_routes`]). A NetworkPolicy that does not convert fails
//! its file like a bad Pod (the last good version stays), since dropping
//! it alone would lift the isolation it gave. Kinds other than Service,
//! EndpointSlice, Pod, Namespace, NetworkPolicy
//! (`networking.k8s.io/v1`), HTTPRoute, GRPCRoute
//! (`gateway.networking.k8s.io/v1`; HTTPRoute also `v1beta1`) and
//! BackendPolicy, Server, AuthorizationPolicy (`policy.weft.dev/v1alpha1`) are ignored with a debug log. Objects without a namespace are in `default`.
//! When two files define the same object, the file later in path order
//! wins (logged).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_yaml_ng as yaml;

use super::Readiness;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::model::{convert, Kind, Object};

/// How often the directory is scanned.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("manifest directory {path}: {source}; expected a readable directory of Kubernetes YAML files")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A manifest file that cannot be loaded, with the 1-based line to look at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {message}", path.display())]
pub struct ManifestError {
    pub path: PathBuf,
    pub line: usize,
    pub message: String,
}

/// Parses the objects of one manifest file. Pure, so the webhook and CLI
/// can validate manifests the same way. Route and policy documents that do
/// not decode are skipped here; [`load_manifests`] returns them.
pub fn parse_manifests(path: &Path, text: &str) -> Result<Vec<Object>, ManifestError> {
    load_manifests(path, text).map(|l| l.objects)
}

/// What one manifest file yields.
#[derive(Debug, Default)]
pub struct Loaded {
    pub objects: Vec<Object>,
    /// Route and policy documents that did not decode (each names the
    /// object), skipped without failing the file.
    pub skipped: Vec<ManifestError>,
    /// The routes among those documents (when their metadata names
    /// them): the directory source keeps each one's last good version.
    pub skipped_objects: Vec<(Kind, crate::model::ObjectKey)>,
}

/// Parses one manifest file: its objects, and the route and policy
/// documents that were skipped. An error in any other kind fails the
/// whole file.
pub fn load_manifests(path: &Path, text: &str) -> Result<Loaded, ManifestError> {
    let mut objects = Vec::new();
    let mut skipped = Vec::new();
    let mut skipped_objects = Vec::new();
    for (doc_index, (start_line, doc)) in split_documents(text).into_iter().enumerate() {
        let err = |line: usize, message: String| ManifestError {
            path: path.to_path_buf(),
            line,
            message: format!("document {}: {message}", doc_index + 1),
        };
        let located = |e: &yaml::Error| {
            e.location()
                .map_or(start_line, |l| start_line + l.line().saturating_sub(1))
        };
        weft_model::yaml::check_expansion(&doc).map_err(|e| err(located(&e), e.to_string()))?;
        let value: yaml::Value =
            yaml::from_str(&doc).map_err(|e| err(located(&e), e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_string);
        let (Some(api_version), Some(kind)) = (field("apiVersion"), field("kind")) else {
            return Err(err(
                start_line,
                "not a Kubernetes object: apiVersion and kind must be strings".into(),
            ));
        };
        let object = match (api_version.as_str(), kind.as_str()) {
            ("v1", "Service") => typed(&doc, start_line, &err, |s| {
                convert::service(s, "default").map(Object::Service)
            })?,
            ("discovery.k8s.io/v1", "EndpointSlice") => typed(&doc, start_line, &err, |s| {
                convert::endpoint_slice(s, "default").map(Object::EndpointSlice)
            })?,
            ("v1", "Pod") => typed(&doc, start_line, &err, |p| {
                convert::pod(p, "default").map(Object::Pod)
            })?,
            ("v1", "Namespace") => typed(&doc, start_line, &err, |n| {
                convert::namespace(n).map(Object::Namespace)
            })?,
            // Loaded whatever the consumer: a Node the controller does not read costs a
            // map entry (the CNI agent routes to the other nodes' pod CIDRs).
            ("v1", "Node") => typed(&doc, start_line, &err, |n| {
                convert::node(n).map(Object::Node)
            })?,
            // A policy that does not convert keeps the whole file at its last good state
            // (as a bad Pod does): dropping only the bad policy would lift the isolation it
            // gave, which the API server's validation would never let happen.
            ("networking.k8s.io/v1", "NetworkPolicy") => typed(&doc, start_line, &err, |p| {
                convert::network_policy(p, "default").map(|p| Object::NetworkPolicy(Box::new(p)))
            })?,
            ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute")
            | ("gateway.networking.k8s.io/v1", "GRPCRoute")
            | ("policy.weft.dev/v1alpha1", "BackendPolicy" | "Server" | "AuthorizationPolicy") => {
                let name = |field: &str| {
                    value
                        .get("metadata")
                        .and_then(|m| m.get(field))
                        .and_then(|v| v.as_str())
                        .map(str::to_string)
                };
                let object = format!(
                    "{kind} {}/{}",
                    name("namespace").unwrap_or_else(|| "default".into()),
                    name("name").unwrap_or_else(|| "<unnamed>".into())
                );
                let named =
                    |line: usize, message: String| err(line, format!("{object}: {message}"));
                let parsed = match kind.as_str() {
                    "HTTPRoute" => typed(&doc, start_line, &named, |r| {
                        convert::http_route(r, "default").map(|r| Object::Route(Box::new(r)))
                    }),
                    "GRPCRoute" => typed(&doc, start_line, &named, |r| {
                        convert::grpc_route(r, "default").map(|r| Object::Route(Box::new(r)))
                    }),
                    "Server" => typed(&doc, start_line, &named, |s| {
                        convert::server(s, "default").map(|s| Object::Server(Box::new(s)))
                    }),
                    "AuthorizationPolicy" => typed(&doc, start_line, &named, |a| {
                        convert::authorization_policy(a, "default")
                            .map(|a| Object::AuthorizationPolicy(Box::new(a)))
                    }),
                    _ => typed(&doc, start_line, &named, |p| {
                        convert::backend_policy(p, "default")
                            .map(|p| Object::BackendPolicy(Box::new(p)))
                    }),
                };
                match parsed {
                    Ok(o) => o,
                    Err(e) => {
                        skipped.push(e);
                        // Routes only: a Server or AuthorizationPolicy that cannot be read is
                        // left out (its Server then denies: fail closed), a BackendPolicy too
                        // (the defaults apply).
                        let model_kind = match kind.as_str() {
                            "HTTPRoute" => Some(Kind::HttpRoute),
                            "GRPCRoute" => Some(Kind::GrpcRoute),
                            _ => None,
                        };
                        if let (Some(model_kind), Some(n)) =
                            (model_kind, name("name").filter(|n| !n.is_empty()))
                        {
                            let ns = name("namespace")
                                .filter(|n| !n.is_empty())
                                .unwrap_or_else(|| "default".into());
                            skipped_objects.push((model_kind, crate::model::ObjectKey::new(ns, n)));
                        }
                        continue;
                    }
                }
            }
            _ => {
                tracing::debug!(path = %path.display(), line = start_line, %api_version, %kind, "ignoring kind the controller does not index");
                continue;
            }
        };
        objects.push(object);
    }
    Ok(Loaded {
        objects,
        skipped,
        skipped_objects,
    })
}

fn typed<T: DeserializeOwned>(
    doc: &str,
    start_line: usize,
    err: &dyn Fn(usize, String) -> ManifestError,
    to_model: impl FnOnce(&T) -> Result<Object, convert::ConvertError>,
) -> Result<Object, ManifestError> {
    let obj: T = yaml::from_str(doc).map_err(|e| {
        let line = e
            .location()
            .map_or(start_line, |l| start_line + l.line().saturating_sub(1));
        err(line, e.to_string())
    })?;
    to_model(&obj).map_err(|e| err(start_line, e.to_string()))
}

/// Splits a YAML stream at `---` lines, returning each document with the
/// 1-based line it starts on.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let is_separator = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '#']));
        if is_separator {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 2;
        } else if line.trim_end() == "..." {
            // Document end marker: the next document starts after it.
            docs.push((start, std::mem::take(&mut current)));
            start = i + 2;
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs.push((start, current));
    docs.retain(|(_, d)| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    });
    docs
}

struct FileState {
    hash: u64,
    objects: Vec<Object>,
    error: Option<ManifestError>,
}

/// Watches a directory of manifests.
pub struct DirSource {
    root: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    metrics: Metrics,
    /// The verdict last logged per route and policy.
    logged: HashMap<(Kind, crate::model::ObjectKey), String>,
}

impl std::fmt::Debug for DirSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirSource")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl DirSource {
    /// Fails if `root` is not a readable directory.
    pub fn new(root: impl Into<PathBuf>, metrics: Metrics) -> Result<Self, DirError> {
        let root = root.into();
        std::fs::read_dir(&root).map_err(|source| DirError::Io {
            path: root.clone(),
            source,
        })?;
        Ok(DirSource {
            root,
            files: BTreeMap::new(),
            metrics,
            logged: HashMap::new(),
        })
    }

    /// Rescans the directory; returns whether the set of objects may have
    /// changed.
    pub fn scan(&mut self) -> Result<bool, DirError> {
        let mut found = Vec::new();
        collect_files(&self.root, &mut found)?;
        let mut changed = false;
        let before = self.files.len();
        self.files.retain(|p, _| found.contains(p));
        if self.files.len() != before {
            changed = true;
        }
        for path in found {
            let text = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                // Removed between listing and reading: the next scan drops it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(DirError::Io { path, source }),
            };
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            text.hash(&mut hasher);
            let hash = hasher.finish();
            if self.files.get(&path).is_some_and(|f| f.hash == hash) {
                continue;
            }
            let parsed = match std::str::from_utf8(&text) {
                Ok(text) => load_manifests(&path, text),
                Err(e) => Err(ManifestError {
                    path: path.clone(),
                    line: 1 + text[..e.valid_up_to()]
                        .iter()
                        .filter(|b| **b == b'\n')
                        .count(),
                    message: "file is not UTF-8".into(),
                }),
            };
            match parsed {
                Ok(Loaded {
                    mut objects,
                    skipped,
                    skipped_objects,
                }) => {
                    for error in &skipped {
                        tracing::warn!(%error, "object skipped (Accepted=False); the rest of the file is loaded");
                        self.metrics.manifest_errors.inc();
                    }
                    // As in kube mode, an object whose new version cannot be read keeps its
                    // last good version from this file; one never loaded stays out.
                    let previous = self.files.get(&path).map(|f| f.objects.as_slice());
                    for (kind, key) in skipped_objects {
                        if objects.iter().any(|o| o.kind() == kind && o.key() == key) {
                            continue;
                        }
                        let kept = previous
                            .into_iter()
                            .flatten()
                            .find(|o| o.kind() == kind && o.key() == key);
                        match kept {
                            Some(o) => {
                                tracing::warn!(path = %path.display(), %kind, object = %key, "the last good version of this object stays in force until its document is fixed or removed");
                                objects.push(o.clone());
                            }
                            None => {
                                tracing::warn!(path = %path.display(), %kind, object = %key, "no good version of this object was ever loaded; it is left out")
                            }
                        }
                    }
                    tracing::info!(path = %path.display(), objects = objects.len(), skipped = skipped.len(), "loaded manifests");
                    self.files.insert(
                        path,
                        FileState {
                            hash,
                            objects,
                            error: None,
                        },
                    );
                    changed = true;
                }
                Err(error) => {
                    tracing::warn!(%error, "manifest file is invalid; keeping its last good objects");
                    self.metrics.manifest_errors.inc();
                    let entry = self.files.entry(path).or_insert(FileState {
                        hash,
                        objects: Vec::new(),
                        error: None,
                    });
                    entry.hash = hash;
                    entry.error = Some(error);
                }
            }
        }
        let invalid = self.files.values().filter(|f| f.error.is_some()).count();
        self.metrics
            .manifest_files_invalid
            .set(i64::try_from(invalid).unwrap_or(i64::MAX));
        Ok(changed)
    }

    /// Every object from the last good version of every file.
    pub fn objects(&self) -> Vec<Object> {
        let mut by_key: HashMap<(Kind, crate::model::ObjectKey), (&Path, &Object)> = HashMap::new();
        for (path, file) in &self.files {
            for object in &file.objects {
                if let Some((earlier, _)) =
                    by_key.insert((object.kind(), object.key()), (path, object))
                {
                    tracing::warn!(kind = %object.kind(), object = %object.key(), first = %earlier.display(), wins = %path.display(), "object defined twice; the later file wins");
                }
            }
        }
        by_key.into_values().map(|(_, o)| o.clone()).collect()
    }

    /// Files whose latest version failed to parse.
    pub fn errors(&self) -> Vec<ManifestError> {
        self.files
            .values()
            .filter_map(|f| f.error.clone())
            .collect()
    }

    /// Loads the directory, marks the source ready, then applies changes
    /// until the task is dropped.
    pub async fn run(mut self, index: Index, readiness: Readiness) -> Result<(), DirError> {
        self.scan()?;
        self.publish(&index);
        self.log_verdicts(&index);
        readiness.set_ready();
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.scan() {
                Ok(true) => {
                    self.publish(&index);
                    self.log_verdicts(&index);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "scanning the manifest directory failed; serving the last good state")
                }
            }
        }
    }

    fn publish(&self, index: &Index) {
        let applied = index.reset_kinds(&Kind::EVERY, self.objects());
        self.metrics.index_changes.inc_by(applied.changed as u64);
        self.metrics.observe_index(index);
        if applied.changed > 0 {
            tracing::info!(changed = applied.changed, "index updated from manifests");
        }
    }
}

impl DirSource {
    /// Logs the status verdict of each route and BackendPolicy whose
    /// verdict changed (what kube mode writes into `status`), naming the
    /// file and the object: info when accepted, warn when not.
    pub fn log_verdicts(&mut self, index: &Index) {
        use crate::index::outbound::{policy_verdicts, route_verdicts, OutboundConfig};
        let file_of = |kind: Kind, key: &crate::model::ObjectKey| {
            self.files
                .iter()
                .rev() // the later file wins, as in `objects`
                .find(|(_, f)| {
                    f.objects
                        .iter()
                        .any(|o| o.kind() == kind && o.key() == *key)
                })
                .map(|(p, _)| p.display().to_string())
                .unwrap_or_default()
        };
        let state = index.read();
        let config = OutboundConfig::default();
        let mut now: HashMap<(Kind, crate::model::ObjectKey), (String, bool)> = HashMap::new();
        for route in state.http_routes.values().chain(state.grpc_routes.values()) {
            let verdicts = route_verdicts(&state, route, &config);
            let servers: Vec<String> = route.parent_servers().map(|k| k.to_string()).collect();
            let inbound = (verdicts.is_empty() && !servers.is_empty())
                .then(|| crate::index::outbound::rule_matches(route).err());
            let ok = verdicts.iter().all(|v| v.accepted.ok && v.resolved_refs.ok)
                && !matches!(inbound, Some(Some(_)));
            let text = if let Some(error) = &inbound {
                match error {
                    None => format!(
                        "inbound route of Server {}: accepted by Weft",
                        servers.join(", ")
                    ),
                    Some(e) => format!(
                        "inbound route of Server {}: not applied: {e}{}",
                        servers.join(", "),
                        crate::index::outbound::held_note(&state, route)
                            .map(|n| format!("; {n}"))
                            .unwrap_or_default()
                    ),
                }
            } else if verdicts.is_empty() {
                "no Service parentRef: not a mesh route, ignored".to_string()
            } else {
                verdicts
                    .iter()
                    .map(|v| {
                        format!(
                            "parent Service {}: {}",
                            v.parent_ref.name,
                            crate::status::describe(&v.accepted, Some(&v.resolved_refs))
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" | ")
            };
            now.insert((route.kind(), route.meta.key.clone()), (text, ok));
        }
        for policy in state.policies.values() {
            let verdicts = policy_verdicts(&state, policy);
            let ok = verdicts.iter().all(|(_, v)| v.ok);
            let text = verdicts
                .iter()
                .map(|(t, v)| {
                    format!(
                        "target Service {}: {}",
                        t.name,
                        crate::status::describe(v, None)
                    )
                })
                .collect::<Vec<_>>()
                .join(" | ");
            now.insert((Kind::BackendPolicy, policy.meta.key.clone()), (text, ok));
        }
        drop(state);
        self.logged.retain(|k, _| now.contains_key(k));
        for ((kind, key), (text, ok)) in now {
            if self.logged.get(&(kind, key.clone())) == Some(&text) {
                continue;
            }
            let file = file_of(kind, &key);
            if ok {
                tracing::info!(%file, %kind, object = %key, verdict = %text, "{kind} {key}: accepted");
            } else {
                tracing::warn!(%file, %kind, object = %key, verdict = %text, "{kind} {key}: not (fully) accepted");
            }
            self.logged.insert((kind, key), text);
        }
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DirError> {
    let entries = std::fs::read_dir(dir).map_err(|source| DirError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        // Skip hidden files and directories (editor swap files, and the
        // `..data` links of mounted ConfigMaps, which are followed through
        // their visible names instead).
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(path);
        }
    }
    out.sort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Found by fuzz/tests/manifests.rs: nested aliases ("billion laughs") in a 2 KB file
    /// expanded to 7 GB and took more than a minute before serde_yaml_ng's jump limit
    /// refused them. Now refused at once, naming the line; ordinary aliases still load.
    #[test]
    fn nested_aliases_are_refused_before_they_expand() {
        let leaf = vec!["x"; 1000].join(",");
        let mut text = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: a}}\nspec: {{containers: []}}\na0: &a0 [{leaf}]\n"
        );
        for i in 1..6 {
            let refs = vec![format!("*a{}", i - 1); 10].join(",");
            text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        let started = std::time::Instant::now();
        let e = load_manifests(Path::new("laughs.yaml"), &text).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(e.message.contains("through YAML aliases"), "{e}");
        assert!(e.line >= 1 && e.line <= 10, "{e}");

        let ok = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: &l {app: web}}\n\
                  spec:\n  containers: [{name: a, ports: [&p {containerPort: 80}, *p]}]\n\
                  x: [*l, *l]\n";
        assert_eq!(
            load_manifests(Path::new("ok.yaml"), ok)
                .unwrap()
                .objects
                .len(),
            1
        );
    }

    #[test]
    fn splits_documents_with_start_lines() {
        let text =
            "a: 1\n---\n# only a comment\n--- # sep with comment\nb: 2\nc: 3\n---\n\n...\nd: 4\n";
        let docs = split_documents(text);
        let starts: Vec<usize> = docs.iter().map(|(s, _)| *s).collect();
        assert_eq!(starts, vec![1, 5, 10]);
        assert_eq!(docs[1].1, "b: 2\nc: 3\n");
    }

    #[test]
    fn errors_name_path_and_line() {
        let path = Path::new("m/web.yaml");
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n  - port: eighty\n";
        let err = parse_manifests(path, text).expect_err("bad port");
        assert_eq!(err.line, 11, "{err}");
        assert!(
            err.to_string().starts_with("m/web.yaml:11: document 2"),
            "{err}"
        );
        let syntax = "apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n";
        let err = parse_manifests(path, syntax).expect_err("syntax");
        assert!((3..=4).contains(&err.line), "{err}");
        let convert = "---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 300.1.1.1}\n";
        let err = parse_manifests(path, convert).expect_err("bad ip");
        assert_eq!(err.line, 2, "{err}");
        assert!(
            err.message.contains("spec.clusterIPs[0]") && err.message.contains("300.1.1.1"),
            "{err}"
        );
        let not_k8s = "just: text\n";
        assert_eq!(parse_manifests(path, not_k8s).expect_err("no kind").line, 1);
    }

    #[test]
    fn ignores_unknown_kinds_and_empty_docs() {
        let text = "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n---\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";
        let objects = parse_manifests(Path::new("x.yaml"), text).expect("parses");
        assert_eq!(objects.len(), 1);
        assert_eq!(objects[0].kind(), Kind::Namespace);
    }

    #[test]
    fn bad_route_is_skipped_and_named_the_rest_loads() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: bad, namespace: shop}\nspec:\n  rules: nope\n---\n\
apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: good, namespace: shop}\nspec:\n  parentRefs: [{group: '', kind: Service, name: web}]\n---\n\
apiVersion: policy.weft.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {name: p}\nspec:\n  targetRefs: [{group: '', kind: Service, name: web}]\n";
        let loaded = load_manifests(Path::new("m/routes.yaml"), text).expect("file loads");
        let kinds: Vec<Kind> = loaded.objects.iter().map(Object::kind).collect();
        assert_eq!(
            kinds,
            [Kind::Namespace, Kind::GrpcRoute, Kind::BackendPolicy]
        );
        assert_eq!(loaded.skipped.len(), 1);
        let e = loaded.skipped[0].to_string();
        assert!(
            e.starts_with("m/routes.yaml:9: document 2: HTTPRoute shop/bad: "),
            "{e}"
        );
        assert_eq!(
            loaded.objects[2].key(),
            crate::model::ObjectKey::new("default", "p")
        );
    }

    /// A route document that stops decoding keeps the object's last good
    /// version (as kube mode keeps an object that stops converting); one
    /// never loaded stays out; removing the document removes the object.
    #[test]
    fn an_undecodable_edit_keeps_the_last_good_route() {
        let dir = std::env::temp_dir().join(format!(
            "weft-dir-keep-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("routes.yaml");
        let route = |name: &str, rules: &str| {
            format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: web}}]\n  rules: {rules}\n")
        };
        let good = "[{backendRefs: [{name: web, port: 80}]}]";
        let routes = |src: &DirSource| -> Vec<(String, String)> {
            let mut out: Vec<(String, String)> = src
                .objects()
                .into_iter()
                .filter_map(|o| match o {
                    Object::Route(r) => Some((r.meta.key.name.clone(), format!("{:?}", r.spec))),
                    _ => None,
                })
                .collect();
            out.sort();
            out
        };
        std::fs::write(&file, route("r", good)).expect("write");
        let metrics = Metrics::new();
        let mut src = DirSource::new(&dir, metrics.clone()).expect("dir");
        src.scan().expect("scan");
        let loaded = routes(&src);
        assert_eq!(loaded.len(), 1, "{loaded:?}");

        std::fs::write(
            &file,
            format!("{}---\n{}", route("r", "nope"), route("n", "nope")),
        )
        .expect("write");
        assert!(src.scan().expect("scan"));
        assert_eq!(
            routes(&src),
            loaded,
            "r keeps its last good version; n never loaded"
        );
        assert!(src.errors().is_empty(), "the file itself loads");
        assert!(metrics
            .encode()
            .contains("weft_controller_manifest_errors_total 2"));
        // Still broken after another change of the file: still kept.
        std::fs::write(&file, format!("# edited\n{}", route("r", "nope"))).expect("write");
        assert!(src.scan().expect("scan"));
        assert_eq!(routes(&src), loaded);

        std::fs::write(&file, "# no routes\n").expect("write");
        assert!(src.scan().expect("scan"));
        assert_eq!(routes(&src), []);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn network_policies_load_and_a_bad_one_fails_its_file() {
        let good = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: shop}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n";
        let loaded = load_manifests(Path::new("m/np.yaml"), good).expect("loads");
        assert_eq!(loaded.objects.len(), 1);
        assert_eq!(loaded.objects[0].kind(), Kind::NetworkPolicy);
        assert_eq!(
            loaded.objects[0].key(),
            crate::model::ObjectKey::new("shop", "deny")
        );
        let bad = format!(
            "{good}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: lan, namespace: shop}}\nspec:\n  podSelector: {{}}\n  ingress:\n  - from: [{{ipBlock: {{cidr: 10.0.0.0/16, except: [10.1.0.0/16]}}}}]\n"
        );
        let e = load_manifests(Path::new("m/np.yaml"), &bad)
            .expect_err("a policy that cannot be enforced as written fails the file")
            .to_string();
        assert!(
            e.starts_with("m/np.yaml:8: ")
                && e.contains("shop/lan")
                && e.contains("spec.ingress[0].from[0].ipBlock.except[0]")
                && e.contains("10.1.0.0/16"),
            "{e}"
        );
    }

    proptest! {
        #[test]
        fn parser_never_panics(text in "(apiVersion: v1\n|kind: Service\n|---\n|metadata:\n|  name: x\n|spec: \\{\\}\n|[ -~]{0,20}\n){0,12}") {
            let _ = parse_manifests(Path::new("p.yaml"), &text);
        }
    }
}
