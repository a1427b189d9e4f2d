// Package proto is a compile-only stand-in for step-runner's gRPC API.
package proto

import "google.golang.org/protobuf/types/known/structpb"

// ValueType is the type of a step input.
type ValueType int32

const (
	ValueType_string  ValueType = 1
	ValueType_number  ValueType = 2
	ValueType_boolean ValueType = 3
	ValueType_struct  ValueType = 4
	ValueType_array   ValueType = 5
)

// Spec describes a step's inputs.
type Spec struct {
	Spec *Spec_Content
}

func (s *Spec) GetSpec() *Spec_Content {
	if s == nil {
		return nil
	}
	return s.Spec
}

// Spec_Content holds the inputs of a Spec.
type Spec_Content struct {
	Inputs map[string]*Spec_Content_Input
}

func (s *Spec_Content) GetInputs() map[string]*Spec_Content_Input {
	if s == nil {
		return nil
	}
	return s.Inputs
}

// Spec_Content_Input is one declared input.
type Spec_Content_Input struct {
	Type      ValueType
	Default   *structpb.Value
	Sensitive bool
}

// StepRunnerServer is the step-runner gRPC service.
type StepRunnerServer interface{}

// RegisterStepRunnerServer does nothing: there is no step-runner service in this build.
func RegisterStepRunnerServer(s any, srv StepRunnerServer) {}
