package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/firerunner/firerunner/internal/cli"
	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/daemon"
	"github.com/firerunner/firerunner/internal/store"
)

func init() {
	register(command{name: "status", summary: "show jobs from the state store (read-only)", run: status})
}

func status(args []string) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	cfgPath := fs.String("config", config.DefaultPath, "configuration file (for state_dir)")
	stateDir := fs.String("state-dir", "", "state directory (overrides the config file)")
	limit := fs.Int("n", 50, "show the newest N jobs (0 = all)")
	activeOnly := fs.Bool("active", false, "only jobs still in flight")
	jobID := fs.Int64("job", 0, "show one job's timeline and transitions")
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if err := cli.NoArgs(fs); err != nil {
		return err
	}
	dir := *stateDir
	if dir == "" {
		cfg, err := config.Load(*cfgPath, daemon.Drivers())
		if err != nil {
			return fmt.Errorf("%w\n(or pass --state-dir)", err)
		}
		dir = cfg.StateDir
	}
	ctx := context.Background()
	st, err := store.OpenReadOnly(ctx, dir)
	if err != nil {
		return err
	}
	defer st.Close()
	if *jobID != 0 {
		return showJob(ctx, st, *jobID)
	}
	jobs, err := st.List(ctx, store.Filter{ActiveOnly: *activeOnly, Limit: *limit})
	if err != nil {
		return err
	}
	if len(jobs) == 0 {
		fmt.Println("no jobs")
		return nil
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "JOB\tPROJECT\tSIZE\tSTATE\tRUNNER\tVM\tAGE\tTOTAL\tREASON")
	now := time.Now()
	for _, j := range jobs {
		total := "-"
		if !j.Timeline.Finished.IsZero() && !j.Timeline.WebhookReceived.IsZero() {
			total = j.Timeline.Finished.Sub(j.Timeline.WebhookReceived).Round(time.Millisecond).String()
		}
		proj := j.ProjectPath
		if proj == "" {
			proj = fmt.Sprint(j.ProjectID)
		}
		fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", j.ID, proj, j.SizeTag, j.State, dash(j.RunnerID),
			orDash(j.VMID), now.Sub(j.CreatedAt).Round(time.Second), total, clipReason(j.Reason, 70))
	}
	return w.Flush()
}

func showJob(ctx context.Context, st *store.Store, id int64) error {
	j, err := st.Get(ctx, id)
	if err != nil {
		return fmt.Errorf("job %d: %w", id, err)
	}
	fmt.Printf("job %d  project %s (%d)  %s  ref %s  name %q\n", j.ID, j.ProjectPath, j.ProjectID, j.SizeTag, j.Ref, j.Name)
	fmt.Printf("state %s  reason %q  runner %s  vm %s  picked job %s  source %s\n", j.State, j.Reason, dash(j.RunnerID), orDash(j.VMID), dash(j.PickedJobID), j.Source)
	if j.ExitCode != nil {
		fmt.Printf("exit code %d\n", *j.ExitCode)
	}
	fmt.Println("\ntimeline:")
	t := j.Timeline
	base := t.WebhookReceived
	for _, p := range []struct {
		name string
		at   time.Time
	}{{"webhook received", t.WebhookReceived}, {"tags fetched", t.TagsFetched}, {"runner created", t.RunnerCreated},
		{"vm start request", t.VMStartRequest}, {"vm started", t.VMStarted}, {"job picked", t.JobPicked},
		{"vm exited", t.VMExited}, {"vm destroyed", t.VMDestroyed}, {"runner deleted", t.RunnerDeleted}, {"finished", t.Finished}} {
		if p.at.IsZero() {
			fmt.Printf("  %-17s -\n", p.name)
			continue
		}
		rel := ""
		if !base.IsZero() {
			rel = fmt.Sprintf("  (+%s)", p.at.Sub(base).Round(time.Microsecond))
		}
		fmt.Printf("  %-17s %s%s\n", p.name, p.at.UTC().Format("2006-01-02 15:04:05.000"), rel)
	}
	if stages := t.Stages(); len(stages) > 0 {
		fmt.Println("\nstages:")
		for _, s := range stages {
			fmt.Printf("  %-28s %s\n", s.Name, s.Duration.Round(time.Microsecond))
		}
	}
	tr, err := st.Transitions(ctx, id)
	if err != nil {
		return err
	}
	fmt.Println("\ntransitions:")
	for _, x := range tr {
		from := string(x.From)
		if from == "" {
			from = "(new)"
		}
		fmt.Printf("  %s  %-14s -> %-14s %s\n", x.At.UTC().Format("15:04:05.000"), from, x.To, x.Reason)
	}
	return nil
}

func dash(n int64) string {
	if n == 0 {
		return "-"
	}
	return fmt.Sprint(n)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func clipReason(s string, n int) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) > n {
		return s[:n-1] + "…"
	}
	return s
}
