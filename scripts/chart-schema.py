#!/usr/bin/env python3
"""Writes values.schema.json for charts/kcloud and its subcharts from their
values.yaml (the source of truth for what exists) plus the constraints below (what a
value may be). Helm validates values against the schema on lint, template, install
and upgrade, so a typo'd key or a wrong type is refused with a message naming it.

Every object in values.yaml is closed (no unknown keys) except the free-form maps
listed in FREE; a key whose default is null takes any value. scripts/check-chart.sh
checks that the committed schemas are what this script writes.

Usage: scripts/chart-schema.py [--check]
"""
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHARTS = {
    "kcloud": ROOT / "charts/kcloud",
    "agent": ROOT / "charts/kcloud/charts/agent",
    "aggregator": ROOT / "charts/kcloud/charts/aggregator",
}

# Maps and lists whose content Kubernetes or the user decides (checked by Kubernetes,
# or free by design): any content.
FREE = {
    "*": {"global", "resources", "podSecurityContext", "securityContext", "nodeSelector",
          "affinity", "tolerations", "podAnnotations", "podLabels", "extraEnv",
          "startupProbe", "livenessProbe", "readinessProbe", "updateStrategy",
          "serviceAccount.annotations", "serviceMonitor.labels", "service.annotations"},
    "kcloud": {"agent", "aggregator", "prometheusRule.labels", "grafanaDashboard.labels"},
    "agent": set(),
    "aggregator": {"ingress.annotations", "ingress.hosts", "ingress.tls",
                   "metrics.serviceMonitor.labels", "networkPolicy.prometheus",
                   "networkPolicy.extraIngress", "settings.queue.weights",
                   "persistence.accessModes",
                   "global.imagePullSecrets"},
}

DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w)?)+$"}
LOG_FORMAT = {"type": "string", "enum": ["text", "json"]}
PULL = {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]}
DNS_LABEL = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
TOLERATION = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "key": {"type": "string"},
        "operator": {"type": "string", "enum": ["Equal", "Exists"]},
        "value": {"type": "string"},
        "effect": {"type": "string", "enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
        "tolerationSeconds": {"type": "integer"},
    },
}

# Per chart: dotted path -> schema replacing (or refining) the inferred one.
CONSTRAINTS = {
    "agent": {
        "logFormat": LOG_FORMAT,
        "image.pullPolicy": PULL,
        "interval": DURATION,
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "simulate": {"type": "string", "enum": ["", "dgx-a100-mig", "dgx-h100"]},
    },
    "aggregator": {
        "logFormat": LOG_FORMAT,
        "image.pullPolicy": PULL,
        "provisioner": {"type": "string", "enum": ["kubernetes", "local"]},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "accessTtl": DURATION,
        "refreshTtl": DURATION,
        "userOrigins.pattern": {
            "type": "string",
            "pattern": r"^$|^https?://\{user\}\.[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?"
                       r"(:([0-9]+|\{port\}))?/?$",
        },
        "trustedProxies": {
            "type": "array",
            "items": {"type": "string", "pattern": r"^[0-9A-Fa-f.:]+(/[0-9]{1,3})?$"},
        },
        "kubernetes.images": {
            "type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
        "kubernetes.pinning.mode": {"type": "string", "enum": ["env", "dra"]},
        "kubernetes.pinning.tolerations": {"type": "array", "items": TOLERATION},
        "kubernetes.runAsUser": {"type": "integer", "minimum": 1},
        "kubernetes.runAsGroup": {"type": "integer", "minimum": 0},
        "settings.default_quota": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                k: {"type": ["integer", "null"], "minimum": 0}
                for k in ["gpus", "servers", "cpu_millis", "memory_bytes", "storage_bytes",
                          "gpu_hours_per_month"]
            },
        },
        "settings.presets": {
            "type": "object",
            "additionalProperties": False,
            "patternProperties": {
                r"^[A-Za-z0-9_-]+$": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["cpu_millis", "memory_bytes"],
                    "properties": {
                        "cpu_millis": {"type": "integer", "minimum": 1},
                        "memory_bytes": {"type": "integer", "minimum": 67108864},
                        "description": {"type": "string"},
                    },
                }
            },
        },
        "settings.culling.gpu_idle_threshold": {
            "type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 100},
        "settings.culling.gpu_idle_keeps_per_day": {"type": ["integer", "null"], "minimum": 0},
        "nfsShares": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "server", "path"],
                "properties": {
                    "name": {"type": "string", "pattern": DNS_LABEL, "maxLength": 57},
                    "server": {"type": "string", "minLength": 1},
                    "path": {"type": "string", "pattern": "^/"},
                    "readOnly": {"type": "boolean"},
                    "roles": {"type": "array", "items": {"type": "string",
                                                         "enum": ["admin", "user"]}},
                    "users": {"type": "array", "items": {"type": "string"}},
                    "description": {"type": "string"},
                },
            },
        },
        "oidc.localAccounts": {"type": "string", "enum": ["all", "admins", "off"]},
        "oidc.adminGroups": {"type": "array", "items": {"type": "string"}},
    },
    "kcloud": {},
}


def infer(value, path, chart):
    """The schema of `value`, found at dotted `path` in `chart`'s values."""
    if path in CONSTRAINTS[chart]:
        return CONSTRAINTS[chart][path]
    free = FREE["*"] | FREE[chart]
    if path in free or path.split(".")[-1] in FREE["*"]:
        return {}
    if isinstance(value, dict):
        return {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                k: infer(v, f"{path}.{k}" if path else k, chart) for k, v in value.items()
            },
        }
    if value is None:
        return {}
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer"}
    if isinstance(value, float):
        return {"type": "number"}
    if isinstance(value, str):
        return {"type": "string"}
    if isinstance(value, list):
        return {"type": "array"}
    raise SystemExit(f"{chart}: {path}: cannot infer a schema for {value!r}")


def schema(chart):
    values = yaml.safe_load((CHARTS[chart] / "values.yaml").read_text()) or {}
    s = infer(values, "", chart)
    if chart != "kcloud":
        # The umbrella's condition (`agent.enabled`, `aggregator.enabled`) reaches the
        # subchart's values too.
        s["properties"]["enabled"] = {"type": "boolean"}
    s = {"$schema": "http://json-schema.org/draft-07/schema#",
         "title": f"values of the {chart} chart (generated by scripts/chart-schema.py)",
         **s}
    return json.dumps(s, indent=2, sort_keys=True) + "\n"


def main():
    check = "--check" in sys.argv
    stale = []
    for chart, path in CHARTS.items():
        out = path / "values.schema.json"
        text = schema(chart)
        if check:
            if not out.exists() or out.read_text() != text:
                stale.append(str(out.relative_to(ROOT)))
        else:
            out.write_text(text)
    if stale:
        print("out of date (run scripts/chart-schema.py):", ", ".join(stale))
        sys.exit(1)


if __name__ == "__main__":
    main()
