// Package proxy is a compile-only stand-in for step-runner's stdio proxy.
package proxy

import (
	"errors"
	"io"
)

// Proxy always fails: there is no step-runner in this build.
func Proxy(in io.Reader, out io.Writer, conn io.ReadWriter) error {
	return errors.New("step-runner is not available in this build (FireRunner's shell/custom-only gitlab-runner)")
}
