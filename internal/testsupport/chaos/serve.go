package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/controller"
	"github.com/firerunner/firerunner/internal/gitlabapi"
	"github.com/firerunner/firerunner/internal/metrics"
	"github.com/firerunner/firerunner/internal/planner"
	"github.com/firerunner/firerunner/internal/runners"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/testsupport/fakevm"
	"github.com/firerunner/firerunner/internal/vm"
	"github.com/firerunner/firerunner/internal/webhook"
)

// childConfig is what the harness hands a FireRunner process (a JSON file,
// no secrets: those are in 0600 files named by Config, as in production).
type childConfig struct {
	Config   config.Config
	HostID   string
	Capacity planner.Capacity
	Guest    []string // argv of the guest program (the VM dir is appended)
	GuestEnv []string
}

// netDir is where the file-backed network keeps its "taps".
func netDir(stateDir string) string { return filepath.Join(stateDir, "chaosnet") }

// Serve runs one FireRunner process from the config file at cfgPath: the
// parts internal/daemon assembles (API client with the production retry
// policy, one-off runners, SQLite store, controller, webhook handler,
// /readyz), but with the process-backed fake driver and the file-backed
// network. It returns after SIGTERM and a graceful shutdown; SIGKILL is the
// harness's business.
func Serve(cfgPath string) error {
	b, err := os.ReadFile(cfgPath)
	if err != nil {
		return err
	}
	var cc childConfig
	if err := json.Unmarshal(b, &cc); err != nil {
		return err
	}
	cfg := cc.Config
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	apiToken, err := config.ReadSecret(cfg.GitLab.TokenFile)
	if err != nil {
		return err
	}
	hookSecret, err := config.ReadSecret(cfg.GitLab.WebhookSecretFile)
	if err != nil {
		return err
	}
	var c *controller.Controller
	m := metrics.New(func() metrics.Snapshot {
		if c == nil {
			return metrics.Snapshot{}
		}
		return c.Snapshot()
	})
	api, err := gitlabapi.New(cfg.GitLab.URL, apiToken,
		gitlabapi.WithRetries(cfg.GitLab.MaxRetries), gitlabapi.WithTimeout(cfg.GitLab.RequestTimeout),
		gitlabapi.WithLogger(log), gitlabapi.WithErrorCounter(m.APIErrorCounter),
		gitlabapi.WithHTTPClient(controller.APIHTTPClient()))
	if err != nil {
		return err
	}
	prov, err := runners.NewOneOff(api, runners.OneOffConfig{Scope: cfg.Runners.Scope, GroupID: cfg.Runners.GroupID,
		MaximumTimeout: cfg.Runners.MaximumTimeout, DescriptionPrefix: cfg.Runners.DescriptionPrefix, HostID: cc.HostID})
	if err != nil {
		return err
	}
	drv, err := fakevm.NewProc(fakevm.ProcOptions{StateDir: cfg.StateDir, Guest: cc.Guest, Env: cc.GuestEnv})
	if err != nil {
		return err
	}
	ctx := context.Background()
	// SQLite in state_dir, or the fleet's PostgreSQL (make test-fleet), as
	// daemon.OpenStore does.
	var st *store.Store
	if cfg.State.Backend == "postgres" {
		dsn, derr := config.ReadSecret(cfg.State.PostgresDSNFile)
		if derr != nil {
			return derr
		}
		st, err = store.OpenPostgres(ctx, dsn)
	} else {
		st, err = store.Open(ctx, cfg.StateDir)
	}
	if err != nil {
		return err
	}
	defer st.Close()
	c, err = controller.New(controller.Options{Config: cfg, HostID: cc.HostID, Store: st, Driver: drv,
		Image:  vm.Image{Kernel: "/chaos/vmlinux", Initrd: "/chaos/initrd.img", Rootfs: "/chaos/rootfs.ext4"},
		GitLab: api, Runners: prov, Network: NewFileNet(netDir(cfg.StateDir)), Metrics: m, Logger: log, Capacity: cc.Capacity})
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.Handle("/webhook", metrics.Timed(webhook.NewHandler(hookSecret, c, webhook.WithMaxBody(cfg.GitLab.WebhookMaxBody),
		webhook.WithLogger(log), webhook.WithRejectCounter(func(r string) { m.WebhookRejects.WithLabelValues(r).Inc() }),
		webhook.WithEventCounter(func(e, s string) { m.WebhookEvents.WithLabelValues(e, s).Inc() })), m.WebhookLatency))
	mux.Handle("/metrics", m.Handler())
	mux.Handle("/readyz", metrics.Readyz(c.Ready))
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	// Serving first, like the daemon: hooks during start-up are stored.
	if err := c.Start(ctx); err != nil {
		return err
	}
	log.Info("chaos firerunner serving", "listen", cfg.Listen, "pid", os.Getpid())
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	sctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	err = c.Shutdown(sctx)
	_ = srv.Shutdown(sctx)
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("shutdown: %w", err)
	}
	return err
}
