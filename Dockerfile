# kitebridge serve in a container: the self-hosted process, for a host next to a Bitbucket Data
# Center behind a firewall, or wherever the old connector's container ran.
#
#   docker build -t kitebridge .
#   docker run -d --name kitebridge --env-file kitebridge.env -p 8080:8080 \
#     -v kitebridge-data:/data kitebridge
#
# The embedded store lives in the /data volume; keep it across upgrades (it holds the poll
# cursor and what was reported). The image has no shell: `docker exec` is not a way in.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The sandbox (a default feature) is left out of the production binary.
RUN cargo build --release --locked -p kitebridge-cli --no-default-features \
 && cp target/release/kitebridge /kitebridge \
 && mkdir /data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /kitebridge /usr/local/bin/kitebridge
COPY --from=build --chown=65532:65532 /data /data
# One CA bundle file instead of the whole directory: faster start-up (BENCHMARKS.md).
ENV KITEBRIDGE_DB=/data/kitebridge.db \
    KITEBRIDGE_LOG_FORMAT=json \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
VOLUME /data
EXPOSE 8080
USER nonroot
ENTRYPOINT ["/usr/local/bin/kitebridge"]
CMD ["serve", "--listen", "0.0.0.0:8080"]
