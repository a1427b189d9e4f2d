package netsetup

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
)

// allocFile is the persisted address table: VM id -> IPv4 address. It lives
// under the state dir so allocations survive a FireRunner restart or crash.
const allocFile = "network/allocations.json"

type allocTable struct {
	Version int               `json:"version"`
	CIDR    string            `json:"cidr"`
	VMs     map[string]string `json:"vms"`
}

type allocator struct {
	path    string
	prefix  netip.Prefix // masked
	gateway netip.Addr
	last    netip.Addr // broadcast
}

func newAllocator(stateDir string, prefix netip.Prefix) (*allocator, error) {
	prefix = prefix.Masked()
	if !prefix.Addr().Is4() {
		return nil, fmt.Errorf("network.cidr %s: only IPv4 is supported", prefix)
	}
	if prefix.Bits() > 29 {
		return nil, fmt.Errorf("network.cidr %s: prefix too small, need /29 or larger", prefix)
	}
	gw := prefix.Addr().Next()
	b := prefix.Addr().As4()
	host := uint32(1)<<(32-prefix.Bits()) - 1
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]) | host
	last := netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
	return &allocator{path: filepath.Join(stateDir, allocFile), prefix: prefix, gateway: gw, last: last}, nil
}

func (a *allocator) load() (allocTable, error) {
	t := allocTable{Version: 1, CIDR: a.prefix.String(), VMs: map[string]string{}}
	b, err := os.ReadFile(a.path)
	if errors.Is(err, os.ErrNotExist) {
		return t, nil
	}
	if err != nil {
		return t, fmt.Errorf("read address table: %w", err)
	}
	if err := json.Unmarshal(b, &t); err != nil {
		return t, fmt.Errorf("address table %s is corrupt: %w", a.path, err)
	}
	if t.VMs == nil {
		t.VMs = map[string]string{}
	}
	return t, nil
}

// save writes the table atomically (temp file, fsync, rename, fsync dir), so
// a crash leaves either the old or the new table, never a torn one.
func (a *allocator) save(t allocTable) error {
	t.Version, t.CIDR = 1, a.prefix.String()
	b, err := json.MarshalIndent(t, "", "  ")
	if err != nil {
		return err
	}
	dir := filepath.Dir(a.path)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("address table dir: %w", err)
	}
	f, err := os.CreateTemp(dir, ".allocations-*")
	if err != nil {
		return fmt.Errorf("address table: %w", err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after a successful rename
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return fmt.Errorf("address table: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("address table: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("address table: %w", err)
	}
	if err := os.Rename(tmp, a.path); err != nil {
		return fmt.Errorf("address table: %w", err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// allocate returns vmID's address, assigning the lowest free one if it has
// none (or one outside the configured CIDR after a config change).
func (a *allocator) allocate(t *allocTable, vmID string) (netip.Addr, bool, error) {
	if s, ok := t.VMs[vmID]; ok {
		if ip, err := netip.ParseAddr(s); err == nil && a.prefix.Contains(ip) && ip != a.gateway && ip != a.last {
			return ip, false, nil
		}
	}
	used := map[netip.Addr]bool{}
	for id, s := range t.VMs {
		if id == vmID {
			continue
		}
		if ip, err := netip.ParseAddr(s); err == nil {
			used[ip] = true
		}
	}
	for ip := a.gateway.Next(); ip.IsValid() && ip != a.last && a.prefix.Contains(ip); ip = ip.Next() {
		if !used[ip] {
			t.VMs[vmID] = ip.String()
			return ip, true, nil
		}
	}
	return netip.Addr{}, false, fmt.Errorf("network.cidr %s: no free address (%d VMs attached)", a.prefix, len(t.VMs))
}

func sortedIDs(m map[string]string) []string {
	ids := make([]string, 0, len(m))
	for id := range m {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

func sortedAddrIDs(m map[string]netip.Addr) []string {
	ids := make([]string, 0, len(m))
	for id := range m {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// addrs parses the table's addresses, skipping entries that do not parse.
func (t allocTable) addrs() map[string]netip.Addr {
	out := make(map[string]netip.Addr, len(t.VMs))
	for id, s := range t.VMs {
		if ip, err := netip.ParseAddr(s); err == nil && ip.Is4() {
			out[id] = ip
		}
	}
	return out
}
