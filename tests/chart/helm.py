#!/usr/bin/env python3
"""Runs real Helm (helm-sdkpy, which bundles Helm's Go library) on charts/weft for
tests/tests/chart.rs.

    python3 tests/chart/helm.py CHART_DIR NAMESPACE OVERRIDES_JSON

OVERRIDES_JSON is a JSON object deep-merged into the chart's values.yaml. Prints one JSON
object: {"lint": <Helm's lint result>, "manifest": <the rendered templates>}.

Lint: helm-sdkpy's Lint takes only a chart directory, so the chart is copied to a temporary
directory whose values.yaml is the merged values; Helm's linter then renders the templates and
checks them, Chart.yaml and values.schema.json.

Render: helm-sdkpy has no `helm template` or dry run, so the release is installed against a
minimal in-process Kubernetes API (discovery for the kinds the chart uses, 404 for every
object, creates echoed back, the release Secret accepted) and the release's manifest is printed:
Helm's own rendering, schema validation included (an invalid value fails the install).

Exit status: 0 done; 3 helm_sdkpy cannot be imported (the Rust test skips or, under CI=true,
fails); 1 anything else, with the reason on stderr.
"""

import asyncio
import copy
import json
import shutil
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

try:
    import helm_sdkpy
    import yaml
except ImportError as e:  # pragma: no cover - the environment decides
    print(f"helm.py: {e}: install with `pip install --ignore-requires-python helm-sdkpy`",
          file=sys.stderr)
    sys.exit(3)

# The API groups and resources the chart creates (plural, kind, namespaced).
RESOURCES = {
    "v1": [("configmaps", "ConfigMap", True), ("secrets", "Secret", True),
           ("services", "Service", True), ("serviceaccounts", "ServiceAccount", True),
           ("namespaces", "Namespace", False)],
    "apps/v1": [("deployments", "Deployment", True), ("daemonsets", "DaemonSet", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "rbac.authorization.k8s.io/v1": [("clusterroles", "ClusterRole", False),
                                     ("clusterrolebindings", "ClusterRoleBinding", False),
                                     ("roles", "Role", True), ("rolebindings", "RoleBinding", True)],
    "admissionregistration.k8s.io/v1": [
        ("mutatingwebhookconfigurations", "MutatingWebhookConfiguration", False)],
    "apiextensions.k8s.io/v1": [
        ("customresourcedefinitions", "CustomResourceDefinition", False)],
    "monitoring.coreos.com/v1": [("podmonitors", "PodMonitor", True),
                                 ("prometheusrules", "PrometheusRule", True)],
    "cert-manager.io/v1": [("certificates", "Certificate", True), ("issuers", "Issuer", True)],
}


class FakeApi(BaseHTTPRequestHandler):
    """Just enough of the API server for `helm install` without waiting."""

    created = {}

    def log_message(self, *args):
        pass

    def reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/version":
            return self.reply(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0"})
        if path == "/api":
            return self.reply(200, {"kind": "APIVersions", "versions": ["v1"],
                                    "serverAddressByClientCIDRs": []})
        if path == "/apis":
            groups = []
            for gv in RESOURCES:
                if "/" in gv:
                    g, v = gv.split("/")
                    ver = {"groupVersion": gv, "version": v}
                    groups.append({"name": g, "versions": [ver], "preferredVersion": ver})
            return self.reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        gv = path[len("/api/"):] if path.startswith("/api/") else path[len("/apis/"):]
        if gv in RESOURCES:
            return self.reply(200, {
                "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                "resources": [{"name": n, "singularName": "", "namespaced": ns, "kind": k,
                               "verbs": ["create", "delete", "get", "list", "patch",
                                         "update", "watch"]}
                              for n, k, ns in RESOURCES[gv]]})
        if path in self.created:
            return self.reply(200, self.created[path])
        parts = path.strip("/").split("/")
        rest = parts[2:] if parts[0] == "api" else parts[3:]
        if len(rest) in (1, 3):  # a collection: empty
            return self.reply(200, {"kind": "List", "apiVersion": "v1",
                                    "metadata": {"resourceVersion": "1"}, "items": []})
        return self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                "reason": "NotFound", "code": 404, "message": "not found"})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if "json" not in self.headers.get("Content-Type", ""):
            # The release record (a protobuf Secret): accepted, not kept.
            return self.reply(201 if self.command == "POST" else 200, {
                "kind": "Secret", "apiVersion": "v1",
                "metadata": {"name": "release", "uid": "u", "resourceVersion": "1"}})
        obj = json.loads(raw)
        meta = obj.setdefault("metadata", {})
        meta.update({"uid": "u", "resourceVersion": "1"})
        if obj.get("kind") == "CustomResourceDefinition":
            obj["status"] = {"conditions": [
                {"type": "Established", "status": "True"},
                {"type": "NamesAccepted", "status": "True"}],
                "acceptedNames": obj.get("spec", {}).get("names", {})}
        path = self.path.split("?")[0]
        if self.command == "POST":
            path = f"{path}/{meta.get('name')}"
        self.created[path] = obj
        return self.reply(201 if self.command == "POST" else 200, obj)

    do_PUT = do_POST
    do_PATCH = do_POST


def merge(base, over):
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def main():
    chart, namespace, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    work = Path(tempfile.mkdtemp(prefix="weft-chart-"))
    try:
        copy_dir = work / "weft"
        shutil.copytree(chart, copy_dir)
        values = yaml.safe_load((copy_dir / "values.yaml").read_text())
        (copy_dir / "values.yaml").write_text(yaml.safe_dump(merge(values, overrides)))
        lint = asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration(namespace=namespace))
                           .run(str(copy_dir)))

        server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        kubeconfig = yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {
                "server": f"http://127.0.0.1:{server.server_address[1]}"}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
            "contexts": [{"name": "fake", "context": {
                "cluster": "fake", "user": "fake", "namespace": namespace}}]})
        config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=kubeconfig)
        # The chart as committed plus the overrides, as `helm install -f` would give them.
        release = asyncio.run(helm_sdkpy.Install(config).run(
            "weft", chart, values=overrides, wait=False, timeout=60))
        server.shutdown()
        json.dump({"lint": lint, "manifest": release["manifest"]}, sys.stdout)
    except Exception as e:
        print(f"helm.py: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
