// Package netsetup gives each VM a tap on a FireRunner bridge, an address from
// the configured CIDR (persisted), and nftables NAT/isolation for both drivers.
//
// Tap names ARE the VM ids: a VM id matches vm.IDPattern (fr-[a-z0-9]{1,12},
// at most 15 bytes = IFNAMSIZ-1), so reconciliation maps a leftover tap back
// to its VM with no extra table. Every tap is an isolated bridge port
// (BR_ISOLATED: no frames between VMs at layer 2) that does not learn MACs
// and holds a static FDB entry for its VM's MAC; the table
// `bridge firerunner` pins each tap to its VM's MAC and IPv4 address, and
// `inet firerunner` stops VMs reaching each other through the gateway, the
// host itself (except allowed ports on the gateway address),
// 169.254.0.0/16 and (deny_private) private ranges; egress is NATed. A
// released address has its conntrack entries flushed before it is reused.
package netsetup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/vm"
)

var idRE = regexp.MustCompile(vm.IDPattern)

// Manager owns the bridge, the taps, the address table and the nft table.
// Its methods are safe for concurrent use and idempotent.
type Manager struct {
	cfg          config.Network
	prefix       netip.Prefix
	gateway      netip.Addr
	egressAllow  []netip.Prefix
	dns          []string
	alloc        *allocator
	log          *slog.Logger
	ns           netns.NsHandle // -1: the caller's namespace
	blockedPorts []uint16
	allowedPorts []uint16
	tapUID       uint32
	tapGID       uint32
	tapRangeBase uint32 // WithTapOwnerRange; 0 = every tap is tapUID's

	// newPort creates the VM's bridge port; tests swap in veth pairs so
	// traffic can flow without a VMM holding the tap open.
	newPort func(name string, uid, gid uint32) (netlink.Link, error)

	mu sync.Mutex
}

// Option customises a Manager.
type Option func(*Manager)

// WithNetNS runs every operation inside the given network namespace (tests).
func WithNetNS(h netns.NsHandle) Option { return func(m *Manager) { m.ns = h } }

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(m *Manager) { m.log = l } }

// WithHostPorts drops these host TCP/UDP ports for VMs even if allowed. All
// host ports are closed to VMs by default; this makes the FireRunner API and
// metrics port explicit, so a later allow rule cannot open them.
func WithHostPorts(blocked ...uint16) Option {
	return func(m *Manager) { m.blockedPorts = append(m.blockedPorts, blocked...) }
}

// WithAllowedHostPorts opens host TCP/UDP ports to VMs (e.g. 53 for a DNS
// resolver listening on the bridge address).
func WithAllowedHostPorts(allowed ...uint16) Option {
	return func(m *Manager) { m.allowedPorts = append(m.allowedPorts, allowed...) }
}

// WithTapOwner makes taps owned by uid/gid, so an unprivileged VMM (the
// Firecracker jailer's uid) can open them. The default owner is root.
func WithTapOwner(uid, gid uint32) Option {
	return func(m *Manager) { m.tapUID, m.tapGID = uid, gid }
}

// WithTapOwnerRange gives every VM a user of its own: the tap of the VM
// whose address is host number i of network.cidr belongs to uid and gid
// base+i, reported in vm.NetAttachment (the driver runs that VM's VMM as
// it). Addresses are unique among live VMs, so are the users.
func WithTapOwnerRange(base uint32) Option {
	return func(m *Manager) { m.tapRangeBase = base }
}

// New validates cfg and returns a Manager; it changes nothing on the host.
func New(cfg config.Network, stateDir string, opts ...Option) (*Manager, error) {
	if cfg.Bridge == "" || len(cfg.Bridge) > 15 {
		return nil, fmt.Errorf("network.bridge %q: must be 1-15 characters", cfg.Bridge)
	}
	if idRE.MatchString(cfg.Bridge) {
		return nil, fmt.Errorf("network.bridge %q: must not look like a VM id (fr-...), those names are taps", cfg.Bridge)
	}
	if stateDir == "" {
		return nil, errors.New("netsetup: state dir must be set")
	}
	prefix, err := netip.ParsePrefix(cfg.CIDR)
	if err != nil {
		return nil, fmt.Errorf("network.cidr %q: %w", cfg.CIDR, err)
	}
	if prefix.Addr().Is4In6() || !prefix.Addr().Is4() {
		return nil, fmt.Errorf("network.cidr %q: must be IPv4", cfg.CIDR)
	}
	if prefix.Masked().Overlaps(metadataPrefix) {
		return nil, fmt.Errorf("network.cidr %q: must not overlap link-local 169.254.0.0/16", cfg.CIDR)
	}
	if cfg.MTU == 0 {
		cfg.MTU = 1500
	}
	if cfg.MTU < 576 || cfg.MTU > 9000 {
		return nil, fmt.Errorf("network.mtu %d: must be between 576 and 9000", cfg.MTU)
	}
	a, err := newAllocator(stateDir, prefix)
	if err != nil {
		return nil, err
	}
	m := &Manager{cfg: cfg, prefix: prefix.Masked(), gateway: a.gateway, alloc: a, ns: -1,
		log: slog.New(slog.DiscardHandler)}
	for _, d := range cfg.DNS {
		ip, err := netip.ParseAddr(d)
		if err != nil || !ip.Is4() {
			return nil, fmt.Errorf("network.dns %q: not an IPv4 address", d)
		}
		m.dns = append(m.dns, ip.String())
	}
	// egress_allow: the only destinations with allowlist, the exceptions to
	// deny_private with allow_all.
	for _, s := range cfg.EgressAllow {
		p, err := config.ParseIPv4Prefix(s)
		if err != nil {
			return nil, fmt.Errorf("network.egress_allow: %w", err)
		}
		m.egressAllow = append(m.egressAllow, p)
	}
	switch cfg.Egress {
	case "", "allow_all":
		m.cfg.Egress = "allow_all"
	case "allowlist":
		// The guests' resolvers must stay reachable or nothing resolves.
		for _, d := range m.dns {
			ip := netip.MustParseAddr(d)
			m.egressAllow = append(m.egressAllow, netip.PrefixFrom(ip, 32))
		}
	default:
		return nil, fmt.Errorf("network.egress %q: not one of allow_all, allowlist", cfg.Egress)
	}
	m.newPort = m.newTap
	for _, o := range opts {
		o(m)
	}
	return m, nil
}

// Gateway is the bridge's address, the VMs' default gateway.
func (m *Manager) Gateway() netip.Addr { return m.gateway }

// run executes fn on an OS thread inside m.ns (when set). Taps are created by
// ioctl on /dev/net/tun, which binds them to the opening thread's namespace,
// so a netlink handle alone would not do. A thread whose namespace cannot be
// restored is never unlocked: Go then destroys it instead of reusing it.
func (m *Manager) run(fn func() error) error {
	if m.ns < 0 {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("netns: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(m.ns); err != nil {
			errc <- fmt.Errorf("netns: enter: %w", err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("netns: restore: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Setup creates the bridge (with the gateway address, MTU, up), enables IPv4
// forwarding and installs the nft table. Safe to call on every start.
func (m *Manager) Setup(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	t, err := m.alloc.load()
	if err != nil {
		return err
	}
	return m.run(func() error {
		br, err := m.ensureBridge()
		if err != nil {
			return err
		}
		if err := writeSysctl("/proc/sys/net/ipv4/ip_forward", "1"); err != nil {
			return fmt.Errorf("enable ip_forward: %w", err)
		}
		// The guest never does IPv6; keep the host's bridge out of it too.
		_ = writeSysctl("/proc/sys/net/ipv6/conf/"+br.Attrs().Name+"/disable_ipv6", "1")
		c, err := nftables.New()
		if err != nil {
			return fmt.Errorf("nftables: %w", err)
		}
		if err := m.applyRuleset(c, t.addrs()); err != nil {
			return err
		}
		if err := m.pinExistingPorts(br, t.addrs()); err != nil {
			return err
		}
		m.log.Info("network ready", "bridge", m.cfg.Bridge, "cidr", m.prefix.String(), "gateway", m.gateway.String(), "egress", m.cfg.Egress)
		return nil
	})
}

func (m *Manager) ensureBridge() (netlink.Link, error) {
	br, err := netlink.LinkByName(m.cfg.Bridge)
	var nf netlink.LinkNotFoundError
	switch {
	case errors.As(err, &nf):
		if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: m.cfg.Bridge, MTU: m.cfg.MTU}}); err != nil && !errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("create bridge %s: %w", m.cfg.Bridge, err)
		}
		if br, err = netlink.LinkByName(m.cfg.Bridge); err != nil {
			return nil, fmt.Errorf("bridge %s: %w", m.cfg.Bridge, err)
		}
	case err != nil:
		return nil, fmt.Errorf("bridge %s: %w", m.cfg.Bridge, err)
	case br.Type() != "bridge":
		return nil, fmt.Errorf("network.bridge %s exists but is a %s, not a bridge", m.cfg.Bridge, br.Type())
	}
	if br.Attrs().MTU != m.cfg.MTU {
		if err := netlink.LinkSetMTU(br, m.cfg.MTU); err != nil {
			return nil, fmt.Errorf("bridge %s mtu: %w", m.cfg.Bridge, err)
		}
	}
	want := &net.IPNet{IP: m.gateway.AsSlice(), Mask: net.CIDRMask(m.prefix.Bits(), 32)}
	addrs, err := netlink.AddrList(br, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("bridge %s addresses: %w", m.cfg.Bridge, err)
	}
	for _, a := range addrs { // drop addresses from an earlier CIDR
		if a.IPNet.String() != want.String() {
			_ = netlink.AddrDel(br, &a)
		}
	}
	if err := netlink.AddrReplace(br, &netlink.Addr{IPNet: want}); err != nil {
		return nil, fmt.Errorf("bridge %s address %s: %w", m.cfg.Bridge, want, err)
	}
	if err := netlink.LinkSetUp(br); err != nil {
		return nil, fmt.Errorf("bridge %s up: %w", m.cfg.Bridge, err)
	}
	return br, nil
}

func writeSysctl(path, v string) error {
	if b, err := os.ReadFile(path); err == nil && strings.TrimSpace(string(b)) == v {
		return nil
	}
	return os.WriteFile(path, []byte(v), 0o644)
}

// newTap creates a persistent tap (no VMM attached yet). IFF_VNET_HDR and
// IFF_NO_PI match what Firecracker and QEMU ask for when they open it.
func (m *Manager) newTap(name string, uid, gid uint32) (netlink.Link, error) {
	t := &netlink.Tuntap{
		LinkAttrs: netlink.LinkAttrs{Name: name, MTU: m.cfg.MTU},
		Mode:      netlink.TUNTAP_MODE_TAP,
		Flags:     netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_ONE_QUEUE,
		Owner:     uid,
		Group:     gid,
	}
	if err := netlink.LinkAdd(t); err != nil {
		return nil, err
	}
	for _, f := range t.Fds {
		f.Close()
	}
	return netlink.LinkByName(name)
}

// MAC derives the guest MAC from its address: locally administered (02:),
// "fc" for FireRunner, then the 4 IPv4 bytes, so it is unique per VM. It is
// predictable, so it is never trusted on its own: the bridge pins each tap
// to its VM's MAC (applyPortRules, static FDB entry, no learning).
func MAC(ip netip.Addr) string {
	return net.HardwareAddr(macBytes(ip)).String()
}

func macBytes(ip netip.Addr) []byte {
	b := ip.As4()
	return []byte{0x02, 0xfc, b[0], b[1], b[2], b[3]}
}

// hostIndex is ip's host number in prefix: 172.30.0.5 in 172.30.0.0/24 is 5.
func hostIndex(prefix netip.Prefix, ip netip.Addr) uint32 {
	a, b := prefix.Masked().Addr().As4(), ip.As4()
	return (uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])) -
		(uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3]))
}

func validID(id string) error {
	if !idRE.MatchString(id) {
		return fmt.Errorf("vm id %q: must match %s", id, vm.IDPattern)
	}
	return nil
}

// Attach allocates vmID's address (reusing a persisted one) and creates its
// tap as an isolated port of the bridge. Calling it again returns the same
// attachment. Setup must have run.
func (m *Manager) Attach(ctx context.Context, vmID string) (*vm.NetAttachment, *guestconfig.Network, error) {
	if err := validID(vmID); err != nil {
		return nil, nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	t, err := m.alloc.load()
	if err != nil {
		return nil, nil, err
	}
	ip, fresh, err := m.alloc.allocate(&t, vmID)
	if err != nil {
		return nil, nil, err
	}
	if fresh {
		// Release flushes too; this also covers addresses freed by an
		// older FireRunner or by hand. The new tenant gets no old flows.
		if err := m.run(func() error { return flushConntrack(ip) }); err != nil {
			return nil, nil, fmt.Errorf("attach %s: %w", vmID, err)
		}
		if err := m.alloc.save(t); err != nil {
			return nil, nil, err
		}
	}
	// The tap's owner: the VM's own user (WithTapOwnerRange), or the one.
	uid, gid := m.tapUID, m.tapGID
	if m.tapRangeBase > 0 {
		uid = m.tapRangeBase + uint32(hostIndex(m.prefix, ip))
		gid = uid
	}
	// Anti-spoofing rules first: the port never exists without them.
	err = m.syncPortRules(t)
	if err == nil {
		err = m.run(func() error { return m.ensurePort(vmID, macBytes(ip), uid, gid) })
	}
	if err != nil {
		if fresh { // leave nothing behind for a VM that never got a port
			_ = m.run(func() error { return delLink(vmID) })
			delete(t.VMs, vmID)
			_ = m.alloc.save(t)
			_ = m.syncPortRules(t)
		}
		return nil, nil, fmt.Errorf("attach %s: %w", vmID, err)
	}
	m.log.Info("vm network attached", "vm", vmID, "tap", vmID, "ip", ip.String())
	att := &vm.NetAttachment{TapName: vmID, MAC: MAC(ip)}
	if m.tapRangeBase > 0 {
		att.UID, att.GID = int(uid), int(gid)
	}
	return att,
		&guestconfig.Network{
			Address: netip.PrefixFrom(ip, m.prefix.Bits()).String(),
			Gateway: m.gateway.String(),
			DNS:     append([]string(nil), m.dns...),
			MTU:     m.cfg.MTU,
		}, nil
}

func (m *Manager) ensurePort(name string, mac net.HardwareAddr, uid, gid uint32) error {
	br, err := netlink.LinkByName(m.cfg.Bridge)
	if err != nil {
		return fmt.Errorf("bridge %s missing (run Setup first): %w", m.cfg.Bridge, err)
	}
	l, err := netlink.LinkByName(name)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		if l, err = m.newPort(name, uid, gid); err != nil {
			return fmt.Errorf("create tap %s: %w", name, err)
		}
	} else if err != nil {
		return err
	}
	if l.Attrs().MTU != m.cfg.MTU {
		if err := netlink.LinkSetMTU(l, m.cfg.MTU); err != nil {
			return fmt.Errorf("tap %s mtu: %w", name, err)
		}
	}
	if l.Attrs().MasterIndex != br.Attrs().Index {
		if err := netlink.LinkSetMaster(l, br); err != nil {
			return fmt.Errorf("tap %s on bridge %s: %w", name, m.cfg.Bridge, err)
		}
	}
	// Isolated ports only talk to non-isolated ones (the host's bridge
	// device), never to each other.
	if err := netlink.LinkSetIsolated(l, true); err != nil {
		return fmt.Errorf("tap %s isolate: %w", name, err)
	}
	if err := pinPort(l, mac); err != nil {
		return err
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("tap %s up: %w", name, err)
	}
	return nil
}

// pinPort makes bridge port l carry only mac: the port never learns, so a
// guest sending frames with a neighbour's MAC cannot move that MAC to its
// own port (the bridge table drops such frames too, before learning would
// happen). Its VM's MAC is a static FDB entry, and unknown unicast is not
// flooded to it, so it receives only frames for its own MAC and broadcasts
// (ARP).
func pinPort(l netlink.Link, mac net.HardwareAddr) error {
	name := l.Attrs().Name
	if err := netlink.LinkSetLearning(l, false); err != nil {
		return fmt.Errorf("tap %s learning off: %w", name, err)
	}
	if err := netlink.LinkSetFlood(l, false); err != nil {
		return fmt.Errorf("tap %s unicast flood off: %w", name, err)
	}
	if err := netlink.NeighSet(&netlink.Neigh{LinkIndex: l.Attrs().Index, Family: unix.AF_BRIDGE,
		State: netlink.NUD_NOARP, Flags: netlink.NTF_MASTER, HardwareAddr: mac}); err != nil {
		return fmt.Errorf("tap %s static fdb entry %s: %w", name, mac, err)
	}
	return nil
}

// pinExistingPorts applies pinPort to the taps of allocated VMs that are
// already on the bridge (VMs that outlived a restart or an upgrade).
func (m *Manager) pinExistingPorts(br netlink.Link, vms map[string]netip.Addr) error {
	for _, id := range sortedAddrIDs(vms) {
		l, err := netlink.LinkByName(id)
		if err != nil || l.Attrs().MasterIndex != br.Attrs().Index {
			continue
		}
		if err := pinPort(l, macBytes(vms[id])); err != nil {
			return err
		}
	}
	return nil
}

func delLink(name string) error {
	l, err := netlink.LinkByName(name)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := netlink.LinkDel(l); err != nil && !errors.As(err, &nf) && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}

// Release deletes vmID's tap and frees its address. Unknown ids are fine.
func (m *Manager) Release(ctx context.Context, vmID string) error {
	if err := validID(vmID); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.run(func() error { return delLink(vmID) }); err != nil {
		return fmt.Errorf("release %s: %w", vmID, err)
	}
	t, err := m.alloc.load()
	if err != nil {
		return err
	}
	if s, ok := t.VMs[vmID]; ok {
		// The lowest free address is handed out next: flush its flows
		// before it is free, or the next tenant would receive replies
		// (and established inbound flows) meant for this VM. On failure
		// the address stays allocated and reconcile retries the Release.
		if ip, err := netip.ParseAddr(s); err == nil && ip.Is4() {
			if err := m.run(func() error { return flushConntrack(ip) }); err != nil {
				return fmt.Errorf("release %s: %w", vmID, err)
			}
		}
		delete(t.VMs, vmID)
		if err := m.alloc.save(t); err != nil {
			return err
		}
		m.log.Info("vm network released", "vm", vmID)
	}
	return m.syncPortRules(t)
}

// flushConntrack deletes every conntrack entry with ip in its original or
// reply tuple (the VM's own flows, NATed or not, and flows towards it).
//
// vishvananda/netlink's ConntrackDeleteFilters (already a dependency; no
// shelling out to conntrack(8)) dumps the table and deletes the matches, so
// its cost grows with the host's whole conntrack table; it runs once per
// Release and per fresh Attach, never per packet.
func flushConntrack(ip netip.Addr) error {
	host := &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(32, 32)}
	var filters []netlink.CustomConntrackFilter
	for _, tp := range []netlink.ConntrackFilterType{netlink.ConntrackOrigSrcIP, netlink.ConntrackOrigDstIP, netlink.ConntrackReplyAnyIP} {
		f := &netlink.ConntrackFilter{}
		if err := f.AddIPNet(tp, host); err != nil {
			return err
		}
		filters = append(filters, f)
	}
	var err error
	// A dump that raced with table changes is flagged interrupted (its
	// matches are deleted all the same); go again until one is complete.
	for try := 0; try < 5; try++ {
		if _, err = netlink.ConntrackDeleteFilters(netlink.ConntrackTable, unix.AF_INET, filters...); !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("flush conntrack entries of %s: %w", ip, err)
	}
	return nil
}

// syncPortRules rebuilds table bridge firerunner from the address table.
func (m *Manager) syncPortRules(t allocTable) error {
	return m.run(func() error {
		c, err := nftables.New()
		if err != nil {
			return fmt.Errorf("nftables: %w", err)
		}
		applyPortRules(c, t.addrs())
		if err := c.Flush(); err != nil {
			return fmt.Errorf("nftables: port rules: %w", err)
		}
		return nil
	})
}

// List returns the VM ids that hold a tap or an address on this host, for
// reconciliation after a crash.
func (m *Manager) List(ctx context.Context) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	t, err := m.alloc.load()
	if err != nil {
		return nil, err
	}
	ids := map[string]string{}
	for id := range t.VMs {
		ids[id] = ""
	}
	err = m.run(func() error {
		links, err := netlink.LinkList()
		if err != nil {
			return err
		}
		for _, l := range links {
			if idRE.MatchString(l.Attrs().Name) {
				ids[l.Attrs().Name] = ""
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	return sortedIDs(ids), nil
}

// Teardown removes every tap, the bridge, the nft table and the address
// table (uninstall and tests). Running VMs lose their network.
func (m *Manager) Teardown(ctx context.Context) error {
	ids, err := m.List(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, id := range ids {
		errs = append(errs, m.Release(ctx, id))
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	errs = append(errs, m.run(func() error {
		var e []error
		if l, err := netlink.LinkByName(m.cfg.Bridge); err == nil && l.Type() == "bridge" {
			e = append(e, delLink(m.cfg.Bridge))
		}
		c, err := nftables.New()
		if err != nil {
			return errors.Join(append(e, err)...)
		}
		return errors.Join(append(e, deleteTable(c))...)
	}))
	if err := os.Remove(m.alloc.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Check reports what is missing for VM networking (for `firerunner doctor`):
// the bridge, its address, the nft table and IPv4 forwarding.
func (m *Manager) Check(ctx context.Context) []string {
	var problems []string
	_ = m.run(func() error {
		br, err := netlink.LinkByName(m.cfg.Bridge)
		if err != nil {
			problems = append(problems, fmt.Sprintf("bridge %s does not exist", m.cfg.Bridge))
		} else {
			addrs, _ := netlink.AddrList(br, netlink.FAMILY_V4)
			found := false
			for _, a := range addrs {
				if a.IP.Equal(m.gateway.AsSlice()) {
					found = true
				}
			}
			if !found {
				problems = append(problems, fmt.Sprintf("bridge %s lacks gateway address %s", m.cfg.Bridge, m.gateway))
			}
		}
		if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward"); err != nil || strings.TrimSpace(string(b)) != "1" {
			problems = append(problems, "net.ipv4.ip_forward is not 1")
		}
		c, err := nftables.New()
		if err == nil {
			var ok bool
			ok, err = tableExists(c)
			if err == nil && !ok {
				problems = append(problems, "nftables table inet "+TableName+" is missing")
			}
		}
		if err != nil {
			problems = append(problems, "nftables: "+err.Error())
		}
		return nil
	})
	sort.Strings(problems)
	return problems
}

// HostOptions derives the options the daemon should pass from its whole
// config: its own listen port is blocked for VMs explicitly, and with the
// Firecracker jailer the taps belong to the jailer's uid/gid so the
// unprivileged Firecracker process can open them.
func HostOptions(cfg config.Config) []Option {
	var opts []Option
	if _, p, err := net.SplitHostPort(cfg.Listen); err == nil {
		if port, err := strconv.ParseUint(p, 10, 16); err == nil && port > 0 {
			opts = append(opts, WithHostPorts(uint16(port)))
		}
	}
	if cfg.VM.Driver == "firecracker" && cfg.Firecracker.UseJailer {
		opts = append(opts, WithTapOwner(uint32(cfg.Firecracker.UID), uint32(cfg.Firecracker.GID)))
	}
	return opts
}
