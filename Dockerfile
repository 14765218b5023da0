# syntax=docker/dockerfile:1
# One image for all of Tandem's binaries:
#   /usr/local/bin/manager         the controller manager (entrypoint)
#   /usr/local/bin/agent           the per-node dataplane agent (DaemonSet command)
#   /usr/local/bin/kubectl-tandem  the kubectl plugin (copy it out with
#                                  `docker cp` or run it from the image)
#
#   make docker-build IMG=registry.example.com/tandem:v0.1.0
#   docker buildx build --platform linux/amd64,linux/arm64 -t IMG .
#
# `make image` writes the same image as an archive without Docker (the same
# static binaries, paths, user, entrypoint, environment and labels; the
# Makefile's IMAGE_* variables, which go test ./hack/image compares with this
# file: change both).
#
# The builder runs on the build machine's platform and cross-compiles for the
# target one, so multi-arch builds need no emulation.
FROM --platform=$BUILDPLATFORM golang:1.26 AS build
ARG TARGETOS
ARG TARGETARCH
WORKDIR /src

# Dependencies first: this layer is reused until go.mod or go.sum change.
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download

COPY api/ api/
COPY cmd/ cmd/
COPY controllers/ controllers/
COPY dataplane/ dataplane/
COPY internal/ internal/
COPY pkg/ pkg/

# Static binaries (no cgo) without local paths or VCS stamp (.git is not in
# the context; make image leaves it out too, so the same source gives the
# same binaries): the final image has no libc.
ENV CGO_ENABLED=0
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    GOOS=${TARGETOS:-linux} GOARCH=${TARGETARCH} \
    go build -trimpath -buildvcs=false -ldflags='-s -w' -o /out/ \
      ./cmd/manager ./cmd/agent ./cmd/kubectl-tandem

# The filesystem tools the CSI node plugin runs (mkfs.ext4, mkfs.xfs), with
# the libraries they load, laid out by the script `make image` takes its list
# from.
FROM debian:bookworm-slim AS fstools
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends e2fsprogs xfsprogs \
    && rm -rf /var/lib/apt/lists/*
COPY hack/image/fstools.sh /fstools.sh
RUN /fstools.sh --copy /out

# Nothing but the three binaries and the filesystem tools (with the glibc
# they are linked against): no shell, no package manager, no /etc/passwd, no
# CA bundle, no time zone data. Tandem's binaries are static and need none of
# them: they talk only to the API server (trusted through the service
# account's ca.crt) and to each other, and log in UTC. It runs as
# 65532:65532 (distroless's "nonroot"), given by number, which is what lets
# the kubelet check runAsNonRoot. The agent's Pod overrides the user with
# root without capabilities, only so it can write its root-owned hostPath
# directory (see config/agent/agent.yaml); the CSI node plugin's runs
# privileged (it attaches, formats and mounts volumes: config/csi).
FROM scratch
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL org.opencontainers.image.source="https://github.com/tandem-storage/tandem" \
      org.opencontainers.image.description="Tandem: replicated block volume pairs for Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/manager /out/agent /out/kubectl-tandem /usr/local/bin/
COPY --from=fstools /out/ /
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/manager"]
