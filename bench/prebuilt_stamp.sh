#!/usr/bin/env bash
# The identity of a seqkern._C build, as one hash: its inputs (every file under csrc/, and
# setup.py), the torch it is built against and the CUDA archs. `make gpu-torch-check` writes
# it beside the _C it leaves in gpu-prebuilt/; bench/gpu_check.sh installs that _C only where
# the stamp of the tree and torch in hand is the same.
#   bash bench/prebuilt_stamp.sh TORCH_VERSION CUDA_ARCHS
set -euo pipefail
cd "$(dirname "$0")/.."
{ find csrc setup.py -type f | LC_ALL=C sort | while read -r f; do echo "== $f"; cat "$f"; done
  echo "torch=$1 archs=$2"; } | sha256sum | cut -d' ' -f1
