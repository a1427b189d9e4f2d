// Package runners is the runner-lifecycle seam: a Provider creates the GitLab
// runner a VM's gitlab-runner uses, retags it, and deletes it after.
//
// OneOff creates one runner per VM (POST /user/runners, or legacy POST
// /runners) with the tags of the job the VM is for, locked and tagged-only,
// and deletes it once the VM is gone. GitLab gives a runner any pending job
// whose tags are a subset of its own, so the controller never assumes a
// runner runs the job it was made for; it records what each runner took.
//
// Every runner's description names the host that created it
// ("<prefix> <host> vm <vm-id> job <job-id>"), and Owned lists only this
// host's, so hosts sharing a GitLab never delete each other's runners.
// GitLab caps runner creation (GitLab.com Free: 50 per project per 7 days):
// OneOff turns that error into ErrLimit.
package runners

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/firerunner/firerunner/internal/gitlabapi"
	"github.com/firerunner/firerunner/internal/tags"
)

// Request asks for a runner for one VM, able to run one job.
type Request struct {
	VMID      string
	JobID     int64
	ProjectID int64
	Tags      []string // the job's tag_list; the runner gets exactly these
	JobName   string
}

// Lease is a runner handed to one VM. Token is a secret: it goes only into
// the VM's config drive; LogValue and String redact it.
type Lease struct {
	RunnerID int64
	Token    string
	TagSet   string // canonical tag set key (tags.Key)
	Shared   bool   // pooled: the runner outlives the lease
}

// LogValue keeps the token out of structured logs.
func (l Lease) LogValue() slog.Value {
	return slog.GroupValue(slog.Int64("runner_id", l.RunnerID), slog.String("tags", l.TagSet), slog.Bool("shared", l.Shared))
}

func (l Lease) String() string { return fmt.Sprintf("runner %d [%s]", l.RunnerID, l.TagSet) }

// Owned is a runner in GitLab that this host's provider created.
type Owned struct {
	RunnerID int64
	VMID     string // the VM it was created for ("" for a legacy runner)
	JobID    int64  // the job it was created for
	Legacy   bool   // description of releases before host ids: "<prefix> job <id> …"
	// Pool is the size tag of a pool's shared runner ("<prefix> <host> pool
	// <size>", runners.mode pooled); "" for a one-off runner.
	Pool        string
	Description string
}

// Provider is the runner lifecycle seam.
type Provider interface {
	// Name is the mode ("oneoff").
	Name() string
	// Init prepares background state before the first Acquire; Shutdown
	// ends it. A provider without such state does nothing in either.
	Init(ctx context.Context) error
	Shutdown(ctx context.Context) error
	// Acquire returns a runner for the job. Errors wrapping ErrLimit mean
	// GitLab's runner cap was hit; other permanent errors should fail the job.
	Acquire(ctx context.Context, r Request) (Lease, error)
	// Release gives the lease back once the VM is destroyed (one-off: deletes
	// the runner). Idempotent: releasing a deleted runner is not an error.
	// Only RunnerID and Shared need to be set (the token is not persisted).
	Release(ctx context.Context, l Lease) error
	// Retag replaces a runner's tags: a VM that is still idle is pointed at
	// another waiting job instead of creating a new runner.
	Retag(ctx context.Context, runnerID int64, tags []string) error
	// Owned lists runners this host's provider created that still exist in GitLab.
	Owned(ctx context.Context) ([]Owned, error)
	// Delete removes a leaked runner found by reconciliation (404 = nil).
	Delete(ctx context.Context, runnerID int64) error
}

// ErrLimit wraps gitlabapi.ErrRunnerLimit with what it means for FireRunner.
var ErrLimit = errors.New("GitLab's runner creation cap is reached (GitLab.com Free: 50 runners per project or group per 7 days); one-off mode creates one runner per job, so new jobs cannot get runners until the cap frees up or a pooled mode is used")

// API is the part of the GitLab client a provider uses (*gitlabapi.Client).
type API interface {
	CreateRunner(ctx context.Context, s gitlabapi.RunnerSpec) (gitlabapi.Runner, error)
	RegisterRunnerLegacy(ctx context.Context, regToken string, s gitlabapi.RunnerSpec) (gitlabapi.Runner, error)
	DeleteRunner(ctx context.Context, id int64) error
	UpdateRunnerTags(ctx context.Context, id int64, tags []string) error
	ListOwnedRunners(ctx context.Context, descriptionPrefix string) ([]gitlabapi.RunnerInfo, error)
	// ListAllRunners is GET /runners/all: GET /runners does not list
	// instance runners, so scope instance needs it (admin token).
	ListAllRunners(ctx context.Context, descriptionPrefix string) ([]gitlabapi.RunnerInfo, error)
}

// OneOffConfig configures the one-off provider.
type OneOffConfig struct {
	Scope             string // project | group | instance
	GroupID           int64  // scope group
	MaximumTimeout    time.Duration
	DescriptionPrefix string
	HostID            string // this host's id; must not contain spaces
	// LegacyRegistrationToken, when set, registers through POST /runners
	// (GitLab < 15.10) instead of POST /user/runners.
	LegacyRegistrationToken string
}

// OneOff creates one runner per VM.
type OneOff struct {
	api    API
	cfg    OneOffConfig
	re     *regexp.Regexp
	legacy *regexp.Regexp
	pool   *regexp.Regexp
}

// NewOneOff returns the one-off provider.
func NewOneOff(api API, cfg OneOffConfig) (*OneOff, error) {
	switch cfg.Scope {
	case "project", "instance":
	case "group":
		if cfg.GroupID <= 0 {
			return nil, errors.New("runners: group scope needs a group id")
		}
	default:
		return nil, fmt.Errorf("runners: unknown scope %q", cfg.Scope)
	}
	if cfg.DescriptionPrefix == "" {
		return nil, errors.New("runners: description prefix must be set")
	}
	if cfg.HostID == "" || strings.ContainsAny(cfg.HostID, " \t\n") {
		return nil, fmt.Errorf("runners: host id %q must be set and contain no spaces", cfg.HostID)
	}
	p := regexp.QuoteMeta(cfg.DescriptionPrefix)
	return &OneOff{api: api, cfg: cfg,
		re:     regexp.MustCompile(`^` + p + ` ` + regexp.QuoteMeta(cfg.HostID) + ` vm (fr-[a-z0-9]+) job ([0-9]+)( |$)`),
		legacy: regexp.MustCompile(`^` + p + ` job ([0-9]+)( |$)`),
		pool:   regexp.MustCompile(`^` + p + ` ` + regexp.QuoteMeta(cfg.HostID) + ` pool (firecracker-[0-9]+cpu-[0-9]+gb)$`)}, nil
}

// Name implements Provider.
func (o *OneOff) Name() string { return "oneoff" }

// Init implements Provider (nothing to prepare).
func (o *OneOff) Init(context.Context) error { return nil }

// Shutdown implements Provider (nothing to stop).
func (o *OneOff) Shutdown(context.Context) error { return nil }

// Description is the runner description for a VM; reconciliation parses the
// host and VM ids back out of it.
func (o *OneOff) Description(r Request) string {
	d := fmt.Sprintf("%s %s vm %s job %d project %d", o.cfg.DescriptionPrefix, o.cfg.HostID, r.VMID, r.JobID, r.ProjectID)
	if r.JobName != "" {
		d += " (" + r.JobName + ")"
	}
	if len(d) > 250 {
		d = d[:250]
	}
	return d
}

// Acquire implements Provider: creates a locked, tagged-only runner.
func (o *OneOff) Acquire(ctx context.Context, r Request) (Lease, error) {
	spec := gitlabapi.RunnerSpec{
		Scope:          o.cfg.Scope,
		TagList:        r.Tags,
		Description:    o.Description(r),
		MaximumTimeout: o.cfg.MaximumTimeout,
		Locked:         true,
		RunUntagged:    false,
	}
	switch o.cfg.Scope {
	case "project":
		spec.ProjectID = r.ProjectID
	case "group":
		spec.GroupID = o.cfg.GroupID
	}
	var run gitlabapi.Runner
	var err error
	if o.cfg.LegacyRegistrationToken != "" {
		run, err = o.api.RegisterRunnerLegacy(ctx, o.cfg.LegacyRegistrationToken, spec)
	} else {
		run, err = o.api.CreateRunner(ctx, spec)
	}
	if err != nil {
		if errors.Is(err, gitlabapi.ErrRunnerLimit) {
			return Lease{}, fmt.Errorf("%w: %w", ErrLimit, err)
		}
		return Lease{}, err
	}
	if run.ID == 0 || run.Token == "" {
		// Do not leave a runner we cannot use behind.
		if run.ID != 0 {
			_ = o.api.DeleteRunner(ctx, run.ID)
		}
		return Lease{}, fmt.Errorf("runner creation for vm %s returned no id or token", r.VMID)
	}
	return Lease{RunnerID: run.ID, Token: run.Token, TagSet: tags.Key(r.Tags)}, nil
}

// Release implements Provider: deletes the runner (404 counts as done).
func (o *OneOff) Release(ctx context.Context, l Lease) error {
	if l.RunnerID == 0 || l.Shared {
		return nil
	}
	return o.api.DeleteRunner(ctx, l.RunnerID)
}

// Retag implements Provider.
func (o *OneOff) Retag(ctx context.Context, runnerID int64, tagList []string) error {
	return o.api.UpdateRunnerTags(ctx, runnerID, tagList)
}

// Owned implements Provider: runners whose description starts with
// "<prefix> <host> vm <id> job <id>", legacy ones ("<prefix> job <id>"),
// and this host's pool runners ("<prefix> <host> pool <size>", listed in
// either mode, so that a pool removed from the config, or a switch back to
// one-off mode, still finds its runner to delete).
func (o *OneOff) Owned(ctx context.Context) ([]Owned, error) {
	listRunners := o.api.ListOwnedRunners
	if o.cfg.Scope == "instance" {
		listRunners = o.api.ListAllRunners
	}
	list, err := listRunners(ctx, o.cfg.DescriptionPrefix+" ")
	if err != nil {
		return nil, err
	}
	var out []Owned
	for _, r := range list {
		if m := o.re.FindStringSubmatch(r.Description); m != nil {
			id, _ := strconv.ParseInt(m[2], 10, 64)
			out = append(out, Owned{RunnerID: r.ID, VMID: m[1], JobID: id, Description: r.Description})
		} else if m := o.pool.FindStringSubmatch(r.Description); m != nil {
			out = append(out, Owned{RunnerID: r.ID, Pool: m[1], Description: r.Description})
		} else if m := o.legacy.FindStringSubmatch(r.Description); m != nil {
			id, _ := strconv.ParseInt(m[1], 10, 64)
			out = append(out, Owned{RunnerID: r.ID, JobID: id, Legacy: true, Description: r.Description})
		} // same prefix, another host or not our format: never touch it
	}
	return out, nil
}

// Delete implements Provider.
func (o *OneOff) Delete(ctx context.Context, runnerID int64) error {
	return o.api.DeleteRunner(ctx, runnerID)
}

// OwnedBy lists the runners in GitLab whose description names host (not
// this provider's host): a fleet host whose lease ended is reaped by
// another, which deletes them (controller.reapHost).
func (o *OneOff) OwnedBy(ctx context.Context, host string) ([]Owned, error) {
	other := *o
	other.cfg.HostID = host
	other.re = regexp.MustCompile(`^` + regexp.QuoteMeta(o.cfg.DescriptionPrefix) + ` ` + regexp.QuoteMeta(host) + ` vm (fr-[a-z0-9]+) job ([0-9]+)( |$)`)
	out, err := other.Owned(ctx)
	if err != nil {
		return nil, err
	}
	// Legacy descriptions name no host: never another host's to delete.
	mine := out[:0]
	for _, r := range out {
		if !r.Legacy {
			mine = append(mine, r)
		}
	}
	return mine, nil
}
