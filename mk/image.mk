# Guest agent and guest image (internal/image, internal/agent).
#   make agent        static bin/firerunner-agent
#   make image        build (or reuse, cached by input hash) the guest image;
#                     needs GITLAB_RUNNER_BIN (mk/gitlab-runner.mk), or
#                     IMAGE_NO_GITLAB_RUNNER=1 for a smoke-test image
#   make -s image-dir print the image dir (use as FIRERUNNER_TEST_IMAGE)
IMAGE_CACHE ?= $(FIRERUNNER_CACHE)/images
GITLAB_RUNNER_BIN ?=
GITLAB_RUNNER_HELPER_BIN ?=
HELPER_IMAGE_TAR ?=
IMAGE_NO_GITLAB_RUNNER ?=
IMAGE_EXTRA_CA ?=
IMAGE_DIR_FILE := $(IMAGE_CACHE)/latest

.PHONY: agent image image-dir image-verify $(BIN)/firerunner-agent $(BIN)/firerunner

agent: $(BIN)/firerunner-agent

$(BIN)/firerunner-agent:
	@mkdir -p $(BIN)
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $@ ./cmd/firerunner-agent

$(BIN)/firerunner:
	@mkdir -p $(BIN)
	$(GO) build -ldflags '$(LDFLAGS)' -o $@ ./cmd/firerunner

ifeq ($(IMAGE_NO_GITLAB_RUNNER),1)
IMAGE_RUNNER_FLAGS := --no-gitlab-runner
IMAGE_RUNNER_DEP :=
else
# The docker executor's helper image: a `docker save` archive when given
# (HELPER_IMAGE_TAR, production), else built from the helper binary.
IMAGE_RUNNER_FLAGS = --gitlab-runner $(GITLAB_RUNNER_BIN) \
  $(if $(HELPER_IMAGE_TAR),--helper-image-tar $(HELPER_IMAGE_TAR),$(if $(GITLAB_RUNNER_HELPER_BIN),--gitlab-runner-helper $(GITLAB_RUNNER_HELPER_BIN)))
IMAGE_RUNNER_DEP = $(GITLAB_RUNNER_BIN) $(if $(HELPER_IMAGE_TAR),,$(GITLAB_RUNNER_HELPER_BIN))
endif

image: agent $(BIN)/firerunner $(IMAGE_RUNNER_DEP)
	@if [ "$(IMAGE_NO_GITLAB_RUNNER)" != 1 ] && [ -z "$(GITLAB_RUNNER_BIN)" ]; then \
	  echo "make image: GITLAB_RUNNER_BIN is empty (set it, run make gitlab-runner, or IMAGE_NO_GITLAB_RUNNER=1)" >&2; exit 1; fi
	$(BIN)/firerunner image build --cache $(IMAGE_CACHE) --agent $(BIN)/firerunner-agent \
	  $(IMAGE_RUNNER_FLAGS) $(if $(IMAGE_EXTRA_CA),--extra-ca $(IMAGE_EXTRA_CA)) --print-dir >/dev/null
	@echo "image: $$(readlink -f $(IMAGE_DIR_FILE))"

image-dir:
	@readlink -e $(IMAGE_DIR_FILE) || { echo "no image yet: run make image" >&2; exit 1; }

image-verify: $(BIN)/firerunner
	$(BIN)/firerunner image verify --cache $(IMAGE_CACHE)
