package fcstandin

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// loadSpecs loads the SDK's spec and, where ../shared/specs exists, the
// newest official one; the test says loudly when only the SDK's is checked.
func loadSpecs(t *testing.T) (*Checker, Specs) {
	t.Helper()
	specs, err := FindSpecs()
	if err != nil {
		t.Fatalf("the contract tests need the Firecracker API specs: %v", err)
	}
	if n := specs.Note(); n != "" {
		t.Log(n)
	}
	c, err := LoadChecker(specs.Paths()...)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"1.4.1"}
	if specs.Official != "" {
		want = append(want, "1.17.0-dev")
	}
	if v := c.Versions(); !slices.Equal(v, want) {
		t.Fatalf("spec versions = %v, want %v", v, want)
	}
	return c, specs
}

func TestCheckerAcceptsValidAndRejectsInvalid(t *testing.T) {
	c, specs := loadSpecs(t)
	cases := []struct {
		method, path, body string
		wantErr            string // "" = valid
		official           bool   // only the 1.17.0-dev spec can judge it
	}{
		{"PUT", "/machine-config", `{"vcpu_count":2,"mem_size_mib":1024,"smt":false}`, "", false},
		{"PUT", "/machine-config", `{"mem_size_mib":1024}`, "vcpu_count", false},
		{"PUT", "/machine-config", `{"vcpu_count":"2","mem_size_mib":1024}`, "vcpu_count", false},
		{"PUT", "/machine-config", `{"vcpu_count":2,"mem_size_mib":1024,"bogus":1}`, "bogus", false},
		{"PUT", "/drives/rootfs", `{"drive_id":"rootfs","path_on_host":"/r","is_root_device":true,"is_read_only":true}`, "", false},
		// 1.4.1 requires is_read_only; 1.17 does not (vhost-user drives).
		{"PUT", "/drives/rootfs", `{"drive_id":"rootfs","path_on_host":"/r","is_root_device":true}`, "API 1.4.1", false},
		{"PUT", "/actions", `{"action_type":"InstanceStart"}`, "", false},
		{"PUT", "/actions", `{"action_type":"Reboot"}`, "action_type", false},
		{"PUT", "/entropy", `{}`, "", false},
		// /serial exists only in 1.17.
		{"PUT", "/serial", `{"serial_out_path":"/c"}`, "API 1.4.1", false},
		{"DELETE", "/machine-config", ``, "not an operation", false},
		{"PUT", "/nonexistent", `{}`, "not an operation", false},
		{"PUT", "/boot-source", ``, "required", false},
		{"PUT", "/snapshot/create", `{"snapshot_path":"/s","mem_file_path":"/m","version":"1.4.0"}`, "API 1.17.0-dev", true},
	}
	for _, tc := range cases {
		if tc.official && specs.Official == "" {
			t.Logf("not checked without the 1.17.0-dev spec: %s %s %s", tc.method, tc.path, tc.body)
			continue
		}
		_, _, err := c.Check(tc.method, tc.path, []byte(tc.body))
		if tc.wantErr == "" && err != nil {
			t.Errorf("%s %s %s: unexpected error %v", tc.method, tc.path, tc.body, err)
		}
		if tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
			t.Errorf("%s %s %s: error %v, want one mentioning %q", tc.method, tc.path, tc.body, err, tc.wantErr)
		}
	}
}

func TestPhaseNotesFromSpec(t *testing.T) {
	c, _ := loadSpecs(t)
	for _, tc := range []struct {
		method, path string
		pre, post    bool
	}{
		{"PUT", "/machine-config", true, false},
		{"PUT", "/drives/x", true, false},
		{"PATCH", "/drives/x", false, true},
		{"PUT", "/snapshot/create", false, true},
		{"PUT", "/snapshot/load", true, false},
		{"PUT", "/actions", false, false},
	} {
		o, _, _ := c.Check(tc.method, tc.path, nil)
		if o.PreBootOnly != tc.pre || o.PostBootOnly != tc.post {
			t.Errorf("%s %s: pre=%v post=%v, want %v %v", tc.method, tc.path, o.PreBootOnly, o.PostBootOnly, tc.pre, tc.post)
		}
	}
}

// TestFindSpecs: the SDK's spec is always found; the official one from
// ../shared/specs where it exists beside the repository root, else the
// repository's copy.
func TestFindSpecs(t *testing.T) {
	specs, err := FindSpecs()
	if err != nil {
		t.Fatal(err)
	}
	root, err := RepoRoot(".")
	if err != nil {
		t.Fatal(err)
	}
	if specs.SharedDir != filepath.Join(filepath.Dir(root), "shared", "specs") {
		t.Errorf("SharedDir = %s", specs.SharedDir)
	}
	if filepath.Base(specs.SDK) != "swagger.yaml" || !strings.Contains(specs.SDK, "firecracker-go-sdk") {
		t.Errorf("SDK spec = %s", specs.SDK)
	}
	_, statErr := os.Stat(specs.SharedDir)
	switch {
	case statErr == nil && (specs.Official == "" || specs.Note() != "" || len(specs.Paths()) != 2):
		t.Errorf("%s exists but the official spec is not checked: %+v", specs.SharedDir, specs)
	case statErr != nil && (!specs.Bundled || specs.Official != filepath.Join(root, BundledSpec) || !strings.Contains(specs.Note(), specs.SharedDir) || len(specs.Paths()) != 2):
		t.Errorf("%s is missing (%v) but specs = %+v, note %q", specs.SharedDir, statErr, specs, specs.Note())
	}
}

// TestSpecsIn: no ../shared/specs means the SDK's spec only (with a note);
// a ../shared/specs without the official spec is an error, not a quiet
// downgrade; a missing SDK spec is always an error.
func TestSpecsIn(t *testing.T) {
	base := t.TempDir()
	root, sdk := filepath.Join(base, "clone"), filepath.Join(base, "sdk")
	for _, d := range []string{root, filepath.Join(sdk, "client")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := specsIn(root, sdk); err == nil || !strings.Contains(err.Error(), "SDK") {
		t.Errorf("no SDK spec: %v", err)
	}
	if err := os.WriteFile(filepath.Join(sdk, "client", "swagger.yaml"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := specsIn(root, sdk)
	if err != nil || s.Official != "" || len(s.Paths()) != 1 || !strings.Contains(s.Note(), filepath.Join(base, "shared", "specs")) {
		t.Errorf("no shared dir: %+v, %v, note %q", s, err, s.Note())
	}
	bundled := filepath.Join(root, BundledSpec)
	if err := os.MkdirAll(filepath.Dir(bundled), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bundled, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	s, err = specsIn(root, sdk)
	if err != nil || !s.Bundled || s.Official != bundled || len(s.Paths()) != 2 || !strings.Contains(s.Note(), "repository's copy") {
		t.Errorf("no shared dir, the repository's copy: %+v, %v, note %q", s, err, s.Note())
	}
	shared := filepath.Join(base, "shared", "specs")
	if err := os.MkdirAll(shared, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := specsIn(root, sdk); err == nil || !strings.Contains(err.Error(), OfficialSpecName) {
		t.Errorf("shared dir without the spec: %v", err)
	}
	if err := os.WriteFile(filepath.Join(shared, OfficialSpecName), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	s, err = specsIn(root, sdk)
	if err != nil || s.Official != filepath.Join(shared, OfficialSpecName) || s.Bundled || len(s.Paths()) != 2 || s.Note() != "" {
		t.Errorf("both specs: %+v, %v", s, err)
	}
}

// An operation only newer specs have passes only when it is Optional (the
// driver sends it with a fallback), and then only against the specs that
// have it: field names and types still count.
func TestCheckerOptionalNewerOperations(t *testing.T) {
	c, specs := loadSpecs(t)
	if specs.Official == "" {
		t.Skip("!!!!!!!! needs the newer Firecracker spec: " + specs.Note())
	}
	limiter := `{"rate_limiter":{"size":262144,"refill_time":1000,"one_time_burst":1048576}}`
	if _, _, err := c.Check("PUT", "/serial", []byte(limiter)); err == nil || !strings.Contains(err.Error(), "API 1.4.1") {
		t.Fatalf("PUT /serial without Optional: %v; want refused by API 1.4.1", err)
	}
	c.Optional = map[string]bool{}
	for _, o := range NewerOptional {
		c.Optional[o] = true
	}
	op, _, err := c.Check("PUT", "/serial", []byte(limiter))
	if err != nil || len(op.Missing) != 1 || op.Missing[0] != "1.4.1" {
		t.Fatalf("optional PUT /serial: %v, missing in %v; want accepted, missing in 1.4.1", err, op.Missing)
	}
	for _, bad := range []string{
		`{"rate_limiter":{"bandwidth":{"size":1,"refill_time":1}}}`, // a RateLimiter, not the TokenBucket /serial takes
		`{"rate_limiter":{"size":"big","refill_time":1000}}`,
		`{"rate_limiter":{"refill_time":1000}}`, // size is required
		`{"serial_rate_limiter":{}}`,
	} {
		if _, _, err := c.Check("PUT", "/serial", []byte(bad)); err == nil || !strings.Contains(err.Error(), "API 1.17.0-dev") {
			t.Errorf("PUT /serial %s: %v; want refused by API 1.17.0-dev", bad, err)
		}
	}
	if _, _, err := c.Check("PUT", "/nonexistent", []byte(`{}`)); err == nil {
		t.Error("an operation no spec has passed")
	}
}
