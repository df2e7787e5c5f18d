//! Delegation to the IPAM plugin named by `ipam.type` (spec section 4).
//!
//! The plugin is looked up in `CNI_PATH` and run with this invocation's
//! `CNI_*` environment (only `CNI_COMMAND` changes, per command) and the whole
//! network configuration on stdin; its stderr is ours. When the configuration
//! speaks a version the IPAM plugin does not (1.1.0 against Debian's
//! host-local, which stops at 1.0.0), the plugin hands it the configuration
//! under the newest version both support (see [`crate::version`]): the two
//! formats are the same, only `cniVersion` differs.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};

use crate::config::NetConf;
use crate::env::{vars, Command, EnvMap, Invocation};
use crate::error::{Error, ErrorObject};
use crate::result::{CniResult, VersionResult};
use crate::version;

/// The IPAM plugin of one invocation.
#[derive(Debug, Clone)]
pub struct Ipam {
    plugin: String,
    binary: PathBuf,
    env: EnvMap,
}

/// Whether a delegated STATUS or GC ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delegated {
    Ran,
    /// The IPAM plugin predates the command (it does not speak 1.1.0).
    Skipped {
        supported: Vec<String>,
    },
}

impl Ipam {
    /// Finds the IPAM plugin `conf` names in the invocation's `CNI_PATH`.
    pub fn locate(conf: &NetConf, inv: &Invocation) -> Result<Option<Ipam>, Error> {
        let Some(plugin) = conf.ipam_type.clone() else {
            return Ok(None);
        };
        if inv.path.is_empty() {
            return Err(Error::InvalidEnv {
                var: vars::PATH,
                reason: format!("not set; it must list the directories that hold the IPAM plugin {plugin:?} (field ipam.type)"),
            });
        }
        let binary = inv
            .path
            .iter()
            .map(|dir| dir.join(&plugin))
            .find(|p| p.is_file())
            .ok_or_else(|| Error::IpamNotFound {
                plugin: plugin.clone(),
                searched: inv
                    .path
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":"),
            })?;
        Ok(Some(Ipam {
            plugin,
            binary,
            env: inv.raw.clone(),
        }))
    }

    /// The plugin's name (`ipam.type`).
    pub fn name(&self) -> &str {
        &self.plugin
    }

    /// ADD: allocate addresses.
    pub fn add(&self, conf: &NetConf) -> Result<CniResult, Error> {
        let stdin = self.stdin_for(conf, Command::Add)?;
        let out = self.exec(Command::Add, &stdin)?;
        CniResult::parse(
            &out,
            &format!("the output of IPAM plugin {} on ADD", self.describe()),
        )
        .map_err(|e| Error::Ipam {
            plugin: self.describe(),
            command: "ADD".into(),
            reason: e.to_string(),
        })
    }

    /// DEL: release the attachment's addresses (idempotent in the plugin).
    pub fn del(&self, conf: &NetConf) -> Result<(), Error> {
        let stdin = self.stdin_for(conf, Command::Del)?;
        self.exec(Command::Del, &stdin).map(drop)
    }

    /// CHECK: the plugin still holds the attachment's addresses.
    pub fn check(&self, conf: &NetConf) -> Result<(), Error> {
        let stdin = self.stdin_for(conf, Command::Check)?;
        self.exec(Command::Check, &stdin).map(drop)
    }

    /// STATUS or GC, when the plugin has them.
    pub fn status_or_gc(&self, conf: &NetConf, command: Command) -> Result<Delegated, Error> {
        let supported = self.versions(&conf.cni_version)?;
        if !supported.iter().any(|v| version::has_status_and_gc(v)) {
            return Ok(Delegated::Skipped { supported });
        }
        let v = version::negotiate(&conf.cni_version, &supported)
            .unwrap_or_else(|| conf.cni_version.clone());
        self.exec(command, &conf.to_bytes_with_version(&v))?;
        Ok(Delegated::Ran)
    }

    /// The configuration as this plugin should read it. 1.0.0 is the floor
    /// every supported IPAM plugin speaks, so only a newer configuration
    /// costs a VERSION round trip.
    fn stdin_for(&self, conf: &NetConf, command: Command) -> Result<Vec<u8>, Error> {
        if conf.cni_version == version::SUPPORTED[0] {
            return Ok(conf.to_bytes_with_version(&conf.cni_version));
        }
        let supported = self.versions(&conf.cni_version)?;
        let v = version::negotiate(&conf.cni_version, &supported).ok_or_else(|| Error::Ipam {
            plugin: self.describe(),
            command: command.as_str().into(),
            reason: format!(
                "it supports CNI versions {} and none of them is compatible with cniVersion {} (weft-cni needs {} or newer)",
                supported.join(", "),
                conf.cni_version,
                version::SUPPORTED[0]
            ),
        })?;
        Ok(conf.to_bytes_with_version(&v))
    }

    fn versions(&self, ours: &str) -> Result<Vec<String>, Error> {
        let stdin = serde_json::json!({ "cniVersion": ours }).to_string();
        let out = self.exec(Command::Version, stdin.as_bytes())?;
        let v: VersionResult = serde_json::from_slice(&out).map_err(|e| Error::Ipam {
            plugin: self.describe(),
            command: "VERSION".into(),
            reason: format!("unreadable answer: {e}"),
        })?;
        Ok(v.supported_versions)
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.plugin, self.binary.display())
    }

    /// Runs the plugin with `command`; its stdout on success.
    fn exec(&self, command: Command, stdin: &[u8]) -> Result<Vec<u8>, Error> {
        let fail = |reason: String| Error::Ipam {
            plugin: self.describe(),
            command: command.as_str().into(),
            reason,
        };
        let mut cmd = Process::new(&self.binary);
        // The delegate sees exactly this invocation's CNI_* variables, also
        // when the plugin runs in-process with an environment of its own.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CNI_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(&self.env)
            .env(vars::COMMAND, command.as_str())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .map_err(|e| fail(format!("cannot run it: {e}")))?;
        if let Some(mut pipe) = child.stdin.take() {
            // A plugin that exits before reading its stdin says why in its output.
            let _ = pipe.write_all(stdin);
        }
        let out = child
            .wait_with_output()
            .map_err(|e| fail(format!("waiting for it: {e}")))?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        let reason = match serde_json::from_slice::<ErrorObject>(&out.stdout) {
            Ok(o) if o.details.is_empty() || o.details == o.msg => {
                format!("error code {}: {}", o.code, o.msg)
            }
            Ok(o) => format!("error code {}: {} ({})", o.code, o.msg, o.details),
            Err(_) => format!(
                "exited with {} and output {:?}",
                out.status,
                String::from_utf8_lossy(&out.stdout)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ),
        };
        Err(fail(reason))
    }
}
