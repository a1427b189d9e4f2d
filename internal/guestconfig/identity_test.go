package guestconfig

import (
	"bytes"
	"strings"
	"testing"
)

// TestAssignmentIdentity: a clone's assignment carries an identity that
// replaces what the guest resumed with; a bad one is refused whole.
func TestAssignmentIdentity(t *testing.T) {
	warm := Config{Hostname: "fr-src", MachineID: strings.Repeat("a", 32), EntropySeed: []byte("source"), Warm: true, JobTimeoutSec: 60,
		Network: &Network{Address: "172.30.0.2/24", Gateway: "172.30.0.1"}, UnixTimeNano: 1}
	id := &Identity{Hostname: "fr-clone", MachineID: strings.Repeat("b", 32), EntropySeed: bytes.Repeat([]byte{7}, 32), UnixTimeNano: 42,
		Network: &Network{Address: "172.30.0.9/24", Gateway: "172.30.0.1"}, MAC: "02:fc:ac:1e:00:09", SystemID: "s_frclone00001"}
	a := Assignment{GitLabURL: "https://gitlab.example", RunnerToken: "t", JobTimeoutSec: 60, Identity: id}
	if err := a.Validate(); err != nil {
		t.Fatal(err)
	}
	if s := id.String(); strings.Contains(s, "\x07") || !strings.Contains(s, "fr-clone") || !strings.Contains(s, "[redacted]") {
		t.Errorf("Identity.String = %q", s)
	}
	c := warm.Apply(a)
	if c.Hostname != "fr-clone" || c.MachineID != id.MachineID || !bytes.Equal(c.EntropySeed, id.EntropySeed) || c.UnixTimeNano != 42 || c.Network.Address != "172.30.0.9/24" || c.SystemID != "s_frclone00001" || c.Warm {
		t.Errorf("Apply with identity = %+v", c)
	}
	if c := warm.Apply(Assignment{GitLabURL: "https://gitlab.example", RunnerToken: "t", JobTimeoutSec: 60}); c.Hostname != "fr-src" || c.MachineID != warm.MachineID {
		t.Errorf("Apply without identity changed the identity: %+v", c)
	}
	for _, bad := range []func(*Identity){
		func(i *Identity) { i.Hostname = "" },
		func(i *Identity) { i.MachineID = "xyz" },
		func(i *Identity) { i.MachineID = strings.Repeat("A", 32) },
		func(i *Identity) { i.EntropySeed = []byte("short") },
		func(i *Identity) { i.MAC = "02:fc:zz:00:00:01" },
		func(i *Identity) { i.SystemID = "s_short" },
	} {
		x := *id
		bad(&x)
		a.Identity = &x
		if err := a.Validate(); err == nil {
			t.Errorf("identity %+v accepted", x)
		}
	}
}
