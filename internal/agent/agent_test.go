package agent

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/vm"
)

const secret = "glrt-SECRETtoken123"

func runnerConfig() guestconfig.Config {
	return guestconfig.Config{
		Hostname: "fr-abc", GitLabURL: "http://10.0.2.2:8080", RunnerToken: secret,
		JobTimeoutSec: 600, WaitTimeoutSec: 30, Env: map[string]string{"B": "2", "A": "1"},
	}
}

func TestBuildWorkloadRunnerKeepsTokenOutOfArgvAndEnv(t *testing.T) {
	w, err := BuildWorkload(runnerConfig())
	if err != nil {
		t.Fatal(err)
	}
	want := []string{GitLabRunnerPath, "run-single", "--config", RunnerConfigPath, "--runner", RunnerName,
		"--max-builds", "1", "--wait-timeout", "30"}
	if strings.Join(w.Args, " ") != strings.Join(want, " ") {
		t.Fatalf("args = %q, want %q", w.Args, want)
	}
	for _, s := range append(append([]string{}, w.Args...), w.Env...) {
		if strings.Contains(s, secret) {
			t.Fatalf("token leaked into argv/env: %q", s)
		}
	}
	if w.UID != CIUID || w.GID != CIGID || w.Dir != CIHome {
		t.Fatalf("runs as %d:%d in %s, want the CI user", w.UID, w.GID, w.Dir)
	}
	toml := string(w.ConfigTOML)
	for _, line := range []string{`token = "` + secret + `"`, `url = "http://10.0.2.2:8080"`, `executor = "shell"`,
		`name = "` + RunnerName + `"`, `builds_dir = "/home/ci/builds"`} {
		if !strings.Contains(toml, line) {
			t.Errorf("config.toml lacks %s:\n%s", line, toml)
		}
	}
	env := strings.Join(w.Env, "\n")
	if !strings.Contains(env, "A=1\nB=2") {
		t.Errorf("extra env missing or unsorted: %v", w.Env)
	}
}

func TestBuildWorkloadDefaultsWaitTimeout(t *testing.T) {
	c := runnerConfig()
	c.WaitTimeoutSec = 0
	w, err := BuildWorkload(c)
	if err != nil {
		t.Fatal(err)
	}
	if w.Args[len(w.Args)-1] != "120" {
		t.Fatalf("wait timeout = %s, want default 120", w.Args[len(w.Args)-1])
	}
}

func TestBuildWorkloadCommand(t *testing.T) {
	c := guestconfig.Config{JobTimeoutSec: 10, Command: []string{"sh", "-c", "exit 3"}}
	w, err := BuildWorkload(c)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(w.Args, "|") != "sh|-c|exit 3" || w.ConfigTOML != nil {
		t.Fatalf("workload = %+v", w)
	}
}

func TestBuildWorkloadRejects(t *testing.T) {
	for name, c := range map[string]guestconfig.Config{
		"no timeout":    {Command: []string{"true"}},
		"no token":      {JobTimeoutSec: 1, GitLabURL: "http://x"},
		"bad url":       {JobTimeoutSec: 1, RunnerToken: "t", GitLabURL: "ftp://x"},
		"bad env name":  {JobTimeoutSec: 1, Command: []string{"true"}, Env: map[string]string{"A=B": "c"}},
		"empty env key": {JobTimeoutSec: 1, Command: []string{"true"}, Env: map[string]string{"": "c"}},
	} {
		if _, err := BuildWorkload(c); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestTOMLStringEscapes(t *testing.T) {
	got := tomlString("a\"b\\c\nd")
	if got != `"a\"b\\c\u000Ad"` {
		t.Fatalf("tomlString = %s", got)
	}
	// A hostile URL cannot add keys to the config.
	c := runnerConfig()
	c.GitLabURL = "http://x/\"\n  executor = \"docker"
	if strings.Count(string(RunnerConfigTOML(c)), "\n  executor =") != 1 {
		t.Fatalf("injection:\n%s", RunnerConfigTOML(c))
	}
}

func TestPlanNetwork(t *testing.T) {
	p, err := PlanNetwork(nil)
	if err != nil {
		t.Fatal(err)
	}
	if p.Address.String() != "10.0.2.15/24" || p.Gateway.String() != "10.0.2.2" || len(p.DNS) != 1 || p.DNS[0].String() != "10.0.2.3" {
		t.Fatalf("slirp default plan = %+v", p)
	}
	p, err = PlanNetwork(&guestconfig.Network{Address: "172.30.0.2/24", Gateway: "172.30.0.1", DNS: []string{"1.1.1.1", "9.9.9.9"}, MTU: 1400})
	if err != nil {
		t.Fatal(err)
	}
	if p.MTU != 1400 || p.Address.Bits() != 24 {
		t.Fatalf("plan = %+v", p)
	}
	if rc := p.ResolvConf(); !strings.Contains(rc, "nameserver 1.1.1.1\nnameserver 9.9.9.9\n") {
		t.Fatalf("resolv.conf:\n%s", rc)
	}
	for name, n := range map[string]guestconfig.Network{
		"no cidr":       {Address: "172.30.0.2", Gateway: "172.30.0.1"},
		"ipv6":          {Address: "fd00::2/64", Gateway: "fd00::1"},
		"gw outside":    {Address: "172.30.0.2/24", Gateway: "172.31.0.1"},
		"gw is self":    {Address: "172.30.0.2/24", Gateway: "172.30.0.2"},
		"bad dns":       {Address: "172.30.0.2/24", Gateway: "172.30.0.1", DNS: []string{"dns.example"}},
		"mtu too small": {Address: "172.30.0.2/24", Gateway: "172.30.0.1", MTU: 100},
	} {
		if _, err := PlanNetwork(&n); err == nil {
			t.Errorf("%s: accepted %+v", name, n)
		}
	}
}

func TestHosts(t *testing.T) {
	if h := Hosts("fr-x1"); !strings.Contains(h, "127.0.1.1\tfr-x1\n") {
		t.Fatalf("hosts:\n%s", h)
	}
}

// TestFindConfigDrive lays out a fake /sys/block and /dev: the rootfs-like
// disk comes first, the config drive second, and a tiny disk is skipped.
func TestFindConfigDrive(t *testing.T) {
	dir := t.TempDir()
	sys, dev := filepath.Join(dir, "sys"), filepath.Join(dir, "dev")
	for _, d := range []string{"vda", "vdb", "vdc", "loop0"} {
		if err := os.MkdirAll(filepath.Join(sys, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.MkdirAll(dev, 0o755)
	os.WriteFile(filepath.Join(dev, "vda"), bytes.Repeat([]byte{0x53}, 8192), 0o600)
	os.WriteFile(filepath.Join(dev, "vdb"), []byte("tiny"), 0o600)
	want := guestconfig.Config{Hostname: "fr-t1", JobTimeoutSec: 5, Command: []string{"true"}}
	if err := guestconfig.WriteDrive(filepath.Join(dev, "vdc"), want); err != nil {
		t.Fatal(err)
	}
	// loop0 holds a drive too, but only vd* devices are considered.
	guestconfig.WriteDrive(filepath.Join(dev, "loop0"), guestconfig.Config{Hostname: "wrong", JobTimeoutSec: 1, Command: []string{"x"}})
	got, path, err := FindConfigDrive(sys, dev)
	if err != nil {
		t.Fatal(err)
	}
	if path != filepath.Join(dev, "vdc") || got.Hostname != "fr-t1" {
		t.Fatalf("found %s %+v", path, got)
	}

	// No drive at all: a clear error.
	os.Remove(filepath.Join(dev, "vdc"))
	if _, _, err := FindConfigDrive(sys, dev); err == nil || !strings.Contains(err.Error(), "no config drive") {
		t.Fatalf("err = %v", err)
	}

	// A drive with the magic but an invalid config is an error, not skipped.
	b, _ := guestconfig.Encode(guestconfig.Config{Command: []string{"true"}}) // no timeout
	os.WriteFile(filepath.Join(dev, "vdc"), b, 0o600)
	if _, p, err := FindConfigDrive(sys, dev); err == nil || p == "" {
		t.Fatalf("invalid drive: path %q err %v", p, err)
	}
}

func TestAssignmentChannel(t *testing.T) {
	sys, dev := t.TempDir(), "/dev"
	for name, port := range map[string]string{"vport0p1": "org.qemu.guest_agent.0", "vport1p1": guestconfig.AssignPort} {
		if err := os.MkdirAll(filepath.Join(sys, name), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(sys, name, "name"), []byte(port+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if got := FindAssignPort(sys, dev); got != "/dev/vport1p1" {
		t.Fatalf("port %q", got)
	}
	if got := FindAssignPort(t.TempDir(), dev); got != "" {
		t.Fatalf("port without any: %q", got)
	}
	// The host side (vm.SendAssignment) against the agent side over a pipe.
	host, guest := net.Pipe()
	a := guestconfig.Assignment{GitLabURL: "https://gitlab.example", RunnerToken: "glrt-" + strings.Repeat("x", 20), JobTimeoutSec: 60}
	got := make(chan guestconfig.Assignment, 1)
	go func() {
		x, err := AcceptAssignment(guest)
		if err != nil {
			t.Error(err)
		}
		got <- x
	}()
	if err := vm.SendAssignment(context.Background(), host, a); err != nil {
		t.Fatal(err)
	}
	if x := <-got; x != a {
		t.Fatalf("received %+v", x)
	}
	for _, bad := range []string{`{"gitlab_url":"https://g","job_timeout_sec":1}`, `{"runner_token":"t","gitlab_url":"ftp://x","job_timeout_sec":1}`,
		`{"runner_token":"t","gitlab_url":"https://g","job_timeout_sec":1,"extra":1}`, `not json`} {
		if _, err := DecodeAssignment(strings.NewReader(bad)); err == nil {
			t.Errorf("accepted %s", bad)
		}
	}
	if strings.Contains(a.String(), "glrt-") || strings.Contains((guestconfig.Config{}).Apply(a).String(), "glrt-") {
		t.Fatal("assignment printed its token")
	}
}

// TestWriteSystemID: the VM's system_id lands where gitlab-runner reads it
// (beside its config), in gitlab-runner's format, owner-only; a malformed
// one is refused rather than silently replaced by gitlab-runner.
func TestWriteSystemID(t *testing.T) {
	c := runnerConfig()
	c.SystemID = "s_fr0123456789"
	w, err := BuildWorkload(c)
	if err != nil || w.SystemID != c.SystemID {
		t.Fatalf("workload system id %q: %v", w.SystemID, err)
	}
	dir := t.TempDir()
	if err := WriteSystemID(dir, w.SystemID, os.Getuid(), os.Getgid()); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, ".runner_system_id")
	b, err := os.ReadFile(p)
	fi, _ := os.Stat(p)
	if err != nil || strings.TrimSpace(string(b)) != c.SystemID || fi.Mode().Perm() != 0o600 {
		t.Fatalf("%s: %q mode %v err %v", p, b, fi.Mode(), err)
	}
	if err := WriteSystemID(dir, "", 0, 0); err != nil {
		t.Fatalf("no system id: %v", err)
	}
	for _, bad := range []string{"s_short", "x_fr0123456789", "s_fr01234567-9"} {
		if err := WriteSystemID(dir, bad, os.Getuid(), os.Getgid()); err == nil {
			t.Errorf("system id %q accepted", bad)
		}
		c.SystemID = bad
		if _, err := BuildWorkload(c); err == nil {
			t.Errorf("guest config with system id %q accepted", bad)
		}
	}
}
