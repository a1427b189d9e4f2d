package chaos

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/testsupport/pgtest"
)

// TestMain lets the test binary be the harness's FireRunner ("serve CFG")
// and its fake VMs' guest ("guest DIR"), as cmd/firerunner-chaos is.
func TestMain(m *testing.M) {
	if len(os.Args) == 3 {
		switch os.Args[1] {
		case "serve":
			if err := Serve(os.Args[2]); err != nil {
				os.Stderr.WriteString("serve: " + err.Error() + "\n")
				os.Exit(1)
			}
			os.Exit(0)
		case "guest":
			os.Exit(Guest(os.Args[2]))
		}
	}
	os.Exit(pgtest.Main(m))
}

// TestChaosSmall is `make chaos` in small: 40 jobs, FireRunner killed every
// 1-2 s, the same webhook and API chaos. Nothing may be lost, run twice or
// left behind, and the chaos must really have happened.
func TestChaosSmall(t *testing.T) {
	o := DefaultOptions()
	o.Jobs, o.KillMin, o.KillMax = 40, time.Second, 2*time.Second
	o.FeedEvery = 200 * time.Millisecond
	o.Timeout, o.Stall, o.Settle = 3*time.Minute, time.Minute, 30*time.Second
	o.WorkDir = t.TempDir()
	o.Log = testWriter{t}
	res, err := Run(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Log(res.Summary())
	if !res.OK() {
		t.Fatalf("%s", res.Line())
	}
	if res.Kills == 0 || res.HooksDropped == 0 || res.HooksSent <= res.HooksReceived-res.HooksDropped ||
		res.APIFailedBefore == 0 || res.APIFailedAfter == 0 {
		t.Fatalf("the chaos did not happen: %d kills, hooks %d received %d dropped %d sent, api %d/%d failed",
			res.Kills, res.HooksReceived, res.HooksDropped, res.HooksSent, res.APIFailedBefore, res.APIFailedAfter)
	}
	if res.P99Start <= 0 {
		t.Fatalf("no start latency measured: %s", res.Line())
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) { w.t.Log(string(b)); return len(b), nil }
