package fcstandin

import (
	"strings"
	"testing"
)

func loadBoth(t *testing.T) *Checker {
	t.Helper()
	paths, err := SpecPaths()
	if err != nil {
		t.Fatalf("the contract tests need both Firecracker API specs: %v", err)
	}
	c, err := LoadChecker(paths...)
	if err != nil {
		t.Fatal(err)
	}
	if v := c.Versions(); len(v) != 2 || v[0] != "1.4.1" || v[1] != "1.17.0-dev" {
		t.Fatalf("spec versions = %v, want [1.4.1 1.17.0-dev]", v)
	}
	return c
}

func TestCheckerAcceptsValidAndRejectsInvalid(t *testing.T) {
	c := loadBoth(t)
	cases := []struct {
		method, path, body string
		wantErr            string // "" = valid
	}{
		{"PUT", "/machine-config", `{"vcpu_count":2,"mem_size_mib":1024,"smt":false}`, ""},
		{"PUT", "/machine-config", `{"mem_size_mib":1024}`, "vcpu_count"},
		{"PUT", "/machine-config", `{"vcpu_count":"2","mem_size_mib":1024}`, "vcpu_count"},
		{"PUT", "/machine-config", `{"vcpu_count":2,"mem_size_mib":1024,"bogus":1}`, "bogus"},
		{"PUT", "/drives/rootfs", `{"drive_id":"rootfs","path_on_host":"/r","is_root_device":true,"is_read_only":true}`, ""},
		// 1.4.1 requires is_read_only; 1.17 does not (vhost-user drives).
		{"PUT", "/drives/rootfs", `{"drive_id":"rootfs","path_on_host":"/r","is_root_device":true}`, "API 1.4.1"},
		{"PUT", "/actions", `{"action_type":"InstanceStart"}`, ""},
		{"PUT", "/actions", `{"action_type":"Reboot"}`, "action_type"},
		{"PUT", "/entropy", `{}`, ""},
		// /serial exists only in 1.17.
		{"PUT", "/serial", `{"serial_out_path":"/c"}`, "API 1.4.1"},
		{"DELETE", "/machine-config", ``, "not an operation"},
		{"PUT", "/nonexistent", `{}`, "not an operation"},
		{"PUT", "/boot-source", ``, "required"},
		{"PUT", "/snapshot/create", `{"snapshot_path":"/s","mem_file_path":"/m","version":"1.4.0"}`, "API 1.17.0-dev"},
	}
	for _, tc := range cases {
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
	c := loadBoth(t)
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

// An operation only newer specs have passes only when it is Optional (the
// driver sends it with a fallback), and then only against the specs that
// have it: field names and types still count.
func TestCheckerOptionalNewerOperations(t *testing.T) {
	c := loadBoth(t)
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
