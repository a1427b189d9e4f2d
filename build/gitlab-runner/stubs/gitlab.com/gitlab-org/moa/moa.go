// Package moa is FireRunner's compile-only stand-in for gitlab.com/gitlab-org/moa
// (the `${{ }}` expression language), which the Go module proxy refuses to serve.
// Job-input interpolation is not available in this build.
package moa

import (
	"errors"
	"strings"

	"gitlab.com/gitlab-org/moa/ast"
)

// ParseTemplate always fails: expressions are not available in this build.
func ParseTemplate(text string) (ast.Expr, error) {
	return nil, errors.New("job input interpolation is not available in this build (FireRunner's shell/custom-only gitlab-runner)")
}

// EscapeTemplate escapes `${{` so text is taken literally.
func EscapeTemplate(text string) string {
	return strings.ReplaceAll(text, "${{", "$${{")
}
