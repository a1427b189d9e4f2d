package netsetup

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/testenv"
)

// --- fixtures: namespaces the test creates and always deletes ---

func sh(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

var nsSeq int

// newNS creates a named network namespace (lo up) and deletes it at cleanup.
func newNS(t *testing.T, role string) (string, netns.NsHandle) {
	t.Helper()
	nsSeq++
	name := fmt.Sprintf("frt%d-%s%d", os.Getpid(), role, nsSeq)
	sh(t, "ip", "netns", "add", name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	h, err := netns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	sh(t, "ip", "-n", name, "link", "set", "lo", "up")
	return name, h
}

// inNS runs fn on a thread inside the namespace; sockets made there stay there.
func inNS(t *testing.T, h netns.NsHandle, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		if err := netns.Set(h); err != nil {
			t.Errorf("setns: %v", err)
			return
		}
		fn()
	}()
	<-done
}

// serve listens on addr inside ns and answers each connection with the
// remote address it saw, then closes it.
func serve(t *testing.T, h netns.NsHandle, addr string) {
	t.Helper()
	var ln net.Listener
	var err error
	inNS(t, h, func() { ln, err = net.Listen("tcp4", addr) })
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintln(c, c.RemoteAddr().(*net.TCPAddr).IP.String())
			c.Close()
		}
	}()
}

// dial connects from ns to addr; it returns the source address the server
// saw, or an error when the connection is blocked.
func dial(h netns.NsHandle, addr string) (string, error) { return dialFrom(h, "", addr) }

// dialFrom is dial with a chosen local source address.
func dialFrom(h netns.NsHandle, src, addr string) (string, error) {
	var conn net.Conn
	var err error
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		if err = netns.Set(h); err != nil {
			return
		}
		d := net.Dialer{Timeout: 1500 * time.Millisecond}
		if src != "" {
			d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(src)}
		}
		conn, err = d.Dial("tcp4", addr)
	}()
	<-done
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	return strings.TrimSpace(line), err
}

func listenUDP(t *testing.T, h netns.NsHandle, addr string) *net.UDPConn {
	t.Helper()
	var c net.PacketConn
	var err error
	inNS(t, h, func() { c, err = net.ListenPacket("udp4", addr) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.UDPConn)
}

func sendUDP(t *testing.T, h netns.NsHandle, src, dst, msg string) {
	t.Helper()
	inNS(t, h, func() {
		c, err := net.DialUDP("udp4", &net.UDPAddr{IP: net.ParseIP(src)}, net.UDPAddrFromAddrPort(netip.MustParseAddrPort(dst)))
		if err != nil {
			t.Errorf("udp from %s: %v", src, err)
			return
		}
		defer c.Close()
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Errorf("udp send: %v", err)
		}
	})
}

// recvUDP returns the next datagram, or "" if none arrives within 2s.
func recvUDP(c *net.UDPConn) string {
	b := make([]byte, 64)
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	n, _, err := c.ReadFrom(b)
	if err != nil {
		return ""
	}
	return string(b[:n])
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func testCfg() config.Network {
	return config.Network{Mode: "tap", Bridge: "frbr0", CIDR: "10.231.0.0/24", MTU: 1400,
		DNS: []string{"10.99.0.2"}, Egress: "allow_all"}
}

func leftovers(t *testing.T, m *Manager) []string {
	t.Helper()
	var names []string
	if err := m.run(func() error {
		links, err := netlink.LinkList()
		for _, l := range links {
			if l.Attrs().Name != "lo" {
				names = append(names, l.Attrs().Name)
			}
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return names
}

// --- unit tests (no root) ---

func TestNewRejectsBadConfig(t *testing.T) {
	for _, c := range []func(*config.Network){
		func(n *config.Network) { n.CIDR = "nonsense" },
		func(n *config.Network) { n.CIDR = "fd00::/64" },
		func(n *config.Network) { n.CIDR = "10.0.0.0/30" },
		func(n *config.Network) { n.CIDR = "169.254.0.0/24" },
		func(n *config.Network) { n.Bridge = "fr-abc" },
		func(n *config.Network) { n.Bridge = "" },
		func(n *config.Network) { n.Egress = "sometimes" },
		func(n *config.Network) { n.Egress = "allowlist"; n.EgressAllow = []string{"x"} },
		func(n *config.Network) { n.DenyPrivate = true; n.EgressAllow = []string{"fd00::/8"} }, // allow_all exceptions are checked too
		func(n *config.Network) { n.DNS = []string{"dns.example"} },
		func(n *config.Network) { n.MTU = 100 },
	} {
		cfg := testCfg()
		c(&cfg)
		if _, err := New(cfg, t.TempDir()); err == nil {
			t.Errorf("New(%+v) accepted a bad config", cfg)
		}
	}
	if _, err := New(testCfg(), t.TempDir()); err != nil {
		t.Fatal(err)
	}
}

func TestAllocatorPersistsAndExhausts(t *testing.T) {
	dir := t.TempDir()
	cfg := testCfg()
	cfg.CIDR = "10.5.0.8/29" // .8 net, .9 gateway, .10-.14 VMs, .15 broadcast
	m, _ := New(cfg, dir)
	tab, _ := m.alloc.load()
	var got []string
	for i := 0; i < 5; i++ {
		ip, fresh, err := m.alloc.allocate(&tab, fmt.Sprintf("fr-%d", i))
		if err != nil || !fresh {
			t.Fatalf("allocate %d: %v fresh=%v", i, err, fresh)
		}
		got = append(got, ip.String())
	}
	if strings.Join(got, ",") != "10.5.0.10,10.5.0.11,10.5.0.12,10.5.0.13,10.5.0.14" {
		t.Fatalf("allocated %v", got)
	}
	if _, _, err := m.alloc.allocate(&tab, "fr-x"); err == nil {
		t.Fatal("allocation past the end of the CIDR succeeded")
	}
	if err := m.alloc.save(tab); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, allocFile))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("address table mode %v, want 0600", fi.Mode().Perm())
	}
	m2, _ := New(cfg, dir)
	tab2, err := m2.alloc.load()
	if err != nil || tab2.VMs["fr-3"] != "10.5.0.13" {
		t.Fatalf("reloaded table %v, %v", tab2, err)
	}
	delete(tab2.VMs, "fr-1")
	ip, _, err := m2.alloc.allocate(&tab2, "fr-new")
	if err != nil || ip.String() != "10.5.0.11" {
		t.Fatalf("freed address not reused: %v %v", ip, err)
	}
	if ids, _ := m2.List(context.Background()); len(ids) < 5 {
		t.Fatalf("List from the table: %v", ids)
	}
	if err := os.WriteFile(filepath.Join(dir, allocFile), []byte("{torn"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := m2.Attach(context.Background(), "fr-y"); err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Fatalf("corrupt table not reported: %v", err)
	}
}

func TestRejectsBadVMID(t *testing.T) {
	m, _ := New(testCfg(), t.TempDir())
	for _, id := range []string{"", "eth0", "fr-", "fr-ABC", "fr-0123456789abc", "fr-a/b"} {
		if _, _, err := m.Attach(context.Background(), id); err == nil {
			t.Errorf("Attach(%q) accepted", id)
		}
		if err := m.Release(context.Background(), id); err == nil {
			t.Errorf("Release(%q) accepted", id)
		}
	}
}

func TestMAC(t *testing.T) {
	m, _ := New(testCfg(), t.TempDir())
	tab, _ := m.alloc.load()
	ip, _, _ := m.alloc.allocate(&tab, "fr-a")
	if mac := MAC(ip); mac != "02:fc:0a:e7:00:02" {
		t.Fatalf("MAC = %s", mac)
	}
}

func TestHostOptions(t *testing.T) {
	cfg := config.Default()
	cfg.Listen = "127.0.0.1:9090"
	m, err := New(testCfg(), t.TempDir(), HostOptions(cfg)...)
	if err != nil {
		t.Fatal(err)
	}
	if len(m.blockedPorts) != 1 || m.blockedPorts[0] != 9090 || m.tapUID != 64000 || m.tapGID != 64000 {
		t.Errorf("blocked %v, tap owner %d:%d", m.blockedPorts, m.tapUID, m.tapGID)
	}
	cfg.VM.Driver = "qemu"
	m, _ = New(testCfg(), t.TempDir(), HostOptions(cfg)...)
	if m.tapUID != 0 {
		t.Errorf("qemu: tap owner %d", m.tapUID)
	}
}

// BenchmarkAttachRelease measures one VM's network setup and teardown
// (allocation file write, nft port-table rebuild, tap create/delete).
func BenchmarkAttachRelease(b *testing.B) {
	testenv.RequireRoot(b)
	ctx := context.Background()
	name := fmt.Sprintf("frb%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		b.Fatalf("%v: %s", err, out)
	}
	b.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	h, err := netns.GetFromName(name)
	if err != nil {
		b.Fatal(err)
	}
	defer h.Close()
	m, err := New(testCfg(), b.TempDir(), WithNetNS(h))
	if err != nil {
		b.Fatal(err)
	}
	if err := m.Setup(ctx); err != nil {
		b.Fatal(err)
	}
	for i := 0; i < 20; i++ { // 20 VMs already running
		if _, _, err := m.Attach(ctx, fmt.Sprintf("fr-bg%d", i)); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, _, err := m.Attach(ctx, "fr-bench"); err != nil {
			b.Fatal(err)
		}
		if err := m.Release(ctx, "fr-bench"); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	_ = m.Teardown(ctx)
}

// --- real tests in namespaces (root) ---

// TestTapsLifecycle creates real taps, checks every port property, restarts
// the Manager (persistence), simulates a crash and reconciles, and tears down.
func TestTapsLifecycle(t *testing.T) {
	testenv.RequireRoot(t)
	ctx := context.Background()
	hostName, host := newNS(t, "h")
	dir := t.TempDir()
	m, err := New(testCfg(), dir, WithNetNS(host))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Teardown(ctx) })
	for i := 0; i < 2; i++ { // Setup is idempotent
		if err := m.Setup(ctx); err != nil {
			t.Fatal(err)
		}
	}
	rules := sh(t, "ip", "netns", "exec", hostName, "nft", "list", "table", "inet", TableName)
	for _, want := range []string{"masquerade", "169.254.0.0/16", `iifname "frbr0" counter packets 0 bytes 0 drop`, `oifname "frbr0" ct state established,related accept`, "10.231.0.0/24"} {
		if !strings.Contains(rules, want) {
			t.Errorf("nft table lacks %q:\n%s", want, rules)
		}
	}
	if fwd := strings.TrimSpace(sh(t, "ip", "netns", "exec", hostName, "cat", "/proc/sys/net/ipv4/ip_forward")); fwd != "1" {
		t.Errorf("ip_forward = %s", fwd)
	}
	if p := m.Check(ctx); len(p) != 0 {
		t.Errorf("Check after Setup: %v", p)
	}

	att1, g1, err := m.Attach(ctx, "fr-abc123")
	if err != nil {
		t.Fatal(err)
	}
	att2, g2, err := m.Attach(ctx, "fr-0123456789ab") // 15 bytes: the longest id
	if err != nil {
		t.Fatal(err)
	}
	if att1.TapName != "fr-abc123" || g1.Address != "10.231.0.2/24" || g1.Gateway != "10.231.0.1" || g1.MTU != 1400 || len(g1.DNS) != 1 {
		t.Errorf("attachment 1: %+v %+v", att1, g1)
	}
	if g2.Address != "10.231.0.3/24" || att2.MAC == att1.MAC {
		t.Errorf("attachment 2: %+v %+v", att2, g2)
	}
	brRules := sh(t, "ip", "netns", "exec", hostName, "nft", "list", "table", "bridge", TableName)
	for _, want := range []string{`iifname "fr-abc123" arp saddr ip != 10.231.0.2`, `iifname "fr-0123456789ab" ip saddr != 10.231.0.3`,
		`iifname "fr-abc123" ether saddr != 02:fc:0a:e7:00:02`, `iifname "fr-0123456789ab" arp saddr ether != 02:fc:0a:e7:00:03`} {
		if !strings.Contains(brRules, want) {
			t.Errorf("bridge table lacks %q:\n%s", want, brRules)
		}
	}
	again, gAgain, err := m.Attach(ctx, "fr-abc123")
	if err != nil || *again != *att1 || gAgain.Address != g1.Address {
		t.Errorf("Attach not idempotent: %+v %+v %v", again, gAgain, err)
	}
	err = m.run(func() error {
		br, err := netlink.LinkByName("frbr0")
		if err != nil {
			return err
		}
		for _, name := range []string{"fr-abc123", "fr-0123456789ab"} {
			l, err := netlink.LinkByName(name)
			if err != nil {
				return err
			}
			if l.Type() != "tuntap" || l.(*netlink.Tuntap).Mode != netlink.TUNTAP_MODE_TAP {
				t.Errorf("%s is %s, want a tap", name, l.Type())
			}
			if l.Attrs().MasterIndex != br.Attrs().Index || l.Attrs().MTU != 1400 {
				t.Errorf("%s: master %d (bridge %d) mtu %d", name, l.Attrs().MasterIndex, br.Attrs().Index, l.Attrs().MTU)
			}
			pi, err := netlink.LinkGetProtinfo(l)
			if err != nil {
				return err
			}
			if !pi.Isolated || pi.Learning || pi.Flood {
				t.Errorf("%s: isolated %v, learning %v, unicast flood %v; want an isolated port that neither learns nor floods", name, pi.Isolated, pi.Learning, pi.Flood)
			}
			fdb, err := netlink.NeighList(l.Attrs().Index, unix.AF_BRIDGE)
			if err != nil {
				return err
			}
			want := map[string]string{"fr-abc123": att1.MAC, "fr-0123456789ab": att2.MAC}[name]
			static := false
			for _, n := range fdb {
				static = static || (n.HardwareAddr.String() == want && n.State&netlink.NUD_NOARP != 0)
			}
			if !static {
				t.Errorf("%s has no static fdb entry for %s", name, want)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	// Restart: a new Manager sees both and hands out the same addresses.
	m2, _ := New(testCfg(), dir, WithNetNS(host))
	if err := m2.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	ids, err := m2.List(ctx)
	if err != nil || strings.Join(ids, ",") != "fr-0123456789ab,fr-abc123" {
		t.Fatalf("List after restart = %v, %v", ids, err)
	}
	if _, g, _ := m2.Attach(ctx, "fr-0123456789ab"); g.Address != g2.Address {
		t.Errorf("address changed across restart: %s -> %s", g2.Address, g.Address)
	}
	if err := m2.Release(ctx, "fr-abc123"); err != nil {
		t.Fatal(err)
	}
	if err := m2.Release(ctx, "fr-abc123"); err != nil { // idempotent
		t.Fatal(err)
	}
	if _, g, _ := m2.Attach(ctx, "fr-new1"); g.Address != "10.231.0.2/24" {
		t.Errorf("released address not reused: %s", g.Address)
	}

	// Simulated crash: m2 is dropped with VMs attached; a tap exists whose
	// allocation was lost and an allocation exists whose tap was lost.
	sh(t, "ip", "-n", hostName, "tuntap", "add", "dev", "fr-orphan", "mode", "tap")
	sh(t, "ip", "-n", hostName, "link", "del", "fr-new1")
	m3, _ := New(testCfg(), dir, WithNetNS(host))
	ids, _ = m3.List(ctx)
	if strings.Join(ids, ",") != "fr-0123456789ab,fr-new1,fr-orphan" {
		t.Fatalf("List after crash = %v", ids)
	}
	for _, id := range ids {
		if err := m3.Release(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if ids, _ := m3.List(ctx); len(ids) != 0 {
		t.Errorf("after reconcile List = %v", ids)
	}
	if l := leftovers(t, m3); strings.Join(l, ",") != "frbr0" {
		t.Errorf("links left after Release: %v", l)
	}
	if out := sh(t, "ip", "netns", "exec", hostName, "nft", "list", "tables"); strings.Contains(out, "bridge") {
		t.Errorf("bridge table left after the last Release:\n%s", out)
	}
	var tab allocTable
	b, _ := os.ReadFile(filepath.Join(dir, allocFile))
	if err := json.Unmarshal(b, &tab); err != nil || len(tab.VMs) != 0 {
		t.Errorf("address table after Release: %s", b)
	}

	if _, _, err := m3.Attach(ctx, "fr-last"); err != nil {
		t.Fatal(err)
	}
	if err := m3.Teardown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := m3.Teardown(ctx); err != nil { // idempotent
		t.Fatal(err)
	}
	if l := leftovers(t, m3); len(l) != 0 {
		t.Errorf("links left after Teardown: %v", l)
	}
	if out := sh(t, "ip", "netns", "exec", hostName, "nft", "list", "ruleset"); strings.Contains(out, "table") {
		t.Errorf("nft table left after Teardown:\n%s", out)
	}
	if p := m3.Check(ctx); len(p) == 0 {
		t.Error("Check reports nothing missing after Teardown")
	}
}

// TestTapOwnerPerVM: with WithTapOwnerRange every VM gets a user of its
// own, base + its address's host number: its tap belongs to that user (so
// a jailed Firecracker running as it can open only its own tap), and the
// attachment names it for the driver. Without it every tap is the one
// VMM user's.
func TestTapOwnerPerVM(t *testing.T) {
	testenv.RequireRoot(t)
	ctx := context.Background()
	_, host := newNS(t, "o")
	m, err := New(testCfg(), t.TempDir(), WithNetNS(host), WithTapOwner(64000, 64000), WithTapOwnerRange(300000))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Teardown(ctx) })
	if err := m.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	want := map[string]int{"fr-own1": 300002, "fr-own2": 300003}
	for _, id := range []string{"fr-own1", "fr-own2"} {
		att, _, err := m.Attach(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if att.UID != want[id] || att.GID != want[id] {
			t.Errorf("%s: attachment user %d:%d, want %d", id, att.UID, att.GID, want[id])
		}
	}
	err = m.run(func() error {
		for id, uid := range want {
			l, err := netlink.LinkByName(id)
			if err != nil {
				return err
			}
			tt, ok := l.(*netlink.Tuntap)
			if !ok || int(tt.Owner) != uid || int(tt.Group) != uid {
				t.Errorf("%s: tap owner %+v, want %d:%d", id, l, uid, uid)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// A released address's user goes to the next VM at that address.
	if err := m.Release(ctx, "fr-own1"); err != nil {
		t.Fatal(err)
	}
	if att, _, err := m.Attach(ctx, "fr-own3"); err != nil || att.UID != 300002 {
		t.Errorf("fr-own3 at the freed address: %+v %v; want user 300002", att, err)
	}
	// Without the range: the one user, not named in the attachment.
	m2, _ := New(testCfg(), t.TempDir(), WithNetNS(host), WithTapOwner(64000, 64000))
	if att, _, err := m2.Attach(ctx, "fr-shared1"); err != nil || att.UID != 0 {
		t.Errorf("shared user: %+v %v", att, err)
	}
	_ = m2.run(func() error {
		if l, err := netlink.LinkByName("fr-shared1"); err != nil || l.(*netlink.Tuntap).Owner != 64000 {
			t.Errorf("fr-shared1 owner: %+v %v", l, err)
		}
		return nil
	})
	_ = m2.Release(ctx, "fr-shared1")
}
