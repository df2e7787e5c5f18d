//! `weft inject`: the injector's patch, offline, over manifests.
//!
//! Reads Kubernetes YAML from files or stdin (`-`), multi-document, and writes it to stdout
//! with every workload's pod template injected (Pods, Deployments, StatefulSets, DaemonSets,
//! ReplicaSets, Jobs, CronJobs, Lists of them). Other documents pass through unchanged. The
//! logic is `weft_injector::manifest`, the same as the admission webhook's; offline, every
//! workload is treated as if its namespace had `weft.dev/inject: enabled`.
//!
//! `weft inject deploy.yaml | kubectl apply -f -`

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::Context;
use weft_injector::manifest::inject_yaml;
use weft_injector::patch::InjectConfig;
use weft_injector::ports::PortList;

#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// Manifest files; `-` or none reads stdin.
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Inject the proxy as a classic sidecar container, for clusters older than Kubernetes
    /// 1.29 (the default is a native sidecar: an init container with restartPolicy: Always).
    #[arg(long)]
    pub classic_sidecar: bool,
    /// The CNI plugin installs the redirect: no weft-init container.
    #[arg(long)]
    pub cni: bool,
    #[arg(long, value_name = "IMAGE")]
    pub proxy_image: Option<String>,
    #[arg(long, value_name = "IMAGE")]
    pub init_image: Option<String>,
    /// The controller's destination address for the proxies (WEFT_PROXY_DESTINATION_ADDR).
    #[arg(long, value_name = "HOST:PORT")]
    pub destination_addr: Option<String>,
    /// The controller's identity address for the proxies (WEFT_PROXY_IDENTITY_ADDR).
    #[arg(long, value_name = "HOST:PORT")]
    pub identity_addr: Option<String>,
    /// The control plane's namespace: the proxies verify the controller's TLS identity in it
    /// (WEFT_PROXY_CONTROLLER_NAMESPACE; the webhook writes its release's namespace).
    #[arg(long, value_name = "NAMESPACE")]
    pub controller_namespace: Option<String>,
    /// The mesh's trust domain (WEFT_PROXY_TRUST_DOMAIN).
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The cluster's default inbound policy, the proxies' fallback until the controller
    /// answers (pods and namespaces override it with config.weft.dev/default-inbound-policy).
    #[arg(long, value_name = "POLICY")]
    pub default_inbound_policy: Option<weft_model::authz::DefaultPolicy>,
    /// Opaque ports for every proxy, besides the pods' config.weft.dev/opaque-ports.
    #[arg(long, value_name = "PORTS", default_value = "")]
    pub opaque_ports: PortList,
}

impl InjectArgs {
    pub fn config(&self) -> InjectConfig {
        let mut cfg = InjectConfig {
            native_sidecar: !self.classic_sidecar,
            cni: self.cni,
            destination_addr: self.destination_addr.clone(),
            identity_addr: self.identity_addr.clone(),
            controller_namespace: self.controller_namespace.clone(),
            trust_domain: self.trust_domain.clone(),
            default_inbound_policy: self.default_inbound_policy,
            opaque_ports: self.opaque_ports.clone(),
            ..Default::default()
        };
        if let Some(i) = &self.proxy_image {
            cfg.proxy_image = i.clone();
        }
        if let Some(i) = &self.init_image {
            cfg.init_image = i.clone();
        }
        cfg
    }
}

/// Injects every input and writes the result to `out`; errors name the input.
pub fn run(args: &InjectArgs, stdin: &mut dyn Read, out: &mut dyn Write) -> anyhow::Result<()> {
    let cfg = args.config();
    let stdin_only = [PathBuf::from("-")];
    let files = if args.files.is_empty() {
        &stdin_only[..]
    } else {
        &args.files[..]
    };
    let mut first = true;
    for file in files {
        let (name, text) = if file.as_os_str() == "-" {
            let mut s = String::new();
            stdin.read_to_string(&mut s).context("reading stdin")?;
            ("<stdin>".to_string(), s)
        } else {
            let s = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            (file.display().to_string(), s)
        };
        let injected = inject_yaml(&text, &cfg).with_context(|| name.clone())?;
        if injected.is_empty() {
            continue;
        }
        if !first {
            out.write_all(b"---\n")?;
        }
        first = false;
        out.write_all(injected.as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn args(files: &[&str]) -> InjectArgs {
        InjectArgs {
            files: files.iter().map(PathBuf::from).collect(),
            classic_sidecar: false,
            cni: false,
            proxy_image: Some("example/proxy:dev".into()),
            init_image: None,
            destination_addr: None,
            identity_addr: None,
            controller_namespace: None,
            trust_domain: "cluster.local".into(),
            default_inbound_policy: None,
            opaque_ports: PortList::default(),
        }
    }

    #[test]
    fn flags_reach_the_proxy_as_the_webhook_writes_them() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            inject: InjectArgs,
        }
        let cli = Cli::try_parse_from([
            "weft",
            "--controller-namespace",
            "mesh",
            "--trust-domain",
            "example.org",
            "--default-inbound-policy",
            "deny",
        ])
        .unwrap();
        let mut stdin =
            "kind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: app, image: app}]\n"
                .as_bytes();
        let mut out = Vec::new();
        run(&cli.inject, &mut stdin, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        for (name, value) in [
            ("WEFT_PROXY_CONTROLLER_NAMESPACE", "mesh"),
            ("WEFT_PROXY_TRUST_DOMAIN", "example.org"),
            ("WEFT_PROXY_INBOUND_DEFAULT_POLICY", "deny"),
        ] {
            let lines: Vec<&str> = text.lines().map(str::trim).collect();
            let found = lines.windows(2).any(|w| {
                w[0].trim_start_matches("- ") == format!("name: {name}")
                    && w[1] == format!("value: {value}")
            });
            assert!(found, "{name}={value} missing:\n{text}");
        }
        let err = Cli::try_parse_from(["weft", "--default-inbound-policy", "open"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("--default-inbound-policy") && err.contains("open"),
            "{err}"
        );
    }

    #[test]
    fn stdin_and_files() {
        let dir = std::env::temp_dir().join(format!("weft-cli-inject-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let svc = dir.join("svc.yaml");
        std::fs::write(&svc, "kind: Service\nmetadata: {name: web}\n").unwrap();
        let mut stdin =
            "kind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: app, image: app}]\n"
                .as_bytes();
        let mut out = Vec::new();
        run(&args(&["-", svc.to_str().unwrap()]), &mut stdin, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("image: example/proxy:dev"), "{text}");
        assert!(
            text.ends_with("---\nkind: Service\nmetadata: {name: web}\n"),
            "{text}"
        );

        let bad = dir.join("bad.yaml");
        std::fs::write(
            &bad,
            "kind: Service\n---\nkind: Deployment\nspec: {template: {spec: {containers: 1}}}\n",
        )
        .unwrap();
        let err = run(
            &args(&[bad.to_str().unwrap()]),
            &mut "".as_bytes(),
            &mut Vec::new(),
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("bad.yaml") && msg.contains("document 1 (Deployment"),
            "{msg}"
        );
        let err = run(
            &args(&["/nonexistent/x.yaml"]),
            &mut "".as_bytes(),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/x.yaml"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
