#!/usr/bin/env bash
# Checks the Helm chart (charts/kcloud and its subcharts agent, aggregator):
#   - helm lint --strict, for the default values and each charts/kcloud/ci/*.yaml;
#   - helm template for each, and every rendered object validated strictly against
#     the Kubernetes JSON schemas of the oldest version we support (1.33) and of the
#     newest one kubernetes-validate ships. CRD kinds without a built-in schema are
#     skipped by name (SKIP_KINDS, with a note); any other unknown kind fails;
#   - the chart's contracts with the binaries: every --flag and KCLOUD_* variable it
#     renders exists in agent/src/config.rs or aggregator/src/config.rs, and the
#     rendered settings file holds only keys the aggregator's Settings
#     (aggregator/core/src/settings.rs, user.rs) accepts (it
#     refuses unknown keys at start); the recommended labels on every object;
#   - generated Secrets differ between renders (no fixed default), bad values are
#     refused, and every PromQL query of the Grafana dashboard parses (promtool).
# Installs what it needs when missing: helm and kubectl (scripts/install-helm.sh),
# kubernetes-validate from PyPI, promtool with apt-get. Prints "chart: N passed, M failed"; exits 0 only if M is 0.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> Helm chart: lint, render, validate ($0)"

CHART=charts/kcloud
K8S_OLDEST=1.33.0
# Custom resources whose schemas live in their operators' CRDs, not in Kubernetes'.
SKIP_KINDS="monitoring.coreos.com/ServiceMonitor monitoring.coreos.com/PrometheusRule"

apt_install() {
  echo "==> installing: $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- tools ---------------------------------------------------------------------------
HELM=$(./scripts/install-helm.sh)
KUBECTL="$(dirname "$(dirname "$HELM")")/kubectl/kubectl"
if ! python3 -c 'import kubernetes_validate, yaml, tomllib' 2>/dev/null; then
  echo "==> pip install kubernetes-validate"
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate ||
    # A distribution's Python (PEP 668) refuses plain installs.
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages \
      kubernetes-validate
fi
command -v promtool >/dev/null || apt_install prometheus
K8S_NEWEST=$(python3 -c 'import kubernetes_validate.utils as u; print(u.latest_version())')
kubectl_version=$("$KUBECTL" version --client -o json |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])')
validate_version=$(python3 -c 'import kubernetes_validate.version as v; print(v.__version__)')
echo "==> helm $("$HELM" version --short), kubectl $kubectl_version," \
  "kubernetes-validate $validate_version (Kubernetes $K8S_OLDEST and $K8S_NEWEST)"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# --- helpers in Python ---------------------------------------------------------------
# validate.py VERSION FILE: strict schema validation of every object in FILE.
cat >"$WORK/validate.py" <<'PY'
import functools, sys
import yaml
import kubernetes_validate.utils as kv

version, path, skip = sys.argv[1], sys.argv[2], set(sys.argv[3].split())
# The schema files are big and the same for every object: read each once.
kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)

class UniqueKeys(yaml.SafeLoader):
    """A duplicate key is a template bug that YAML parsers silently resolve."""
    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)

failed = 0
try:
    with open(path) as f:
        docs = [d for d in yaml.load_all(f, Loader=UniqueKeys) if d]
except yaml.YAMLError as e:
    sys.exit(f"    {path}: {e}")
for obj in docs:
    kind, api = obj.get("kind", "?"), obj.get("apiVersion", "?")
    name = f'{kind}/{obj.get("metadata", {}).get("name", "?")}'
    if f'{api.split("/")[0]}/{kind}' in skip:
        print(f"    note: {name} ({api}) skipped: a CRD kind, no built-in schema")
        continue
    try:
        kv.validate(obj, version, strict=True)
    except kv.ValidationError as e:
        failed += 1
        where = ".".join(str(p) for p in e.path)
        print(f"    {name}: {where}: {e.message}")
    except kv.SchemaNotFoundError as e:
        failed += 1
        print(f"    {name}: {e.message}")
print(f"    {len(docs)} objects, {failed} invalid against Kubernetes {version}")
sys.exit(1 if failed else 0)
PY

# contracts.py FILE: the chart against the binaries' own configuration code.
cat >"$WORK/contracts.py" <<'PY'
import re, sys, tomllib
import yaml

def struct_fields(src, name):
    body = re.search(r"pub struct %s \{(.*?)\n\}" % name, src, re.S).group(1)
    return re.findall(r"^\s*pub (\w+):", body, re.M)

def cli(path):
    src = open(path).read()
    body = re.search(r"pub struct Config \{(.*?)\n\}", src, re.S).group(1)
    flags = {"--" + f.replace("_", "-") for f in re.findall(r"^\s*pub (\w+):", body, re.M)}
    envs = set(re.findall(r'env = "(\w+)"', body))
    return src, flags, envs

binaries = {"agent": cli("agent/src/config.rs"), "aggregator": cli("aggregator/src/config.rs")}
# The settings file's structs (serde), apart from the command line.
SETTINGS_SRC = open("aggregator/core/src/settings.rs").read() + open("aggregator/core/src/user.rs").read()
# Read outside clap: the Downward API's NODE_NAME (agent), tracing's filter, and the
# NVIDIA container toolkit's variables.
OTHER_ENV = {"NODE_NAME", "RUST_LOG", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"}
# Rendered ahead of the code that reads them; clap ignores unknown variables.
PENDING_ENV = {"KCLOUD_PROMETHEUS_URL": "issue 6 (Prometheus integration)"}
LABELS = ["app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
          "app.kubernetes.io/component", "app.kubernetes.io/part-of",
          "app.kubernetes.io/managed-by", "helm.sh/chart"]

errors, notes = [], set()
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
seen = set()
for obj in docs:
    meta = obj["metadata"]
    ident = (obj["kind"], meta.get("namespace", ""), meta["name"])
    name = "%s/%s" % (obj["kind"], meta["name"])
    if ident in seen:
        errors.append(f"{name}: rendered twice in namespace {ident[1]!r}")
    seen.add(ident)
    labels = meta.get("labels") or {}
    missing = [l for l in LABELS if l not in labels]
    if missing:
        errors.append(f"{name}: missing labels {missing}")
    if labels.get("app.kubernetes.io/part-of") != "kcloud":
        errors.append(f"{name}: app.kubernetes.io/part-of is not kcloud")

    pod = obj.get("spec", {}).get("template", {}).get("spec")
    if pod:
        component = labels.get("app.kubernetes.io/component")
        src, flags, envs = binaries[component]
        tmpl_labels = obj["spec"]["template"]["metadata"].get("labels") or {}
        if [l for l in LABELS if l not in tmpl_labels]:
            errors.append(f"{name}: pod template lacks the recommended labels")
        for c in pod["containers"]:
            for arg in c.get("args", []):
                flag = arg.split("=", 1)[0]
                if flag.startswith("--") and flag not in flags:
                    errors.append(f"{name}: {flag} is not a kcloud-{component} flag")
            for e in c.get("env", []):
                n = e["name"]
                if n in envs or n in OTHER_ENV:
                    continue
                if n in PENDING_ENV:
                    notes.add(f"{n} is not read by kcloud-{component} yet: {PENDING_ENV[n]}")
                else:
                    errors.append(f"{name}: env {n} is not read by kcloud-{component}")
            res = c.get("resources", {})
            if not res.get("requests", {}).get("cpu") or not res.get("limits", {}).get("memory"):
                errors.append(f"{name}: {c['name']} needs a CPU request and a memory limit")
            if not (c.get("livenessProbe") and c.get("readinessProbe")):
                errors.append(f"{name}: {c['name']} needs liveness and readiness probes")
            if not c.get("securityContext", {}).get("readOnlyRootFilesystem"):
                errors.append(f"{name}: {c['name']} root filesystem is writable")

    if obj["kind"] == "ConfigMap" and "kcloud.toml" in obj.get("data", {}):
        src = SETTINGS_SRC
        try:
            settings = tomllib.loads(obj["data"]["kcloud.toml"])
            tomllib.loads(obj["data"].get("cluster.toml", ""))
        except tomllib.TOMLDecodeError as e:
            errors.append(f"{name}: invalid TOML: {e}")
            continue
        # serde(deny_unknown_fields) on every struct: an unknown key stops the binary.
        allowed = {"": struct_fields(src, "Settings"),
                   "default_quota": struct_fields(src, "DefaultQuota"),
                   "preset": struct_fields(src, "Preset"),
                   "images": struct_fields(src, "Images"),
                   "kubernetes": struct_fields(src, "KubernetesSettings"),
                   "pinning": struct_fields(src, "Pinning"),
                   "toleration": struct_fields(src, "Toleration"),
                   "queue": struct_fields(src, "QueueSettings"),
                   "reservations": struct_fields(src, "ReservationSettings"),
                   "culling": struct_fields(src, "Culling"),
                   "oidc": struct_fields(src, "OidcSettings")}
        def known(table, where, keys):
            for key in keys:
                if key not in allowed[table]:
                    errors.append(f"{name}: kcloud.toml: {where}.{key} unknown")
        known("images", "images", settings.get("images", {}))
        known("queue", "queue", settings.get("queue", {}))
        known("reservations", "reservations", settings.get("reservations", {}))
        known("culling", "culling", settings.get("culling", {}))
        known("oidc", "oidc", settings.get("oidc", {}))
        kube = settings.get("kubernetes", {})
        known("kubernetes", "kubernetes", kube)
        known("pinning", "kubernetes.pinning", kube.get("pinning", {}))
        for i, t in enumerate(kube.get("pinning", {}).get("tolerations", [])):
            known("toleration", f"kubernetes.pinning.tolerations[{i}]", t)
        if kube.get("pinning", {}).get("mode") not in ("env", "dra"):
            errors.append(f"{name}: kcloud.toml: kubernetes.pinning.mode must be env or dra")
        for key in settings:
            if key not in allowed[""]:
                errors.append(f"{name}: kcloud.toml: unknown top-level key {key!r}")
        for key, value in settings.get("default_quota", {}).items():
            if key not in allowed["default_quota"] or not isinstance(value, int) or value < 0:
                errors.append(f"{name}: kcloud.toml: default_quota.{key} = {value!r}")
        for preset, p in settings.get("presets", {}).items():
            for key in p:
                if key not in allowed["preset"]:
                    errors.append(f"{name}: kcloud.toml: presets.{preset}.{key} unknown")
            if not (isinstance(p.get("cpu_millis"), int) and p["cpu_millis"] > 0
                    and isinstance(p.get("memory_bytes"), int) and p["memory_bytes"] >= 64 << 20):
                errors.append(f"{name}: kcloud.toml: presets.{preset} out of range")

for n in sorted(notes):
    print("    note:", n)
for e in errors:
    print("   ", e)
print(f"    {len(docs)} objects, {len(errors)} contract errors")
sys.exit(1 if errors else 0)
PY

# secrets.py A B: every generated Secret value differs between two renders.
cat >"$WORK/secrets.py" <<'PY'
import sys, yaml
def secrets(path):
    return {(d["metadata"]["name"], k): v for d in yaml.safe_load_all(open(path))
            if d and d["kind"] == "Secret" for k, v in d.get("data", {}).items()}
a, b = secrets(sys.argv[1]), secrets(sys.argv[2])
same = [f"{n}/{k}" for (n, k), v in a.items() if b.get((n, k)) == v]
print(f"    {len(a)} generated values; the same in both renders: {same or 'none'}")
sys.exit(1 if same or len(a) < 3 else 0)
PY

# dashboard.py JSON RULES: the dashboard's queries as a rules file for promtool, after
# replacing Grafana's variables; also checks that it uses the series it is built on.
cat >"$WORK/dashboard.py" <<'PY'
import json, sys, yaml
dash = json.load(open(sys.argv[1]))
exprs = []
def walk(panels):
    for p in panels:
        walk(p.get("panels", []))
        for t in p.get("targets", []):
            exprs.append((p["title"], t["expr"]))
walk(dash["panels"])
text = "\n".join(e for _, e in exprs)
needed = ["DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_GPU_TEMP",
          "DCGM_FI_DEV_POWER_USAGE", "kcloud_mig_instance_info", "kcloud_host_cpu_utilization_ratio",
          "kcloud_host_memory_used_bytes", "kcloud_gpu_allocated", "GPU_I_PROFILE", "GPU_I_ID"]
missing = [n for n in needed if n not in text]
names = [v["name"] for v in dash["templating"]["list"]]
if missing or "Hostname" not in names:
    sys.exit(f"    dashboard lacks {missing} / template variables {names}")
subst = lambda e: e.replace("$__rate_interval", "5m").replace("$Hostname", ".*")
rules = {"groups": [{"name": "dashboard", "rules": [
    {"record": f"dashboard:query_{i}", "expr": subst(e)} for i, (_, e) in enumerate(exprs)]}]}
yaml.safe_dump(rules, open(sys.argv[2], "w"))
print(f"    {len(exprs)} queries")
PY

# --- checks --------------------------------------------------------------------------
passed=0
failed=0
check() { # check NAME COMMAND...: runs COMMAND, shows its output only when it fails
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then
    passed=$((passed + 1))
    echo "ok   $name"
    grep -E '^ +note:' <<<"$out" || true
  else
    failed=$((failed + 1))
    echo "FAIL $name"
    tail -40 <<<"$out" | sed 's/^/    /'
  fi
}
render() { # render OUT [helm args...]
  local out=$1
  shift
  "$HELM" template kcloud "$CHART" --namespace kcloud "$@" >"$out"
}
refused() { # refused [helm args...]: helm template must fail
  if "$HELM" template kcloud "$CHART" --namespace kcloud "$@" >/dev/null 2>&1; then
    echo "rendered, but should have been refused: $*"
    return 1
  fi
}

shapes=(default)
for f in "$CHART"/ci/*-values.yaml; do shapes+=("$f"); done

for shape in "${shapes[@]}"; do
  label=$(basename "$shape" .yaml)
  args=()
  [[ $shape == default ]] || args=(--values "$shape")
  out="$WORK/$label.yaml"
  check "$label: helm lint --strict" "$HELM" lint --strict "$CHART" "${args[@]}"
  if check "$label: helm template" render "$out" "${args[@]}"; then
    check "$label: Kubernetes $K8S_OLDEST schemas (strict)" \
      python3 "$WORK/validate.py" "$K8S_OLDEST" "$out" "$SKIP_KINDS"
    check "$label: Kubernetes $K8S_NEWEST schemas (strict)" \
      python3 "$WORK/validate.py" "$K8S_NEWEST" "$out" "$SKIP_KINDS"
    check "$label: flags, env, settings file, labels" python3 "$WORK/contracts.py" "$out"
  fi
done

render "$WORK/again.yaml"
check "generated Secrets differ between installs (no fixed default)" \
  python3 "$WORK/secrets.py" "$WORK/default.yaml" "$WORK/again.yaml"
bad_values() {
  refused --set aggregator.kubernetes.pinning.mode=cuda &&
    refused --set 'aggregator.kubernetes.pinning.tolerations[0].operator=Maybe' &&
    refused --set aggregator.kubernetes.runAsUser=0 &&
    refused --set aggregator.settings.default_quota.unlimited=1 &&
    refused --set aggregator.settings.presets.tiny.cpu_millis=0 &&
    refused --set 'aggregator.nfsShares[0].name=x' &&
    refused --set 'aggregator.userOrigins.pattern=https://users.example.org' &&
    refused --set 'aggregator.userOrigins.pattern=https://{user}.x.org/path' &&
    refused --set 'aggregator.trustedProxies[0]=ingress-nginx' &&
    refused --set aggregator.tpyo=1 &&
    refused --set aggregator.logFormat=xml &&
    refused --set agent.interval=soon &&
    refused --set aggregator.oidc.localAccounts=maybe &&
    refused --set 'aggregator.kubernetes.pinning.tolerations[0].operator=Exists' \
      --set 'aggregator.kubernetes.pinning.tolerations[0].value=x'
}
# The users' origins: the wildcard Ingress and the variables the binary reads.
user_origins() {
  python3 - "$WORK/ingress-values.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
users = [d for d in docs if d["kind"] == "Ingress" and d["metadata"]["name"].endswith("-users")]
assert len(users) == 1, "one Ingress for users' origins"
spec = users[0]["spec"]
assert spec["rules"][0]["host"] == "*.users.kcloud.example.org", spec
assert spec["tls"] == [{"secretName": "kcloud-users-wildcard-tls",
                        "hosts": ["*.users.kcloud.example.org"]}], spec
env = {e["name"]: e.get("value") for d in docs if d["kind"] == "Deployment"
       for c in d["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
assert env["KCLOUD_USER_ORIGIN"] == "https://{user}.users.kcloud.example.org", env
assert env["KCLOUD_TRUSTED_PROXIES"] == "10.244.0.0/16,192.0.2.10", env
print("    wildcard Ingress, TLS and environment as configured")
PY
}
dashboard() {
  python3 "$WORK/dashboard.py" "$CHART/dashboards/kcloud-gpus.json" "$WORK/rules.yaml" &&
    promtool check rules "$WORK/rules.yaml"
}
check "values.schema.json files are what scripts/chart-schema.py writes" \
  python3 scripts/chart-schema.py --check
check "bad values are refused" bad_values
check "users' origins: wildcard Ingress and environment" user_origins
check "dashboard queries parse (promtool)" dashboard
# The alert rules as the chart renders them, and their unit tests.
alerts() {
  python3 - "$WORK/servicemonitor-values.yaml" "$WORK/alerts.yaml" <<'PY' &&
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
rules = [d for d in docs if d["kind"] == "PrometheusRule"]
assert len(rules) == 1, "one PrometheusRule"
names = [r["alert"] for g in rules[0]["spec"]["groups"] for r in g["rules"]]
for want in ["KcloudAgentDown", "KcloudNvmlDown", "KcloudGpuLost", "KcloudNodeStale",
             "KcloudAllocationNearCapacity", "KcloudQueueWaitLong", "KcloudAllocatedIdleGpus"]:
    assert want in names, f"{want} missing from {names}"
yaml.safe_dump(rules[0]["spec"], open(sys.argv[2], "w"))
print(f"    {len(names)} alerts rendered")
PY
    promtool check rules "$WORK/alerts.yaml" &&
    (cd "$CHART/tests" && promtool test rules alerts-test.yaml)
}
check "alert rules render, parse and pass their unit tests (promtool)" alerts

echo "chart: $passed passed, $failed failed"
((failed == 0))
