package runners

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/firerunner/firerunner/internal/gitlabapi"
	"github.com/firerunner/firerunner/internal/tags"
)

// PoolAPI is what the pooled provider needs beyond API.
type PoolAPI interface {
	API
	// ResetRunnerToken is POST /runners/:id/reset_authentication_token:
	// a new token, the old one dead at once.
	ResetRunnerToken(ctx context.Context, runnerID int64) (string, error)
}

// Pools is the part of a provider that hands out pools' shared runners
// (runners.mode pooled). The controller asks for it with a type assertion:
// a provider without it serves every job one-off.
type Pools interface {
	// PoolLease returns the shared runner of the pool of size tag size (a
	// canonical size tag), with its token: created on first use, or found
	// in GitLab by its description after a restart and its token rotated
	// (the token is never stored, so the old one is unknown and must die).
	PoolLease(ctx context.Context, size string) (Lease, error)
	// PoolRunner is the id of a pool's runner known in this process (0: none yet).
	PoolRunner(size string) int64
	// Rotate gives runner id a new token, so that no gitlab-runner still
	// holding the old one can take another job. The new token is kept when
	// id is a configured pool's runner, dropped otherwise.
	Rotate(ctx context.Context, runnerID int64) error
	// Pooled reports whether size has a shared runner (a configured pool).
	Pooled(size string) bool
}

// PooledConfig configures the pooled provider.
type PooledConfig struct {
	OneOffConfig
	// Pools are the canonical size tags that get a shared runner each.
	Pools []string
}

// Pooled gives each configured pool one runner, created once and shared by
// all of the pool's VMs (each VM's gitlab-runner is a runner manager of its
// own, named by its system_id); other jobs get one-off runners as with
// OneOff. The shared runners' tokens live only in this process's memory.
type Pooled struct {
	*OneOff
	api   PoolAPI
	pools []string
	// byPool is fixed at construction; each entry has its own lock.
	byPool map[string]*poolRunner
}

type poolRunner struct {
	mu    sync.Mutex // one creation or rotation at a time per pool
	id    int64
	token string
}

// NewPooled returns the pooled provider.
func NewPooled(api PoolAPI, cfg PooledConfig) (*Pooled, error) {
	if cfg.Scope == "project" {
		return nil, errors.New("runners: pooled mode needs scope group or instance (a project runner serves one project, and a pool's VMs wait before any job names its project)")
	}
	o, err := NewOneOff(api, cfg.OneOffConfig)
	if err != nil {
		return nil, err
	}
	p := &Pooled{OneOff: o, api: api, byPool: map[string]*poolRunner{}}
	for _, s := range cfg.Pools {
		if size, ok, err := tags.Parse([]string{s}, tags.Limits{}); err != nil || !ok || size.Tag() != s {
			return nil, fmt.Errorf("runners: pool %q is not a canonical size tag", s)
		}
		p.pools = append(p.pools, s)
		p.byPool[s] = &poolRunner{}
	}
	return p, nil
}

// Name implements Provider.
func (p *Pooled) Name() string { return "pooled" }

// Pooled implements Pools.
func (p *Pooled) Pooled(size string) bool { return slices.Contains(p.pools, size) }

// PoolDescription is a pool runner's description: "<prefix> <host> pool
// <size>". Owned parses it back, so a restart finds the runner again.
func (o *OneOff) PoolDescription(size string) string {
	return fmt.Sprintf("%s %s pool %s", o.cfg.DescriptionPrefix, o.cfg.HostID, size)
}

// PoolRunner implements Pools.
func (p *Pooled) PoolRunner(size string) int64 {
	pr := p.byPool[size]
	if pr == nil {
		return 0
	}
	pr.mu.Lock()
	defer pr.mu.Unlock()
	return pr.id
}

// PoolLease implements Pools.
func (p *Pooled) PoolLease(ctx context.Context, size string) (Lease, error) {
	pr := p.byPool[size]
	if pr == nil {
		return Lease{}, fmt.Errorf("runners: no pool of size %s", size)
	}
	pr.mu.Lock()
	defer pr.mu.Unlock()
	if pr.token == "" {
		if err := p.ensure(ctx, size, pr); err != nil {
			return Lease{}, err
		}
	}
	return Lease{RunnerID: pr.id, Token: pr.token, TagSet: tags.Key([]string{size}), Shared: true}, nil
}

// ensure finds or creates the pool's runner and gets a token for it (pr.mu held).
func (p *Pooled) ensure(ctx context.Context, size string, pr *poolRunner) error {
	if pr.id == 0 {
		owned, err := p.Owned(ctx)
		if err != nil {
			return fmt.Errorf("find the runner of pool %s: %w", size, err)
		}
		for _, r := range owned {
			if r.Pool == size && (pr.id == 0 || r.RunnerID < pr.id) {
				pr.id = r.RunnerID // the oldest, should a crash have left two
			}
		}
	}
	if pr.id != 0 {
		tok, err := p.api.ResetRunnerToken(ctx, pr.id)
		if err == nil {
			pr.token = tok
			return nil
		}
		if !gitlabapi.IsNotFound(err) {
			return fmt.Errorf("rotate the token of pool %s's runner %d: %w", size, pr.id, err)
		}
		pr.id = 0 // deleted behind our back: make a new one
	}
	spec := gitlabapi.RunnerSpec{Scope: p.cfg.Scope, GroupID: p.cfg.GroupID, TagList: []string{size}, Description: p.PoolDescription(size),
		MaximumTimeout: p.cfg.MaximumTimeout, RunUntagged: false}
	var run gitlabapi.Runner
	var err error
	if p.cfg.LegacyRegistrationToken != "" {
		run, err = p.api.RegisterRunnerLegacy(ctx, p.cfg.LegacyRegistrationToken, spec)
	} else {
		run, err = p.api.CreateRunner(ctx, spec)
	}
	if err != nil {
		if errors.Is(err, gitlabapi.ErrRunnerLimit) {
			return fmt.Errorf("%w: %w", ErrLimit, err)
		}
		return fmt.Errorf("create the runner of pool %s: %w", size, err)
	}
	if run.ID == 0 || run.Token == "" {
		if run.ID != 0 {
			_ = p.api.DeleteRunner(ctx, run.ID)
		}
		return fmt.Errorf("runner creation for pool %s returned no id or token", size)
	}
	pr.id, pr.token = run.ID, run.Token
	return nil
}

// Rotate implements Pools.
func (p *Pooled) Rotate(ctx context.Context, runnerID int64) error {
	for _, pr := range p.byPool {
		pr.mu.Lock()
		if pr.id == runnerID {
			tok, err := p.api.ResetRunnerToken(ctx, runnerID)
			if err == nil {
				pr.token = tok
			} else if gitlabapi.IsNotFound(err) {
				pr.id, pr.token, err = 0, "", nil
			}
			pr.mu.Unlock()
			return err
		}
		pr.mu.Unlock()
	}
	_, err := p.api.ResetRunnerToken(ctx, runnerID)
	if gitlabapi.IsNotFound(err) {
		return nil
	}
	return err
}

// Release implements Provider: a shared runner outlives its VMs; a pool's
// runner is never deleted here, whatever the lease says.
func (p *Pooled) Release(ctx context.Context, l Lease) error {
	if l.Shared || l.RunnerID == 0 {
		return nil
	}
	for _, pr := range p.byPool {
		pr.mu.Lock()
		id := pr.id
		pr.mu.Unlock()
		if id == l.RunnerID {
			return nil
		}
	}
	return p.OneOff.Release(ctx, l)
}
