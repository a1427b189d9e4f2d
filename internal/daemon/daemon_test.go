package daemon

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"testing"

	"github.com/firerunner/firerunner/internal/config"
)

// Start validates whatever configuration it is given (not only serve's
// file): user-mode networking without the development switch is refused
// before anything is read, built or listened on.
func TestStartRefusesUserModeWithoutTheDevelopmentSwitch(t *testing.T) {
	c := config.Default()
	c.GitLab.URL = "https://gitlab.example.com"
	c.VM.Driver, c.Network.Mode = "qemu", "user"
	c.StateDir = t.TempDir()
	_, err := Start(context.Background(), c, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err == nil || !strings.Contains(err.Error(), "network.allow_user_mode_for_development") {
		t.Fatalf("Start with network.mode user = %v", err)
	}
}
