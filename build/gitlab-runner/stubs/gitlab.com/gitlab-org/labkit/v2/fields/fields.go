// Package fields is FireRunner's stand-in for labkit's standard log field
// names (the Go module proxy refuses labkit/v2). No field is deprecated here,
// so gitlab-runner logs every field under its legacy name.
package fields

const (
	DurationS      = "duration_s"
	HTTPStatusCode = "status"
)

// Deprecation maps a legacy field alias to its standard name.
type Deprecation struct {
	Standard string
}

// Deprecated lists legacy aliases (none in this build).
var Deprecated = map[string]Deprecation{}

// VariantVersion is the schema version introducing a standard name.
var VariantVersion = map[string]int{}
