#!/usr/bin/env bash
# Install Detectron2 into the Python given as $1 unless it can already import it.
#
# Detectron2's authors do not publish it on the package registry. The wheel
# `sal-detectron2==0.7.2` holds the official sources at upstream commit a59f0563
# (2024-04-17), tagged cp310 only; its compiled `_C` is never loaded by Python 3.11,
# and Detectron2 at that commit runs without it (rfpn needs none of the _C ops).
# We fetch that wheel and give it a neutral file name (pip rejects its internal tag);
# its own dependencies (yacs, omegaconf, ...) come from the registry as usual.
set -euo pipefail
python="${1:-python3}"
if "$python" -c "import detectron2" 2>/dev/null; then
  echo "detectron2 already importable: $("$python" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))')"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.10 \
  sal-detectron2==0.7.2 -d "$tmp"
wheel="$(ls "$tmp"/sal_detectron2-0.7.2-*.whl)"
mv "$wheel" "$tmp/sal_detectron2-0.7.2-py3-none-any.whl"
"$python" -m pip install --quiet "$tmp/sal_detectron2-0.7.2-py3-none-any.whl" "numpy<2" "setuptools<81"
"$python" -c "import detectron2; print('installed detectron2', detectron2.__version__)"
