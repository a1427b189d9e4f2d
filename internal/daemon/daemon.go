// Package daemon assembles a running FireRunner from a Config: GitLab client,
// runner provider, VM driver, network, store, controller and HTTP server.
// `firerunner serve` and the demo (`firerunner-demo`) both start FireRunner
// through it.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/controller"
	"github.com/firerunner/firerunner/internal/gitlabapi"
	"github.com/firerunner/firerunner/internal/image"
	"github.com/firerunner/firerunner/internal/metrics"
	"github.com/firerunner/firerunner/internal/netsetup"
	"github.com/firerunner/firerunner/internal/runners"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/tags"
	"github.com/firerunner/firerunner/internal/vm"
	"github.com/firerunner/firerunner/internal/webhook"
)

// Daemon is a started FireRunner.
type Daemon struct {
	Config     config.Config
	Controller *controller.Controller
	Store      *store.Store
	Driver     vm.Driver
	Image      image.Manifest
	log        *slog.Logger
	srv        *servers
}

// Start reads the secrets, builds every part, listens on cfg.Listen, resumes
// and reconciles the jobs in the store, and returns once FireRunner is ready.
func Start(ctx context.Context, cfg config.Config, log *slog.Logger) (_ *Daemon, err error) {
	// Whoever built cfg (a file, the demo, a test), FireRunner never runs
	// a configuration that validation refuses, e.g. user-mode networking
	// without network.allow_user_mode_for_development.
	if err := cfg.Validate(Drivers()); err != nil {
		return nil, err
	}
	if cfg.Network.Mode == "user" {
		log.Warn("network.mode user: guests can reach this host's loopback services; for development only",
			"allow_user_mode_for_development", cfg.Network.AllowUserModeForDevelopment)
	}
	// Secrets come from 0600 files only (never flags or environment).
	apiToken, err := config.ReadSecret(cfg.GitLab.TokenFile)
	if err != nil {
		return nil, fmt.Errorf("gitlab.token_file: %w", err)
	}
	hookSecret, err := config.ReadSecret(cfg.GitLab.WebhookSecretFile)
	if err != nil {
		return nil, fmt.Errorf("gitlab.webhook_secret_file: %w", err)
	}
	var regToken string
	if cfg.Runners.Registration == "legacy" {
		if regToken, err = config.ReadSecret(cfg.Runners.RegistrationTokenFile); err != nil {
			return nil, fmt.Errorf("runners.registration_token_file: %w", err)
		}
	}

	hostID, err := cfg.HostIdentity()
	if err != nil {
		return nil, err
	}
	d := &Daemon{Config: cfg, log: log}
	m := metrics.New(func() metrics.Snapshot {
		if d.Controller == nil {
			return metrics.Snapshot{}
		}
		return d.Controller.Snapshot()
	})
	api, err := gitlabapi.New(cfg.GitLab.URL, apiToken,
		gitlabapi.WithRetries(cfg.GitLab.MaxRetries), gitlabapi.WithTimeout(cfg.GitLab.RequestTimeout),
		gitlabapi.WithLogger(log), gitlabapi.WithErrorCounter(m.APIErrorCounter),
		gitlabapi.WithHTTPClient(controller.APIHTTPClient()))
	if err != nil {
		return nil, err
	}
	for _, w := range cfg.Warnings() {
		log.Warn("config: " + w)
	}
	prov, err := provider(cfg, api, runners.OneOffConfig{
		Scope: cfg.Runners.Scope, GroupID: cfg.Runners.GroupID, MaximumTimeout: cfg.Runners.MaximumTimeout,
		DescriptionPrefix: cfg.Runners.DescriptionPrefix, HostID: hostID, LegacyRegistrationToken: regToken,
	})
	if err != nil {
		return nil, err
	}
	if d.Image, err = image.Load(cfg.VM.ImageDir); err != nil {
		return nil, fmt.Errorf("vm.image_dir: %w", err)
	}
	if cfg.Runners.Executor == config.ExecutorDocker && !d.Image.HasDocker() {
		return nil, fmt.Errorf("runners.executor docker: the image %s has no Docker engine (built by %s); rebuild it with firerunner image build", d.Image.Dir, d.Image.Builder)
	}
	driver, err := Drivers().Get(cfg.VM.Driver)
	if err != nil {
		return nil, fmt.Errorf("vm.driver: %w", err)
	}
	if d.Driver, err = driver.New(cfg, log); err != nil {
		return nil, fmt.Errorf("vm.driver: %w", err)
	}
	nw, err := network(ctx, cfg, driver, log)
	if err != nil {
		return nil, err
	}
	if d.Store, err = OpenStore(ctx, cfg, false); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			d.Store.Close()
		}
	}()
	d.Controller, err = controller.New(controller.Options{
		Config: cfg, HostID: hostID, Store: d.Store, Driver: d.Driver, Image: d.Image.VMImage(), GitLab: api, Runners: prov,
		Network: nw, Metrics: m, Logger: log,
	})
	if err != nil {
		return nil, err
	}

	hook := metrics.Timed(webhook.NewHandler(hookSecret, d.Controller,
		webhook.WithMaxBody(cfg.GitLab.WebhookMaxBody), webhook.WithLogger(log),
		webhook.WithRejectCounter(func(r string) { m.WebhookRejects.WithLabelValues(r).Inc() }),
		webhook.WithEventCounter(func(e, s string) { m.WebhookEvents.WithLabelValues(e, s).Inc() })), m.WebhookLatency)
	// Serve first (so /healthz answers during start-up), then resume jobs
	// and reconcile; /readyz turns ready once that is done.
	if d.srv, err = listen(cfg, hook, []route{{"/metrics", m.Handler()}, {"/healthz", metrics.Healthz()},
		{"/readyz", metrics.Readyz(d.Controller.Ready)}}, log); err != nil {
		return nil, err
	}
	if err = d.Controller.Start(ctx); err != nil {
		d.srv.close()
		return nil, err
	}
	log.Info("firerunner serving", "host_id", hostID, "listen", d.Addr(), "tls", cfg.TLS.Enabled(), "metrics_listen", d.MetricsAddr(),
		"gitlab", cfg.GitLab.URL, "driver", cfg.VM.Driver,
		"network", cfg.Network.Mode, "state_dir", cfg.StateDir, "store", d.Store.Backend(), "image", d.Image.Dir,
		"poll_projects", fmt.Sprint(cfg.Reconcile.PollProjects), "poll_groups", fmt.Sprint(cfg.Reconcile.PollGroups))
	return d, nil
}

// network prepares tap networking; nil means QEMU user-mode networking.
func network(ctx context.Context, cfg config.Config, driver vm.Provider[config.Config], log *slog.Logger) (controller.Network, error) {
	if cfg.Network.Mode != "tap" {
		return nil, nil
	}
	opts := []netsetup.Option{netsetup.WithLogger(log)}
	// VMs must never reach FireRunner's own webhook and metrics ports.
	for _, a := range []string{cfg.Listen, cfg.MetricsListen} {
		if _, p, err := net.SplitHostPort(a); err == nil {
			if port, err := strconv.ParseUint(p, 10, 16); err == nil && port != 0 {
				opts = append(opts, netsetup.WithHostPorts(uint16(port)))
			}
		}
	}
	// Ports the operator opened to VMs (validated 1-65535 by config).
	for _, p := range cfg.Network.AllowHostPorts {
		opts = append(opts, netsetup.WithAllowedHostPorts(uint16(p)))
	}
	// A VMM that runs as its own user (the jailed Firecracker, as
	// firecracker.uid) opens its tap itself, so the tap must be that user's.
	if u, ok := driver.(vm.VMMUser[config.Config]); ok {
		if uid, gid, ok := u.VMMUser(cfg); ok {
			opts = append(opts, netsetup.WithTapOwner(uint32(uid), uint32(gid)))
		}
	}
	// Each VMM a user of its own: each tap that VM's (base + host number).
	if u, ok := driver.(vm.VMMUserRange[config.Config]); ok {
		if base, ok := u.VMMUserRange(cfg); ok {
			opts = append(opts, netsetup.WithTapOwnerRange(uint32(base)))
		}
	}
	mgr, err := netsetup.New(cfg.Network, cfg.StateDir, opts...)
	if err != nil {
		return nil, err
	}
	if err := mgr.Setup(ctx); err != nil {
		return nil, fmt.Errorf("network setup: %w", err)
	}
	return mgr, nil
}

// Addr is the address the public (webhook) server listens on (useful with
// port 0); it serves HTTPS when tls is configured.
func (d *Daemon) Addr() string { return d.srv.publicLn.Addr().String() }

// MetricsAddr is where /metrics, /healthz and /readyz are served:
// metrics_listen's address, or Addr without it.
func (d *Daemon) MetricsAddr() string { return d.srv.metricsAddr() }

// Wait blocks until ctx ends or an HTTP server fails.
func (d *Daemon) Wait(ctx context.Context) error {
	select {
	case err := <-d.srv.errs:
		if !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("http server: %w", err)
		}
		return nil
	case <-ctx.Done():
		return nil
	}
}

// Stop budget: serve gives Shutdown the drain timeout plus CleanupTimeout
// (tearing down the VMs left and deleting their runners), and the HTTP
// servers HTTPShutdownTimeout after that. The systemd unit's TimeoutStopSec
// must cover StopBudget, or systemd kills FireRunner in the middle of its
// cleanup; install.sh derives it from the config (and passes it to the
// service as FIRERUNNER_TIMEOUT_STOP_SEC, which CheckStopTimeout reads).
const (
	CleanupTimeout      = 3 * time.Minute
	HTTPShutdownTimeout = 10 * time.Second
)

// StopBudget is the longest a SIGTERM'd FireRunner takes to exit.
func StopBudget(cfg config.Config) time.Duration {
	return cfg.Limits.DrainTimeout + CleanupTimeout + HTTPShutdownTimeout
}

// StopTimeoutEnv names the service's stop timeout in seconds (set by the
// unit install.sh writes).
const StopTimeoutEnv = "FIRERUNNER_TIMEOUT_STOP_SEC"

// CheckStopTimeout compares the service manager's stop timeout (seconds,
// from StopTimeoutEnv; "" = not run by the shipped unit) with StopBudget.
func CheckStopTimeout(cfg config.Config, env string) error {
	if env == "" {
		return nil
	}
	sec, err := strconv.Atoi(env)
	if err != nil || sec <= 0 {
		return fmt.Errorf("%s=%q is not a number of seconds", StopTimeoutEnv, env)
	}
	if stop, need := time.Duration(sec)*time.Second, StopBudget(cfg); stop < need {
		return fmt.Errorf("the service's TimeoutStopSec (%s) is shorter than limits.drain_timeout (%s) + cleanup (%s) + HTTP shutdown (%s) = %s: "+
			"systemd would kill FireRunner before it cleaned up (re-run install.sh, which derives it from the config)",
			stop, cfg.Limits.DrainTimeout, CleanupTimeout, HTTPShutdownTimeout, need)
	}
	return nil
}

// Shutdown stops intake, drains running VMs (up to limits.drain_timeout, then
// cleans up), stops the HTTP server last so cancel/success webhooks still
// tear VMs down while draining, and closes the store. State is kept.
func (d *Daemon) Shutdown(ctx context.Context) error {
	d.log.Info("shutdown requested: intake stopped, draining", "drain_timeout", d.Config.Limits.DrainTimeout.String())
	shutErr := d.Controller.Shutdown(ctx)
	hctx, cancel := context.WithTimeout(context.Background(), HTTPShutdownTimeout)
	defer cancel()
	d.srv.shutdown(hctx)
	if err := d.Store.Close(); err != nil && shutErr == nil {
		shutErr = err
	}
	if shutErr == nil {
		d.log.Info("firerunner stopped", "state_dir", d.Config.StateDir)
	}
	return shutErr
}

// provider is the runner provider of runners.mode: one-off, or pooled with
// a shared runner per configured pool.
func provider(cfg config.Config, api *gitlabapi.Client, o runners.OneOffConfig) (runners.Provider, error) {
	if cfg.Runners.Mode != "pooled" {
		return runners.NewOneOff(api, o)
	}
	pc := runners.PooledConfig{OneOffConfig: o}
	for _, p := range cfg.Pools {
		size, ok, err := tags.Parse([]string{p.Size}, tags.Limits{})
		if err != nil || !ok {
			return nil, fmt.Errorf("pools: size %q: %v", p.Size, err)
		}
		pc.Pools = append(pc.Pools, size.Tag())
	}
	return runners.NewPooled(api, pc)
}

// OpenStore opens the store cfg.state.backend names: SQLite in state_dir,
// or PostgreSQL with the connection string read from
// state.postgres_dsn_file (0600 or stricter, like every secret file; the
// string is never logged). readOnly opens it for inspection (status).
func OpenStore(ctx context.Context, cfg config.Config, readOnly bool) (*store.Store, error) {
	if cfg.State.Backend != "postgres" {
		if readOnly {
			return store.OpenReadOnly(ctx, cfg.StateDir)
		}
		return store.Open(ctx, cfg.StateDir)
	}
	dsn, err := config.ReadSecret(cfg.State.PostgresDSNFile)
	if err != nil {
		return nil, fmt.Errorf("state.postgres_dsn_file: %w", err)
	}
	if readOnly {
		return store.OpenPostgresReadOnly(ctx, dsn)
	}
	return store.OpenPostgres(ctx, dsn)
}
