package config

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

// The defaults the network isolation and the console log bounds rely on.
func TestBoundsDefaults(t *testing.T) {
	d := Default()
	if !d.Network.DenyPrivate {
		t.Error("network.deny_private must default to true")
	}
	if d.VM.ConsoleLogMaxBytes != 8<<20 || d.VM.ConsoleLogKeep != 100 || d.VM.ConsoleLogMaxAge != 7*24*time.Hour {
		t.Errorf("console log bounds: max %d keep %d age %s", d.VM.ConsoleLogMaxBytes, d.VM.ConsoleLogKeep, d.VM.ConsoleLogMaxAge)
	}
	if errs := d.boundsErrors(); len(errs) != 0 {
		t.Errorf("defaults: %v", errs)
	}
	// deny_private can be turned off; omitted, it stays on.
	for _, tc := range []struct {
		yaml string
		want bool
	}{{"network:\n  mtu: 1500\n", true}, {"network:\n  deny_private: false\n", false}} {
		c := Default()
		dec := yaml.NewDecoder(bytes.NewReader([]byte(tc.yaml)))
		dec.KnownFields(true)
		if err := dec.Decode(&c); err != nil {
			t.Fatal(err)
		}
		if c.Network.DenyPrivate != tc.want {
			t.Errorf("%q: deny_private = %v, want %v", tc.yaml, c.Network.DenyPrivate, tc.want)
		}
	}
}

func TestBoundsValidation(t *testing.T) {
	c := Default()
	c.Network.EgressAllow = []string{"10.0.0.0/8", "192.168.1.7", "fd00::/8", "gitlab.lan", "::ffff:10.0.0.1"}
	c.Network.DNS = []string{"10.0.0.2", "dns.lan", "fd00::53"}
	c.VM.ConsoleLogMaxBytes = 4096
	c.VM.ConsoleLogKeep = -1
	c.VM.ConsoleLogMaxAge = -time.Hour
	errs := c.boundsErrors()
	got := strings.Join(errs, "\n")
	for _, want := range []string{
		`network.egress_allow: "fd00::/8" is not IPv4`,
		`network.egress_allow: "gitlab.lan" is not an IPv4 CIDR or address`,
		`network.egress_allow: "::ffff:10.0.0.1" is not IPv4`,
		`network.dns: "dns.lan" is not an IPv4 address`,
		`network.dns: "fd00::53" is not an IPv4 address`,
		"vm.console_log_max_bytes: must be >= 65536",
		"vm.console_log_keep: must not be negative",
		"vm.console_log_max_age: must not be negative",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("errors lack %q:\n%s", want, got)
		}
	}
	if len(errs) != 8 {
		t.Errorf("want 8 errors (valid entries not reported), got %d:\n%s", len(errs), got)
	}
	for _, tc := range []struct{ in, want string }{{"10.1.2.3/8", "10.0.0.0/8"}, {"192.168.1.7", "192.168.1.7/32"}} {
		if p, err := ParseIPv4Prefix(tc.in); err != nil || p.String() != tc.want {
			t.Errorf("ParseIPv4Prefix(%q) = %v, %v; want %s", tc.in, p, err, tc.want)
		}
	}
	c = Default()
	c.VM.ConsoleLogMaxBytes, c.VM.ConsoleLogKeep, c.VM.ConsoleLogMaxAge = MinConsoleLogMaxBytes, 0, 0
	if errs := c.boundsErrors(); len(errs) != 0 {
		t.Errorf("smallest cap and no pruning limits are valid: %v", errs)
	}
}
