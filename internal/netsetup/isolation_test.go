package netsetup

import (
	"errors"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TestIsolationAndEgress attaches two "VMs" and checks what each may reach,
// with the production defaults (deny_private on). Every "blocked" check has
// a positive control proving the target is up.
func TestIsolationAndEgress(t *testing.T) {
	cfg := labCfg()
	cfg.EgressAllow = []string{"192.168.7.0/24"}
	l := newLab(t, cfg, WithAllowedHostPorts(18053, 53), WithHostPorts(18080))
	ip1, _ := l.attach("fr-vm1")
	ip2, _ := l.attach("fr-vm2")
	host, ext, vm1 := l.host, l.ext, l.vmNS["fr-vm1"]

	serve(t, host, "10.231.0.1:18080")  // FireRunner API stand-in on the gateway
	serve(t, host, uplinkAddr+":18080") // ... and on the host's uplink address
	serve(t, host, "10.231.0.1:18053")  // an allowed host port on the gateway
	serve(t, host, uplinkAddr+":18053") // ... the same port on another host address
	serve(t, host, "10.231.0.1:18081")  // any other host port
	serve(t, host, "10.231.0.1:53")     // a resolver on the bridge (allowed port)
	serve(t, l.vmNS["fr-vm2"], ip2+":9000")
	serve(t, ext, extAddr+":9000")
	serve(t, ext, publicAddr+":9000")
	serve(t, ext, metaAddr+":80")
	serve(t, ext, resolver+":53")
	serve(t, ext, resolver+":9000")
	for _, a := range privateTargets {
		serve(t, ext, a+":9000")
	}

	l.mustReach(vm1, "internet via NAT", extAddr+":9000", uplinkAddr)
	l.mustReach(vm1, "another public address", publicAddr+":9000", uplinkAddr)
	l.mustReach(vm1, "allowed host port on the gateway", "10.231.0.1:18053", ip1)
	l.mustReach(vm1, "resolver on the bridge", "10.231.0.1:53", ip1)
	l.mustReach(vm1, "egress_allow exception to deny_private", "192.168.7.7:9000", uplinkAddr)
	l.mustReach(vm1, "DNS to the configured resolver (private)", resolver+":53", uplinkAddr)
	l.mustReach(host, "control: VM 2 from the host", ip2+":9000", "")
	l.mustReach(host, "control: metadata from the host", metaAddr+":80", "")
	l.mustReach(host, "control: API port from the host", "10.231.0.1:18080", "")
	l.mustReach(host, "control: allowed port on the uplink address from the host", uplinkAddr+":18053", "")
	l.mustReach(host, "control: resolver's other port from the host", resolver+":9000", "")
	for _, a := range privateTargets {
		l.mustReach(host, "control: private target from the host", a+":9000", "")
	}

	l.mustNotReach(vm1, "the other VM over the bridge (port isolation)", ip2+":9000")
	l.mustNotReach(vm1, "the host's API port on the gateway", "10.231.0.1:18080")
	l.mustNotReach(vm1, "the host's API port on another host address", uplinkAddr+":18080")
	l.mustNotReach(vm1, "an allowed host port on another host address", uplinkAddr+":18053")
	l.mustNotReach(vm1, "another host port", "10.231.0.1:18081")
	l.mustNotReach(vm1, "the metadata address", metaAddr+":80")
	l.mustNotReach(vm1, "a non-DNS port of the resolver", resolver+":9000")
	for _, a := range privateTargets {
		if a != "192.168.7.7" {
			l.mustNotReach(vm1, "a private address (deny_private)", a+":9000")
		}
	}
	// Route VM 2 via the gateway: now only the forward chain stands between them.
	sh(t, "ip", "-n", l.vmName["fr-vm1"], "route", "add", ip2+"/32", "via", "10.231.0.1")
	l.mustNotReach(vm1, "the other VM routed via the gateway (forward chain)", ip2+":9000")
	// VM 1 claiming VM 2's address: the bridge table drops its frames.
	// (a) IPv4 with a forged source: one-way UDP would reach the internet.
	udp := listenUDP(t, ext, extAddr+":9001")
	sh(t, "ip", "-n", l.vmName["fr-vm1"], "addr", "add", ip2+"/32", "dev", "eth0")
	sendUDP(t, vm1, ip1, extAddr+":9001", "control")
	if got := recvUDP(udp); got != "control" {
		t.Errorf("control datagram from VM 1's own address: got %q", got)
	}
	sendUDP(t, vm1, ip2, extAddr+":9001", "forged")
	if got := recvUDP(udp); got != "" {
		t.Errorf("a datagram with VM 2's source address left VM 1's port: %q", got)
	}
	sh(t, "ip", "-n", l.vmName["fr-vm1"], "addr", "del", ip2+"/32", "dev", "eth0")
	// (b) ARP: a gratuitous ARP for VM 2's address must not redirect the
	// host's traffic for VM 2 to VM 1.
	l.mustReach(host, "control: VM 2 from the host (fills the neighbour table)", ip2+":9000", "")
	_ = exec.Command("ip", "netns", "exec", l.hostName, "sysctl", "-qw", "net.ipv4.neigh.frbr0.locktime=0").Run()
	ifc := vmIfc(t, l, "fr-vm1")
	sendFrames(t, vm1, arpFrame(ifc, ifc, ip2), arpFrame(ifc, ifc, ip2), arpFrame(ifc, ifc, ip2))
	if eventually(func() bool { return l.neighMAC(ip2) == ifc.String() }) {
		t.Errorf("VM 1 took over VM 2's address in the host's neighbour table")
	}
	l.mustReach(host, "VM 2 from the host after the ARP attempt", ip2+":9000", "")
	// New connections from outside into a VM are dropped too.
	sh(t, "ip", "-n", l.extName, "route", "add", "10.231.0.0/24", "via", uplinkAddr)
	if _, err := dial(ext, ip2+":9000"); err == nil {
		t.Error("a host outside reached a VM's port")
	}

	t.Run("deny_private off", func(t *testing.T) {
		c := labCfg()
		c.DenyPrivate = false
		mo, err := New(c, t.TempDir(), WithNetNS(host))
		if err != nil {
			t.Fatal(err)
		}
		if err := mo.Setup(l.ctx); err != nil { // replaces the table atomically
			t.Fatal(err)
		}
		l.mustReach(vm1, "a private address without deny_private", "10.99.0.2:9000", uplinkAddr)
		l.mustNotReach(vm1, "the metadata address", metaAddr+":80")
		if err := l.m.Setup(l.ctx); err != nil {
			t.Fatal(err)
		}
		l.mustNotReach(vm1, "a private address after switching back", "10.99.0.2:9000")
	})

	t.Run("allowlist", func(t *testing.T) {
		c := labCfg()
		c.Egress, c.EgressAllow = "allowlist", []string{publicAddr}
		c.DNS = nil
		ma, err := New(c, t.TempDir(), WithNetNS(host))
		if err != nil {
			t.Fatal(err)
		}
		if err := ma.Setup(l.ctx); err != nil {
			t.Fatal(err)
		}
		l.mustReach(vm1, "allow-listed address", publicAddr+":9000", uplinkAddr)
		l.mustNotReach(vm1, "an address off the allow-list", extAddr+":9000")
		l.mustNotReach(vm1, "the metadata address", metaAddr+":80")
		if err := l.m.Setup(l.ctx); err != nil { // back to allow_all
			t.Fatal(err)
		}
		l.mustReach(vm1, "internet via NAT after switching back", extAddr+":9000", uplinkAddr)
	})

	for _, id := range []string{"fr-vm1", "fr-vm2"} {
		if err := l.m.Release(l.ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.m.Teardown(l.ctx); err != nil {
		t.Fatal(err)
	}
	if left := leftovers(t, l.m); strings.Join(left, ",") != "uplink" {
		t.Errorf("links left after Release+Teardown: %v", left)
	}
	var nfe *exec.ExitError
	if out, err := exec.Command("ip", "netns", "exec", l.hostName, "nft", "list", "table", "inet", TableName).CombinedOutput(); !errors.As(err, &nfe) {
		t.Errorf("table still listed after Teardown: %s", out)
	}
}

func vmIfc(t *testing.T, l *lab, id string) net.HardwareAddr {
	t.Helper()
	var mac net.HardwareAddr
	inNS(t, l.vmNS[id], func() {
		ifc, err := net.InterfaceByName("eth0")
		if err != nil {
			t.Error(err)
			return
		}
		mac = ifc.HardwareAddr
	})
	return mac
}

// TestMACSpoofing: a VM with guest root sends frames with its neighbour's
// (predictable) MAC, or ARP claiming its own address at the neighbour's MAC.
// Neither may steal the neighbour's downlink traffic; normal traffic of
// both keeps working.
func TestMACSpoofing(t *testing.T) {
	l := newLab(t, labCfg())
	ip1, mac1 := l.attach("fr-vm1")
	ip2, mac2 := l.attach("fr-vm2")
	host, vm1, vm2 := l.host, l.vmNS["fr-vm1"], l.vmNS["fr-vm2"]

	// Ports: no learning, no unicast flooding, the VM's MAC static.
	if err := l.m.run(func() error {
		for id, mac := range map[string]net.HardwareAddr{"fr-vm1": mac1, "fr-vm2": mac2} {
			lk, err := netlink.LinkByName(id)
			if err != nil {
				return err
			}
			pi, err := netlink.LinkGetProtinfo(lk)
			if err != nil {
				return err
			}
			if pi.Learning || pi.Flood || !pi.Isolated {
				t.Errorf("%s: learning %v, unicast flood %v, isolated %v; want false, false, true", id, pi.Learning, pi.Flood, pi.Isolated)
			}
			fdb, err := netlink.NeighList(lk.Attrs().Index, unix.AF_BRIDGE)
			if err != nil {
				return err
			}
			static := false
			for _, n := range fdb {
				if n.HardwareAddr.String() == mac.String() && n.State&netlink.NUD_NOARP != 0 {
					static = true
				}
			}
			if !static {
				t.Errorf("%s: no static fdb entry for %s: %+v", id, mac, fdb)
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	serve(t, vm1, ip1+":9000")
	serve(t, vm2, ip2+":9000")
	l.mustReach(host, "control: VM 1 from the host", ip1+":9000", "")
	l.mustReach(host, "control: VM 2 from the host", ip2+":9000", "")
	in2 := listenUDP(t, vm2, ip2+":7000")
	sendUDP(t, host, "10.231.0.1", ip2+":7000", "control")
	if got := recvUDP(in2); got != "control" {
		t.Fatalf("control datagram host -> VM 2: got %q", got)
	}

	// VM 1 sends IPv4 from its own address but with VM 2's MAC, as a guest
	// that set its NIC's MAC to its neighbour's would. A learning bridge now
	// sends VM 2's downlink to VM 1's port.
	spoof := udpFrame(broadcast, mac2, ip1, "10.231.0.1", 4000, 9, "spoof")
	caught := capture(t, vm1)
	sendFrames(t, vm1, spoof, spoof, spoof)
	for i := 0; i < 3; i++ {
		sendUDP(t, host, "10.231.0.1", ip2+":7000", "secret-for-vm2")
	}
	frames := caught()
	if containsPayload(frames, "secret-for-vm2") {
		t.Errorf("VM 1 received VM 2's traffic after sending frames with VM 2's MAC")
	}
	if got := recvUDP(in2); got != "secret-for-vm2" {
		t.Errorf("VM 2 lost its traffic to the spoofer: got %q", got)
	}

	// ARP: VM 1's own address at VM 2's MAC (Ethernet source its own). The
	// host would then send VM 1's downlink to VM 2's MAC; any sender MAC
	// but its own must be refused.
	l.mustReach(host, "control: VM 1 from the host (fills the neighbour table)", ip1+":9000", "")
	_ = exec.Command("ip", "netns", "exec", l.hostName, "sysctl", "-qw", "net.ipv4.neigh.frbr0.locktime=0").Run()
	if got := l.neighMAC(ip1); got != mac1.String() {
		t.Fatalf("control: host's neighbour entry for VM 1 is %q, want %s", got, mac1)
	}
	sendFrames(t, vm1, arpFrame(mac1, mac2, ip1), arpFrame(mac1, mac2, ip1), arpFrame(mac1, mac2, ip1))
	if eventually(func() bool { return l.neighMAC(ip1) == mac2.String() }) {
		t.Errorf("an ARP sender MAC other than VM 1's own reached the host's neighbour table")
	}

	// Normal traffic still flows both ways, and out.
	serve(t, l.ext, extAddr+":9000")
	l.mustReach(host, "VM 1 from the host after the attempts", ip1+":9000", "")
	l.mustReach(host, "VM 2 from the host after the attempts", ip2+":9000", "")
	l.mustReach(vm1, "internet from VM 1", extAddr+":9000", uplinkAddr)
	l.mustReach(vm2, "internet from VM 2", extAddr+":9000", uplinkAddr)
}

// TestConntrackFlushedOnRelease: a released address is handed to the next
// VM; flows of the old tenant must not reach the new one.
func TestConntrackFlushedOnRelease(t *testing.T) {
	l := newLab(t, labCfg())
	ip1, _ := l.attach("fr-vm1")
	ext, vm1 := l.ext, l.vmNS["fr-vm1"]

	// VM 1 talks UDP to the internet; the peer answers (conntrack: seen both
	// ways). The peer learns the NATed address and port.
	out := listenUDP(t, ext, extAddr+":9001")
	back := listenUDP(t, vm1, ip1+":5000")
	if _, err := back.WriteTo([]byte("hello"), net.UDPAddrFromAddrPort(netip.MustParseAddrPort(extAddr+":9001"))); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 64)
	if err := out.SetReadDeadline(deadline()); err != nil {
		t.Fatal(err)
	}
	n, natted, err := out.ReadFrom(b)
	if err != nil || string(b[:n]) != "hello" {
		t.Fatalf("control: VM 1 -> internet: %q %v", b[:n], err)
	}
	if _, err := out.WriteTo([]byte("reply"), natted); err != nil {
		t.Fatal(err)
	}
	if got := recvUDP(back); got != "reply" {
		t.Fatalf("control: reply to VM 1: %q", got)
	}
	if n := l.flows(ip1); n == 0 {
		t.Fatalf("control: no conntrack entry for %s", ip1)
	}
	back.Close()

	if err := l.m.Release(l.ctx, "fr-vm1"); err != nil {
		t.Fatal(err)
	}
	if n := l.flows(ip1); n != 0 {
		t.Errorf("%d conntrack entries of %s left after Release", n, ip1)
	}
	ip3, _ := l.attach("fr-vm3")
	if ip3 != ip1 {
		t.Fatalf("the new VM got %s, want the released %s", ip3, ip1)
	}
	in3 := listenUDP(t, l.vmNS["fr-vm3"], ip3+":5000")
	if _, err := out.WriteTo([]byte("late reply"), natted); err != nil {
		t.Fatal(err)
	}
	if got := recvUDP(in3); got != "" {
		t.Errorf("the new tenant of %s received the old tenant's flow: %q", ip3, got)
	}
}

// flows counts the host's conntrack entries involving ip.
func (l *lab) flows(ip string) int {
	n := 0
	a := net.ParseIP(ip)
	if err := l.m.run(func() error {
		fs, err := netlink.ConntrackTableList(netlink.ConntrackTable, unix.AF_INET)
		for _, f := range fs {
			if f.Forward.SrcIP.Equal(a) || f.Forward.DstIP.Equal(a) || f.Reverse.SrcIP.Equal(a) || f.Reverse.DstIP.Equal(a) {
				n++
			}
		}
		return err
	}); err != nil {
		l.t.Fatal(err)
	}
	return n
}
