# FireRunner. Quick start: `make demo`, then `make test`.
SHELL := /bin/bash
GO ?= go
export FIRERUNNER_CACHE ?= /var/cache/firerunner
BIN := $(CURDIR)/bin
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X github.com/firerunner/firerunner/internal/version.Version=$(VERSION)

.PHONY: all build test bench demo lint
all: build

build:
	@mkdir -p $(BIN)
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/firerunner ./cmd/firerunner
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/firerunner-agent ./cmd/firerunner-agent

include $(wildcard mk/*.mk)
