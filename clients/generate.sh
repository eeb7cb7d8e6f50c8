#!/usr/bin/env bash
# Generates the client stubs of every language from proto/, with pinned tools:
#   Go      buf generate with local protoc-gen-go / protoc-gen-go-grpc -> clients/go/gen
#   Python  grpcio-tools                                               -> clients/python/gen
#   Java    protobuf-maven-plugin (protoc and grpc-java from Maven)    -> clients/java/target
#   Node    nothing: @grpc/proto-loader reads proto/ at run time
#   Web     buf generate with the local protoc-gen-es from clients/web/node_modules -> clients/web/gen
# The protos import googleapis' google/rpc/status.proto, vendored in
# proto-vendor/ (a second module of the buf workspace, buf.yaml at the root).
# Go, Python and Java take its generated code from their googleapis packages
# (genproto, googleapis-common-protos, proto-google-common-protos), so only
# the web stubs, which have no such package, generate it (--include-imports).
# Usage: clients/generate.sh   (installs the tools into .tools/ first)
set -euo pipefail
source "$(dirname "$0")/../scripts/tools.sh"
install_tools

cd "$ROOT/clients/go"
rm -rf gen
buf generate "$ROOT/proto" --template buf.gen.yaml

cd "$ROOT/clients/python"
rm -rf gen && mkdir gen
"$TOOLS/venv/bin/python" -m grpc_tools.protoc -I "$ROOT/proto" -I "$ROOT/proto-vendor" \
  --python_out=gen --grpc_python_out=gen --pyi_out=gen \
  "$ROOT/proto/piclumen/v1/image_service.proto"

cd "$ROOT/clients/web"
rm -rf gen
PATH="$ROOT/clients/web/node_modules/.bin:$PATH" buf generate "$ROOT/proto" --template buf.gen.yaml --include-imports

cd "$ROOT/clients/java"
mvn -q -B generate-sources

echo "stubs generated"
