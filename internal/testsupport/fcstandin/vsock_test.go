package fcstandin

import (
	"bufio"
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
	"time"
)

// vmm is one in-process stand-in VMM on its own API socket.
type vmm struct {
	srv *Server
	do  func(method, path, body string) (int, string)
}

// newVMM serves a stand-in for VM id in dir (paths resolve as on the host),
// with the host's taps modelled in tapDir.
func newVMM(t *testing.T, c *Checker, dir, id, tapDir, api string) vmm {
	t.Helper()
	srv := NewServer(c, id, "/", nil)
	srv.TapDir, srv.API = tapDir, api
	sock := filepath.Join(dir, id+".api")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: srv}
	go hs.Serve(l)
	t.Cleanup(func() {
		hs.Close()
		srv.mu.Lock()
		for _, f := range srv.taps {
			f.Close()
		}
		if srv.vsockL != nil {
			srv.vsockL.Close()
		}
		srv.mu.Unlock()
	})
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
	return vmm{srv, do}
}

func checker(t *testing.T) *Checker {
	c, _ := loadSpecs(t)
	c.Optional = map[string]bool{}
	for _, o := range NewerOptional {
		c.Optional[o] = true
	}
	c.OptionalFields = NewerOptionalFields
	return c
}

func tempDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "fcv") // short: socket paths
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.WriteFile(filepath.Join(dir, "vmlinux"), []byte("\x7fELF kernel"), 0o644)
	os.WriteFile(filepath.Join(dir, "rootfs"), []byte("ext4"), 0o644)
	return dir
}

type step struct {
	method, path, body string
	status             int
	fault              string
}

func run(t *testing.T, v vmm, steps []step) {
	t.Helper()
	for _, s := range steps {
		status, fault := v.do(s.method, s.path, s.body)
		if status != s.status || !strings.Contains(fault, s.fault) {
			t.Errorf("%s %s %s = %d %q; want %d with fault mentioning %q", s.method, s.path, s.body, status, fault, s.status, s.fault)
		}
	}
}

// boot configures and starts a VM with a root drive, a tap and a vsock.
func boot(t *testing.T, v vmm, tap string) {
	t.Helper()
	run(t, v, []step{
		{"PUT", "/machine-config", `{"vcpu_count":1,"mem_size_mib":256}`, 204, ""},
		{"PUT", "/boot-source", `{"kernel_image_path":"$DIR/vmlinux","boot_args":"reboot=k"}`, 204, ""},
		{"PUT", "/drives/rootfs", `{"drive_id":"rootfs","path_on_host":"$DIR/rootfs","is_root_device":true,"is_read_only":true}`, 204, ""},
		{"PUT", "/network-interfaces/1", `{"iface_id":"1","host_dev_name":"` + tap + `"}`, 204, ""},
		{"PUT", "/vsock", `{"guest_cid":3,"uds_path":"$DIR/` + v.srv.ID + `.vsock"}`, 204, ""},
		{"PUT", "/actions", `{"action_type":"InstanceStart"}`, 204, ""},
	})
}

// TestVsockHostInitiated: Firecracker's host-initiated handshake on
// uds_path: "CONNECT <port>\n" answered "OK <n>\n" for a port the guest
// listens on; a port nobody listens on, or a malformed request, gets the
// stream closed.
func TestVsockHostInitiated(t *testing.T) {
	dir := tempDir(t)
	v := newVMM(t, checker(t), dir, "fr-vs1", filepath.Join(dir, "taps"), "")
	boot(t, v, "tap-vs1")
	v.srv.GuestListen(1234, func(c net.Conn) { io.Copy(c, c); c.Close() })
	uds := filepath.Join(dir, "fr-vs1.vsock")
	dial := func(req string) (*bufio.Reader, net.Conn) {
		c, err := net.Dial("unix", uds)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, req)
		return bufio.NewReader(c), c
	}
	r, c := dial("CONNECT 1234\n")
	line, err := r.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "OK ") {
		t.Fatalf("CONNECT 1234 answered %q, %v; want OK <port>", line, err)
	}
	io.WriteString(c, "ping\n")
	if echo, _ := r.ReadString('\n'); echo != "ping\n" {
		t.Errorf("the stream after OK echoed %q", echo)
	}
	for _, req := range []string{"CONNECT 99\n", "CONNECT abc\n", "connect 1234\n", "CONNECT 1234"} {
		r, c := dial(req)
		if req == "CONNECT 1234" {
			c.(*net.UnixConn).CloseWrite() // no newline ever comes
		}
		if b, err := r.ReadString('\n'); err == nil {
			t.Errorf("%q answered %q; want the stream closed", req, b)
		}
	}
	// Firecracker binds uds_path itself: a path in use is refused.
	w := newVMM(t, checker(t), dir, "fr-vs2", filepath.Join(dir, "taps"), "")
	run(t, w, []step{{"PUT", "/vsock", `{"guest_cid":3,"uds_path":"$DIR/fr-vs1.vsock"}`, 400, "Address in use"}})
}

// TestVsockGuestInitiated: the guest connecting to the host on port P
// reaches the listener at "<uds_path>_P", and fails while there is none.
func TestVsockGuestInitiated(t *testing.T) {
	dir := tempDir(t)
	v := newVMM(t, checker(t), dir, "fr-vs3", filepath.Join(dir, "taps"), "")
	boot(t, v, "tap-vs3")
	if c, err := v.srv.dialHost(52); err == nil {
		c.Close()
		t.Fatal("guest connected with no host listener")
	}
	l, err := net.Listen("unix", filepath.Join(dir, "fr-vs3.vsock_52"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		if c, err := l.Accept(); err == nil {
			io.WriteString(c, "hello\n")
			c.Close()
		}
	}()
	c, err := v.srv.dialHost(52)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if b, _ := bufio.NewReader(c).ReadString('\n'); b != "hello\n" {
		t.Errorf("guest read %q from the host", b)
	}
	// A jailed Firecracker runs as its own uid: a socket only another user
	// may write is refused, as connect(2) would refuse it.
	os.Chmod(filepath.Join(dir, "fr-vs3.vsock_52"), 0o600)
	v.srv.UID, v.srv.GID = os.Geteuid()+12345, os.Getegid()+12345
	if c, err := v.srv.dialHost(52); err == nil || !strings.Contains(err.Error(), "permission denied") {
		if c != nil {
			c.Close()
		}
		t.Errorf("a jailed VMM connected to another user's 0600 socket: %v", err)
	}
}

// TestSnapshotLoadSemantics: what Firecracker refuses on PUT /snapshot/load,
// each on a fresh VMM (Firecracker ends the process after a failed load).
func TestSnapshotLoadSemantics(t *testing.T) {
	dir := tempDir(t)
	c := checker(t)
	taps := filepath.Join(dir, "taps")
	src := newVMM(t, c, dir, "fr-src", taps, "")
	boot(t, src, "tap-src")
	run(t, src, []step{
		{"PATCH", "/vm", `{"state":"Paused"}`, 204, ""},
		{"PUT", "/snapshot/create", `{"snapshot_path":"$DIR/state","mem_file_path":"$DIR/mem","snapshot_type":"Full"}`, 204, ""},
		{"PATCH", "/vm", `{"state":"Resumed"}`, 204, ""},
	})
	os.Chmod(filepath.Join(dir, "mem"), 0o444)
	mem := `"mem_backend":{"backend_type":"File","backend_path":"$DIR/mem"}`
	n := 0
	fresh := func() vmm {
		n++
		return newVMM(t, c, dir, "fr-dst"+string(rune('a'+n)), taps, "")
	}
	cases := []struct {
		name, body string
		status     int
		fault      string
	}{
		{"source's tap in use", `{"snapshot_path":"$DIR/state",` + mem + `,"vsock_override":{"uds_path":"$DIR/x1.vsock"}}`, 400, "Resource busy"},
		{"override names no interface", `{"snapshot_path":"$DIR/state",` + mem + `,"network_overrides":[{"iface_id":"9","host_dev_name":"tap-x"}]}`, 400, "does not have"},
		{"source's vsock socket in use", `{"snapshot_path":"$DIR/state",` + mem + `,"network_overrides":[{"iface_id":"1","host_dev_name":"tap-d1"}]}`, 400, "Address in use"},
		{"both memory fields", `{"snapshot_path":"$DIR/state","mem_file_path":"$DIR/mem",` + mem + `}`, 400, "exactly one"},
		{"override without host_dev_name", `{"snapshot_path":"$DIR/state",` + mem + `,"network_overrides":[{"iface_id":"1"}]}`, 400, "host_dev_name"},
		{"a clone of its own", `{"snapshot_path":"$DIR/state",` + mem + `,"network_overrides":[{"iface_id":"1","host_dev_name":"tap-d2"}],"vsock_override":{"uds_path":"$DIR/d2.vsock"},"clock_realtime":true,"resume_vm":true}`, 204, ""},
	}
	for _, tc := range cases {
		v := fresh()
		status, fault := v.do("PUT", "/snapshot/load", tc.body)
		if status != tc.status || !strings.Contains(fault, tc.fault) {
			t.Errorf("%s: %d %q; want %d mentioning %q", tc.name, status, fault, tc.status, tc.fault)
		}
		if tc.status == 204 {
			if !v.srv.ClockRealtime() {
				t.Error("clock_realtime not taken")
			}
			// The clone now holds tap-d2: a second clone on it is refused.
			w := fresh()
			if status, fault := w.do("PUT", "/snapshot/load", strings.ReplaceAll(tc.body, "d2.vsock", "d3.vsock")); status != 400 || !strings.Contains(fault, "Resource busy") {
				t.Errorf("second clone on the same tap: %d %q", status, fault)
			}
			// Loaded once: never again, and nothing pre-boot.
			run(t, v, []step{
				{"PUT", "/snapshot/load", tc.body, 400, "after starting"},
				{"PUT", "/machine-config", `{"vcpu_count":1,"mem_size_mib":256}`, 400, "after starting"},
			})
		}
	}
	// Only a fresh VMM loads.
	v := fresh()
	run(t, v, []step{
		{"PUT", "/machine-config", `{"vcpu_count":1,"mem_size_mib":256}`, 204, ""},
		{"PUT", "/snapshot/load", `{"snapshot_path":"$DIR/state",` + mem + `}`, 400, "after configuring"},
	})
	// An older Firecracker refuses the newer fields (its answer, not a
	// contract violation); a field no spec has is a violation.
	old := newVMM(t, c, dir, "fr-old", taps, "1.4.1")
	status, fault := old.do("PUT", "/snapshot/load", `{"snapshot_path":"$DIR/state",`+mem+`,"network_overrides":[{"iface_id":"1","host_dev_name":"tap-o"}]}`)
	if status != 400 || !strings.Contains(fault, "unknown field `network_overrides`") {
		t.Errorf("API 1.4.1 load with network_overrides: %d %q", status, fault)
	}
	if r := old.srv.Records(); r[len(r)-1].Violation {
		t.Error("an older Firecracker's refusal counted as a contract violation")
	}
	c2 := *c
	c2.OptionalFields = map[string][]string{"PUT /snapshot/load": {"made_up"}}
	if _, _, err := c2.Check("PUT", "/snapshot/load", []byte(`{"snapshot_path":"/s","mem_file_path":"/m","made_up":1}`)); err == nil || !strings.Contains(err.Error(), "none of the specs") {
		t.Errorf("a field in no spec: %v", err)
	}
}
