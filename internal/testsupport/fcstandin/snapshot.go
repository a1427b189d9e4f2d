package fcstandin

import (
	"encoding/json"
	"fmt"
	"os"
)

// loadSnapshot is PUT /snapshot/load (s.mu held), with Firecracker's rules
// (docs/snapshotting/snapshot-support.md, API 1.17 SnapshotLoadParams):
//   - only on a fresh VMM: nothing but the logger and metrics configured;
//   - exactly one of mem_file_path and mem_backend; the memory file is
//     opened read-only (File::open) and mapped MAP_PRIVATE, so a read-only
//     file serves any number of clones;
//   - the devices come back from the state file and reopen their host
//     backends: drive files, taps, the vsock's Unix socket. A tap is the
//     snapshot's host_dev_name unless network_overrides names the
//     interface (an override naming an interface the snapshot lacks is
//     refused); a tap another VMM holds is busy, so a clone without an
//     override fails while its source runs. The vsock socket is bound
//     again at uds_path (vsock_override's, if given): a path in use fails;
//   - the VM is Paused afterwards, Running with resume_vm.
//
// On failure Firecracker ends the process (Server.ExitOnLoadFailure).
func (s *Server) loadSnapshot(obj map[string]any) *fault {
	if len(s.configured) > 0 {
		return bad("Loading a microVM snapshot not allowed after configuring boot-specific resources (%v).", s.configured)
	}
	if s.state != notStarted || s.restored {
		return bad("Loading a microVM snapshot not allowed after the microVM was started or loaded.")
	}
	memPath, hasPath := obj["mem_file_path"].(string)
	mb, hasBackend := obj["mem_backend"].(map[string]any)
	if hasPath == hasBackend {
		return bad("Load snapshot error: exactly one of mem_file_path and mem_backend must be given")
	}
	if hasBackend {
		if t, _ := mb["backend_type"].(string); t != "File" {
			return &fault{status: 400, msg: fmt.Sprintf("fcstandin emulates only the File memory backend, not %q", t)}
		}
		memPath, _ = mb["backend_path"].(string)
	}
	snap := fmt.Sprint(obj["snapshot_path"])
	b, err := os.ReadFile(s.Resolve(snap))
	if err != nil {
		return bad("Load snapshot error: cannot open snapshot file %s: %v", snap, err)
	}
	var st snapState
	if err := json.Unmarshal(b, &st); err != nil {
		return bad("Load snapshot error: snapshot file %s: %v", snap, err)
	}
	mf, err := os.OpenFile(s.Resolve(memPath), os.O_RDONLY, 0) // Firecracker: File::open
	if err != nil {
		return bad("Load snapshot error: Failed to load guest memory: %s: %v", memPath, err)
	}
	mf.Close()
	for _, d := range st.Drives { // the restored block devices reopen their files
		if p, ok := d["path_on_host"].(string); ok {
			if f := s.needFile("snapshot drive", p); f != nil {
				return f
			}
		}
	}
	overrides := map[string]string{}
	if list, ok := obj["network_overrides"].([]any); ok {
		for _, x := range list {
			o, _ := x.(map[string]any)
			id, _ := o["iface_id"].(string)
			if _, ok := st.Ifaces[id]; !ok {
				return bad("Load snapshot error: network override names interface %q, which the snapshot does not have", id)
			}
			overrides[id], _ = o["host_dev_name"].(string)
		}
	}
	for id, nic := range st.Ifaces {
		name, _ := nic["host_dev_name"].(string)
		if o, ok := overrides[id]; ok {
			name = o
			nic["host_dev_name"] = o
		}
		if f := s.openTap(name); f != nil {
			f.msg = "Load snapshot error: " + f.msg
			return f
		}
	}
	if st.Vsock != nil {
		v := *st.Vsock
		if o, ok := obj["vsock_override"].(map[string]any); ok {
			v.UDSPath, _ = o["uds_path"].(string)
		}
		if f := s.bindVsock(v.UDSPath); f != nil {
			f.violation = true
			f.msg = "Load snapshot error: " + f.msg
			return f
		}
		s.vsock = &v
	}
	s.clockRealtime, _ = obj["clock_realtime"].(bool)
	s.machine, s.bootSource, s.drives, s.ifaces = st.Machine, st.Boot, st.Drives, st.Ifaces
	if s.drives == nil {
		s.drives = map[string]map[string]any{}
	}
	s.driveOrder = nil
	for id := range s.drives {
		s.driveOrder = append(s.driveOrder, id)
	}
	s.guest, s.guestWarm, s.restored = st.Guest, st.GuestWarm, true
	s.state = paused
	if r, _ := obj["resume_vm"].(bool); r {
		s.state = running
	}
	return nil
}
