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
.PHONY: test test-go test-fuzz fuzz lint
test: deps lint gitlab-runner image test-go test-fuzz test-install test-fleet

# FIRERUNNER_TEST_REQUIRE=1 (TEST_REQUIRE=0 to turn it off): a missing
# prerequisite (guest image, gitlab-runner, QEMU, root, git, xz, promtool)
# fails its test instead of skipping it (internal/testenv). go test -json goes
# through scripts/testreport, which prints go test's ok/FAIL line per package,
# the output of failing tests, a line for every skipped test with its reason,
# then all skips again and "tests: N passed, N failed, N skipped".
TEST_REQUIRE ?= 1
test-go: $(BIN)/testreport
	@img=$$(readlink -e $(IMAGE_DIR_FILE)) || img=; \
	if [ "$(TEST_REQUIRE)" = 1 ]; then \
	  if [ -z "$$img" ]; then echo "test-go: no guest image: $(IMAGE_DIR_FILE) is missing or dangling (make image builds it; make test does)" >&2; exit 1; fi; \
	  if [ ! -x "$(GITLAB_RUNNER_BIN)" ]; then echo "test-go: no gitlab-runner binary at '$(GITLAB_RUNNER_BIN)' (make gitlab-runner builds it; make test does)" >&2; exit 1; fi; \
	fi; \
	echo "test-go: FIRERUNNER_TEST_REQUIRE=$(TEST_REQUIRE) FIRERUNNER_TEST_IMAGE=$$img FIRERUNNER_TEST_GITLAB_RUNNER=$(GITLAB_RUNNER_BIN)"; \
	set -o pipefail; \
	FIRERUNNER_TEST_REQUIRE=$(TEST_REQUIRE) FIRERUNNER_TEST_IMAGE=$$img FIRERUNNER_TEST_GITLAB_RUNNER=$(GITLAB_RUNNER_BIN) \
	  $(GO) test -json -race -count=1 -timeout $(TEST_TIMEOUT) ./... | $(BIN)/testreport

.PHONY: $(BIN)/testreport
$(BIN)/testreport:
	@mkdir -p $(BIN)
	$(GO) build -o $@ ./scripts/testreport

# Short fuzz runs of the parsers that see untrusted input (Job Hooks, tags,
# the config file, the guest's config drive). `make fuzz` runs them longer.
# Counts, not durations: go1.26's fuzz coordinator can fail a duration run
# with "context deadline exceeded" at its end under CPU load (golang/go#75804,
# fixed in go1.27); a count has no deadline to race.
test-fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime 500000x ./internal/tags/
	$(GO) test -run '^$$' -fuzz '^FuzzParseJobEvent$$' -fuzztime 200000x ./internal/webhook/
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime 20000x ./internal/config/
	$(GO) test -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime 100000x ./internal/guestconfig/

# Every fuzz target for an equal share of FUZZ_TOTAL executions (at least
# 1,000,000 in all), printing each count and the total (scripts/fuzz.sh).
# A failing input stays under <package>/testdata/fuzz/ as a regression case
# that every go test runs: commit it with the fix.
FUZZ_TOTAL ?= 1000000
fuzz:
	GO=$(GO) FUZZ_TOTAL=$(FUZZ_TOTAL) bash scripts/fuzz.sh

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	@if command -v staticcheck >/dev/null; then staticcheck ./...; else echo "staticcheck not installed (CI installs it)"; fi
