# QEMU driver (internal/vm/qemu) and the shared VM plumbing (internal/vm).
# The real-VM tests boot the guest image under QEMU (TCG here), need root and
# skip loudly without FIRERUNNER_TEST_IMAGE; this target provides it.
#   make test-qemu     unit + real-VM tests (boot, timeout, token, adoption, tap)
#   make bench-qemu    per-VM disk preparation and boot-to-command stage times
.PHONY: test-qemu bench-qemu
test-qemu: image
	FIRERUNNER_TEST_IMAGE=$$(readlink -e $(IMAGE_DIR_FILE)) $(GO) test -count=1 -v ./internal/vm/ ./internal/vm/qemu/ 2>&1 \
	  | grep -v '^=== RUN'; exit $${PIPESTATUS[0]}
bench-qemu: image
	FIRERUNNER_TEST_IMAGE=$$(readlink -e $(IMAGE_DIR_FILE)) $(GO) test -count=1 -run '^$$' \
	  -bench 'BenchmarkPrepare|BenchmarkBootToCommand' -benchtime 3x ./internal/vm/qemu/
