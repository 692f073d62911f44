#!/usr/bin/env bash
# Checks the workspace's layout (docs/ARCHITECTURE.md):
#   - crates depend only downward: each aggregator crate only on the crates below it
#     in LAYERS (read from `cargo metadata`, normal and build dependencies);
#   - no import circle between the top-level modules of any crate (`use crate::x`,
#     `crate::x::...` paths and `super::` from direct children).
# Prints what it found and exits non-zero on any violation.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo metadata --format-version 1 --no-deps >/tmp/kcloud-metadata.json
python3 - /tmp/kcloud-metadata.json <<'PY'
import json, os, re, sys
from collections import defaultdict

# Each crate may depend on crates of lower layers only (same layer: not at all).
LAYERS = {
    "kcloud-common": 0,
    "kcloud-core": 1,
    "kcloud-cluster": 2, "kcloud-store": 2, "kcloud-provision": 2,
    "kcloud-agent": 2,
    "kcloud-service": 3,
    "kcloud-http": 4,
    "kcloud-aggregator": 5,
    "kcloud-testkit": 1,
}
meta = json.load(open(sys.argv[1]))
errors = []
ours = {p["name"]: p for p in meta["packages"]}
for name, p in sorted(ours.items()):
    if name not in LAYERS:
        errors.append(f"{name}: not placed in a layer (scripts/check-layout.sh)")
        continue
    for d in p["dependencies"]:
        if d["name"] not in ours or d.get("kind") == "dev":
            continue
        if LAYERS[d["name"]] >= LAYERS[name]:
            errors.append(f"{name} (layer {LAYERS[name]}) depends on {d['name']} "
                          f"(layer {LAYERS[d['name']]})")
    print(f"ok   {name}: layer {LAYERS[name]}")

def modules(src):
    """Top-level module of each file under src/ (lib.rs, main.rs: the root)."""
    out = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(root, f), src)
            top = rel.split(os.sep)[0].removesuffix(".rs")
            out[os.path.join(root, f)] = None if top in ("lib", "main") else top
    return out

for name, p in sorted(ours.items()):
    src = os.path.join(os.path.dirname(p["manifest_path"]), "src")
    files = modules(src)
    tops = {t for t in files.values() if t}
    edges = defaultdict(set)
    for path, top in files.items():
        if top is None:
            continue
        text = open(path).read()
        # Test code may reach anywhere in its crate.
        text = re.split(r"#\[cfg\(test\)\]\s*mod tests \{", text)[0]
        # Comments (docs link freely) are not imports.
        text = re.sub(r"//.*", "", text)
        if os.path.basename(path) == "tests.rs":
            continue
        for m in re.finditer(r"\bcrate::(\w+)", text):
            if m.group(1) in tops and m.group(1) != top:
                edges[top].add(m.group(1))
        # `super::x` from a direct child of the root names the sibling x.
        depth = len(os.path.relpath(path, src).split(os.sep))
        if depth == 1 or os.path.basename(path) == "mod.rs" and depth == 2:
            for m in re.finditer(r"\bsuper::(\w+)", text):
                if m.group(1) in tops and m.group(1) != top:
                    edges[top].add(m.group(1))
    # Circles: a depth-first search over the module graph.
    state, stack = {}, []
    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                errors.append(f"{name}: import circle " + " -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2
    for n in sorted(tops):
        if n not in state:
            visit(n)
    n_edges = sum(len(v) for v in edges.values())
    print(f"ok   {name}: {len(tops)} top-level modules, {n_edges} imports between them")

for e in errors:
    print("FAIL", e)
sys.exit(1 if errors else 0)
PY
