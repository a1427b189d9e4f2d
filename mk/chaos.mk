# Chaos run (internal/testsupport/chaos, cmd in internal/testsupport/cmd/firerunner-chaos):
# a real FireRunner process on the process-backed fake driver, against a
# loopback GitLab stand-in, through CHAOS_JOBS jobs (default 1,000) with every
# webhook delivered 1-3 times, reordered, 10 % dropped, 20 % of GitLab API
# calls failing with 5xx/429, and FireRunner killed with SIGKILL and
# restarted every 2-5 s. Prints one line:
#   chaos: jobs=… served=… lost=… doubled=… leaked_vms=… leaked_runners=… leaked_taps=… p99_start_ms=…
# and exits non-zero when a job was lost or ran twice or anything leaked (the
# report, with every problem, then goes to stderr).
#   make chaos                    1,000 jobs (about a minute on 2 cores)
#   make chaos CHAOS_FLAGS='-jobs 200 -seed 42 -workdir /tmp/chaos -v'
CHAOS_FLAGS ?=
.PHONY: chaos $(BIN)/firerunner-chaos
chaos: $(BIN)/firerunner-chaos
	@$(BIN)/firerunner-chaos $(CHAOS_FLAGS)

$(BIN)/firerunner-chaos:
	@mkdir -p $(BIN)
	@$(GO) build -o $@ ./internal/testsupport/cmd/firerunner-chaos
