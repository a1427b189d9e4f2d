# Firecracker driver (internal/vm/firecracker). The contract test boots and
# destroys VMs through firecracker-go-sdk against an API stand-in
# (internal/testsupport/fcstandin, tested here too) that checks
# every request against the SDK's client/swagger.yaml (API 1.4.1) and
# ../shared/specs/firecracker-api-1.17.0-dev.yaml; run as root it also covers
# the jailer's PID namespace and file ownership.
#   make test-firecracker
.PHONY: test-firecracker
test-firecracker:
	$(GO) test -count=1 ./internal/vm/firecracker/... ./internal/testsupport/fcstandin/
