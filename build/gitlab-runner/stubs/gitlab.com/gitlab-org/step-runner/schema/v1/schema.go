// Package schema is a compile-only stand-in for step-runner's step schema:
// it decodes steps (so a job carrying `run:` still parses) but nothing runs them.
package schema

// StepInputs are a step's named inputs.
type StepInputs map[string]any

// Step is one step of a `run:` job.
type Step struct {
	Name   *string           `json:"name,omitempty" yaml:"name,omitempty"`
	Step   string            `json:"step,omitempty" yaml:"step,omitempty"`
	Script string            `json:"script,omitempty" yaml:"script,omitempty"`
	Inputs StepInputs        `json:"inputs,omitempty" yaml:"inputs,omitempty"`
	Env    map[string]string `json:"env,omitempty" yaml:"env,omitempty"`
	Run    []Step            `json:"run,omitempty" yaml:"run,omitempty"`
}
