# Guest agent and guest image (internal/image, internal/agent).
#   make agent        static bin/firerunner-agent
#   make image        build (or reuse, cached by input hash) the guest image;
#                     needs GITLAB_RUNNER_BIN (mk/gitlab-runner.mk), or
#                     IMAGE_NO_GITLAB_RUNNER=1 for a smoke-test image
#   make -s image-dir print the image dir (use as FIRERUNNER_TEST_IMAGE)
IMAGE_CACHE ?= $(FIRERUNNER_CACHE)/images
GITLAB_RUNNER_BIN ?=
IMAGE_NO_GITLAB_RUNNER ?=
IMAGE_EXTRA_CA ?=
IMAGE_DIR_FILE := $(IMAGE_CACHE)/latest

.PHONY: agent image image-dir image-verify $(BIN)/firerunner-agent $(BIN)/frimage

agent: $(BIN)/firerunner-agent

$(BIN)/firerunner-agent:
	@mkdir -p $(BIN)
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $@ ./cmd/firerunner-agent

# `firerunner image` as a standalone binary (internal/image/frimage), so
# `make image` only needs internal/image to compile.
$(BIN)/frimage:
	@mkdir -p $(BIN)
	$(GO) build -ldflags '$(LDFLAGS)' -o $@ ./internal/image/frimage

ifeq ($(IMAGE_NO_GITLAB_RUNNER),1)
IMAGE_RUNNER_FLAGS := --no-gitlab-runner
IMAGE_RUNNER_DEP :=
else
IMAGE_RUNNER_FLAGS = --gitlab-runner $(GITLAB_RUNNER_BIN)
IMAGE_RUNNER_DEP = $(GITLAB_RUNNER_BIN)
endif

image: agent $(BIN)/frimage $(IMAGE_RUNNER_DEP)
	@if [ "$(IMAGE_NO_GITLAB_RUNNER)" != 1 ] && [ -z "$(GITLAB_RUNNER_BIN)" ]; then \
	  echo "make image: GITLAB_RUNNER_BIN is empty (set it, run make gitlab-runner, or IMAGE_NO_GITLAB_RUNNER=1)" >&2; exit 1; fi
	$(BIN)/frimage build --cache $(IMAGE_CACHE) --agent $(BIN)/firerunner-agent \
	  $(IMAGE_RUNNER_FLAGS) $(if $(IMAGE_EXTRA_CA),--extra-ca $(IMAGE_EXTRA_CA)) --print-dir >/dev/null
	@echo "image: $$(readlink -f $(IMAGE_DIR_FILE))"

image-dir:
	@readlink -e $(IMAGE_DIR_FILE) || { echo "no image yet: run make image" >&2; exit 1; }

image-verify: $(BIN)/frimage
	$(BIN)/frimage verify --cache $(IMAGE_CACHE)
