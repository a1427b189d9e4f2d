# Controller overhead benchmark (internal/controller/bench_test.go): the real
# webhook handler, API client, SQLite store, work queue, planner and
# reconcilers against the zero-cost fake VM driver and a loopback GitLab stub;
# prints a table (webhook→VM-start-request p50/p99, webhook answer p50/p99,
# jobs/s for 1,000 jobs, CPU per job).
.PHONY: bench bench-controller bench-fleet
bench: bench-controller bench-fleet

bench-controller:
	$(GO) test -run '^$$' -bench 'BenchmarkControllerOverhead' -benchtime 1x -count 1 ./internal/controller/

# Warm pools with real QEMU VMs and the real gitlab-runner (root): webhook →
# runner's first job request on a warm hit (p50/p95 over 10 jobs) and cold,
# refill time, RSS per idle warm VM. Needs the image and gitlab-runner.
.PHONY: bench-pool
bench-pool: gitlab-runner image
	FIRERUNNER_TEST_IMAGE=$$(readlink -e $(IMAGE_DIR_FILE)) FIRERUNNER_TEST_GITLAB_RUNNER=$(GITLAB_RUNNER_BIN) \
	  $(GO) test -run '^$$' -bench 'BenchmarkWarmPool' -benchtime 1x -count 1 -timeout 20m ./internal/demo/

# State retention's target (internal/controller/store_bench_test.go): with
# 1,000,000 ended jobs in the store (their transitions, VMs and runners
# too), webhook→VM start request p99 and /metrics scrape p99 within 2x of
# an empty store; also what pruning that history costs. Prints a table.
# BENCH_STORE_JOBS sets the history's size (~1.2 GB of SQLite at 1,000,000,
# written once a day into $(FIRERUNNER_CACHE)/bench-store and copied from there).
BENCH_STORE_JOBS ?= 1000000
.PHONY: bench-store

bench-store:
	FIRERUNNER_BENCH_STORE_JOBS=$(BENCH_STORE_JOBS) $(GO) test -run '^$$' -bench 'BenchmarkStoreHistory' -benchtime 1x -count 1 -timeout 30m ./internal/controller/

# The fleet's store (internal/controller/fleet_bench_test.go, docs/fleet.md):
# PostgreSQL (a throwaway cluster, fsync on) next to SQLite; prints a table:
# claims per second with three hosts racing for 3,000 waiting jobs (SQLite:
# one host), and the controller-overhead run on each store (webhook → VM
# start request p50/p99/max one job at a time, jobs/s with 16 senders).
bench-fleet:
	$(GO) test -run '^$$' -bench 'BenchmarkFleet' -benchtime 1x -count 1 -timeout 20m ./internal/controller/

# Docker in a real VM (root, QEMU): VM start -> Docker ready, image pull with
# the registry mirror's cache cold vs warm, container start, docker build of
# a small Dockerfile (internal/vm/qemu BenchmarkDocker). Prints a table.
.PHONY: bench-docker
bench-docker: gitlab-runner image
	FIRERUNNER_TEST_IMAGE=$$(readlink -e $(IMAGE_DIR_FILE)) \
	  $(GO) test -run '^$$' -bench 'BenchmarkDocker$$' -benchtime 1x -count 1 -timeout 20m ./internal/vm/qemu/
