// Package runners is the runner-lifecycle seam: a Provider hands the
// controller a GitLab runner (id + token) for a job and takes it back after.
//
// Today there is one Provider, OneOff: one runner created per job with exactly
// the job's tags (POST /user/runners, or legacy POST /runners), deleted once
// the job's VM is gone.
//
// A pooled mode slots in behind the same interface: Pooled would keep one
// runner per size class (tag set), created once and persisted, and Acquire
// would return that shared Lease (Shared=true, same token for many VMs) while
// Release only drops a reference instead of deleting the runner. The
// controller never assumes one runner per job: it tracks leases by runner id
// and counts runners per tag set, and a runner made for job A may run job B
// with the same tags in either mode. Owned/Delete let reconciliation remove
// runners no lease refers to; Pooled would report its class runners as owned
// by no job and keep them while configured.
//
// GitLab caps runner creation (GitLab.com Free: 50 per project per 7 days),
// which is why pooled mode exists: OneOff turns that error into ErrLimit.
package runners

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/firerunner/firerunner/internal/gitlabapi"
)

// Request asks for a runner able to run one job.
type Request struct {
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
	TagSet   string // canonical tag set key (TagSetKey), for per-tag-set counts
	Shared   bool   // pooled: the runner outlives the lease
}

// LogValue keeps the token out of structured logs.
func (l Lease) LogValue() slog.Value {
	return slog.GroupValue(slog.Int64("runner_id", l.RunnerID), slog.String("tags", l.TagSet), slog.Bool("shared", l.Shared))
}

func (l Lease) String() string { return fmt.Sprintf("runner %d [%s]", l.RunnerID, l.TagSet) }

// Owned is a runner in GitLab that this provider created.
type Owned struct {
	RunnerID    int64
	JobID       int64 // job it was created for; 0 when not per-job (pooled)
	Description string
}

// Provider is the runner lifecycle seam.
type Provider interface {
	// Name is the mode ("oneoff").
	Name() string
	// Acquire returns a runner for the job. Errors wrapping ErrLimit mean
	// GitLab's runner cap was hit; other permanent errors should fail the job.
	Acquire(ctx context.Context, r Request) (Lease, error)
	// Release gives the lease back once the VM is destroyed (one-off: deletes
	// the runner). Idempotent: releasing a deleted runner is not an error.
	// Only RunnerID and Shared need to be set (the token is not persisted).
	Release(ctx context.Context, l Lease) error
	// Owned lists runners this provider created that still exist in GitLab.
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
	// LegacyRegistrationToken, when set, registers through POST /runners
	// (GitLab < 15.10) instead of POST /user/runners.
	LegacyRegistrationToken string
}

// OneOff creates one runner per job.
type OneOff struct {
	api API
	cfg OneOffConfig
	re  *regexp.Regexp
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
	return &OneOff{api: api, cfg: cfg,
		re: regexp.MustCompile(`^` + regexp.QuoteMeta(cfg.DescriptionPrefix) + ` job ([0-9]+)( |$)`)}, nil
}

// Name implements Provider.
func (o *OneOff) Name() string { return "oneoff" }

// Description is the runner description for a job; reconciliation parses
// the job id back out of it.
func (o *OneOff) Description(r Request) string {
	d := fmt.Sprintf("%s job %d project %d", o.cfg.DescriptionPrefix, r.JobID, r.ProjectID)
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
		return Lease{}, fmt.Errorf("runner creation for job %d returned no id or token", r.JobID)
	}
	return Lease{RunnerID: run.ID, Token: run.Token, TagSet: TagSetKey(r.Tags)}, nil
}

// Release implements Provider: deletes the runner (404 counts as done).
func (o *OneOff) Release(ctx context.Context, l Lease) error {
	if l.RunnerID == 0 || l.Shared {
		return nil
	}
	return o.api.DeleteRunner(ctx, l.RunnerID)
}

// Owned implements Provider: runners whose description starts with
// "<prefix> job <id>".
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
		m := o.re.FindStringSubmatch(r.Description)
		if m == nil {
			continue // same prefix, not our format: never touch it
		}
		id, err := strconv.ParseInt(m[1], 10, 64)
		if err != nil {
			continue
		}
		out = append(out, Owned{RunnerID: r.ID, JobID: id, Description: r.Description})
	}
	return out, nil
}

// Delete implements Provider.
func (o *OneOff) Delete(ctx context.Context, runnerID int64) error {
	return o.api.DeleteRunner(ctx, runnerID)
}

// TagSetKey is the canonical key of a tag set: lower-cased, sorted, comma-joined.
func TagSetKey(tags []string) string {
	t := make([]string, 0, len(tags))
	for _, s := range tags {
		t = append(t, strings.ToLower(strings.TrimSpace(s)))
	}
	sort.Strings(t)
	return strings.Join(t, ",")
}
