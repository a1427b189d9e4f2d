package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/controller"
	"github.com/firerunner/firerunner/internal/gitlabapi"
	"github.com/firerunner/firerunner/internal/image"
	"github.com/firerunner/firerunner/internal/metrics"
	"github.com/firerunner/firerunner/internal/netsetup"
	"github.com/firerunner/firerunner/internal/runners"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/vm"
	"github.com/firerunner/firerunner/internal/webhook"

	// VM drivers register themselves by name (config vm.driver).
	_ "github.com/firerunner/firerunner/internal/vm/firecracker"
	_ "github.com/firerunner/firerunner/internal/vm/qemu"
)

func init() {
	register(command{name: "serve", summary: "run the FireRunner daemon", run: serve})
}

func newLogger(level string) *slog.Logger {
	var l slog.Level
	_ = l.UnmarshalText([]byte(level))
	return slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: l}))
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	cfgPath := fs.String("config", config.DefaultPath, "configuration file (YAML)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		return err
	}
	log := newLogger(cfg.LogLevel)
	slog.SetDefault(log)

	// Secrets come from 0600 files only (never flags or environment).
	apiToken, err := config.ReadSecret(cfg.GitLab.TokenFile)
	if err != nil {
		return fmt.Errorf("gitlab.token_file: %w", err)
	}
	hookSecret, err := config.ReadSecret(cfg.GitLab.WebhookSecretFile)
	if err != nil {
		return fmt.Errorf("gitlab.webhook_secret_file: %w", err)
	}
	var regToken string
	if cfg.Runners.Registration == "legacy" {
		if regToken, err = config.ReadSecret(cfg.Runners.RegistrationTokenFile); err != nil {
			return fmt.Errorf("runners.registration_token_file: %w", err)
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	var ctl *controller.Controller
	m := metrics.New(func() metrics.Snapshot {
		if ctl == nil {
			return metrics.Snapshot{}
		}
		return ctl.Snapshot()
	})
	api, err := gitlabapi.New(cfg.GitLab.URL, apiToken,
		gitlabapi.WithRetries(cfg.GitLab.MaxRetries), gitlabapi.WithTimeout(cfg.GitLab.RequestTimeout),
		gitlabapi.WithLogger(log), gitlabapi.WithErrorCounter(m.APIErrorCounter),
		gitlabapi.WithHTTPClient(controller.APIHTTPClient()))
	if err != nil {
		return err
	}
	prov, err := runners.NewOneOff(api, runners.OneOffConfig{
		Scope: cfg.Runners.Scope, GroupID: cfg.Runners.GroupID, MaximumTimeout: cfg.Runners.MaximumTimeout,
		DescriptionPrefix: cfg.Runners.DescriptionPrefix, LegacyRegistrationToken: regToken,
	})
	if err != nil {
		return err
	}
	man, err := image.Load(cfg.VM.ImageDir)
	if err != nil {
		return fmt.Errorf("vm.image_dir: %w", err)
	}
	drv, err := vm.New(cfg.VM.Driver, vm.Env{Config: cfg, Logger: log})
	if err != nil {
		return fmt.Errorf("vm.driver: %w", err)
	}
	var nw controller.Network // nil: user-mode networking (QEMU development only)
	if cfg.Network.Mode == "tap" {
		opts := []netsetup.Option{netsetup.WithLogger(log)}
		// VMs must never reach FireRunner's own webhook/metrics port.
		if _, p, err := net.SplitHostPort(cfg.Listen); err == nil {
			if port, err := strconv.ParseUint(p, 10, 16); err == nil {
				opts = append(opts, netsetup.WithHostPorts(uint16(port)))
			}
		}
		// The jailed Firecracker process runs as firecracker.uid and must open its tap.
		if cfg.VM.Driver == "firecracker" && cfg.Firecracker.UseJailer {
			opts = append(opts, netsetup.WithTapOwner(uint32(cfg.Firecracker.UID), uint32(cfg.Firecracker.GID)))
		}
		mgr, err := netsetup.New(cfg.Network, cfg.StateDir, opts...)
		if err != nil {
			return err
		}
		if err := mgr.Setup(ctx); err != nil {
			return fmt.Errorf("network setup: %w", err)
		}
		nw = mgr
	}
	st, err := store.Open(ctx, cfg.StateDir)
	if err != nil {
		return err
	}
	defer st.Close()

	ctl, err = controller.New(controller.Options{
		Config: cfg, Store: st, Driver: drv, Image: man.VMImage(), GitLab: api, Runners: prov,
		Network: nw, Metrics: m, Logger: log,
	})
	if err != nil {
		return err
	}

	mux := http.NewServeMux()
	mux.Handle("/webhook", webhook.NewHandler(hookSecret, ctl,
		webhook.WithMaxBody(cfg.GitLab.WebhookMaxBody), webhook.WithLogger(log),
		webhook.WithRejectCounter(func(r string) { m.WebhookRejects.WithLabelValues(r).Inc() }),
		webhook.WithEventCounter(func(e, s string) { m.WebhookEvents.WithLabelValues(e, s).Inc() })))
	mux.Handle("/metrics", m.Handler())
	mux.Handle("/healthz", metrics.Healthz())
	mux.Handle("/readyz", metrics.Readyz(ctl.Ready))
	srv := &http.Server{Addr: cfg.Listen, Handler: mux, ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout: time.Minute, WriteTimeout: time.Minute, IdleTimeout: 2 * time.Minute}

	// Serve first (so /healthz answers during start-up), then resume jobs
	// and reconcile; /readyz turns ready once that is done.
	srvErr := make(chan error, 1)
	go func() { srvErr <- srv.ListenAndServe() }()
	if err := ctl.Start(ctx); err != nil {
		_ = srv.Close()
		return err
	}
	log.Info("firerunner serving", "listen", cfg.Listen, "gitlab", cfg.GitLab.URL, "driver", cfg.VM.Driver,
		"network", cfg.Network.Mode, "state_dir", cfg.StateDir, "image", man.Dir,
		"poll_projects", fmt.Sprint(cfg.Reconcile.PollProjects), "poll_groups", fmt.Sprint(cfg.Reconcile.PollGroups))

	select {
	case err := <-srvErr:
		if !errors.Is(err, http.ErrServerClosed) {
			// Listening failed: leave running jobs to the next start's reconcile.
			sctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			_ = ctl.Shutdown(sctx)
			return fmt.Errorf("http server: %w", err)
		}
	case <-ctx.Done():
	}
	log.Info("shutdown requested: intake stopped, draining", "drain_timeout", cfg.Limits.DrainTimeout.String())
	// The HTTP server keeps running while draining: cancel/success webhooks
	// still tear VMs down, and /metrics stays scrapeable.
	sctx, cancel := context.WithTimeout(context.Background(), cfg.Limits.DrainTimeout+3*time.Minute)
	defer cancel()
	shutErr := ctl.Shutdown(sctx)
	hctx, hcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer hcancel()
	_ = srv.Shutdown(hctx)
	if shutErr != nil {
		return shutErr
	}
	log.Info("firerunner stopped", "note", strings.TrimSpace("state kept in "+cfg.StateDir))
	return nil
}
