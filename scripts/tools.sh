#!/usr/bin/env bash
# Installs the pinned tools the interop suite and client generation use, into
# .tools/ (ignored by git). Idempotent: a tool already at its pinned version is
# kept, so reruns are fast. Sourced by scripts/interop.sh and clients/generate.sh.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
export GOBIN="$TOOLS/bin"
export PATH="$GOBIN:$TOOLS/npm/node_modules/.bin:$PATH"

GRPCURL_VERSION=v1.9.3
GHZ_VERSION=v0.121.0
PROTOC_GEN_GO_VERSION=v1.36.12
PROTOC_GEN_GO_GRPC_VERSION=v1.6.0
BUF_VERSION=1.75.0

# go_tool NAME MODULE@VERSION: go install once per pinned version.
go_tool() {
  local name=$1 target=$2 stamp="$TOOLS/stamps/$1"
  if [[ -x "$GOBIN/$name" && "$(cat "$stamp" 2>/dev/null)" == "$target" ]]; then
    return 0
  fi
  echo "installing $target"
  go install "$target"
  mkdir -p "$TOOLS/stamps" && echo "$target" >"$stamp"
}

# install_buf: buf at its pinned version (scripts/buf-breaking.sh needs only this).
install_buf() {
  if [[ "$(buf --version 2>/dev/null)" != "$BUF_VERSION" ]]; then
    echo "installing @bufbuild/buf@$BUF_VERSION"
    mkdir -p "$TOOLS"
    npm install --no-save --no-audit --no-fund --prefix "$TOOLS/npm" "@bufbuild/buf@$BUF_VERSION" >/dev/null
  fi
}

install_tools() {
  mkdir -p "$TOOLS"
  go_tool grpcurl "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION"
  go_tool ghz "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION"
  go_tool protoc-gen-go "google.golang.org/protobuf/cmd/protoc-gen-go@$PROTOC_GEN_GO_VERSION"
  go_tool protoc-gen-go-grpc "google.golang.org/grpc/cmd/protoc-gen-go-grpc@$PROTOC_GEN_GO_GRPC_VERSION"
  install_buf
  if [[ ! -x "$TOOLS/venv/bin/python" ]]; then
    python3 -m venv "$TOOLS/venv"
  fi
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/clients/python/requirements.txt"
  (cd "$ROOT/clients/node" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  (cd "$ROOT/clients/web" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
}
