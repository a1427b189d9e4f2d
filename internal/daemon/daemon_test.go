package daemon

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/config"
)

// Start validates whatever configuration it is given (not only serve's
// file): user-mode networking without the development switch is refused
// before anything is read, built or listened on.
func TestStartRefusesUserModeWithoutTheDevelopmentSwitch(t *testing.T) {
	c := config.Default()
	c.GitLab.URL = "https://gitlab.example.com"
	c.VM.Driver, c.Network.Mode, c.QEMU.AllowForDevelopment = "qemu", "user", true
	c.StateDir = t.TempDir()
	_, err := Start(context.Background(), c, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err == nil || !strings.Contains(err.Error(), "network.allow_user_mode_for_development") {
		t.Fatalf("Start with network.mode user = %v", err)
	}
}

// The unit's stop timeout must cover the drain, the cleanup and the HTTP
// shutdown; the default config needs 13m10s (install.sh writes 13m30s).
func TestCheckStopTimeout(t *testing.T) {
	c := config.Default()
	if got := StopBudget(c); got != 13*time.Minute+10*time.Second {
		t.Fatalf("StopBudget(defaults) = %s", got)
	}
	for env, ok := range map[string]bool{"": true, "810": true, "790": true, "789": false, "660": false, "x": false, "0": false} {
		if err := CheckStopTimeout(c, env); (err == nil) != ok {
			t.Errorf("CheckStopTimeout(%q) = %v", env, err)
		}
	}
	c.Limits.DrainTimeout = 30 * time.Minute
	if err := CheckStopTimeout(c, "810"); err == nil || !strings.Contains(err.Error(), "re-run install.sh") {
		t.Errorf("a 30m drain with the default unit: %v", err)
	}
}
