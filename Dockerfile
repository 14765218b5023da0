# Multi-stage build of Tandem's binaries into a small, non-root image.
#   make docker-build IMG=registry.example.com/tandem:v0.1.0
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY api/ api/
COPY cmd/ cmd/
COPY controllers/ controllers/
COPY dataplane/ dataplane/
ENV CGO_ENABLED=0
RUN go build -trimpath -ldflags='-s -w' -o /out/manager ./cmd/manager && \
    go build -trimpath -ldflags='-s -w' -o /out/agent ./cmd/agent

FROM gcr.io/distroless/static:nonroot
COPY --from=build /out/manager /out/agent /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/manager"]
