# FireRunner. Quick start: `make demo`, then `make test`.
SHELL := /bin/bash
GO ?= go
export FIRERUNNER_CACHE ?= /var/cache/firerunner
BIN := $(CURDIR)/bin
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X github.com/firerunner/firerunner/internal/version.Version=$(VERSION)

.PHONY: all build deps demo
all: build

build: $(BIN)/firerunner $(BIN)/firerunner-agent

# Debian packages for building images, booting VMs and the tests (as root).
deps:
	@bash scripts/host-deps.sh

# A real pipeline in real microVMs (QEMU) against the built-in GitLab stand-in.
# The demo is its own binary, so the production bin/firerunner links no test
# double. Flags: make demo DEMO_FLAGS='--workdir DIR --image DIR'.
DEMO_FLAGS ?=
demo: deps build gitlab-runner image $(BIN)/firerunner-demo
	$(BIN)/firerunner-demo $(DEMO_FLAGS)

.PHONY: $(BIN)/firerunner-demo
$(BIN)/firerunner-demo:
	@mkdir -p $(BIN)
	$(GO) build -ldflags '$(LDFLAGS)' -o $@ ./cmd/firerunner-demo

include $(wildcard mk/*.mk)

# The whole suite, as CI runs it (root: real VMs under QEMU, network
# namespaces, the installer in a throwaway root). Builds the gitlab-runner
# binary and the guest image first (cached by input hash, outside the clone).
TEST_TIMEOUT ?= 25m
.PHONY: test test-go test-fuzz lint
test: deps lint gitlab-runner image test-go test-fuzz test-install

test-go:
	FIRERUNNER_TEST_IMAGE=$$(readlink -e $(IMAGE_DIR_FILE)) \
	FIRERUNNER_TEST_GITLAB_RUNNER=$(GITLAB_RUNNER_BIN) \
	  $(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) ./...

# Short fuzz runs of the two parsers that see untrusted input.
test-fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime 10s ./internal/tags/
	$(GO) test -run '^$$' -fuzz '^FuzzParseJobEvent$$' -fuzztime 10s ./internal/webhook/

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	@if command -v staticcheck >/dev/null; then staticcheck ./...; else echo "staticcheck not installed (CI installs it)"; fi
