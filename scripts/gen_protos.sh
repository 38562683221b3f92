#!/usr/bin/env bash
# Regenerates the committed protobuf/gRPC Python code from protos/fedfhe/v1/*.proto.
# Output lands beside the .proto files so the import path equals the folder path.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -Iprotos \
  --python_out=protos --pyi_out=protos --grpc_python_out=protos \
  protos/fedfhe/v1/*.proto
