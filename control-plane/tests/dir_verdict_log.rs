//! Directory mode reports each route's verdict in the log (what kube mode
//! writes into `status`): the `weft-controller` binary on a manifest
//! directory, its stderr read line by line.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, service_yaml, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_weft-controller");

/// The controller's stderr lines, collected by a thread.
struct Logs {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Logs {
    fn start(dir: &TempDir) -> Logs {
        let (dest, ident, admin) = (free_port(), free_port(), free_port());
        let mut child = Command::new(BIN)
            .args([
                "--source",
                &format!("dir:{}", dir.path().display()),
                "--destination-addr",
                &dest.to_string(),
                "--identity-addr",
                &ident.to_string(),
                "--admin-addr",
                &admin.to_string(),
                "--insecure-plaintext",
            ])
            .env("WEFT_CONTROLLER_LOG", "warn,weft_controller=info")
            .env_remove("WEFT_CONTROLLER_LOG_JSON")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        Logs { child, lines }
    }

    /// The lines that contain every one of `parts`.
    fn matching(&self, parts: &[&str]) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .cloned()
            .collect()
    }

    /// Waits up to 10 s for a line with every one of `parts`.
    fn wait_for(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = self.matching(parts).pop() {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {parts:?} within 10 s; the log:\n{}",
                self.lines.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn route(name: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: web}}]\n  rules:\n{rules}\n"
    )
}

const GOOD: &str = "  - backendRefs: [{name: web, port: 80}]";
const BAD_REGEX: &str = "  - matches: [{path: {type: RegularExpression, value: '/a(b'}}]\n    backendRefs: [{name: web, port: 80}]";

#[test]
fn verdicts_are_logged_once_with_file_object_and_reason() {
    let dir = TempDir::new("verdict-log");
    dir.write(
        "web.yaml",
        &service_yaml("shop", "web", "10.96.0.10", &["10.1.0.1"]),
    );
    dir.write("bad.yaml", &route("bad", BAD_REGEX));
    dir.write("live.yaml", &route("live", GOOD));
    let logs = Logs::start(&dir);
    let bad_file = dir.path().join("bad.yaml").display().to_string();
    let live_file = dir.path().join("live.yaml").display().to_string();

    // A route that was never valid: file, object, Accepted=False and the
    // reason naming the field and the value.
    let bad = [
        bad_file.as_str(),
        "HTTPRoute shop/bad",
        "Accepted=False UnsupportedValue",
        "spec.rules[0].matches[0].path.value is \"/a(b\", not a valid regular expression",
    ];
    let line = logs.wait_for(&bad);
    assert!(line.contains("WARN"), "{line}");
    assert!(!line.contains("stays in force"), "never accepted: {line}");
    let line = logs.wait_for(&[live_file.as_str(), "HTTPRoute shop/live", "Accepted=True"]);
    assert!(line.contains("INFO"), "{line}");

    // A live route edited into an invalid one: not accepted, and the log
    // says its last accepted version stays in force.
    dir.write("live.yaml", &route("live", BAD_REGEX));
    let live_broken = [
        live_file.as_str(),
        "HTTPRoute shop/live",
        "Accepted=False UnsupportedValue",
        "the last accepted version stays in force",
    ];
    logs.wait_for(&live_broken);

    // Rescans (an unrelated file changes, the directory is reloaded) do
    // not repeat a verdict that did not change.
    let other = dir.path().join("other.yaml").display().to_string();
    for i in 0..3 {
        let seen = logs.matching(&["loaded manifests", &other]).len();
        dir.write(
            "other.yaml",
            &format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: other-{i}}}\n"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while logs.matching(&["loaded manifests", &other]).len() == seen {
            assert!(Instant::now() < deadline, "other.yaml was not reloaded");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(logs.matching(&bad).len(), 1, "{:?}", logs.matching(&bad));
    assert_eq!(
        logs.matching(&live_broken).len(),
        1,
        "{:?}",
        logs.matching(&live_broken)
    );
    assert_eq!(
        logs.matching(&["HTTPRoute shop/live", "Accepted=True"])
            .len(),
        1
    );
}
