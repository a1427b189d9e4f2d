package fcstandin

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/firerunner/firerunner/internal/agent"
	"github.com/firerunner/firerunner/internal/guestconfig"
)

// The vsock device as Firecracker backs it on the host (docs/vsock.md):
//   - host-initiated: Firecracker binds and listens on uds_path; the host
//     connects, writes "CONNECT <port>\n", and once the guest accepted on
//     that port Firecracker answers "OK <host port>\n" and forwards bytes.
//     A port nobody listens on in the guest gets the stream closed.
//   - guest-initiated: a guest connecting to the host (CID 2) on port P
//     makes Firecracker connect to the Unix socket "<uds_path>_<P>"; with no
//     listener there the guest's connect fails (reset).
//
// The stand-in binds uds_path like Firecracker (a path that exists is
// "Address in use"), answers host-initiated connections for the ports its
// emulated guest listens on (Server.GuestListen), and makes the emulated
// agent's guest-initiated connection for a warm VM's assignment.

// vsockDev is the configured vsock device.
type vsockDev struct {
	CID     int64  `json:"guest_cid"`
	UDSPath string `json:"uds_path"`
}

// bindVsock binds the device's host socket (s.mu held). Firecracker fails
// the request when the path exists.
func (s *Server) bindVsock(uds string) *fault {
	p := s.Resolve(uds)
	if _, err := os.Lstat(p); err == nil {
		return &fault{status: 400, msg: fmt.Sprintf("Cannot create backend for vsock device: Error binding to the host-side Unix socket: %s: Address in use (os error 98)", uds)}
	}
	l, err := net.Listen("unix", p)
	if err != nil {
		return &fault{status: 400, msg: fmt.Sprintf("Cannot create backend for vsock device: Error binding to the host-side Unix socket: %v", err)}
	}
	if s.vsockL != nil {
		s.vsockL.Close()
	}
	s.vsockL = l
	go s.serveHostInitiated(l)
	return nil
}

// GuestListen registers a guest-side vsock listener of the emulated guest:
// host-initiated connections to port get "OK <n>\n" and are handed to h.
func (s *Server) GuestListen(port uint32, h func(net.Conn)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.guestPorts == nil {
		s.guestPorts = map[uint32]func(net.Conn){}
	}
	s.guestPorts[port] = h
}

// serveHostInitiated answers connections to uds_path with the CONNECT
// handshake.
func (s *Server) serveHostInitiated(l net.Listener) {
	hostPort := uint32(1 << 30)
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		hostPort++
		go func(c net.Conn, hp uint32) {
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			line, err := bufio.NewReaderSize(c, 64).ReadString('\n')
			_ = c.SetReadDeadline(time.Time{})
			port, ok := parseConnect(line)
			s.mu.Lock()
			h := s.guestPorts[port]
			up := s.state == running
			s.mu.Unlock()
			if err != nil || !ok || h == nil || !up {
				c.Close() // malformed, or the guest refused: Firecracker drops the stream
				return
			}
			if _, err := fmt.Fprintf(c, "OK %d\n", hp); err != nil {
				c.Close()
				return
			}
			h(c)
		}(c, hostPort)
	}
}

// parseConnect parses "CONNECT <port>\n" as Firecracker does: the exact
// keyword, one space, a decimal u32.
func parseConnect(line string) (uint32, bool) {
	rest, ok := strings.CutPrefix(line, "CONNECT ")
	if !ok || !strings.HasSuffix(rest, "\n") {
		return 0, false
	}
	n, err := strconv.ParseUint(strings.TrimSuffix(rest, "\n"), 10, 32)
	return uint32(n), err == nil
}

// dialHost is the guest connecting to the host (CID 2) on port: Firecracker
// connects to "<uds_path>_<port>" for it.
//
// The stand-in runs with the privileges it was started with, but
// Firecracker under the jailer runs as the jail's uid: a socket that uid
// may not write (connect(2) needs write permission) is refused here as the
// kernel would refuse it (EACCES).
func (s *Server) dialHost(port uint32) (net.Conn, error) {
	s.mu.Lock()
	v := s.vsock
	s.mu.Unlock()
	if v == nil {
		return nil, errors.New("no vsock device")
	}
	p := s.Resolve(v.UDSPath) + "_" + strconv.FormatUint(uint64(port), 10)
	if fi, err := os.Stat(p); err == nil && s.UID > 0 {
		st, _ := fi.Sys().(*syscall.Stat_t)
		perm := fi.Mode().Perm()
		ok := int(st.Uid) == s.UID && perm&0o200 != 0 || int(st.Gid) == s.GID && perm&0o020 != 0 || perm&0o002 != 0
		if !ok {
			return nil, fmt.Errorf("connect %s as uid %d: %w", p, s.UID, syscall.EACCES)
		}
	}
	return net.Dial("unix", p)
}

// socketOwner is the mode and owner of the host's listener for port.
func (s *Server) socketOwner(port uint32) (os.FileMode, int) {
	s.mu.Lock()
	v := s.vsock
	s.mu.Unlock()
	if v == nil {
		return 0, -1
	}
	fi, err := os.Stat(s.Resolve(v.UDSPath) + "_" + strconv.FormatUint(uint64(port), 10))
	if err != nil {
		return 0, -1
	}
	st, _ := fi.Sys().(*syscall.Stat_t)
	return fi.Mode(), int(st.Uid)
}

// GuestEvent is what the emulated guest did that a test checks and the
// console does not show: written to <EnvLogDir>/<vm id>.guest.jsonl. The
// runner token is recorded only as its SHA-256.
type GuestEvent struct {
	Event       string                `json:"event"`
	GitLabURL   string                `json:"gitlab_url,omitempty"`
	TokenSHA256 string                `json:"token_sha256,omitempty"`
	Identity    *guestconfig.Identity `json:"identity,omitempty"`
	// Hostname and MachineID are the guest's after the event.
	Hostname  string `json:"hostname,omitempty"`
	MachineID string `json:"machine_id,omitempty"`
	Restored  bool   `json:"restored,omitempty"`
	// SocketMode and SocketUID are those of the host's listening socket
	// the guest's connection reached ("<uds_path>_52").
	SocketMode os.FileMode `json:"socket_mode,omitempty"`
	SocketUID  int         `json:"socket_uid"`
}

func (s *Server) guestEvent(e GuestEvent) {
	if s.guestLog == "" {
		return
	}
	b, _ := json.Marshal(e)
	if f, err := os.OpenFile(s.guestLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600); err == nil {
		f.Write(append(b, '\n'))
		f.Close()
	}
}

// ReadGuestEvents reads what a stand-in's emulated guest recorded.
func ReadGuestEvents(path string) ([]GuestEvent, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []GuestEvent
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if line == "" {
			continue
		}
		var e GuestEvent
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, nil
}

// waitAssignment is the warm guest's agent waiting for its job: it
// connects to the host on guestconfig.AssignVsockPort (retrying while
// nothing listens, as the agent does) and runs the agent's own protocol
// (agent.AcceptAssignment). It runs only while the VM runs: a paused
// guest does nothing.
func (s *Server) waitAssignment(out io.Writer) (guestconfig.Assignment, error) {
	for {
		s.mu.Lock()
		st := s.state
		s.mu.Unlock()
		if st == running {
			mode, uid := s.socketOwner(guestconfig.AssignVsockPort)
			c, err := s.dialHost(guestconfig.AssignVsockPort)
			if err == nil {
				s.mu.Lock()
				s.assignSock = [2]int{int(mode), uid}
				s.mu.Unlock()
				a, err := agent.AcceptAssignment(c)
				c.Close()
				return a, err
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// runWarm is the rest of a warm guest's life from "gitlab-runner waits
// for its config": the assignment, the identity a clone takes on, the job.
func (s *Server) runWarm(cfg guestconfig.Config, restored bool) {
	out := os.Stdout
	a, err := s.waitAssignment(out)
	if err != nil {
		fmt.Fprintf(out, "FIRERUNNER-AGENT: runner config: %v\n", err)
		fmt.Fprintln(out, guestconfig.MarkerJobEnd)
		fmt.Fprintf(out, "%s%d\n", guestconfig.ExitMarker, 137)
		fmt.Fprintln(out, guestconfig.MarkerPowerOff)
		powerOff(s)
		return
	}
	fmt.Fprintln(out, guestconfig.MarkerAssigned)
	c := cfg.Apply(a)
	if a.Identity != nil {
		fmt.Fprintf(out, "FIRERUNNER-AGENT: identity of %s applied\n", c.Hostname)
	}
	sum := sha256.Sum256([]byte(a.RunnerToken))
	s.mu.Lock()
	sock := s.assignSock
	s.mu.Unlock()
	s.guestEvent(GuestEvent{Event: "assigned", GitLabURL: a.GitLabURL, TokenSHA256: hex.EncodeToString(sum[:]),
		Identity: a.Identity, Hostname: c.Hostname, MachineID: c.MachineID, Restored: restored,
		SocketMode: os.FileMode(sock[0]), SocketUID: sock[1]})
	fmt.Fprintln(out, guestconfig.MarkerJobEnd)
	fmt.Fprintf(out, "%s%d\n", guestconfig.ExitMarker, 0)
	fmt.Fprintln(out, guestconfig.MarkerPowerOff)
	powerOff(s)
}

// tapLock is a tap device held open by this VMM: Firecracker opens the tap
// at PUT /network-interfaces (and on snapshot load), and a tap another VMM
// holds cannot be opened again (TUNSETIFF: EBUSY). The stand-in models the
// host's taps as lock files in EnvTapDir, each flock'ed by the VMM process
// that holds the tap, so a crashed VMM releases it as the kernel would.
func (s *Server) openTap(name string) *fault {
	if f := s.taps[name]; f != nil {
		return nil // this VMM's own (a PUT updating the interface)
	}
	dir := s.TapDir
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "fcstandin-taps")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return &fault{status: 400, msg: err.Error()}
	}
	f, err := os.OpenFile(filepath.Join(dir, name), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return &fault{status: 400, msg: err.Error()}
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return &fault{status: 400, msg: fmt.Sprintf("Open tap device failed: Error while creating ifreq structure: Resource busy (os error 16). Invalid TUN/TAP Backend provided by %s. Check our documentation on setting up the network devices.", name), violation: true}
	}
	if s.taps == nil {
		s.taps = map[string]*os.File{}
	}
	s.taps[name] = f
	return nil
}
