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
	"github.com/firerunner/firerunner/internal/job"
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
	jobID := fs.Int64("job", 0, "show one job's timeline and transitions (with the VMs started for it or that ran it)")
	vms := fs.Bool("vms", false, "show the live VMs and their runners instead of jobs")
	fleet := fs.Bool("fleet", false, "show the fleet's hosts (state.backend postgres): alive, capacity, jobs, VMs, pools")
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if err := cli.NoArgs(fs); err != nil {
		return err
	}
	ctx := context.Background()
	var st *store.Store
	var err error
	if *stateDir != "" {
		st, err = store.OpenReadOnly(ctx, *stateDir)
	} else {
		cfg, lerr := config.Load(*cfgPath, daemon.Drivers())
		if lerr != nil {
			return fmt.Errorf("%w\n(or pass --state-dir)", lerr)
		}
		st, err = daemon.OpenStore(ctx, cfg, true)
	}
	if err != nil {
		return err
	}
	defer st.Close()
	if *fleet {
		return showFleet(ctx, st)
	}
	if *jobID != 0 {
		return showJob(ctx, st, *jobID)
	}
	if *vms {
		return showVMs(ctx, st)
	}
	if err := showPools(ctx, st); err != nil {
		return err
	}
	jobs, err := st.ListJobs(ctx, store.Filter{ActiveOnly: *activeOnly, Limit: *limit})
	if err != nil {
		return err
	}
	if len(jobs) == 0 {
		fmt.Println("no jobs")
		return nil
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "JOB\tPROJECT\tSIZE\tSTATE\tGITLAB\tRAN ON VM\tRUNNER\tATTEMPTS\tAGE\tTOTAL\tREASON")
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
		fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\n", j.ID, proj, orDash(j.SizeTag), j.State, orDash(j.GitLabStatus),
			orDash(j.VMID), dash(j.RunnerID), j.Attempts, now.Sub(j.CreatedAt).Round(time.Second), total, clipReason(j.Reason, 70))
	}
	return w.Flush()
}

// showPools prints one line per size with warm VMs: how many wait for a job
// and the capacity they hold (nothing when no pool has VMs).
func showPools(ctx context.Context, st *store.Store) error {
	vms, err := st.ListVMs(ctx, true, 0)
	if err != nil {
		return err
	}
	type agg struct{ ready, booting, vcpus, mib int }
	by := map[string]*agg{}
	var sizes []string
	for _, v := range vms {
		if !v.Warm() {
			continue
		}
		size := fmt.Sprintf("firecracker-%dcpu-%dgb", v.VCPUs, v.MemoryMiB/1024)
		a, ok := by[size]
		if !ok {
			a = &agg{}
			by[size] = a
			sizes = append(sizes, size)
		}
		if v.State == job.VMWarm {
			a.ready++
		} else {
			a.booting++
		}
		a.vcpus += v.VCPUs
		a.mib += v.MemoryMiB
	}
	for _, size := range sizes {
		a := by[size]
		fmt.Printf("pool %s: %d warm VMs ready, %d booting; they hold %d vCPUs and %d MiB\n", size, a.ready, a.booting, a.vcpus, a.mib)
	}
	shared, err := showSharedRunners(ctx, st, vms)
	if err != nil {
		return err
	}
	if len(sizes) > 0 || shared > 0 {
		fmt.Println()
	}
	return nil
}

// showSharedRunners prints each pool's shared runner (runners.mode pooled)
// with the live VMs using it, each a runner manager in GitLab named by its
// system_id. Tokens are never stored, so none can be shown.
func showSharedRunners(ctx context.Context, st *store.Store, live []job.VM) (int, error) {
	rs, err := st.ListRunners(ctx, true)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, r := range rs {
		if r.Mode != "pooled" {
			continue
		}
		n++
		var polling, busy int
		var managers []string
		for _, v := range live {
			if v.RunnerID != r.ID || !v.Pooled() {
				continue
			}
			what := "polling"
			switch {
			case v.State == job.VMBusy:
				busy++
				what = fmt.Sprintf("job %d", v.PickedJobID)
			case v.State == job.VMStarting:
				polling++
			default:
				what = string(v.State)
			}
			managers = append(managers, fmt.Sprintf("%s (%s, %s)", v.ID, job.SystemID(v.ID), what))
		}
		fmt.Printf("pooled runner %d (pool %s): %d VMs polling, %d running a job\n", r.ID, strings.Join(r.Tags, ","), polling, busy)
		for _, m := range managers {
			fmt.Printf("  manager %s\n", m)
		}
	}
	return n, nil
}

func showVMs(ctx context.Context, st *store.Store) error {
	vms, err := st.ListVMs(ctx, true, 0)
	if err != nil {
		return err
	}
	if len(vms) == 0 {
		fmt.Println("no live vms")
		return nil
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "VM\tSTATE\tFOR JOB\tRAN JOB\tRUNNER\tSIZE\tTAGS\tAGE\tREASON")
	now := time.Now()
	for _, v := range vms {
		fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%s\t%dcpu/%dMiB\t%s\t%s\t%s\n", v.ID, v.State, v.ForJob, dash(v.PickedJobID), dash(v.RunnerID),
			v.VCPUs, v.MemoryMiB, strings.Join(v.Tags, ","), now.Sub(v.CreatedAt).Round(time.Second), clipReason(v.Reason, 60))
	}
	return w.Flush()
}

func showJob(ctx context.Context, st *store.Store, id int64) error {
	j, err := st.GetJob(ctx, id)
	if err != nil {
		return fmt.Errorf("job %d: %w", id, err)
	}
	fmt.Printf("job %d  project %s (%d)  %s  ref %s  name %q  tags %v\n", j.ID, j.ProjectPath, j.ProjectID, orDash(j.SizeTag), j.Ref, j.Name, j.Tags)
	fmt.Printf("state %s  reason %q  GitLab %s  ran on vm %s  runner %s  attempts %d  source %s\n", j.State, j.Reason,
		orDash(j.GitLabStatus), orDash(j.VMID), dash(j.RunnerID), j.Attempts, j.Source)
	if j.ExitCode != nil {
		fmt.Printf("exit code %d\n", *j.ExitCode)
	}
	t := j.Timeline
	base := t.WebhookReceived
	at := func(name string, ts time.Time) {
		if ts.IsZero() {
			fmt.Printf("  %-22s -\n", name)
			return
		}
		rel := ""
		if !base.IsZero() {
			rel = fmt.Sprintf("  (+%s)", ts.Sub(base).Round(time.Microsecond))
		}
		fmt.Printf("  %-22s %s%s\n", name, ts.UTC().Format("2006-01-02 15:04:05.000"), rel)
	}
	fmt.Println("\ntimeline:")
	at("webhook received", t.WebhookReceived)
	at("tags fetched", t.TagsFetched)
	at("vm start request", t.VMStartRequest)
	at("job picked", t.JobPicked)
	at("finished", t.Finished)
	vms, err := st.ListVMs(ctx, false, id)
	if err != nil {
		return err
	}
	for _, v := range vms {
		role := fmt.Sprintf("started for job %d", v.ForJob)
		if v.PickedJobID == id {
			role = "ran this job"
			if v.ForJob != id {
				role += fmt.Sprintf(" (started for job %d)", v.ForJob)
			}
		}
		fmt.Printf("\nvm %s  %s  state %s  runner %s  tags %v  reason %q\n", v.ID, role, v.State, dash(v.RunnerID), v.Tags, v.Reason)
		vt := v.Timeline
		at("planned", vt.Planned)
		at("runner created", vt.RunnerCreated)
		at("vm started", vt.Started)
		at("job picked", vt.Picked)
		at("vm exited", vt.Exited)
		at("stop requested", vt.StopRequested)
		at("vm destroyed", vt.Destroyed)
		at("runner deleted", vt.RunnerDeleted)
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
		from := x.From
		if from == "" {
			from = "(new)"
		}
		fmt.Printf("  %s  %-3s %-13s %-10s -> %-10s %s\n", x.At.UTC().Format("15:04:05.000"), x.Object, x.ID, from, x.To, x.Reason)
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

// showFleet prints one line per host of the fleet: whether its lease runs,
// its capacity and pools, the active jobs it claimed and its live VMs; and
// the waiting jobs no host claimed yet.
func showFleet(ctx context.Context, st *store.Store) error {
	hosts, err := st.Hosts(ctx)
	if err != nil {
		return err
	}
	load, err := st.FleetLoad(ctx)
	if err != nil {
		return err
	}
	if len(hosts) == 0 {
		fmt.Println("no hosts (state.backend sqlite keeps no fleet; a postgres host registers at start)")
		return nil
	}
	now := time.Now()
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "HOST\tALIVE\tLAST SEEN\tCAPACITY\tMAX VMS\tQUEUED\tRUNNING\tVMS\tIN USE\tPOOLS\tNOTE")
	for _, h := range hosts {
		l := load[h.ID]
		if l == nil {
			l = &store.HostLoad{Jobs: map[job.State]int{}}
		}
		alive, note := "yes", ""
		if !h.Alive(now) {
			alive = "no"
			switch {
			case h.ReapedBy == h.ID:
				note = "left after a clean drain"
			case h.ReapedBy != "":
				note = "lease ended; jobs reconciled by " + h.ReapedBy
			default:
				note = "lease ended; not reconciled yet"
			}
		}
		fmt.Fprintf(w, "%s\t%s\t%s ago\t%d vCPU / %d MiB\t%d\t%d\t%d\t%d\t%d vCPU / %d MiB\t%s\t%s\n", h.ID, alive,
			now.Sub(h.LastSeen).Round(time.Second), h.VCPUs, h.MemoryMiB, h.MaxVMs, l.Jobs[job.Queued], l.Jobs[job.Running], l.VMs,
			l.VCPUs, l.MemoryMiB, orDash(h.Pools), note)
	}
	if u := load[""]; u != nil {
		fmt.Fprintf(w, "(unclaimed)\t\t\t\t\t%d\t%d\t\t\t\t\n", u.Jobs[job.Queued]+u.Jobs[job.New], u.Jobs[job.Running])
	}
	return w.Flush()
}
