# Controller overhead benchmark (internal/controller/bench_test.go): the real
# webhook handler, API client, SQLite store, work queue, planner and
# reconcilers against the zero-cost fake VM driver and a loopback GitLab stub;
# prints a table (webhook→VM-start-request p50/p99, webhook answer p50/p99,
# jobs/s for 1,000 jobs, CPU per job).
.PHONY: bench bench-controller
bench: bench-controller

bench-controller:
	$(GO) test -run '^$$' -bench 'BenchmarkControllerOverhead' -benchtime 1x -count 1 ./internal/controller/

# Warm pools with real QEMU VMs and the real gitlab-runner (root): webhook →
# runner's first job request on a warm hit (p50/p95 over 10 jobs) and cold,
# refill time, RSS per idle warm VM. Needs the image and gitlab-runner.
.PHONY: bench-pool
bench-pool: gitlab-runner image
	FIRERUNNER_TEST_IMAGE=$$(readlink -e $(IMAGE_DIR_FILE)) FIRERUNNER_TEST_GITLAB_RUNNER=$(GITLAB_RUNNER_BIN) \
	  $(GO) test -run '^$$' -bench 'BenchmarkWarmPool' -benchtime 1x -count 1 -timeout 20m ./internal/demo/
