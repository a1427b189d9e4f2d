// Package ast is a compile-only stand-in for moa's syntax tree.
package ast

// Expr is a node of the syntax tree.
type Expr interface {
	Walk(v Visitor) (Expr, error)
}

// Visitor visits nodes.
type Visitor interface {
	Enter(expr Expr) (Visitor, error)
	Exit(expr Expr) (Expr, error)
}

// Template is an interpolation node.
type Template struct{}

func (t *Template) Walk(v Visitor) (Expr, error) { return t, nil }
