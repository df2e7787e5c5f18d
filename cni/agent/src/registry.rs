//! The endpoints this node's plugin registered, and the policy id table, persisted in the
//! state directory so that a restarted agent keeps serving the same endpoints with the same
//! ids (the pinned maps keep enforcing meanwhile).
//!
//! One JSON file, `<state-dir>/state.json`, replaced atomically (written to a temporary file
//! in the same directory, synced, renamed): a crash leaves the old or the new state, never
//! half of one.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use weft_model::ObjectKey;

use crate::policy::{LocalEndpoint, PolicyIdTable};

/// The state file's name in the state directory.
pub const STATE_FILE: &str = "state.json";
const STATE_VERSION: u32 = 1;

/// How CNI names an attachment: (container id, interface name in the pod).
pub type AttachmentKey = (String, String);

/// One registered endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub ep_id: u32,
    pub ips: Vec<IpAddr>,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
}

impl Record {
    pub fn key(&self) -> AttachmentKey {
        (self.container_id.clone(), self.ifname.clone())
    }

    /// The pod, when the plugin named it (namespace and name both given).
    pub fn pod(&self) -> Option<ObjectKey> {
        match (&self.pod_namespace, &self.pod_name) {
            (Some(ns), Some(name)) if !ns.is_empty() && !name.is_empty() => {
                Some(ObjectKey::new(ns, name))
            }
            _ => None,
        }
    }

    pub fn local(&self) -> LocalEndpoint {
        LocalEndpoint {
            ep_id: self.ep_id,
            pod: self.pod(),
            ips: self.ips.clone(),
        }
    }

    /// `namespace/name`, or the container id when the pod is not named.
    pub fn display_name(&self) -> String {
        match self.pod() {
            Some(k) => format!("{}/{}", k.namespace, k.name),
            None => format!("container {}", self.container_id),
        }
    }
}

/// Everything persisted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub endpoints: BTreeMap<String, Record>,
    /// The last endpoint id handed out.
    pub last_ep_id: u32,
    pub policy_ids: PolicyIdTable,
}

/// The map key of an attachment in [`State::endpoints`] (JSON keys are strings).
pub fn state_key(container_id: &str, ifname: &str) -> String {
    format!("{container_id}/{ifname}")
}

impl State {
    pub fn get(&self, container_id: &str, ifname: &str) -> Option<&Record> {
        self.endpoints.get(&state_key(container_id, ifname))
    }

    pub fn insert(&mut self, record: Record) {
        self.endpoints
            .insert(state_key(&record.container_id, &record.ifname), record);
    }

    pub fn remove(&mut self, container_id: &str, ifname: &str) -> Option<Record> {
        self.endpoints.remove(&state_key(container_id, ifname))
    }

    /// A new endpoint id: the one after the last handed out, skipping 0 and ids in use.
    pub fn next_ep_id(&mut self) -> u32 {
        loop {
            self.last_ep_id = self.last_ep_id.wrapping_add(1);
            let id = self.last_ep_id;
            if id != 0 && !self.endpoints.values().any(|r| r.ep_id == id) {
                return id;
            }
        }
    }

    pub fn by_ifindex(&self, ifindex: u32) -> Option<&Record> {
        self.endpoints.values().find(|r| r.host_ifindex == ifindex)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {}: {source}; is --state-dir writable?", .path.display())]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading the agent state {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the agent state {} is not valid ({source}); move it away to start with no endpoints \
         (the plugin's next ADDs register them again)",
        .path.display()
    )]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("writing the agent state {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Reads and writes `state.json` in a directory.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Creates the directory if needed.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StateError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| StateError::Dir {
            path: dir.clone(),
            source,
        })?;
        Ok(Store { dir })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The stored state; empty when there is none yet.
    pub fn load(&self) -> Result<State, StateError> {
        let path = self.path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(State {
                    version: STATE_VERSION,
                    ..State::default()
                })
            }
            Err(source) => return Err(StateError::Read { path, source }),
        };
        serde_json::from_slice(&bytes).map_err(|source| StateError::Parse { path, source })
    }

    /// Replaces the stored state atomically.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let path = self.path();
        let tmp = self.dir.join(format!(".{STATE_FILE}.tmp"));
        let fail = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        let mut state = state.clone();
        state.version = STATE_VERSION;
        let bytes = serde_json::to_vec_pretty(&state).map_err(|e| fail(e.into()))?;
        let mut f = std::fs::File::create(&tmp).map_err(fail)?;
        f.write_all(&bytes).map_err(fail)?;
        f.sync_all().map_err(fail)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(fail)?;
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(c: &str, ifindex: u32, ep_id: u32) -> Record {
        Record {
            container_id: c.into(),
            ifname: "eth0".into(),
            netns: format!("/run/netns/{c}"),
            host_ifname: format!("lxc{c}"),
            host_ifindex: ifindex,
            ep_id,
            ips: vec!["10.1.0.2".parse().expect("ip")],
            pod_namespace: Some("a".into()),
            pod_name: Some(format!("pod-{c}")),
        }
    }

    #[test]
    fn state_round_trips_atomically_and_ids_are_not_reused_while_in_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path().join("agent")).expect("open");
        let mut state = store.load().expect("empty state");
        assert!(state.endpoints.is_empty());
        let id1 = state.next_ep_id();
        state.insert(record("c1", 7, id1));
        let id2 = state.next_ep_id();
        assert_ne!(id1, id2);
        state.insert(record("c2", 8, id2));
        store.save(&state).expect("save");
        let back = store.load().expect("load");
        assert_eq!(
            back,
            State {
                version: 1,
                ..state.clone()
            }
        );
        assert_eq!(back.by_ifindex(8).map(|r| r.ep_id), Some(id2));
        assert_eq!(
            back.get("c1", "eth0").and_then(Record::pod),
            Some(ObjectKey::new("a", "pod-c1"))
        );
        let names: Vec<_> = std::fs::read_dir(store.dir())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from(STATE_FILE)],
            "no temp file left"
        );

        // Wrapping skips 0 and ids in use.
        state.last_ep_id = u32::MAX;
        state.insert(record("c3", 9, 1));
        assert_eq!(state.next_ep_id(), 2.max(id2 + 1));
    }

    #[test]
    fn a_corrupt_state_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        std::fs::write(store.path(), b"{not json").expect("write");
        let err = store.load().expect_err("corrupt").to_string();
        assert!(
            err.contains("state.json") && err.contains("not valid"),
            "{err}"
        );
    }
}
