// Package api is FireRunner's compile-only stand-in for gitlab-runner's nested
// runner_wrapper API module (the Go module proxy refuses it). The
// `wrapper` command's gRPC control server is not available in this build.
package api

import (
	"context"
	"errors"

	"github.com/sirupsen/logrus"
)

var ErrProcessNotInitialized = errors.New("process not initialized")

// Status is the wrapped process's status.
type Status int

const (
	StatusUnknown Status = iota
	StatusRunning
	StatusInShutdown
	StatusStopped
)

func (s Status) String() string {
	switch s {
	case StatusRunning:
		return "running"
	case StatusInShutdown:
		return "in_shutdown"
	case StatusStopped:
		return "stopped"
	}
	return "unknown"
}

// ShutdownCallbackDef describes an HTTP callback sent after shutdown.
type ShutdownCallbackDef interface {
	URL() string
	Method() string
	Headers() map[string]string
}

// InitGracefulShutdownRequest asks the wrapper to shut down gracefully.
type InitGracefulShutdownRequest interface {
	ShutdownCallbackDef() ShutdownCallbackDef
}

// ShutdownCallback is run when the wrapped process has stopped.
type ShutdownCallback interface {
	Run(ctx context.Context)
}

type noCallback struct{ log logrus.FieldLogger }

func (c noCallback) Run(ctx context.Context) {
	c.log.Warn("shutdown callbacks are not available in this build")
}

func NewShutdownCallback(log logrus.FieldLogger, def ShutdownCallbackDef) ShutdownCallback {
	return noCallback{log: log}
}
