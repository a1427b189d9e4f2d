# Controller overhead benchmark (internal/controller/bench_test.go): the real
# webhook handler, API client, SQLite store, work queue, planner and
# reconcilers against the zero-cost fake VM driver and a loopback GitLab stub;
# prints a table (webhook→VM-start-request p50/p99, webhook answer p50/p99,
# jobs/s for 1,000 jobs, CPU per job).
.PHONY: bench bench-controller
bench: bench-controller

bench-controller:
	$(GO) test -run '^$$' -bench 'BenchmarkControllerOverhead' -benchtime 1x -count 1 ./internal/controller/
