package agent

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/firerunner/firerunner/internal/guestconfig"
)

// QEMU user-mode networking (slirp) defaults, used when the config has no
// network: the guest is 10.0.2.15/24, the host is reachable as 10.0.2.2.
var slirpDefault = guestconfig.Network{Address: "10.0.2.15/24", Gateway: "10.0.2.2", DNS: []string{"10.0.2.3"}}

// NetPlan is the validated network configuration for the guest's NIC.
type NetPlan struct {
	Address netip.Prefix
	Gateway netip.Addr
	DNS     []netip.Addr
	MTU     int // 0: leave the driver default
}

// PlanNetwork validates n (nil: slirp defaults) into a NetPlan.
func PlanNetwork(n *guestconfig.Network) (NetPlan, error) {
	if n == nil {
		n = &slirpDefault
	}
	var p NetPlan
	var err error
	if p.Address, err = netip.ParsePrefix(n.Address); err != nil || !p.Address.Addr().Is4() {
		return p, fmt.Errorf("network: address %q is not an IPv4 CIDR", n.Address)
	}
	if p.Gateway, err = netip.ParseAddr(n.Gateway); err != nil || !p.Gateway.Is4() {
		return p, fmt.Errorf("network: gateway %q is not an IPv4 address", n.Gateway)
	}
	if !p.Address.Masked().Contains(p.Gateway) {
		return p, fmt.Errorf("network: gateway %s is outside %s", p.Gateway, p.Address.Masked())
	}
	if p.Gateway == p.Address.Addr() {
		return p, fmt.Errorf("network: gateway %s equals the guest address", p.Gateway)
	}
	for _, d := range n.DNS {
		a, err := netip.ParseAddr(d)
		if err != nil {
			return p, fmt.Errorf("network: dns %q is not an IP address", d)
		}
		p.DNS = append(p.DNS, a)
	}
	if n.MTU != 0 && (n.MTU < 576 || n.MTU > 65535) {
		return p, fmt.Errorf("network: mtu %d out of range 576..65535", n.MTU)
	}
	p.MTU = n.MTU
	return p, nil
}

// ResolvConf renders /etc/resolv.conf for the plan.
func (p NetPlan) ResolvConf() string {
	var b strings.Builder
	b.WriteString("# written by firerunner-agent\n")
	for _, d := range p.DNS {
		fmt.Fprintf(&b, "nameserver %s\n", d)
	}
	b.WriteString("options timeout:2 attempts:2\n")
	return b.String()
}

// Hosts renders /etc/hosts naming the guest.
func Hosts(hostname string) string {
	return "127.0.0.1\tlocalhost\n127.0.1.1\t" + hostname + "\n::1\tlocalhost ip6-localhost ip6-loopback\n"
}
