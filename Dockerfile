# syntax=docker/dockerfile:1
# strangler and the FitTrack demo services, from one build stage. The proxy is built without
# the `demo` feature: its image carries no demo service code (`strangler demo` is not in it).
#   docker build -t strangler .                          # the proxy (default target)
#   docker build --target legacy-stub -t legacy-stub .   # the demo monolith
#   docker build --target users-service -t users-service .
# The runtime images run as a non-root user, write nothing to their filesystem (read-only
# root friendly), and read the route table from a mount: /etc/strangler/routes.toml.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p legacy-stub -p users-service --bins \
 && cargo build --release --locked -p strangler --no-default-features --bin strangler

FROM debian:bookworm-slim AS runtime
# The system trust store, for https:// backends verified without `tls.ca`.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
# A fixed numeric user, so Kubernetes can check runAsNonRoot without a passwd entry.
USER 10001:10001
WORKDIR /

FROM runtime AS legacy-stub
COPY --from=build /src/target/release/legacy-stub /usr/local/bin/legacy-stub
EXPOSE 3000
ENTRYPOINT ["/usr/local/bin/legacy-stub"]
CMD ["--listen", "0.0.0.0:3000"]

FROM runtime AS users-service
COPY --from=build /src/target/release/users-service /usr/local/bin/users-service
EXPOSE 3001
ENTRYPOINT ["/usr/local/bin/users-service"]
CMD ["--listen", "0.0.0.0:3001"]

FROM runtime AS strangler
COPY --from=build /src/target/release/strangler /usr/local/bin/strangler
ENV STRANGLER_CONFIG=/etc/strangler/routes.toml
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/strangler"]
CMD ["run", "--log-format", "json"]
