# FireRunner's test/demo build of the official gitlab-runner (build/gitlab-runner:
# upstream module pinned, shell, custom and docker executors) and of its
# gitlab-runner-helper (the docker executor's helper image binary), cached by
# input hash in $(FIRERUNNER_CACHE)/gitlab-runner/<hash>/. Production images use
# the official release binary instead: set GITLAB_RUNNER_BIN=/path/to/gitlab-runner
# and HELPER_IMAGE_TAR=/path/to/helper.tar (`docker save` of the release's
# official helper image; see docs/docker.md).
#   make gitlab-runner        build (cold ~6+ min on 2 cores; a no-op when cached)
#   make -s gitlab-runner-path  print the binary path (use as FIRERUNNER_TEST_GITLAB_RUNNER)
GITLAB_RUNNER_BUILD := $(CURDIR)/build/gitlab-runner/build.sh

ifeq ($(origin GITLAB_RUNNER_BIN),undefined)
# Computed without building, so mk/image.mk can depend on the file.
GITLAB_RUNNER_BIN := $(shell GO=$(GO) $(GITLAB_RUNNER_BUILD) --print-path)
GITLAB_RUNNER_HELPER_BIN := $(dir $(GITLAB_RUNNER_BIN))gitlab-runner-helper
$(GITLAB_RUNNER_BIN) $(GITLAB_RUNNER_HELPER_BIN):
	GO=$(GO) $(GITLAB_RUNNER_BUILD) >/dev/null
endif

.PHONY: gitlab-runner gitlab-runner-path
gitlab-runner: $(GITLAB_RUNNER_BIN) $(GITLAB_RUNNER_HELPER_BIN)
	@echo "gitlab-runner: $(GITLAB_RUNNER_BIN)"

gitlab-runner-path:
	@echo $(GITLAB_RUNNER_BIN)
