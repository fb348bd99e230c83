# Production image of userseg (all roles: standalone, uss, es, migrate, load).
# Not built in this repository's CI: no Docker engine exists on the development machines.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release -p userseg && cp target/release/userseg /userseg

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl libssl3 \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 userseg
COPY --from=build /userseg /usr/local/bin/userseg
USER userseg
ENV SERVICE_HOST=0.0.0.0 SERVICE_PORT=8080 LOG_FORMAT=json
EXPOSE 8080
HEALTHCHECK CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["userseg"]
CMD ["standalone"]
