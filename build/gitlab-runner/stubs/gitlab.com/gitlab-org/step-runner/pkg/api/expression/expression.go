// Package expression is a compile-only stand-in for step-runner's expression
// evaluator used for job-input interpolation, which this build does not support.
package expression

import (
	"errors"

	"gitlab.com/gitlab-org/moa/ast"
	"gitlab.com/gitlab-org/moa/value"
)

// Sensitive is the mark of sensitive values.
const Sensitive uint16 = 1

// Input is a named job input.
type Input struct {
	Key   string
	Value value.Value
}

// Evaluator would evaluate `${{ }}` expressions.
type Evaluator struct{}

func NewEvaluator(inputs value.Value) (*Evaluator, error) { return &Evaluator{}, nil }

// Eval always fails: job-input interpolation is not available in this build.
func (e *Evaluator) Eval(text string, expr ast.Expr) (value.Value, error) {
	return value.Null(), errors.New("job input interpolation is not available in this build (FireRunner's shell/custom-only gitlab-runner)")
}
