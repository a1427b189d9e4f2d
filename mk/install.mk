# Installer, systemd unit, host checks and VM networking (install.sh,
# packaging/, internal/doctor, internal/netsetup).
#   make test-install   install.sh into a throwaway root: owners, modes,
#                       idempotence (manifest diff), uninstall, purge (root)
#   make test-netsetup  bridge/tap/nftables tests in namespaces the test makes (root)
#   make test-doctor    doctor checks against fake hosts and a GitLab stand-in
#   make install        install this build on this host (sudo make install)
.PHONY: test-install test-netsetup test-doctor install $(BIN)/firerunner-install-test

$(BIN)/firerunner-install-test:
	@mkdir -p $(BIN)
	$(GO) build -ldflags '$(LDFLAGS)' -o $@ ./cmd/firerunner

test-install: $(BIN)/firerunner-install-test
	bash packaging/test-install.sh $(BIN)/firerunner-install-test

test-netsetup:
	$(GO) test -count=1 ./internal/netsetup/

test-doctor:
	$(GO) test -count=1 ./internal/doctor/

install: build
	./install.sh --bin $(BIN)/firerunner $(INSTALL_FLAGS)
