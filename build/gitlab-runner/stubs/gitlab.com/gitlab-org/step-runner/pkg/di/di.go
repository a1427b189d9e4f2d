// Package di is a compile-only stand-in for step-runner's service container.
package di

import (
	"errors"
	"log/slog"

	"gitlab.com/gitlab-org/step-runner/pkg/runner"
	"gitlab.com/gitlab-org/step-runner/proto"
)

// Container would wire up the step-runner service.
type Container struct{}

func WithBuiltinFunc(name string, fn runner.BuiltinFunction) func(*Container) {
	return func(*Container) {}
}

func WithOperatorLogger(l *slog.Logger) func(*Container) {
	return func(*Container) {}
}

func NewContainer(opts ...func(*Container)) *Container { return &Container{} }

// StepRunnerService always fails: there is no step-runner in this build.
func (c *Container) StepRunnerService() (proto.StepRunnerServer, error) {
	return nil, errors.New("step-runner is not available in this build (FireRunner's shell/custom-only gitlab-runner)")
}
