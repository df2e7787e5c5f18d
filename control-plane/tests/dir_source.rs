//! The directory source against a real temporary directory: multi-document
//! files, live reload within 1 s, malformed files, deleted files.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{endpoints, eventually, service_yaml, strings, TempDir};
use weft_controller::index::Index;
use weft_controller::metrics::Metrics;
use weft_controller::source::dir::DirSource;
use weft_controller::source::Readiness;

const RELOAD: Duration = Duration::from_secs(1);

#[tokio::test]
async fn follows_edits_keeps_last_good_state_and_drops_deleted_files() {
    let dir = TempDir::new("dir");
    dir.write(
        "web.yaml",
        &service_yaml("shop", "web", "10.96.0.10", &["10.1.0.1", "10.1.0.2"]),
    );
    dir.write(
        "api.yml",
        &service_yaml("shop", "api", "10.96.0.11", &["10.1.1.1"]),
    );
    dir.write("notes.txt", "not a manifest");
    let index = Index::new();
    let metrics = Metrics::new();
    let readiness = Readiness::default();
    let source = DirSource::new(dir.path(), metrics.clone()).unwrap();
    let task = tokio::spawn(source.run(index.clone(), readiness.clone()));

    eventually("initial load", RELOAD, || readiness.is_ready()).await;
    assert_eq!(
        endpoints(&index, "web.shop:80"),
        strings(&["10.1.0.1:8080", "10.1.0.2:8080"])
    );
    assert_eq!(
        endpoints(&index, "10.96.0.11:80"),
        strings(&["10.1.1.1:8080"])
    );

    // An edit is picked up within 1 s.
    dir.write(
        "web.yaml",
        &service_yaml("shop", "web", "10.96.0.10", &["10.1.0.2", "10.1.0.3"]),
    );
    eventually("edit reloaded", RELOAD, || {
        endpoints(&index, "web.shop:80") == strings(&["10.1.0.2:8080", "10.1.0.3:8080"])
    })
    .await;

    // A malformed edit keeps the file's last good objects and is counted.
    let broken = service_yaml("shop", "web", "10.96.0.10", &["10.1.0.9"])
        .replace("port: 80,", "port: eighty,");
    dir.write("web.yaml", &broken);
    eventually("error counted", RELOAD, || {
        metrics
            .encode()
            .contains("weft_controller_manifest_errors_total 1")
    })
    .await;
    assert!(metrics
        .encode()
        .contains("weft_controller_manifest_files_invalid 1"));
    assert_eq!(
        endpoints(&index, "web.shop:80"),
        strings(&["10.1.0.2:8080", "10.1.0.3:8080"])
    );

    // Fixing it applies again, and clears the invalid gauge.
    dir.write(
        "web.yaml",
        &service_yaml("shop", "web", "10.96.0.10", &["10.1.0.4"]),
    );
    eventually("fix reloaded", RELOAD, || {
        endpoints(&index, "web.shop:80") == strings(&["10.1.0.4:8080"])
    })
    .await;
    assert!(metrics
        .encode()
        .contains("weft_controller_manifest_files_invalid 0"));

    // Deleting a file removes its objects.
    dir.remove("api.yml");
    eventually("file removal applied", RELOAD, || {
        endpoints(&index, "api.shop:80").is_none()
    })
    .await;
    assert_eq!(endpoints(&index, "10.96.0.11:80"), None);
    task.abort();
}

#[tokio::test]
async fn malformed_file_is_reported_with_path_and_line() {
    let dir = TempDir::new("bad");
    let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - port: 80\n    targetPort: [8080]\n";
    dir.write("bad.yaml", text);
    let mut source = DirSource::new(dir.path(), Metrics::new()).unwrap();
    source.scan().unwrap();
    let errors = source.errors();
    assert_eq!(errors.len(), 1);
    let err = &errors[0];
    assert!(err.path.ends_with("bad.yaml"), "{err}");
    assert_eq!(err.line, 13, "{err}");
    assert!(err.to_string().contains("bad.yaml:13: document 2"), "{err}");
    // A file that never parsed contributes nothing.
    assert!(source.objects().is_empty());
}

#[test]
fn missing_directory_is_an_error_naming_it() {
    let err = DirSource::new("/nonexistent/weft-manifests", Metrics::new()).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/weft-manifests"),
        "{err}"
    );
}

#[test]
fn example_manifests_resolve_books() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/manifests");
    let mut source = DirSource::new(&dir, Metrics::new()).unwrap();
    source.scan().unwrap();
    assert!(source.errors().is_empty(), "{:?}", source.errors());
    let index = Index::new();
    index.reset_kinds(&weft_controller::model::Kind::ALL, source.objects());
    let want = strings(&["127.0.0.1:18081", "127.0.0.1:18082"]);
    assert_eq!(endpoints(&index, "books.demo.svc.cluster.local:8080"), want);
    assert_eq!(endpoints(&index, "10.96.0.20:8080"), want);
}
