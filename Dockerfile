# The service image: a release build of `piclumen-grpc`, run as a non-root user
# on a root filesystem it never writes to (fine with readOnlyRootFilesystem).
#
#   docker build -t piclumen-grpc .
#
# Running it: README "Deploying". A default Piclumen token on 0.0.0.0 needs
# caller authentication (--api-keys-file, --tls-client-ca) or an explicit
# --allow-unauthenticated, else `serve` refuses to start.
#
# scripts/deploy-check.sh replays the build stage (its COPY lines and its cargo
# command) in a clean directory, so CI proves this file builds without a
# container engine. Keep the build stage to COPY, WORKDIR, ENV and RUN lines it
# understands.

FROM rust:1-slim-bookworm AS build
WORKDIR /src
# The whole context, less what .dockerignore keeps out: cargo parses every
# target Cargo.toml declares ([[bench]], [[test]], [[bin]]) even to build one
# binary, so copying a hand-picked list breaks whenever a target is added.
COPY . .
RUN cargo build --release --locked --bin piclumen-grpc

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 piclumen \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin piclumen
COPY --from=build /src/target/release/piclumen-grpc /usr/local/bin/piclumen-grpc
# Numeric, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
# gRPC; Prometheus metrics when --metrics-listen is set (deploy/k8s uses 9090).
EXPOSE 50051 9090
# JSON logs for log pipelines; `serve` listens on $PORT when the platform sets it.
ENV PICLUMEN_LOG_FORMAT=json
ENTRYPOINT ["piclumen-grpc"]
CMD ["serve"]
