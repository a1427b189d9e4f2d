package main

import (
	"context"
	"flag"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/firerunner/firerunner/internal/cli"
	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/daemon"
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
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if err := cli.NoArgs(fs); err != nil {
		return err
	}
	cfg, err := config.Load(*cfgPath, daemon.Drivers())
	if err != nil {
		return err
	}
	log := newLogger(cfg.LogLevel)
	slog.SetDefault(log)
	if err := daemon.CheckStopTimeout(cfg, os.Getenv(daemon.StopTimeoutEnv)); err != nil {
		log.Warn("stop timeout too short", "err", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	d, err := daemon.Start(ctx, cfg, log)
	if err != nil {
		return err
	}
	werr := d.Wait(ctx)
	// A failed listener leaves running jobs to the next start's reconcile;
	// a signal drains them within limits.drain_timeout.
	sctx, cancel := context.WithTimeout(context.Background(), cfg.Limits.DrainTimeout+daemon.CleanupTimeout)
	defer cancel()
	if err := d.Shutdown(sctx); err != nil {
		return err
	}
	return werr
}
