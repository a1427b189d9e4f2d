// Package version carries the build's version, set by the linker
// (-X github.com/firerunner/firerunner/internal/version.Version=...).
package version

// Version is the FireRunner release, "dev" for untagged builds.
var Version = "dev"
