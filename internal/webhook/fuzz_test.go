package webhook

import (
	"os"
	"path/filepath"
	"testing"
)

// FuzzParseJobEvent checks the parser never panics and that what it accepts
// satisfies the invariants the controller relies on.
func FuzzParseJobEvent(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("testdata", "*.json"))
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{"object_kind":"build","build_id":1,"project_id":2,"build_status":"pending","runner":null}`))
	f.Add([]byte(`{"object_kind":"build","build_id":9223372036854775807,"project":{"id":3},"build_status":"x"}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, body []byte) {
		ev, err := ParseJobEvent(body)
		if err != nil {
			if ev != (JobEvent{}) {
				t.Fatalf("error with non-zero event: %+v", ev)
			}
			if len(err.Error()) > 300 {
				t.Fatalf("error message too long (%d), may echo the body", len(err.Error()))
			}
			return
		}
		if ev.JobID <= 0 || ev.ProjectID <= 0 || ev.Status == "" {
			t.Fatalf("accepted invalid event %+v", ev)
		}
	})
}
