#!/usr/bin/env bash
# Downloads, into the ignored .whl/ of the project root, the wheels that benchmarks/device_check.sh
# needs on the GPU machine (Python 3.12 there): ml-collections only (76 KB, pure Python; its needs,
# absl-py and PyYAML, are in the GPU image). Name '.whl' in the device call's carry.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform any -d .whl ml-collections==1.1.0
ls -la .whl
