package guestconfig

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func sample() Config {
	return Config{Hostname: "fr-1", GitLabURL: "http://10.0.2.2:8080", RunnerToken: "glrt-" + strings.Repeat("x", 20),
		JobTimeoutSec: 600, Network: &Network{Address: "172.30.0.2/24", Gateway: "172.30.0.1", MTU: 1500}}
}

func TestDriveRoundTrip(t *testing.T) {
	p := filepath.Join(t.TempDir(), "config.img")
	if err := WriteDrive(p, sample()); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 || fi.Size()%4096 != 0 {
		t.Fatalf("drive mode %o size %d: want 0600 and whole 4 KiB blocks", fi.Mode().Perm(), fi.Size())
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, err := Decode(f)
	if err != nil {
		t.Fatal(err)
	}
	if got.RunnerToken != sample().RunnerToken || got.Network.Gateway != "172.30.0.1" || got.JobTimeoutSec != 600 {
		t.Fatalf("round trip changed the config: %+v", got)
	}
	// Never written twice (or through a planted file/symlink).
	if err := WriteDrive(p, sample()); err == nil {
		t.Fatal("WriteDrive overwrote an existing file")
	}
}

func TestDecodeRejects(t *testing.T) {
	good, err := Encode(sample())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Decode(bytes.NewReader(make([]byte, 4096))); !errors.Is(err, ErrNotConfigDrive) {
		t.Errorf("zero disk: %v, want ErrNotConfigDrive", err)
	}
	huge := append([]byte(nil), good...)
	copy(huge[8:16], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	if _, err := Decode(bytes.NewReader(huge)); err == nil {
		t.Error("oversized length accepted")
	}
	if _, err := Decode(bytes.NewReader(good[:20])); err == nil {
		t.Error("truncated drive accepted")
	}
	bad := sample()
	bad.GitLabURL = "ftp://x"
	b, _ := Encode(bad)
	if _, err := Decode(bytes.NewReader(b)); err == nil || !strings.Contains(err.Error(), "gitlab_url") {
		t.Errorf("invalid config accepted: %v", err)
	}
}

func TestValidateAndString(t *testing.T) {
	c := sample()
	c.JobTimeoutSec = 0
	if c.Validate() == nil {
		t.Error("zero timeout accepted")
	}
	c = sample()
	c.RunnerToken = ""
	if c.Validate() == nil {
		t.Error("neither token nor command accepted")
	}
	c.Command = []string{"true"}
	if err := c.Validate(); err != nil {
		t.Errorf("command mode: %v", err)
	}
	if s := sample().String(); strings.Contains(s, "glrt-") || !strings.Contains(s, "[redacted]") {
		t.Errorf("String leaks the token: %s", s)
	}
}
