package chaos

import (
	"context"
	"os"
	"strconv"
	"testing"

	"github.com/firerunner/firerunner/internal/testsupport/pgtest"
)

// TestFleet is make test-fleet: three FireRunner processes on one
// throwaway PostgreSQL and one GitLab stand-in, 1,000 jobs whose webhooks
// go to random hosts, duplicated, reordered and a few dropped; one host
// killed with SIGKILL mid-run and brought back at the end. Every job must
// be served exactly once (or, if it ran on the killed host, failed
// host_lost), no host over its capacity, every host serving, nothing
// leaked. FIRERUNNER_FLEET_JOBS changes the job count (200 under the race
// detector, which make test-go uses).
func TestFleet(t *testing.T) {
	pgtest.Require(t) // skips loudly (or fails under FIRERUNNER_TEST_REQUIRE=1) without PostgreSQL; RunFleet starts its own
	o := DefaultFleetOptions()
	if raceBuild { // go test -race ./... (make test-go); make test-fleet runs all 1,000
		o.Jobs, o.KillAfter = 200, 80
	}
	if n, err := strconv.Atoi(os.Getenv("FIRERUNNER_FLEET_JOBS")); err == nil && n > 0 {
		o.Jobs, o.KillAfter = n, n*2/5
	}
	o.WorkDir = t.TempDir()
	if d := os.Getenv("FIRERUNNER_FLEET_WORKDIR"); d != "" {
		o.WorkDir = d // kept: the hosts' logs, report.txt
	}
	o.Log = testWriter{t}
	res, err := RunFleet(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Log(res.Line())
	if !res.OK() {
		for _, p := range res.Problems {
			t.Error(p)
		}
		t.Fatalf("%s", res.Line())
	}
	if res.Killed == "" || res.HostLost == 0 || res.HooksSent <= res.HooksReceived-res.HooksDropped {
		t.Fatalf("the fleet's trouble did not happen: killed %q holding %d running / %d waiting jobs, %d failed host_lost; hooks %d received, %d dropped, %d sent",
			res.Killed, res.KilledRunning, res.KilledWaiting, res.HostLost, res.HooksReceived, res.HooksDropped, res.HooksSent)
	}
}
