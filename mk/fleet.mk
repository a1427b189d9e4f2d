# A fleet of hosts on PostgreSQL (internal/testsupport/chaos/fleet.go,
# docs/fleet.md): a throwaway PostgreSQL cluster started by the test
# (initdb in a temp dir, Unix socket only, run as the postgres user when
# root), three FireRunner processes on the process-backed fake driver and
# one GitLab stand-in; 1,000 jobs with webhooks sent to random hosts,
# duplicated, reordered and a few dropped; one host killed with SIGKILL
# mid-run and brought back at the end. Fails when a job is lost or served
# twice, a host exceeds its capacity, a host serves nothing, or anything
# leaks. About 1-1.5 min on 2 cores. `make test` runs it (after test-go, whose
# go test -race ./... runs the same test with 200 jobs); FLEET_JOBS=N
# changes the job count.
FLEET_JOBS ?= 1000
.PHONY: test-fleet
test-fleet:
	FIRERUNNER_TEST_REQUIRE=$(TEST_REQUIRE) FIRERUNNER_FLEET_JOBS=$(FLEET_JOBS) \
	  $(GO) test -count=1 -run '^TestFleet$$' -v -timeout 10m ./internal/testsupport/chaos/
