package netsetup

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/testenv"
)

// lab is a host namespace with a FireRunner bridge, an "internet" namespace
// behind the host's uplink and one namespace per "VM", whose eth0 is the far
// end of a veth pair standing in for the VM's tap (same bridge settings as
// a tap, but traffic flows without a VMM). Every address below lives only
// in these namespaces; nothing leaves them.
//
//	host:  uplink 198.51.100.1/24, bridge frbr0 10.231.0.1/24
//	ext:   198.51.100.2/24 plus /32s: 203.0.113.1 (public), 169.254.169.254
//	       (metadata), and private targets 10.99.0.2, 10.99.0.53 (a resolver),
//	       172.16.5.5, 192.168.7.7, 100.64.1.1, all routed by the host via ext.
//	       ext has no route back to the VM subnet: reaching it proves NAT.
type lab struct {
	t        *testing.T
	ctx      context.Context
	m        *Manager
	hostName string
	host     netns.NsHandle
	extName  string
	ext      netns.NsHandle
	vmName   map[string]string
	vmNS     map[string]netns.NsHandle
}

const (
	uplinkAddr = "198.51.100.1"
	extAddr    = "198.51.100.2"
	publicAddr = "203.0.113.1"
	metaAddr   = "169.254.169.254"
	resolver   = "10.99.0.53"
)

var privateTargets = []string{"10.99.0.2", "172.16.5.5", "192.168.7.7", "100.64.1.1"}

// labCfg is testCfg with the production default deny_private on and the
// lab's resolver.
func labCfg() config.Network {
	c := testCfg()
	c.DNS = []string{resolver}
	c.DenyPrivate = true
	return c
}

func newLab(t *testing.T, cfg config.Network, opts ...Option) *lab {
	t.Helper()
	testenv.RequireRoot(t)
	l := &lab{t: t, ctx: context.Background(), vmName: map[string]string{}, vmNS: map[string]netns.NsHandle{}}
	l.hostName, l.host = newNS(t, "h")
	l.extName, l.ext = newNS(t, "e")
	sh(t, "ip", "-n", l.hostName, "link", "add", "up", "type", "veth", "peer", "name", "eth0", "netns", l.extName)
	sh(t, "ip", "-n", l.hostName, "link", "set", "veth0", "name", "uplink", "up")
	sh(t, "ip", "-n", l.hostName, "addr", "add", uplinkAddr+"/24", "dev", "uplink")
	sh(t, "ip", "-n", l.extName, "link", "set", "eth0", "up")
	sh(t, "ip", "-n", l.extName, "addr", "add", extAddr+"/24", "dev", "eth0")
	for _, a := range append([]string{publicAddr, metaAddr, resolver}, privateTargets...) {
		sh(t, "ip", "-n", l.extName, "addr", "add", a+"/32", "dev", "eth0")
		sh(t, "ip", "-n", l.hostName, "route", "add", a+"/32", "via", extAddr)
	}
	// Bridged frames must be stopped by the bridge itself, not by
	// br_netfilter handing them to the inet forward chain.
	_ = exec.Command("ip", "netns", "exec", l.hostName, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0").Run()

	m, err := New(cfg, t.TempDir(), append([]Option{WithNetNS(l.host)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	m.newPort = l.newVeth
	if err := m.Setup(l.ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Teardown(context.Background()) })
	l.m = m
	return l
}

// newVeth is Manager.newPort for the lab: a veth whose peer is eth0 in the
// VM's namespace (created on first use).
func (l *lab) newVeth(name string, _, _ uint32) (netlink.Link, error) {
	if _, ok := l.vmNS[name]; !ok {
		l.vmName[name], l.vmNS[name] = newNS(l.t, "v")
	}
	v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(l.vmNS[name]))}
	if err := netlink.LinkAdd(v); err != nil {
		return nil, err
	}
	return netlink.LinkByName(name)
}

// attach attaches a VM and configures its eth0 the way the guest agent
// does, with the MAC the VMM would give it. It returns the VM's address
// and MAC.
func (l *lab) attach(id string) (string, net.HardwareAddr) {
	l.t.Helper()
	att, g, err := l.m.Attach(l.ctx, id)
	if err != nil {
		l.t.Fatal(err)
	}
	n := l.vmName[id]
	sh(l.t, "ip", "-n", n, "link", "set", "eth0", "address", att.MAC)
	sh(l.t, "ip", "-n", n, "link", "set", "eth0", "up")
	sh(l.t, "ip", "-n", n, "addr", "add", g.Address, "dev", "eth0")
	sh(l.t, "ip", "-n", n, "route", "add", "default", "via", g.Gateway)
	mac, err := net.ParseMAC(att.MAC)
	if err != nil {
		l.t.Fatal(err)
	}
	return strings.Split(g.Address, "/")[0], mac
}

func (l *lab) mustReach(from netns.NsHandle, what, addr, wantSrc string) {
	l.t.Helper()
	src, err := dial(from, addr)
	if err != nil {
		l.t.Errorf("%s (%s) unreachable: %v", what, addr, err)
	} else if wantSrc != "" && src != wantSrc {
		l.t.Errorf("%s (%s) saw source %s, want %s", what, addr, src, wantSrc)
	}
}

func (l *lab) mustNotReach(from netns.NsHandle, what, addr string) {
	l.t.Helper()
	if src, err := dial(from, addr); err == nil {
		l.t.Errorf("VM reached %s (%s), seen as %s; it must be blocked", what, addr, src)
	}
}

// rawSocket opens an AF_PACKET socket on eth0 of the namespace.
func rawSocket(t *testing.T, h netns.NsHandle, proto uint16) (int, *net.Interface) {
	t.Helper()
	fd := -1
	var ifc *net.Interface
	inNS(t, h, func() {
		var err error
		if ifc, err = net.InterfaceByName("eth0"); err != nil {
			t.Error(err)
			return
		}
		if fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(proto))); err != nil {
			t.Error(err)
			return
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(proto), Ifindex: ifc.Index}); err != nil {
			t.Error(err)
		}
	})
	if fd < 0 || ifc == nil {
		t.FailNow()
	}
	return fd, ifc
}

// sendFrames sends raw Ethernet frames out of the namespace's eth0, as a
// guest with root can.
func sendFrames(t *testing.T, h netns.NsHandle, frames ...[]byte) {
	t.Helper()
	fd, ifc := rawSocket(t, h, unix.ETH_P_ALL)
	defer unix.Close(fd)
	for _, f := range frames {
		sa := &unix.SockaddrLinklayer{Ifindex: ifc.Index, Halen: 6}
		copy(sa.Addr[:], f[:6])
		if err := unix.Sendto(fd, f, 0, sa); err != nil {
			t.Errorf("send frame: %v", err)
		}
	}
}

// capture records every frame eth0 of the namespace receives until the
// returned function is called; that function returns the frames.
func capture(t *testing.T, h netns.NsHandle) func() [][]byte {
	t.Helper()
	fd, _ := rawSocket(t, h, unix.ETH_P_ALL)
	tv := unix.Timeval{Usec: 100_000}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		t.Fatal(err)
	}
	var (
		mu     sync.Mutex
		frames [][]byte
		stop   = make(chan struct{})
		done   = make(chan struct{})
	)
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		for {
			select {
			case <-stop:
				return
			default:
			}
			n, from, err := unix.Recvfrom(fd, buf, 0)
			if err != nil || n <= 0 {
				continue
			}
			if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
				continue
			}
			mu.Lock()
			frames = append(frames, append([]byte(nil), buf[:n]...))
			mu.Unlock()
		}
	}()
	return func() [][]byte {
		close(stop)
		<-done
		unix.Close(fd)
		mu.Lock()
		defer mu.Unlock()
		return frames
	}
}

func containsPayload(frames [][]byte, s string) bool {
	for _, f := range frames {
		if bytes.Contains(f, []byte(s)) {
			return true
		}
	}
	return false
}

var broadcast = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// udpFrame builds an Ethernet/IPv4/UDP frame.
func udpFrame(dstMAC, srcMAC net.HardwareAddr, src, dst string, sport, dport uint16, payload string) []byte {
	udp := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(udp[0:], sport)
	binary.BigEndian.PutUint16(udp[2:], dport)
	binary.BigEndian.PutUint16(udp[4:], uint16(8+len(payload)))
	udp = append(udp, payload...) // checksum 0: none (IPv4)
	ip := make([]byte, 20)
	ip[0], ip[8], ip[9] = 0x45, 64, unix.IPPROTO_UDP
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(udp)))
	s, d := netip.MustParseAddr(src).As4(), netip.MustParseAddr(dst).As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(ip[i:]))
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	binary.BigEndian.PutUint16(ip[10:], ^uint16(sum))
	f := append(append(append([]byte{}, dstMAC...), srcMAC...), 0x08, 0x00)
	return append(append(f, ip...), udp...)
}

// arpFrame builds a broadcast gratuitous ARP request sent from ethSrc whose
// sender is (sha, spa).
func arpFrame(ethSrc, sha net.HardwareAddr, spa string) []byte {
	a := netip.MustParseAddr(spa).As4()
	f := append(append(append([]byte{}, broadcast...), ethSrc...), 0x08, 0x06)
	f = append(f, 0, 1, 0x08, 0, 6, 4, 0, 1) // Ethernet/IPv4, request
	f = append(f, sha...)
	f = append(f, a[:]...)
	f = append(f, 0, 0, 0, 0, 0, 0)
	return append(f, a[:]...)
}

// neighMAC is the host's neighbour entry for ip on the bridge ("" if none).
func (l *lab) neighMAC(ip string) string {
	out := sh(l.t, "ip", "-n", l.hostName, "neigh", "show", ip, "dev", "frbr0")
	if i := strings.Index(out, "lladdr "); i >= 0 {
		return strings.Fields(out[i+len("lladdr "):])[0]
	}
	return ""
}

// eventually polls cond for up to 2 s.
func eventually(cond func() bool) bool {
	for i := 0; i < 20; i++ {
		if cond() {
			return true
		}
		time.Sleep(100 * time.Millisecond)
	}
	return cond()
}

func deadline() time.Time { return time.Now().Add(2 * time.Second) }
