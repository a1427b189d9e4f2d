package netsetup

import (
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// TableName is the nftables table (family inet) FireRunner owns. Setup
// replaces it atomically and Teardown deletes it; nothing else is touched.
const TableName = "firerunner"

// metadataPrefix is link-local, home of cloud metadata services (169.254.169.254).
var metadataPrefix = netip.MustParsePrefix("169.254.0.0/16")

// privatePrefixes are the destinations network.deny_private drops: RFC 1918,
// CGNAT (RFC 6598, often a provider's internal network) and link-local.
var privatePrefixes = []netip.Prefix{
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("100.64.0.0/10"),
	metadataPrefix,
}

func ifname(n string) []byte {
	b := make([]byte, 16)
	copy(b, n)
	return b
}

// rule helpers: each returns expressions that load and compare one field.

func iif(name string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(name)},
	}
}

func oif(name string, op expr.CmpOp) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: ifname(name)},
	}
}

func ctEstablished() []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED),
			Xor:  binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
	}
}

func nfproto(p byte, op expr.CmpOp) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: []byte{p}},
	}
}

// ip4 matches the IPv4 source (offset 12) or destination (16) against a prefix.
func ip4(offset uint32, p netip.Prefix, op expr.CmpOp) []expr.Any {
	p = p.Masked()
	mask := make([]byte, 4)
	for i := 0; i < p.Bits(); i++ {
		mask[i/8] |= 0x80 >> (i % 8)
	}
	a := p.Addr().As4()
	// The nfproto guard makes each rule self-contained (and lets nft print
	// it as "ip saddr/daddr").
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)},
		&expr.Cmp{Op: op, Register: 1, Data: a[:]},
	}
}

func dport(proto byte, port uint16) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
	}
}

func verdict(k expr.VerdictKind) expr.Any { return &expr.Verdict{Kind: k} }

func join(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// applyRuleset replaces table inet firerunner in one netlink batch (atomic:
// the kernel applies all of it or none). The rules, in nft syntax:
//
//	chain input { type filter hook input priority filter; policy accept;
//	  iifname BR ct state established,related accept
//	  iifname BR tcp/udp dport <blocked> drop      # WithHostPorts
//	  iifname BR ip daddr GW tcp/udp dport <allowed> accept  # WithAllowedHostPorts:
//	                                               # the gateway address only
//	  iifname BR drop }                            # API, metrics, sshd... unreachable
//	chain forward { type filter hook forward priority filter; policy accept;
//	  oifname BR ct state established,related accept
//	  oifname BR drop                              # VM->VM via the gateway, inbound
//	  iifname BR meta nfproto != ipv4 drop
//	  iifname BR ip saddr != CIDR drop             # spoofed sources
//	  iifname BR ip daddr 169.254.0.0/16 drop      # link-local / metadata
//	  allow_all: [deny_private:
//	               iifname BR ip daddr <egress_allow> accept
//	               iifname BR ip daddr <dns> tcp/udp dport 53 accept
//	               iifname BR ip daddr {10/8, 172.16/12, 192.168/16, 100.64/10} drop]
//	             iifname BR accept
//	  allowlist: iifname BR ip daddr {allow, dns} accept; iifname BR drop }
//	chain postrouting { type nat hook postrouting priority srcnat;
//	  ip saddr CIDR oifname != BR masquerade }
func (m *Manager) applyRuleset(c *nftables.Conn, vms map[string]netip.Addr) error {
	br := m.cfg.Bridge
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: TableName}
	c.AddTable(t)
	c.DelTable(t) // add-then-delete makes the delete idempotent
	c.AddTable(t)
	accept := nftables.ChainPolicyAccept
	in := c.AddChain(&nftables.Chain{Name: "input", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	fwd := c.AddChain(&nftables.Chain{Name: "forward", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	post := c.AddChain(&nftables.Chain{Name: "postrouting", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
	add := func(ch *nftables.Chain, e ...[]expr.Any) {
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: join(e...)})
	}
	v := func(k expr.VerdictKind) []expr.Any { return []expr.Any{verdict(k)} }
	counter := []expr.Any{&expr.Counter{}}

	add(in, iif(br), ctEstablished(), v(expr.VerdictAccept))
	for _, p := range m.blockedPorts {
		add(in, iif(br), dport(unix.IPPROTO_TCP, p), v(expr.VerdictDrop))
		add(in, iif(br), dport(unix.IPPROTO_UDP, p), v(expr.VerdictDrop))
	}
	gw := netip.PrefixFrom(m.gateway, 32)
	for _, p := range m.allowedPorts {
		add(in, iif(br), ip4(16, gw, expr.CmpOpEq), dport(unix.IPPROTO_TCP, p), v(expr.VerdictAccept))
		add(in, iif(br), ip4(16, gw, expr.CmpOpEq), dport(unix.IPPROTO_UDP, p), v(expr.VerdictAccept))
	}
	add(in, iif(br), counter, v(expr.VerdictDrop))

	add(fwd, oif(br, expr.CmpOpEq), ctEstablished(), v(expr.VerdictAccept))
	add(fwd, oif(br, expr.CmpOpEq), counter, v(expr.VerdictDrop))
	add(fwd, iif(br), nfproto(unix.NFPROTO_IPV4, expr.CmpOpNeq), v(expr.VerdictDrop))
	add(fwd, iif(br), ip4(12, m.prefix, expr.CmpOpNeq), v(expr.VerdictDrop))
	add(fwd, iif(br), ip4(16, metadataPrefix, expr.CmpOpEq), counter, v(expr.VerdictDrop))
	if m.cfg.Egress == "allowlist" {
		for _, p := range m.egressAllow {
			add(fwd, iif(br), ip4(16, p, expr.CmpOpEq), v(expr.VerdictAccept))
		}
		add(fwd, iif(br), counter, v(expr.VerdictDrop))
	} else {
		if m.cfg.DenyPrivate {
			for _, p := range m.egressAllow {
				add(fwd, iif(br), ip4(16, p, expr.CmpOpEq), v(expr.VerdictAccept))
			}
			// The guests' resolvers are often on a private network (a VPC
			// resolver, the LAN router): DNS to them, and nothing else.
			for _, d := range m.dns {
				p := netip.PrefixFrom(netip.MustParseAddr(d), 32)
				add(fwd, iif(br), ip4(16, p, expr.CmpOpEq), dport(unix.IPPROTO_UDP, 53), v(expr.VerdictAccept))
				add(fwd, iif(br), ip4(16, p, expr.CmpOpEq), dport(unix.IPPROTO_TCP, 53), v(expr.VerdictAccept))
			}
			for _, p := range privatePrefixes {
				if p != metadataPrefix { // dropped above, whatever egress_allow says
					add(fwd, iif(br), ip4(16, p, expr.CmpOpEq), counter, v(expr.VerdictDrop))
				}
			}
		}
		add(fwd, iif(br), v(expr.VerdictAccept))
	}

	add(post, ip4(12, m.prefix, expr.CmpOpEq), oif(br, expr.CmpOpNeq), []expr.Any{&expr.Masq{}})
	applyPortRules(c, vms)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: install tables inet/bridge %s: %w", TableName, err)
	}
	return nil
}

func deleteTable(c *nftables.Conn) error {
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: TableName}
	c.AddTable(t)
	c.DelTable(t)
	deleteBridgeTable(c)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: delete tables inet/bridge %s: %w", TableName, err)
	}
	return nil
}

func tableExists(c *nftables.Conn) (bool, error) {
	ts, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, err
	}
	for _, t := range ts {
		if t.Name == TableName {
			return true, nil
		}
	}
	return false, nil
}

// ethertype matches the frame's EtherType (bridge family).
func ethertype(t uint16, op expr.CmpOp) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyPROTOCOL, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: binaryutil.BigEndian.PutUint16(t)},
	}
}

const (
	etherIPv4 = 0x0800
	etherARP  = 0x0806
)

// applyPortRules replaces table bridge firerunner: per VM port, frames must
// carry the VM's own MAC (Ethernet source, and ARP sender hardware address)
// and its own IPv4 source (IP header, and ARP sender address), so a VM can
// claim neither another VM's MAC in the bridge's forwarding table nor another
// VM's address in the host's neighbour table; anything but IPv4 and ARP is
// dropped. (The ARP offsets are those of Ethernet/IPv4 ARP, the only layout
// the host's ARP code accepts on an Ethernet bridge: arp_rcv drops other
// address lengths.) The chain runs before the bridge learns, and
// the ports do not learn at all (static FDB entries, see pinPort), so a
// spoofed frame can never steal a neighbour's downlink. The table is rebuilt
// from the address table on every Attach and Release, so it never drifts
// from the allocations (a VM's MAC is derived from its address).
//
//	chain prerouting { type filter hook prerouting priority -200;
//	  iifname VM ether saddr != MAC drop
//	  iifname VM ether type != ip ether type != arp drop
//	  iifname VM ether type ip ip saddr != ADDR drop
//	  iifname VM ether type arp arp saddr ether != MAC drop
//	  iifname VM ether type arp arp saddr ip != ADDR drop }
func applyPortRules(c *nftables.Conn, vms map[string]netip.Addr) {
	t := &nftables.Table{Family: nftables.TableFamilyBridge, Name: TableName}
	c.AddTable(t)
	c.DelTable(t)
	if len(vms) == 0 { // no VMs, no table: nothing left behind after the last Release
		return
	}
	c.AddTable(t)
	accept := nftables.ChainPolicyAccept
	pre := c.AddChain(&nftables.Chain{Name: "prerouting", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRef(-200), Policy: &accept})
	drop := []expr.Any{&expr.Counter{}, verdict(expr.VerdictDrop)}
	for _, id := range sortedAddrIDs(vms) {
		a := vms[id].As4()
		mac := macBytes(vms[id])
		add := func(e ...[]expr.Any) { c.AddRule(&nftables.Rule{Table: t, Chain: pre, Exprs: join(e...)}) }
		add(iif(id), []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseLLHeader, Offset: 6, Len: 6},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: mac},
		}, drop)
		add(iif(id), ethertype(etherIPv4, expr.CmpOpNeq), ethertype(etherARP, expr.CmpOpNeq), drop)
		add(iif(id), ethertype(etherIPv4, expr.CmpOpEq), []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: a[:]},
		}, drop)
		add(iif(id), ethertype(etherARP, expr.CmpOpEq), []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 8, Len: 6},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: mac},
		}, drop)
		add(iif(id), ethertype(etherARP, expr.CmpOpEq), []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 14, Len: 4},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: a[:]},
		}, drop)
	}
}

func deleteBridgeTable(c *nftables.Conn) {
	t := &nftables.Table{Family: nftables.TableFamilyBridge, Name: TableName}
	c.AddTable(t)
	c.DelTable(t)
}
