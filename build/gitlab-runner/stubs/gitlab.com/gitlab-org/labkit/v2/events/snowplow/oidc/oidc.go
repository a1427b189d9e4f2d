// Package oidc is a compile-only stand-in for labkit's cloud OIDC token source.
package oidc

type config struct{}

type Option func(*config)

func WithSkipIfUnsupportedCloud(skip bool) Option { return func(*config) {} }

// TokenSource would mint OIDC tokens.
type TokenSource interface{}

func NewSource(opts ...Option) TokenSource { return nil }
