# nats-server, built from the module version in go.mod as a static binary
# FROM scratch (scripts/build-images.sh). It takes the same arguments as
# the official image, so compose.yaml can use either.
FROM scratch
COPY nats-server /nats-server
EXPOSE 4222
ENTRYPOINT ["/nats-server"]
CMD ["--config", "/etc/nats/nats.conf"]
