package chaos

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/vm"
)

// FileNet is a controller.Network whose state outlives the process, like
// netsetup's taps and allocations.json: one file per VM ("its tap"),
// holding the VM's address. A killed FireRunner leaves the files; what is
// left at the end is a leaked tap.
type FileNet struct {
	dir string
	mu  sync.Mutex
}

// NewFileNet keeps its state in dir.
func NewFileNet(dir string) *FileNet { return &FileNet{dir: dir} }

// Attach implements controller.Network: the VM's address (the lowest free
// one, reused when it already has one) and its "tap".
func (n *FileNet) Attach(_ context.Context, id string) (*vm.NetAttachment, *guestconfig.Network, error) {
	if !vm.ValidID(id) {
		return nil, nil, fmt.Errorf("vm id %q: must match %s", id, vm.IDPattern)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if err := os.MkdirAll(n.dir, 0o700); err != nil {
		return nil, nil, err
	}
	p := filepath.Join(n.dir, id)
	b, err := os.ReadFile(p)
	ip, perr := netip.ParseAddr(strings.TrimSpace(string(b)))
	if err != nil || perr != nil {
		used := map[netip.Addr]bool{}
		ids, _ := n.list()
		for _, other := range ids {
			if b, err := os.ReadFile(filepath.Join(n.dir, other)); err == nil {
				if a, err := netip.ParseAddr(strings.TrimSpace(string(b))); err == nil {
					used[a] = true
				}
			}
		}
		for ip = netip.MustParseAddr("172.30.0.2"); used[ip]; ip = ip.Next() {
		}
		tmp := p + ".tmp"
		if err := os.WriteFile(tmp, []byte(ip.String()+"\n"), 0o600); err != nil {
			return nil, nil, err
		}
		if err := os.Rename(tmp, p); err != nil {
			return nil, nil, err
		}
	}
	return &vm.NetAttachment{TapName: id, MAC: "02:fc:" + strings.Join(hexBytes(ip.As4()), ":")},
		&guestconfig.Network{Address: netip.PrefixFrom(ip, 24).String(), Gateway: "172.30.0.1", MTU: 1500}, nil
}

func hexBytes(b [4]byte) []string {
	out := make([]string, 4)
	for i, x := range b {
		out[i] = fmt.Sprintf("%02x", x)
	}
	return out
}

// Release implements controller.Network; unknown ids are fine.
func (n *FileNet) Release(_ context.Context, id string) error {
	if !vm.ValidID(id) {
		return fmt.Errorf("vm id %q: must match %s", id, vm.IDPattern)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if err := os.Remove(filepath.Join(n.dir, id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// List implements controller.Network.
func (n *FileNet) List(context.Context) ([]string, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.list()
}

func (n *FileNet) list() ([]string, error) {
	ents, err := os.ReadDir(n.dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, e := range ents {
		if vm.ValidID(e.Name()) {
			ids = append(ids, e.Name())
		}
	}
	sort.Strings(ids)
	return ids, nil
}
