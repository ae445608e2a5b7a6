#!/usr/bin/env python3
"""Validates EtcdCluster objects against the committed CRD's OpenAPI schema, the way the API
server would (unknown fields refused, as with kubectl's strict field validation).

usage: validate_crs.py CRD.yaml [CRD.yaml ...] --valid FILE... --invalid FILE...
Every --valid file must pass and every --invalid file must be refused; exits 1 otherwise.
"""
import argparse
import copy
import sys

import jsonschema
import yaml


def structural(schema):
    """The CRD schema as plain JSON Schema: nullable, int-or-string, closed objects."""
    s = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return node
        for key in ("properties", "patternProperties"):
            if key in node:
                node[key] = {k: walk(v) for k, v in node[key].items()}
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                node[key] = walk(node[key])
        for key in ("allOf", "anyOf", "oneOf"):
            if key in node:
                node[key] = [walk(v) for v in node[key]]
        if node.pop("x-kubernetes-int-or-string", False) and "anyOf" not in node:
            node["type"] = ["integer", "string"]
        if node.get("type") == "object" and "properties" in node \
                and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
        return node

    return walk(s)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("crds", nargs="+")
    ap.add_argument("--valid", nargs="*", default=[])
    ap.add_argument("--invalid", nargs="*", default=[])
    args = ap.parse_args()
    schemas = {}
    failed = False

    def enum_nulls(node, where):
        """kubectl refuses a CRD whose enums list null (schemars does that for Option<enum>)."""
        found = []
        if isinstance(node, dict):
            if None in node.get("enum", []):
                found.append(where)
            for k, v in node.items():
                found += enum_nulls(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                found += enum_nulls(v, f"{where}[{i}]")
        return found

    for path in args.crds:
        crd = yaml.safe_load(open(path))
        for where in enum_nulls(crd, "crd"):
            print(f"FAIL {path}: null in the enum at {where}")
            failed = True
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schemas[(f"{group}/{v['name']}", kind)] = structural(v["schema"]["openAPIV3Schema"])
    kinds = {k for (_, k) in schemas}
    # metadata is validated by the API server itself, not by the CRD schema.
    for path, want_valid in [(p, True) for p in args.valid] + [(p, False) for p in args.invalid]:
        for doc in yaml.safe_load_all(open(path)):
            if doc is None or doc.get("kind") not in kinds:
                continue
            schema = schemas.get((doc.get("apiVersion"), doc.get("kind")))
            if schema is None:
                print(f"FAIL {path}: unknown apiVersion {doc.get('apiVersion')}")
                failed = True
                continue
            body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
            schema = dict(schema, properties={k: v for k, v in schema["properties"].items()
                                              if k not in ("apiVersion", "kind", "metadata")})
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(body), key=str)
            if want_valid and errors:
                failed = True
                for e in errors:
                    print(f"FAIL {path}: {'.'.join(map(str, e.path))}: {e.message}")
            elif not want_valid and not errors:
                failed = True
                print(f"FAIL {path}: accepted, but must be refused")
            else:
                why = f" ({errors[0].message})" if errors else ""
                print(f"ok   {path}: {'valid' if want_valid else 'refused'}{why}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
