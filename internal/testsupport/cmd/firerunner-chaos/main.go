// Command firerunner-chaos runs FireRunner through many jobs under chaos
// (internal/testsupport/chaos) and prints one line:
//
//	chaos: jobs=1000 served=… lost=… doubled=… leaked_vms=… leaked_runners=… leaked_taps=… p99_start_ms=…
//
// It exits 1 when a job was lost or ran twice or anything leaked, 2 on bad
// usage, 3 when the harness itself failed. The full report (every problem,
// the chaos applied) is written to <work dir>/report.txt and, on failure,
// to stderr. `make chaos` runs it.
//
// The same binary is the FireRunner process the harness kills and restarts
// ("serve CONFIG") and each fake VM's guest ("guest DIR").
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/firerunner/firerunner/internal/testsupport/chaos"
)

func main() {
	if len(os.Args) == 3 {
		switch os.Args[1] {
		case "serve":
			if err := chaos.Serve(os.Args[2]); err != nil {
				fmt.Fprintln(os.Stderr, "firerunner-chaos serve:", err)
				os.Exit(1)
			}
			os.Exit(0)
		case "guest":
			os.Exit(chaos.Guest(os.Args[2]))
		}
	}
	o := chaos.DefaultOptions()
	fs := flag.NewFlagSet("firerunner-chaos", flag.ContinueOnError)
	fs.IntVar(&o.Jobs, "jobs", o.Jobs, "jobs to run")
	fs.DurationVar(&o.KillMin, "kill-min", o.KillMin, "shortest time between FireRunner's start and its SIGKILL")
	fs.DurationVar(&o.KillMax, "kill-max", o.KillMax, "longest time between FireRunner's start and its SIGKILL")
	fs.Float64Var(&o.HookDrop, "hook-drop", o.HookDrop, "share of webhooks dropped")
	fs.IntVar(&o.HookCopies, "hook-copies", o.HookCopies, "most deliveries of one webhook")
	fs.DurationVar(&o.HookDelay, "hook-delay", o.HookDelay, "longest delay of a delivery (reordering)")
	fs.Float64Var(&o.APIFail, "api-fail", o.APIFail, "share of GitLab API calls failing with 5xx/429")
	fs.DurationVar(&o.Timeout, "timeout", o.Timeout, "bound on the run")
	fs.Uint64Var(&o.Seed, "seed", uint64(time.Now().UnixNano()), "random seed")
	fs.StringVar(&o.WorkDir, "workdir", "", "keep state, logs and report.txt here (default: a new temp dir)")
	verbose := fs.Bool("v", false, "progress on stderr")
	if err := fs.Parse(os.Args[1:]); err != nil {
		if err == flag.ErrHelp {
			os.Exit(0)
		}
		os.Exit(2)
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "firerunner-chaos: unexpected argument %q\n", fs.Arg(0))
		fs.Usage()
		os.Exit(2)
	}
	o.Log = io.Discard
	if *verbose {
		o.Log = os.Stderr
	}
	res, err := chaos.Run(context.Background(), o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "firerunner-chaos:", err)
		if res.WorkDir != "" {
			fmt.Fprintln(os.Stderr, "work dir:", res.WorkDir)
		}
		os.Exit(3)
	}
	fmt.Println(res.Line())
	if !res.OK() {
		fmt.Fprint(os.Stderr, res.Summary())
		os.Exit(1)
	}
	if o.WorkDir == "" {
		_ = os.RemoveAll(res.WorkDir)
	}
}
