# Controller overhead benchmark (internal/controller/bench_test.go): the real
# webhook handler, API client, SQLite store, scheduler and controller against
# the zero-cost fake VM driver and a loopback GitLab stand-in; prints a table
# (webhook→VM-start-request p50/p99, jobs/s for 1,000 jobs, CPU per job).
.PHONY: bench bench-controller bench-store
bench: bench-controller bench-store

bench-controller:
	$(GO) test -run '^$$' -bench 'BenchmarkControllerOverhead' -benchtime 1x -count 1 ./internal/controller/

# The displaced-job lookup that every "finished" webhook runs, over a day of
# history: 20,000 ended jobs, 200 of them displaced (ms per lookup).
bench-store:
	$(GO) test -run '^$$' -bench 'BenchmarkDisplaced' -benchtime 200x -count 1 ./internal/store/
