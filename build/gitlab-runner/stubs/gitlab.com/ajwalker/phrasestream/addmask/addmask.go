// Package addmask is FireRunner's compile-only stand-in for phrasestream's
// add-mask writer (used by the experimental proxy_exec mode, off by default).
package addmask

import (
	"errors"
	"io"
)

// AddMask would mask phrases registered at run time.
type AddMask struct{}

// New always fails: proxy_exec masking is not available in this build.
func New(db any, stdout, stderr io.Writer) (*AddMask, error) {
	return nil, errors.New("add-mask is not available in this build (FireRunner's shell/custom-only gitlab-runner)")
}

func (a *AddMask) Get(i int) io.Writer { return io.Discard }

func (a *AddMask) Close() error { return nil }
