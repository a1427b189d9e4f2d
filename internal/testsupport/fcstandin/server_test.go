package fcstandin

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// standIn serves a stand-in on a temp socket and returns a client for it.
func standIn(t *testing.T) (*Server, func(method, path, body string) (int, string)) {
	t.Helper()
	c, _ := loadSpecs(t)
	dir, err := os.MkdirTemp("", "fcs")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	kernel := filepath.Join(dir, "vmlinux")
	os.WriteFile(kernel, []byte("\x7fELF kernel"), 0o644)
	os.WriteFile(filepath.Join(dir, "bzImage"), []byte("MZ not elf"), 0o644)
	srv := NewServer(c, "fr-neg", "/", nil)
	sock := filepath.Join(dir, "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: srv}
	go hs.Serve(l)
	t.Cleanup(func() { hs.Close() })
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	do := func(method, path, body string) (int, string) {
		body = strings.ReplaceAll(body, "$DIR", dir)
		req, _ := http.NewRequest(method, "http://localhost"+path, bytes.NewReader([]byte(body)))
		req.Header.Set("Content-Type", "application/json")
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		var f struct {
			FaultMessage string `json:"fault_message"`
		}
		json.Unmarshal(b, &f)
		return resp.StatusCode, f.FaultMessage
	}
	return srv, do
}

// TestStandInRejectsContractViolations proves the contract test can fail:
// schema, semantic and ordering violations get Firecracker's 400 with a
// fault_message and are recorded as violations.
func TestStandInRejectsContractViolations(t *testing.T) {
	srv, do := standIn(t)
	steps := []struct {
		method, path, body string
		status             int
		fault              string
	}{
		{"PUT", "/machine-config", `{"mem_size_mib":512}`, 400, "vcpu_count"},                       // missing required field
		{"PUT", "/machine-config", `{"vcpu_count":2,"mem_size_mib":512,"smtt":false}`, 400, "smtt"}, // unknown field
		{"PUT", "/actions", `{"action_type":"InstanceStart"}`, 400, "without kernel"},               // no boot source yet
		{"PATCH", "/vm", `{"state":"Paused"}`, 400, "before starting"},                              // post-boot only
		{"PUT", "/boot-source", `{"kernel_image_path":"$DIR/bzImage","boot_args":"console=ttyS0"}`, 400, "ELF"},
		{"PUT", "/boot-source", `{"kernel_image_path":"$DIR/missing"}`, 400, "cannot open"},
		{"PUT", "/drives/a", `{"drive_id":"b","path_on_host":"$DIR/vmlinux","is_root_device":false,"is_read_only":true}`, 400, "does not match"},
		{"PUT", "/machine-config", `{"vcpu_count":2,"mem_size_mib":512}`, 204, ""},
		{"PUT", "/boot-source", `{"kernel_image_path":"$DIR/vmlinux","boot_args":"console=ttyS0"}`, 204, ""},
		{"PUT", "/actions", `{"action_type":"InstanceStart"}`, 204, ""},
		{"PUT", "/machine-config", `{"vcpu_count":4,"mem_size_mib":512}`, 400, "after starting"}, // pre-boot only
		{"PUT", "/logger", `{"log_path":"$DIR/vmlinux"}`, 400, "after InstanceStart"},            // only actions/PATCH after start
		{"PUT", "/actions", `{"action_type":"InstanceStart"}`, 400, "after InstanceStart"},
		{"PUT", "/snapshot/create", `{"snapshot_path":"$DIR/s","mem_file_path":"$DIR/m"}`, 400, "paused"},
		{"PATCH", "/vm", `{"state":"Paused"}`, 204, ""},
		{"PUT", "/snapshot/create", `{"snapshot_path":"$DIR/s","mem_file_path":"$DIR/m"}`, 204, ""},
		{"GET", "/", ``, 200, ""},
	}
	for _, s := range steps {
		status, fault := do(s.method, s.path, s.body)
		if status != s.status || !strings.Contains(fault, s.fault) {
			t.Errorf("%s %s %s = %d %q; want %d with fault mentioning %q", s.method, s.path, s.body, status, fault, s.status, s.fault)
		}
	}
	violations := 0
	for _, r := range srv.Records() {
		if r.Violation {
			violations++
		}
	}
	if violations != 11 {
		t.Errorf("recorded %d violations, want 11", violations)
	}
}

func TestParseJailerArgs(t *testing.T) {
	ok := []string{"--id", "fr-a1", "--exec-file", "/usr/bin/firecracker", "--uid", "1", "--gid", "2", "--cgroup-version", "2", "--new-pid-ns", "--", "--api-sock", "/run/firecracker.socket"}
	j, err := ParseJailerArgs(ok)
	if err != nil || j.ChrootDir() != "/srv/jailer/firecracker/fr-a1/root" || !j.NewPIDNS || len(j.Extra) != 2 {
		t.Errorf("ParseJailerArgs = %+v, %v", j, err)
	}
	for _, bad := range [][]string{
		{"--id", "fr-a1", "--exec-file", "/usr/bin/fc", "--uid", "1", "--gid", "2"},          // exec name
		{"--id", "fr a1", "--exec-file", "/usr/bin/firecracker", "--uid", "1", "--gid", "2"}, // id charset
		{"--id", "fr-a1", "--exec-file", "/usr/bin/firecracker", "--uid", "1"},               // gid missing
		{"--id", "fr-a1", "--exec-file", "/usr/bin/firecracker", "--uid", "1", "--gid", "2", "--cgroup-version", "3"},
		{"--id", "fr-a1", "--exec-file", "/usr/bin/firecracker", "--uid", "1", "--gid", "2", "--bogus"},
	} {
		if _, err := ParseJailerArgs(bad); err == nil {
			t.Errorf("ParseJailerArgs(%q) accepted", bad)
		}
	}
}
