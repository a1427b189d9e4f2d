package vm

import (
	"fmt"
	"log/slog"
	"strings"
)

// Provider is one VM driver as the daemon knows it, in the manner of
// gitlab-runner's executor providers. It owns everything about the driver
// that is not running VMs: its name (the value of vm.driver), the validation
// of its own configuration section, the host checks `firerunner doctor` runs
// for it, and building the driver from the configuration.
//
// C is the daemon's configuration type (config.Config). It is a type
// parameter so that this package does not import internal/config; each
// provider reads its own section of it.
type Provider[C any] interface {
	// Name selects the driver (vm.driver).
	Name() string
	// Validate checks the provider's own configuration section and, when
	// selected (cfg's vm.driver names this provider), what the driver needs
	// from the rest of cfg. It returns every problem, each naming its field
	// as the configuration file spells it ("qemu.accel").
	Validate(cfg C, selected bool) []FieldError
	// Checks are the host checks this driver needs, in the order doctor
	// runs and prints them.
	Checks(cfg C) []Check
	// New builds the driver from cfg; log receives the driver's logs.
	New(cfg C, log *slog.Logger) (Driver, error)
}

// FieldError is one bad configuration field.
type FieldError struct {
	// Field is the field's path in the configuration file ("qemu.binary").
	Field string
	// Problem says what is wrong ("must be set").
	Problem string
}

func (e FieldError) Error() string { return e.Field + ": " + e.Problem }

// Fieldf returns the FieldError for field with a formatted problem.
func Fieldf(field, format string, a ...any) FieldError {
	return FieldError{Field: field, Problem: fmt.Sprintf(format, a...)}
}

// UnknownDriverError is the answer for a name no provider has.
type UnknownDriverError struct {
	Name  string
	Known []string
}

func (e *UnknownDriverError) Error() string {
	return fmt.Sprintf("unknown vm driver %q (known: %s)", e.Name, strings.Join(e.Known, ", "))
}

// Registry is the set of drivers a program can run, built explicitly in one
// place (the daemon's Drivers) rather than by init-time side effects, so
// what a binary links and offers is visible in code. It is not safe for
// concurrent Add; build it, then share it.
type Registry[C any] struct {
	providers []Provider[C] // in the order added
}

// NewRegistry returns an empty registry.
func NewRegistry[C any]() *Registry[C] { return &Registry[C]{} }

// Add makes p's driver available by p.Name(). An empty or duplicate name is
// a programming error and panics.
func (r *Registry[C]) Add(p Provider[C]) {
	name := p.Name()
	if name == "" {
		panic(fmt.Sprintf("vm: provider %T has no name", p))
	}
	if _, err := r.Get(name); err == nil {
		panic("vm: driver added twice: " + name)
	}
	r.providers = append(r.providers, p)
}

// Names lists the drivers in the order they were added.
func (r *Registry[C]) Names() []string {
	names := make([]string, len(r.providers))
	for i, p := range r.providers {
		names[i] = p.Name()
	}
	return names
}

// Get returns the named provider, or an *UnknownDriverError listing the
// known names.
func (r *Registry[C]) Get(name string) (Provider[C], error) {
	for _, p := range r.providers {
		if p.Name() == name {
			return p, nil
		}
	}
	return nil, &UnknownDriverError{Name: name, Known: r.Names()}
}

// New builds the named driver from cfg.
func (r *Registry[C]) New(name string, cfg C, log *slog.Logger) (Driver, error) {
	p, err := r.Get(name)
	if err != nil {
		return nil, err
	}
	return p.New(cfg, log)
}

// Validate runs every provider's section validation, the selected driver's
// with selected set, and returns all problems in the order the providers
// were added (each a FieldError). A selected name no provider has selects
// none; reporting that is the caller's, who knows where the name came from.
func (r *Registry[C]) Validate(selected string, cfg C) []error {
	var errs []error
	for _, p := range r.providers {
		for _, fe := range p.Validate(cfg, p.Name() == selected) {
			errs = append(errs, fe)
		}
	}
	return errs
}

// Checks returns the named driver's host checks.
func (r *Registry[C]) Checks(name string, cfg C) ([]Check, error) {
	p, err := r.Get(name)
	if err != nil {
		return nil, err
	}
	return p.Checks(cfg), nil
}

// VMMUser is implemented by a Provider whose VMM runs as an unprivileged
// user (the jailed Firecracker). Host resources the VMM opens itself, its
// tap device in particular, must then belong to that user; ok is false when
// cfg runs the VMM as FireRunner's own user.
type VMMUser[C any] interface {
	VMMUser(cfg C) (uid, gid int, ok bool)
}

// VMMUserRange is implemented by a provider whose VMMs each run as a user
// of their own (the jailed Firecracker with firecracker.vm_uid_base): the
// VM whose address is host number i of the VM network runs as uid and gid
// base+i, its tap belongs to that user, and the driver takes the ids from
// vm.NetAttachment. ok is false when VMs share VMMUser's user.
type VMMUserRange[C any] interface {
	VMMUserRange(cfg C) (base int, ok bool)
}
