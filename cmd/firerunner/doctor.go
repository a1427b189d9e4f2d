package main

import (
	"context"
	"errors"
	"flag"
	"os"
	"os/signal"
	"syscall"

	"github.com/firerunner/firerunner/internal/cli"
	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/daemon"
	"github.com/firerunner/firerunner/internal/doctor"
)

func init() {
	register(command{name: "doctor", summary: "check this host can run FireRunner (pass/fail with fixes)", run: runDoctor})
}

// errDoctorFailed makes main exit 1 after the report was printed.
var errDoctorFailed = errors.New("one or more checks failed")

func runDoctor(args []string) error {
	fs := flag.NewFlagSet("doctor", flag.ContinueOnError)
	path := fs.String("config", config.DefaultPath, "config file")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if err := cli.NoArgs(fs); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// A bad config is reported as a failed check; the other checks still run
	// on whatever loaded (defaults for the rest).
	drivers := daemon.Drivers()
	cfg, err := config.Load(*path, drivers)
	r := doctor.Run(ctx, doctor.Env{Config: cfg, ConfigErr: err, Drivers: drivers})
	if *asJSON {
		if err := r.WriteJSON(os.Stdout); err != nil {
			return err
		}
	} else {
		r.WriteText(os.Stdout)
	}
	if !r.OK {
		return errDoctorFailed
	}
	return nil
}
