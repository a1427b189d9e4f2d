// Package runner is a compile-only stand-in for step-runner's builtin-function API.
package runner

import (
	"context"
	"io"
	"time"

	"google.golang.org/protobuf/types/known/structpb"

	"gitlab.com/gitlab-org/step-runner/proto"
)

// Kind is the expected kind of an input value.
type Kind int

const (
	KindNull Kind = iota
	KindString
	KindNumber
	KindBool
	KindStruct
	KindList
)

// BuiltinResult is a builtin step's result.
type BuiltinResult struct {
	Outputs map[string]*structpb.Value
}

// BuiltinContext is what step-runner hands a builtin step.
type BuiltinContext interface {
	GetInput(name string, kind Kind) (*structpb.Value, error)
	GetInputWithDefault(name string, kind Kind, inputs map[string]*proto.Spec_Content_Input) (*structpb.Value, error)
	GetJobVars() map[string]*structpb.Value
	GetEnvs() map[string]string
	GetEnvList() []string
	Pipe() (io.Writer, io.Writer)
	WorkDir() string
	GracefulExitDelay() time.Duration
	ListenCancel(ctx context.Context) (context.Context, context.CancelFunc)
}

// BuiltinFunction is a step implemented inside the runner binary.
type BuiltinFunction interface {
	Spec() *proto.Spec
	Run(ctx context.Context, bctx BuiltinContext) (BuiltinResult, error)
}
