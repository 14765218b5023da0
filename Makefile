# Tandem — replicated block volume pairs for Kubernetes.
#
# Every Go tool the targets need is built from its Go module into bin/ by
# hack/tools.sh (no binary downloads); shellcheck and the NBD/fio tools come
# from the distribution's packages. Run `make help` for the list.

# Image used by docker-build, make image and the deploy manifests.
IMG ?= ghcr.io/tandem-storage/tandem:dev
# The pod sandbox image make image writes next to $(IMG).
PAUSE_IMG ?= tandem.local/pause:1
# The CSI story's workload (hack/recorder): appends durable numbered records to a volume.
RECORDER_IMG ?= tandem.local/recorder:1
# GOARCH of make image's binaries (the build machine's by default).
IMAGE_ARCH ?= $(shell go env GOARCH)
# The version the binaries report (kubectl tandem version), stamped with -ldflags.
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT ?= $(shell git rev-parse HEAD 2>/dev/null)
VERSION_PKG := github.com/tandem-storage/tandem/internal/version
LDFLAGS := -X $(VERSION_PKG).Version=$(VERSION) -X $(VERSION_PKG).Commit=$(COMMIT)
# Go test flags for `make test`.
TEST_FLAGS ?= -race -count=1
# Time budget for `make test`'s go test run.
TEST_TIMEOUT ?= 20m

SHELL := /usr/bin/env bash -o pipefail
.SHELLFLAGS := -ec
.DEFAULT_GOAL := help

ROOT := $(CURDIR)
BIN := $(ROOT)/bin
CONTROLLER_GEN := $(BIN)/controller-gen
STATICCHECK := $(BIN)/staticcheck
KUBECTL := $(BIN)/kubectl
HELM := $(BIN)/helm
PROMTOOL := $(BIN)/promtool
# The Kubernetes version helm template checks the chart's kubeVersion against
# (helm's own default is v1.20 unless built with hack/tools.sh's ldflags): the
# oldest the chart supports.
HELM_KUBE_VERSION ?= 1.29.0
export KUBEBUILDER_ASSETS := $(BIN)

##@ General

.PHONY: help
help: ## Show the targets and what they do.
	@awk 'BEGIN {FS = ":.*##"; printf "\nUsage:\n  make \033[36m<target>\033[0m\n"} /^[a-zA-Z_0-9-]+:.*?##/ { printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2 } /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) } ' $(MAKEFILE_LIST)

##@ Development

.PHONY: manifests
manifests: tools-controller-gen ## Generate the CRD and RBAC manifests (config/, charts/tandem/crds).
	$(CONTROLLER_GEN) rbac:roleName=tandem-manager crd paths="./api/..." paths="./controllers/..." paths="./internal/csi/..." paths="./internal/agentca/..." output:crd:artifacts:config=config/crd/bases output:rbac:artifacts:config=config/rbac
	hack/sync-chart-crds.sh

.PHONY: generate
generate: tools-controller-gen ## Generate DeepCopy methods for the API types.
	$(CONTROLLER_GEN) object:headerFile="hack/boilerplate.go.txt" paths="./api/..."

.PHONY: fmt
fmt: ## Run gofmt on the code.
	gofmt -s -w $$(git ls-files '*.go')

.PHONY: vet
vet: ## Run go vet.
	go vet ./...

.PHONY: lint
lint: tools-staticcheck ## Run staticcheck on every package, the e2e tests included.
	$(STATICCHECK) -tags e2e ./...

.PHONY: shellcheck
shellcheck: ## Run shellcheck on every shell script (installs shellcheck when missing).
	hack/verify-shell.sh

.PHONY: lint-rules
lint-rules: tools-promtool tools-helm ## Check the alerts with promtool (built on first use): config/monitoring's rules, their unit tests, the PrometheusRule the chart renders, and the dashboard's queries.
	$(PROMTOOL) check rules config/monitoring/prometheus-rules.yaml
	$(PROMTOOL) test rules config/monitoring/prometheus-rules.test.yaml
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  $(HELM) template tandem charts/tandem --kube-version $(HELM_KUBE_VERSION) --set monitoring.prometheusRule.enabled=true --show-only templates/monitoring.yaml \
	    | go run ./hack/promrules >"$$tmp/chart-rules.yaml" && \
	  echo "lint-rules: the PrometheusRule of charts/tandem" && $(PROMTOOL) check rules "$$tmp/chart-rules.yaml" && \
	  go run ./hack/promrules -dashboard config/monitoring/grafana-dashboard.json >"$$tmp/dashboard-queries.yaml" && \
	  echo "lint-rules: the queries of config/monitoring/grafana-dashboard.json" && $(PROMTOOL) check rules "$$tmp/dashboard-queries.yaml"

.PHONY: tidy-check
tidy-check: ## Fail when go.mod/go.sum, or a tool module's under hack/tools, is not what go mod tidy makes.
	@go mod tidy -diff || { echo "verify: go.mod/go.sum are not tidy; run 'go mod tidy' and commit the result" >&2; exit 1; }
	@for d in hack/tools/*/; do (cd "$$d" && go mod tidy -diff) || { echo "verify: $$d is not tidy; run 'go mod tidy' there and commit the result" >&2; exit 1; }; done

.PHONY: verify
verify: manifests generate ## Fail when generated files are stale, code is not gofmt'ed, a module is not tidy, or vet, staticcheck, shellcheck or promtool complain.
	@test -z "$$(gofmt -s -l $$(git ls-files '*.go'))" || { echo "verify: gofmt needed on:"; gofmt -s -l $$(git ls-files '*.go'); exit 1; }
	go vet ./...
	@$(MAKE) --no-print-directory lint shellcheck tidy-check lint-rules
	@git diff --exit-code -- api config charts || { echo "verify: generated files are stale; run 'make manifests generate' and commit the result" >&2; exit 1; }
	@test -z "$$(git status --porcelain -- api config charts)" || { echo "verify: untracked generated files:" >&2; git status --porcelain -- api config charts; exit 1; }

.PHONY: test
test: tools ## Run all unit and envtest tests with the race detector (builds the tools on first use).
	go test $(TEST_FLAGS) -timeout $(TEST_TIMEOUT) ./...

# One local cluster at a time on this machine (its namespaces and ports are
# fixed): e2e runs and make stress's cluster steps take this lock.
CLUSTER_LOCK ?= /tmp/tandem-cluster.lock

.PHONY: test-e2e
test-e2e: tools build ## Run the end-to-end user stories, crash matrix, partitions and load test (short versions) on the local cluster (as root: network namespaces).
	flock -o $(CLUSTER_LOCK) go test -tags e2e -count=1 -timeout 45m -v ./test/e2e/ 2>&1 | tee .e2e.log \
	  | grep -E '^(=== RUN|--- |PASS|FAIL|ok|\s+\S+_test.go:[0-9]+: (STORY|LOAD|RELIABILITY|VIOLATION))' \
	  || { hack/e2e-failures.sh .e2e.log; exit 1; }
	@echo "test-e2e: the Helm install path (TANDEM_INSTALL=helm): a pair, a failover and failback, the leading manager's node lost, mutual TLS (tls.enabled)"
	TANDEM_INSTALL=helm flock -o $(CLUSTER_LOCK) go test -tags e2e -count=1 -timeout 15m -v -run '^TestStory0[12]|^TestStory14|^TestStory23' ./test/e2e/ 2>&1 | tee .e2e-helm.log \
	  | grep -E '^(=== RUN|--- |PASS|FAIL|ok|\s+\S+_test.go:[0-9]+: (STORY|VIOLATION))' \
	  || { hack/e2e-failures.sh .e2e-helm.log; exit 1; }

.PHONY: bench
bench: tools ## Measure Tandem against nbdkit, qemu-storage-daemon's mirror, nbdcopy and DESIGN §7 on this machine; writes docs/benchmarks.md and .png (BENCH_FLAGS=-only fio,...).
	@need=(); for pc in fio:fio nbdkit:nbdkit libnbd-bin:nbdcopy qemu-system-common:qemu-storage-daemon gnuplot-nox:gnuplot; do \
	  command -v "$${pc#*:}" >/dev/null 2>&1 || need+=("$${pc%%:*}"); done; \
	if [ $${#need[@]} -gt 0 ]; then echo "bench: installing $${need[*]}"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$${need[@]}"; fi
	go run ./hack/bench $(BENCH_FLAGS)

.PHONY: stress
stress: tools ## Reliability suites with many trials + fuzz every decoder; writes docs/reliability.md (TANDEM_STRESS_TRIALS, FUZZTIME).
	hack/stress/run.sh

##@ Build

.PHONY: build
build: ## Build the manager, agent and kubectl-tandem binaries into bin/.
	go build -ldflags='$(LDFLAGS)' -o $(BIN)/manager ./cmd/manager
	go build -ldflags='$(LDFLAGS)' -o $(BIN)/agent ./cmd/agent
	go build -ldflags='$(LDFLAGS)' -o $(BIN)/kubectl-tandem ./cmd/kubectl-tandem

# The plugin's release version: the tag vX.Y.Z on HEAD, else v0.0.0-dev.<commit>
# (Krew wants a semantic version).
RELEASE_VERSION ?= $(shell git describe --tags --exact-match --match 'v[0-9]*' 2>/dev/null || echo v0.0.0-dev.$$(git rev-parse --short HEAD))

.PHONY: release
release: ## Build the kubectl plugin's release into dist/: kubectl-tandem_<v>_{linux,darwin}_{amd64,arm64}.tar.gz (binary + LICENSE), SHA256SUMS, and the Krew manifest tandem.yaml with their sha256.
	hack/release.sh $(RELEASE_VERSION) $(COMMIT)

.PHONY: release-check
release-check: tools-krew tools-kubernetes ## Install this machine's archive from dist/ with krew (built from its Go module) into a temporary KREW_ROOT and run kubectl tandem version through it.
	hack/release-check.sh

.PHONY: docker-build
docker-build: ## Build the container image $(IMG) (needs a Docker engine).
	docker build -t $(IMG) .

# What make image puts in $(IMG): the binaries, how they are built, and the
# image config. The Dockerfile's final stage says the same; keep the two in
# step (go test ./hack/image compares them).
IMAGE_CMDS := manager agent kubectl-tandem
IMAGE_GOFLAGS := -trimpath -buildvcs=false -ldflags='-s -w'
IMAGE_CONFIG := --user 65532:65532 --entrypoint /usr/local/bin/manager \
	--env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
	--label org.opencontainers.image.source=https://github.com/tandem-storage/tandem \
	--label 'org.opencontainers.image.description=Tandem: replicated block volume pairs for Kubernetes' \
	--label org.opencontainers.image.licenses=Apache-2.0

.PHONY: image
image: ## Write $(IMG), the pause image and the CSI story's recorder image as archives in bin/images/, no Docker needed (load: ctr -n k8s.io images import).
	@mkdir -p $(BIN)/image $(BIN)/images
	CGO_ENABLED=0 GOOS=linux GOARCH=$(IMAGE_ARCH) go build $(IMAGE_GOFLAGS) -o $(BIN)/image/ \
	  $(addprefix ./cmd/,$(IMAGE_CMDS)) ./hack/image/pause ./hack/recorder
	@[ "$(IMAGE_ARCH)" = "$$(go env GOHOSTARCH)" ] || { echo "make image: the filesystem tools (hack/image/fstools.sh) come from this machine; build $(IMAGE_ARCH) images on $(IMAGE_ARCH) or with the Dockerfile" >&2; exit 1; }
	hack/image/fstools.sh >$(BIN)/image/fstools.list
	go run ./hack/image --name $(IMG) --out $(BIN)/images/tandem.tar --arch $(IMAGE_ARCH) $(IMAGE_CONFIG) \
	  $(foreach c,$(IMAGE_CMDS),--file /usr/local/bin/$(c)=$(BIN)/image/$(c)) \
	  $$(sed 's/^/--file /' $(BIN)/image/fstools.list)
	go run ./hack/image --name $(PAUSE_IMG) --out $(BIN)/images/pause.tar --arch $(IMAGE_ARCH) \
	  --user 65535:65535 --entrypoint /pause --file /pause=$(BIN)/image/pause
	go run ./hack/image --name $(RECORDER_IMG) --out $(BIN)/images/recorder.tar --arch $(IMAGE_ARCH) \
	  --entrypoint /recorder --file /recorder=$(BIN)/image/recorder

.PHONY: helm-lint
helm-lint: tools-helm ## Lint the Helm chart.
	$(HELM) lint charts/tandem

##@ Try it

.PHONY: demo
demo: ## Run the failover/failback story, then a Pod following its volume, on a local 3-node cluster (KEEP=1 keeps the cluster).
	hack/demo.sh

##@ Local cluster

.PHONY: local-cluster-up
local-cluster-up: ## Start etcd, kube-apiserver, the manager and 3 agents on this machine (.local/kubeconfig).
	hack/local-cluster.sh up

.PHONY: local-cluster-down
local-cluster-down: ## Stop the local cluster and remove its namespaces, links and state.
	hack/local-cluster.sh down

.PHONY: local-cluster-status
local-cluster-status: ## Show the local cluster's processes, links, Nodes and VolumePairs.
	hack/local-cluster.sh status

##@ Tools

.PHONY: tools
tools: ## Build every tool into bin/ (cached; rebuilt only when a pin changes).
	hack/tools.sh

.PHONY: tools-%
tools-%:
	@hack/tools.sh $*
