#!/usr/bin/env bash
# Regenerate shared/wire/pfl_pb2.py, pfl_pb2.pyi and pfl_pb2_grpc.py from proto/pfl.proto.
#
# Uses grpcio-tools' bundled protoc, which must be no newer than the protobuf runtime the
# code will run on (protoc 33.x <-> protobuf 6.33.x; see DESIGN.md, pitfalls).
# Usage (from anywhere): PYTHON=.venv/bin/python proto/generate.sh
# OUT=DIR writes elsewhere (tests compare a fresh generation with the committed files).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUT="${OUT:-shared/wire}"

# protoc NN.x ships with the protobuf Python runtime 6.NN.x (e.g. libprotoc 33.5 <-> 6.33.5).
protoc_major=$("$PYTHON" -m grpc_tools.protoc --version | sed -E 's/^libprotoc ([0-9]+)\..*/\1/')
runtime=$("$PYTHON" -c 'import google.protobuf as p; print(p.__version__)')
runtime_minor=$(echo "$runtime" | cut -d. -f2)
if [ "$protoc_major" -gt "$runtime_minor" ]; then
  echo "protoc $protoc_major.x is newer than the protobuf runtime $runtime: refusing" >&2
  exit 1
fi

"$PYTHON" -m grpc_tools.protoc -I proto \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  proto/pfl.proto
# protoc writes an absolute import; make it package-relative (shared.wire).
sed -i -E 's/^import pfl_pb2 as pfl__pb2$/from . import pfl_pb2 as pfl__pb2/' \
  "$OUT/pfl_pb2_grpc.py"
grep -q '^from \. import pfl_pb2 as pfl__pb2$' "$OUT/pfl_pb2_grpc.py"
echo "generated $OUT/pfl_pb2.py, pfl_pb2.pyi, pfl_pb2_grpc.py (protoc for protobuf $runtime)"
