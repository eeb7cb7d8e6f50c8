#!/usr/bin/env bash
# Checks the deploy files the way CI can: no container engine runs here (the
# docker client alone cannot build), so the Dockerfile is replayed instead.
#
# 1. The build stage: a fresh temporary directory gets exactly what the
#    stage's COPY lines copy (read from the Dockerfile, with .dockerignore
#    applied the way Docker applies it), then the stage's cargo command runs
#    there. A file the build needs that the COPY lines leave out fails here as
#    it fails `docker build`.
# 2. The runtime stage: the file it copies from the build stage exists and
#    answers `ENTRYPOINT CMD --help`; its USER is a numeric, non-root uid
#    (Kubernetes cannot check runAsNonRoot against a user name).
# 3. Every manifest in deploy/k8s passes `kubernetes-validate --strict`
#    (installed into .tools/k8s-venv when missing; it ships the Kubernetes
#    schemas and needs no network) for the oldest Kubernetes the manifests
#    target and the newest the package knows; kustomization.yaml lists them
#    all; the Deployments keep the rules README "Deploying" promises
#    (non-root, read-only root filesystem, no privilege escalation, no
#    capabilities, a grace period longer than preStop + drain).
# 4. render.yaml gives the process more time to stop
#    (maxShutdownDelaySeconds) than its PICLUMEN_DRAIN_TIMEOUT, in which a
#    stopping replica finishes its calls and creates in flight.
#
# Usage: scripts/deploy-check.sh [--check-only | --rules-only DIR]
#
# By default the replay runs the stage's own command, a release build
# (`cargo build --release --locked --bin piclumen-grpc`): that is what proves
# the image builds, and it yields the binary step 2 runs. It fits CI: from
# nothing it takes about 2 minutes on the project's 2-core machine (3.5
# minutes of CPU, the crate's single-codegen-unit LTO build the longest
# step). Its output stays in target/deploy-check, so later runs rebuild only
# what changed (an unchanged tree: about a second). --check-only runs
# `cargo check` with the same arguments less `--release`, in the project's
# own target/ (so the dependencies `cargo clippy` or `cargo check` already
# checked are reused: about 20 s after them, 3 minutes from nothing): it
# still proves the manifest and sources complete, without a binary (step 2
# then checks the USER line only), for machines where the build is too
# slow.
# --rules-only DIR checks only the rules of 3 and 4, on DIR/deploy/k8s and
# DIR/render.yaml (no build, no kubernetes-validate): for checking changed
# copies of the deploy files, as the tests do.
#
# Every line printed starts with "deploy-check:"; the exit status is non-zero
# on the first failure.
set -euo pipefail
RULES_DIR=
if [[ "${1:-}" == --rules-only && -d "${2:-}" ]]; then
  RULES_DIR=$(cd "$2" && pwd)
fi
cd "$(dirname "$0")/.."
ROOT=$PWD

KUBERNETES_VALIDATE_VERSION=1.37.0
# The oldest Kubernetes the manifests target (gRPC probes are GA from 1.27).
K8S_MIN=1.27.0

MODE=build
case "${1:-}" in
  "") ;;
  --check-only) MODE=check ;;
  --rules-only)
    [[ -n $RULES_DIR ]] || { echo "usage: $0 --rules-only DIR" >&2; exit 2; }
    MODE=rules
    ROOT=$RULES_DIR
    ;;
  *) echo "usage: $0 [--check-only | --rules-only DIR]" >&2; exit 2 ;;
esac

say() { echo "deploy-check: $*"; }
fail() { say "FAIL: $*"; exit 1; }

START=$SECONDS
# Emptied at every start and removed at exit, so it holds only what the COPY
# lines put there. Outside the repository (no parent Cargo.toml), and at the
# same path every run: cargo then recognises unchanged sources (the copies
# keep their times) and skips rebuilding them.
WORK="${TMPDIR:-/tmp}/piclumen-deploy-check-$(printf %s "$ROOT" | cksum | cut -d' ' -f1)"
rm -rf "$WORK" && mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
CACHE="$ROOT/target/deploy-check"
# cargo check's output is the dev profile's, as cargo clippy's: share it.
[[ $MODE != check ]] || CACHE="$ROOT/target"
[[ $MODE == rules ]] || mkdir -p "$CACHE"

if [[ $MODE != rules ]]; then
# --- 1 and 2: the Dockerfile ------------------------------------------------
say "replaying the Dockerfile's build stage in $WORK (cargo $MODE)"
python3 - "$ROOT" "$WORK/rootfs" "$CACHE" "$MODE" <<'PY' || fail "Dockerfile replay (see the lines above)"
import json, os, re, shlex, shutil, subprocess, sys, time

root, rootfs, cache, mode = sys.argv[1:5]


def say(msg):
    print(f"deploy-check: {msg}", flush=True)


def fail(msg):
    say(f"FAIL: {msg}")
    sys.exit(1)


# --- Dockerfile: logical lines (comments dropped, continuations joined) ---
def instructions(path):
    out, buf, start = [], "", None
    with open(path) as f:
        for n, line in enumerate(f, 1):
            s = line.rstrip("\n")
            if s.strip() == "" or s.lstrip().startswith("#"):
                continue
            start = start or n
            if s.rstrip().endswith("\\"):
                buf += s.rstrip()[:-1] + " "
                continue
            word, _, rest = (buf + s).strip().partition(" ")
            out.append((start, word.upper(), rest.strip()))
            buf, start = "", None
    return out


def split_args(rest):
    """COPY/RUN arguments: exec (JSON) form or whitespace form, leading --flags apart."""
    args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    flags = {}
    while args and args[0].startswith("--"):
        key, _, value = args.pop(0)[2:].partition("=")
        flags[key] = value
    return flags, args


stages = []
for n, word, rest in instructions(os.path.join(root, "Dockerfile")):
    if word == "FROM":
        parts = [p for p in rest.split() if not p.startswith("--")]
        name = parts[2] if len(parts) == 3 and parts[1].lower() == "as" else None
        stages.append({"name": name, "base": parts[0], "line": n, "instrs": []})
    elif not stages:
        continue  # ARG before the first FROM
    else:
        stages[-1]["instrs"].append((n, word, rest))
if len(stages) < 2:
    fail("the Dockerfile has no separate build stage")
final = stages[-1]
sources = {
    split_args(rest)[0].get("from")
    for _, word, rest in final["instrs"]
    if word == "COPY" and "from" in split_args(rest)[0]
}
if len(sources) != 1:
    fail(f"the final stage should copy from exactly one build stage, found {sorted(map(str, sources))}")
(build_name,) = sources
build = next((s for s in stages if s["name"] == build_name), None)
if build is None:
    fail(f"COPY --from={build_name}: no stage named {build_name}")
if any(s["name"] == build["base"] for s in stages):
    fail(f"stage {build_name} builds on another stage; deploy-check replays single stages only")


# --- .dockerignore, with Docker's matching rules (moby/patternmatcher) ---
def pattern_regex(pattern):
    out, i = "^", 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            if pattern[i + 1 : i + 2] == "*":
                i += 1
                if pattern[i + 1 : i + 2] == "/":
                    i += 1
                out += ".*" if i + 1 >= len(pattern) else "(.*/)?"
            else:
                out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                fail(f".dockerignore: unclosed [ in {pattern!r}")
            out += pattern[i : end + 1]
            i = end
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(out + "$")


patterns = []
ignore_file = os.path.join(root, ".dockerignore")
if os.path.exists(ignore_file):
    for line in open(ignore_file).read().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        line = os.path.normpath(line[1:].strip() if exception else line).lstrip("/")
        if line not in ("", "."):
            patterns.append((exception, pattern_regex(line)))
has_exceptions = any(e for e, _ in patterns)


def ignored(rel):
    parents = rel.split("/")[:-1]
    matched = False
    for exception, rx in patterns:
        if exception != matched:
            continue
        hit = bool(rx.match(rel)) or any(
            rx.match("/".join(parents[: i + 1])) for i in range(len(parents))
        )
        if hit:
            matched = not exception
    return matched


# The build context as Docker sends it: every file not ignored.
context = []
for dirpath, dirnames, filenames in os.walk(root):
    base = os.path.relpath(dirpath, root)
    base = "" if base == "." else base + "/"
    keep = []
    for d in dirnames:
        if os.path.islink(os.path.join(dirpath, d)):
            filenames.append(d)
        elif not (ignored(base + d) and not has_exceptions):
            keep.append(d)
    dirnames[:] = keep
    context += [base + f for f in filenames if not ignored(base + f)]
context_set = set(context)
context_dirs = {"/".join(p.split("/")[:i]) for p in context for i in range(1, p.count("/") + 1)}
size = sum(os.lstat(os.path.join(root, p)).st_size for p in context)
say(f"build context: {len(context)} files, {size / 1e6:.1f} MB after .dockerignore")


def host(path):
    """A path of the build stage's filesystem, under the replay's rootfs."""
    return os.path.join(rootfs, path.lstrip("/"))


# Copied directories get their source's times back once everything is in
# place: cargo compares them (build.rs watches `proto`), and a fresh time
# would rebuild the crate on every run.
dir_times = {}


def copy_one(rel, dest):
    src = os.path.join(root, rel)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.islink(src):
        os.symlink(os.readlink(src), dest)
    else:
        shutil.copy2(src, dest)
    # The parent directories both paths share by name, e.g. proto/piclumen
    # for proto/piclumen/v1/x.proto copied to /src/proto/piclumen/v1/x.proto.
    while True:
        rel, dest = os.path.dirname(rel), os.path.dirname(dest)
        if not rel or os.path.basename(rel) != os.path.basename(dest):
            break
        dir_times[dest] = os.path.join(root, rel)


# --- replay the build stage ---
workdir, env, commands = "/", {}, []
for n, word, rest in build["instrs"]:
    if word == "WORKDIR":
        workdir = os.path.normpath(os.path.join(workdir, rest))
        os.makedirs(host(workdir), exist_ok=True)
    elif word == "ENV":
        parts = shlex.split(rest)
        pairs = [p.partition("=")[::2] for p in parts] if "=" in parts[0] else [(parts[0], " ".join(parts[1:]))]
        env.update(pairs)
    elif word == "COPY":
        flags, args = split_args(rest)
        unknown = set(flags) - {"chown", "chmod", "link"}
        if unknown:
            fail(f"Dockerfile line {n}: COPY --{sorted(unknown)[0]} is not replayed; extend scripts/deploy-check.sh")
        *srcs, dest = args
        dest_path = os.path.normpath(os.path.join(workdir, dest))
        wild = any(c in s for s in srcs for c in "*?[")
        dest_is_dir = dest.endswith("/") or dest in (".", "..") or len(srcs) > 1 or wild or os.path.isdir(host(dest_path))
        for src in srcs:
            src = os.path.normpath(src).lstrip("/")
            if src == ".":
                matches = [""]
            elif any(c in src for c in "*?["):
                rx = pattern_regex(src)
                matches = sorted(p for p in context_set | context_dirs if rx.match(p))
            else:
                matches = [src] if src in context_set or src in context_dirs else []
            if not matches:
                fail(f"Dockerfile line {n}: COPY {src}: not in the build context (missing, or excluded by .dockerignore)")
            for m in matches:
                if m in context_set:  # a file
                    target = os.path.join(dest_path, os.path.basename(m)) if dest_is_dir else dest_path
                    copy_one(m, host(target))
                else:  # a directory: its contents
                    prefix = m + "/" if m else ""
                    for p in context:
                        if p.startswith(prefix):
                            copy_one(p, host(os.path.join(dest_path, p[len(prefix):])))
        say(f"Dockerfile line {n}: COPY {rest}")
    elif word == "RUN":
        if rest.startswith("["):
            command = shlex.join(json.loads(rest))
        else:  # shell form: as written, less options such as --mount=...
            command = re.sub(r"^(--\S+\s+)*", "", rest)
        # Only plain cargo commands run on this machine: anything else (a
        # package install, a copy into /usr) would act on the host.
        if not re.fullmatch(r"cargo\s[^;&|`$()<>\n]*", command):
            fail(f"Dockerfile line {n}: RUN {command!r} is not a plain cargo command, which is all the replay runs; extend scripts/deploy-check.sh")
        commands.append((n, command))
    elif word in ("ARG", "LABEL"):
        continue
    else:
        fail(f"Dockerfile line {n}: {word} in the build stage is not replayed; extend scripts/deploy-check.sh")
if not any(re.match(r"cargo\s+build\b", c) for _, c in commands):
    fail("the build stage runs no `cargo build`")

# target/ is build output: it must not come from the context (.dockerignore
# keeps it out); here it is the persistent cache, so only the first run
# compiles the dependencies.
for dest, src in dir_times.items():
    shutil.copystat(src, dest)
target = os.path.join(host(workdir), "target")
if os.path.lexists(target):
    fail("the build context holds target/: .dockerignore must exclude it")
os.symlink(cache, target)

run_env = dict(os.environ, CARGO_TERM_COLOR="never", **env)
run_env.pop("CARGO_TARGET_DIR", None)
for n, command in commands:
    if mode == "check":
        command = re.sub(r"^cargo\s+build\b", "cargo check", command)
        command = re.sub(r"\s--release\b", "", command)
    say(f"Dockerfile line {n}: RUN {command}  (in {host(workdir)})")
    log = os.path.join(cache, "last-run.log")
    began = time.monotonic()
    with open(log, "w") as out:
        rc = subprocess.call(["sh", "-c", command], cwd=host(workdir), env=run_env, stdout=out, stderr=subprocess.STDOUT)
    took = time.monotonic() - began
    if rc != 0:
        lines = open(log).read().splitlines()
        for line in lines[-30:]:
            say(f"  | {line}")
        fail(f"Dockerfile line {n}: `{command}` exited {rc} after {took:.0f} s (full output: {log})")
    say(f"Dockerfile line {n}: ok in {took:.0f} s")

# --- the runtime stage ---
user = next((rest for _, word, rest in reversed(final["instrs"]) if word == "USER"), None)
if user is None:
    fail("the runtime stage has no USER line: the image would run as root")
uid = user.split(":")[0]
if not uid.isdigit() or int(uid) == 0:
    fail(f"the runtime stage's USER {user!r} must be a numeric non-root uid (Kubernetes' runAsNonRoot cannot check a name)")
say(f"runtime stage: USER {user} (numeric, non-root)")
with open(os.path.join(rootfs, ".image-uid"), "w") as f:
    f.write(uid)

entrypoint = cmd = []
for n, word, rest in final["instrs"]:
    if word in ("ENTRYPOINT", "CMD"):
        value = json.loads(rest) if rest.startswith("[") else ["sh", "-c", rest]
        entrypoint, cmd = (value, []) if word == "ENTRYPOINT" else (entrypoint, value)
for n, word, rest in final["instrs"]:
    flags, args = split_args(rest) if word == "COPY" else ({}, [])
    if flags.get("from") != build_name:
        continue
    *srcs, dest = args
    for src in srcs:
        built = host(os.path.normpath(os.path.join(workdir, src)))
        if mode == "check":
            say(f"Dockerfile line {n}: COPY --from={build_name} {src}: not built with --check-only")
            continue
        if not os.access(built, os.X_OK):
            fail(f"Dockerfile line {n}: COPY --from={build_name} {src}: the build stage did not produce it")
        say(f"Dockerfile line {n}: COPY --from={build_name} {src}: built ({os.path.getsize(built) / 1e6:.1f} MB)")
        if entrypoint and entrypoint[0] in (dest, os.path.basename(dest)):
            probe = [built] + entrypoint[1:] + cmd + ["--help"]
            shown = " ".join(entrypoint + cmd + ["--help"])
            result = subprocess.run(probe, capture_output=True, text=True, timeout=30)
            if result.returncode != 0:
                fail(f"`{shown}` with the built binary exited {result.returncode}: {result.stderr.strip()}")
            say(f"runtime stage: `{shown}` answers")
PY

# --- 3: the Kubernetes manifests ---------------------------------------------
VENV="$ROOT/.tools/k8s-venv"
if [[ "$("$VENV/bin/kubernetes-validate" --version 2>/dev/null)" != "$KUBERNETES_VALIDATE_VERSION" ]]; then
  say "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION into .tools/k8s-venv"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" || fail "cannot install kubernetes-validate"
fi

shopt -s nullglob
MANIFESTS=()
for f in deploy/k8s/*.yaml deploy/k8s/*.yml; do
  [[ "$(basename "$f")" == kustomization.y*ml ]] || MANIFESTS+=("$f")
done
((${#MANIFESTS[@]})) || fail "no manifests in deploy/k8s"
for version in "$K8S_MIN" default; do
  args=(--strict --quiet)
  [[ $version == default ]] || args+=(-k "$version")
  if ! out=$("$VENV/bin/kubernetes-validate" "${args[@]}" "${MANIFESTS[@]}" 2>&1); then
    while IFS= read -r line; do say "  | $line"; done <<<"$out"
    fail "kubernetes-validate --strict (Kubernetes $version) rejected a manifest"
  fi
  [[ -z $out ]] || while IFS= read -r line; do say "  | $line"; done <<<"$out"
done
say "kubernetes-validate --strict: ${#MANIFESTS[@]} files pass for Kubernetes $K8S_MIN and $("$VENV/bin/kubernetes-validate" --version)"
PYTHON="$VENV/bin/python"
else
  # Only the rules: any python3 with PyYAML.
  PYTHON=python3
  shopt -s nullglob
  MANIFESTS=()
  for f in "$ROOT"/deploy/k8s/*.yaml "$ROOT"/deploy/k8s/*.yml; do
    [[ "$(basename "$f")" == kustomization.y*ml ]] || MANIFESTS+=("$f")
  done
  ((${#MANIFESTS[@]})) || fail "no manifests in $ROOT/deploy/k8s"
fi

"$PYTHON" - "$ROOT" "$WORK/rootfs/.image-uid" "${MANIFESTS[@]}" <<'PY' || fail "deploy rules (see the lines above)"
import os, re, sys

import yaml

root, uid_file, *manifests = sys.argv[1:]
problems = []


def say(msg):
    print(f"deploy-check: {msg}", flush=True)


def seconds(text):
    m = re.fullmatch(r"(\d+)(ms|s|m)", str(text))
    if not m:
        problems.append(f"cannot read the duration {text!r}")
        return 0
    return int(m[1]) * {"ms": 0.001, "s": 1, "m": 60}[m[2]]


# kustomization.yaml lists every manifest but the *.example.yaml ones.
k8s = os.path.join(root, "deploy/k8s")
kust = yaml.safe_load(open(os.path.join(k8s, "kustomization.yaml")))
listed = set(kust.get("resources", []))
present = {os.path.basename(m) for m in manifests if ".example." not in m}
for name in sorted(listed - present):
    problems.append(f"kustomization.yaml lists {name}, which is not in deploy/k8s")
for name in sorted(present - listed):
    problems.append(f"kustomization.yaml does not list {name}")

image_uid = int(open(uid_file).read()) if os.path.exists(uid_file) else None
for path in manifests:
    for doc in yaml.safe_load_all(open(path)):
        if not doc or doc.get("kind") != "Deployment":
            continue
        name = doc["metadata"]["name"]
        pod = doc["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{name}: pod securityContext.runAsNonRoot is not true")
        for c in pod["containers"]:
            sc = c.get("securityContext", {})
            where = f"{name}/{c['name']}"
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: capabilities.drop lacks ALL")
        if name != "piclumen-grpc":
            continue
        # The service itself: replicas, probes, grace period, image user.
        before = len(problems)
        c = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        if doc["spec"].get("replicas", 1) < 2:
            problems.append(f"{name}: fewer than 2 replicas")
        for probe in ("livenessProbe", "readinessProbe"):
            if "grpc" not in c.get(probe, {}):
                problems.append(f"{name}: {probe} is not a grpc probe")
        if "PICLUMEN_DRAIN_TIMEOUT" not in env:
            problems.append(f"{name}: set PICLUMEN_DRAIN_TIMEOUT explicitly (the grace period depends on it)")
        drain = seconds(env.get("PICLUMEN_DRAIN_TIMEOUT", "0s"))
        pre = c.get("lifecycle", {}).get("preStop", {})
        pre_stop = int(pre.get("sleep", {}).get("seconds", 0)) or next(
            (int(a) for a in pre.get("exec", {}).get("command", [])[1:] if str(a).isdigit()), 0
        )
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace <= pre_stop + drain:
            problems.append(f"{name}: terminationGracePeriodSeconds {grace} is not above preStop {pre_stop} s + drain {drain} s")
        if not env.get("PICLUMEN_IDEMPOTENCY_STORE", "").startswith(("redis://", "rediss://")):
            problems.append(f"{name}: PICLUMEN_IDEMPOTENCY_STORE is not a redis:// URL")
        if image_uid is not None and psc.get("runAsUser") != image_uid:
            problems.append(f"{name}: runAsUser {psc.get('runAsUser')} is not the image's USER {image_uid}")
        if len(problems) == before:
            say(f"{name}: {doc['spec']['replicas']} replicas, grpc probes, grace {grace} s > preStop {pre_stop} s + drain {drain:g} s")

# render.yaml: Render stops an instance with SIGTERM and kills it after
# maxShutdownDelaySeconds (default 30), which must leave the drain its time.
render_file = os.path.join(root, "render.yaml")
blueprint = yaml.safe_load(open(render_file)) if os.path.exists(render_file) else {}
for svc in (blueprint or {}).get("services", []):
    if svc.get("name") != "piclumen-grpc":
        continue
    before = len(problems)
    env = {e["key"]: e.get("value") for e in svc.get("envVars", [])}
    if "PICLUMEN_DRAIN_TIMEOUT" not in env:
        problems.append("render.yaml: set PICLUMEN_DRAIN_TIMEOUT explicitly (maxShutdownDelaySeconds depends on it)")
    drain = seconds(env.get("PICLUMEN_DRAIN_TIMEOUT", "0s"))
    delay = svc.get("maxShutdownDelaySeconds", 30)
    if delay <= drain:
        problems.append(f"render.yaml: maxShutdownDelaySeconds {delay} is not above drain {drain:g} s")
    if len(problems) == before:
        say(f"render.yaml: maxShutdownDelaySeconds {delay} > drain {drain:g} s")

for p in problems:
    say(f"  | {p}")
sys.exit(1 if problems else 0)
PY
say "deploy rules hold: non-root, read-only root, no escalation, no capabilities; kustomization lists every manifest; every stop leaves the drain its time"

say "OK: all deploy checks passed in $((SECONDS - START)) s"
