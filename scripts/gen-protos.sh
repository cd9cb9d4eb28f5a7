#!/bin/sh
# Regenerate the committed gRPC/protobuf stubs (and their .pyi) beside the .proto files.
# The proto path is the import path: protos/skiff/v1/x.proto -> import skiff.v1.x_pb2.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-protos}
"$PY" -m grpc_tools.protoc -I protos \
  --python_out="$OUT" --mypy_out=quiet:"$OUT" \
  --grpc_python_out="$OUT" --mypy_grpc_out=quiet:"$OUT" \
  protos/skiff/v1/*.proto
