#!/usr/bin/env bash
# Fails when proto/ breaks the released contract. The released contract is a
# buf image kept in the repository, proto-baseline/piclumen-v1.binpb, outside
# proto/ so that no buf or protox run takes it as an input. Comparing against
# a branch would compare a clean clone of main with itself.
#   scripts/buf-breaking.sh                    # check proto/ against the baseline
#   scripts/buf-breaking.sh --update-baseline  # on release only: record proto/ as
#                                              # the new released contract, then commit
# Installs its pinned buf (scripts/tools.sh) when missing. Exits non-zero on a
# breaking change (buf's FILE rules, proto/buf.yaml) or a missing baseline.
set -euo pipefail
source "$(dirname "$0")/tools.sh"
cd "$ROOT"

BASELINE=proto-baseline/piclumen-v1.binpb
install_buf

case "${1:-}" in
  "")
    if [[ ! -s "$BASELINE" ]]; then
      echo "no baseline at $BASELINE: run scripts/buf-breaking.sh --update-baseline on a release" >&2
      exit 1
    fi
    buf breaking proto --against "$BASELINE"
    echo "buf breaking: proto/ keeps the contract in $BASELINE"
    ;;
  --update-baseline)
    mkdir -p "$(dirname "$BASELINE")"
    # Comments are not part of the contract: leave them out, so that editing
    # one does not change the baseline.
    buf build proto --exclude-source-info -o "$BASELINE"
    echo "wrote $BASELINE from proto/; commit it with the release"
    ;;
  *)
    echo "usage: $0 [--update-baseline]" >&2
    exit 2
    ;;
esac
