//go:build race

package chaos

// raceBuild: the race detector slows the fleet's three FireRunner
// processes about fivefold; TestFleet then runs fewer jobs (make test-fleet,
// without it, runs the full 1,000).
const raceBuild = true
