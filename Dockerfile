# Build: docker build -t piclumen-grpc .
# Run:   docker run -p 50051:50051 -e PICLUMEN_TOKEN=... piclumen-grpc
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
RUN cargo build --release --locked --bin piclumen-grpc

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 piclumen
COPY --from=build /src/target/release/piclumen-grpc /usr/local/bin/piclumen-grpc
USER piclumen
EXPOSE 50051
# JSON logs for log pipelines; `serve` listens on $PORT when the platform sets it.
ENV PICLUMEN_LOG_FORMAT=json
ENTRYPOINT ["piclumen-grpc"]
CMD ["serve"]
