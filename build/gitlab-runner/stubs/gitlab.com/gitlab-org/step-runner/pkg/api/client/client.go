// Package client is a compile-only stand-in for step-runner's client types.
package client

import "time"

// State is a step-runner job state.
type State int32

const (
	StateUnspecified State = iota
	StateRunning
	StateSuccess
	StateFailure
	StateCancelled
)

func (s State) String() string {
	switch s {
	case StateRunning:
		return "running"
	case StateSuccess:
		return "success"
	case StateFailure:
		return "failure"
	case StateCancelled:
		return "cancelled"
	}
	return "unspecified"
}

// ErrorKind classifies a failed job.
type ErrorKind int32

const (
	ErrorUnknown ErrorKind = iota
	ErrorInternal
	ErrorStepFailure
	ErrorCancelled
	ErrorTimeout
)

// Status is a job's final status.
type Status struct {
	State     State
	ErrorKind ErrorKind
	Message   string
}

// Variable is a job variable sent to step-runner.
type Variable struct {
	Key    string
	Value  string
	File   bool
	Masked bool
}

// RunRequest asks step-runner to run steps.
type RunRequest struct {
	Id        string
	Timeout   *time.Duration
	WorkDir   string
	BuildDir  string
	Env       map[string]string
	Steps     string
	Variables []Variable
}
