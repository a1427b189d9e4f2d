package fcstandin

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/firerunner/firerunner/internal/guestconfig"
)

// Record is one request the stand-in received, as written to the request log.
type Record struct {
	Seq       int             `json:"seq"`
	Method    string          `json:"method"`
	Path      string          `json:"path"`
	Body      json.RawMessage `json:"body,omitempty"`
	Status    int             `json:"status"`
	Fault     string          `json:"fault,omitempty"`
	Violation bool            `json:"violation,omitempty"`
}

type vmState int

const (
	notStarted vmState = iota
	running
	paused
)

func (s vmState) String() string {
	return [...]string{"Not started", "Running", "Paused"}[s]
}

// Server emulates the Firecracker API: every request is checked against the
// specs (operation, body schema) and Firecracker's ordering rules, answered
// like Firecracker (204, 200 + JSON, or 400 {"fault_message"}), and logged.
type Server struct {
	Checker *Checker
	// API, if set, is the spec version this Firecracker implements: an
	// optional operation that version lacks is answered 400 (EnvAPI).
	API string
	ID  string
	// Root resolves the paths the API names (the jail root under the jailer).
	Root string
	// OnStart runs (in its own goroutine) after InstanceStart was accepted.
	OnStart func(s *Server)

	mu         sync.Mutex
	state      vmState
	seq        int
	records    []Record
	logW       io.Writer
	machine    map[string]any
	bootSource map[string]any
	drives     map[string]map[string]any
	driveOrder []string
	ifaces     map[string]map[string]any
	configured []string // boot-specific resources set so far
	vmmLog     string   // PUT /logger's log_path (resolved): Firecracker's own log

	// TapDir holds the lock files that stand for the host's tap devices
	// (see openTap); "" = <tmp>/fcstandin-taps.
	TapDir string
	// UID and GID are the user the VMM runs as (the jailer's --uid/--gid;
	// 0 = unjailed): the stand-in keeps its privileges, so it checks the
	// access such a user would have where the kernel would (dialHost).
	UID, GID int
	// ExitOnLoadFailure ends the process after answering a failed
	// PUT /snapshot/load, as Firecracker does (the process binary sets it).
	ExitOnLoadFailure bool

	taps       map[string]*os.File // taps this VMM holds open
	vsock      *vsockDev
	vsockL     net.Listener
	guestPorts map[uint32]func(net.Conn)
	guestLog   string // GuestEvent log ("" = none)
	assignSock [2]int // mode and uid of the listener the guest reached
	// guest is the emulated guest's config once booted (or restored);
	// guestWarm: it waits for its assignment (the state a snapshot keeps).
	guest     *guestconfig.Config
	guestWarm bool
	// restored: loaded from a snapshot of a warm guest, which goes on
	// waiting for its assignment once the VM runs (guestGoing: it does).
	restored, guestGoing bool
	clockRealtime        bool
	loadFailed           bool
}

// snapState is the stand-in's microVM state file: what Firecracker keeps
// in its own (devices, their host backends) plus the emulated guest.
type snapState struct {
	Machine   map[string]any            `json:"machine-config"`
	Boot      map[string]any            `json:"boot-source"`
	Drives    map[string]map[string]any `json:"drives"`
	Ifaces    map[string]map[string]any `json:"network-interfaces"`
	Vsock     *vsockDev                 `json:"vsock,omitempty"`
	Guest     *guestconfig.Config       `json:"guest,omitempty"`
	GuestWarm bool                      `json:"guest_warm,omitempty"`
}

// ClockRealtime reports whether the snapshot load asked for clock_realtime.
func (s *Server) ClockRealtime() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.clockRealtime
}

// NewServer returns a stand-in for VM id checking against c.
func NewServer(c *Checker, id, root string, log io.Writer) *Server {
	return &Server{
		Checker: c, ID: id, Root: root, logW: log,
		machine: map[string]any{"vcpu_count": 1, "mem_size_mib": 128, "smt": false, "track_dirty_pages": false},
		drives:  map[string]map[string]any{}, ifaces: map[string]map[string]any{},
	}
}

// Serve answers on the Unix socket at sockPath until the listener fails.
func (s *Server) Serve(sockPath string) error {
	if _, err := os.Lstat(sockPath); err == nil {
		// Firecracker refuses to start when the socket path exists.
		return fmt.Errorf("failed to open the API socket: %s: address in use", sockPath)
	}
	l, err := net.Listen("unix", sockPath)
	if err != nil {
		return err
	}
	return http.Serve(l, s)
}

// Records returns the requests seen so far.
func (s *Server) Records() []Record {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Record(nil), s.records...)
}

// Drives returns the configured drives in the order they were added.
func (s *Server) Drives() []map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []map[string]any
	for _, id := range s.driveOrder {
		out = append(out, s.drives[id])
	}
	return out
}

// BootArgs returns the configured kernel command line.
func (s *Server) BootArgs() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	a, _ := s.bootSource["boot_args"].(string)
	return a
}

// Resolve maps a path named in the API to the host path (inside Root).
func (s *Server) Resolve(p string) string {
	if s.Root == "" || s.Root == "/" {
		return p
	}
	return filepath.Join(s.Root, filepath.Clean("/"+p))
}

type fault struct {
	status    int
	msg       string
	violation bool // a contract violation (vs. an ordinary runtime error)
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	s.mu.Lock()
	s.seq++
	rec := Record{Seq: s.seq, Method: r.Method, Path: r.URL.Path}
	if len(bytes.TrimSpace(body)) > 0 {
		if json.Valid(body) {
			rec.Body = json.RawMessage(body)
		} else {
			rec.Body, _ = json.Marshal(string(body))
		}
	}
	resp, f := s.handle(r.Method, r.URL.Path, body)
	started := false
	if f != nil {
		rec.Status, rec.Fault, rec.Violation = f.status, f.msg, f.violation
	} else if resp != nil {
		rec.Status = http.StatusOK
	} else {
		rec.Status = http.StatusNoContent
		started = r.Method == "PUT" && r.URL.Path == "/actions" && s.state == running && isInstanceStart(body)
	}
	s.records = append(s.records, rec)
	if s.vmmLog != "" {
		// Firecracker logs what the API server did, failures with their
		// reason; so does the stand-in, into the file PUT /logger named.
		line := fmt.Sprintf("[%s:fcstandin] The API server received a %s request on %s; answered %d", s.ID, r.Method, r.URL.Path, rec.Status)
		if rec.Fault != "" {
			line += ": " + rec.Fault
		}
		if f, err := os.OpenFile(s.vmmLog, os.O_WRONLY|os.O_APPEND, 0); err == nil {
			fmt.Fprintln(f, line)
			f.Close()
		}
	}
	if s.logW != nil {
		b, _ := json.Marshal(rec)
		s.logW.Write(append(b, '\n'))
	}
	s.mu.Unlock()

	w.Header().Set("Content-Type", "application/json")
	switch {
	case f != nil:
		w.WriteHeader(f.status)
		json.NewEncoder(w).Encode(map[string]string{"fault_message": f.msg})
	case resp != nil:
		w.WriteHeader(http.StatusOK)
		json.NewEncoder(w).Encode(resp)
	default:
		w.WriteHeader(http.StatusNoContent)
	}
	if fl, ok := w.(http.Flusher); ok {
		fl.Flush()
	}
	if started && s.OnStart != nil {
		go s.OnStart(s)
	}
	s.mu.Lock()
	goOn := s.restored && !s.guestGoing && s.state == running && s.guest != nil && s.guestWarm
	if goOn {
		s.guestGoing = true
	}
	cfg, exit := s.guest, s.loadFailed && s.ExitOnLoadFailure
	s.mu.Unlock()
	if goOn {
		go s.runWarm(*cfg, true)
	}
	if exit {
		// "on failure: A specific error is reported and then the current
		// Firecracker process is ended (as it might be in an invalid state)."
		os.Exit(1)
	}
}

func isInstanceStart(body []byte) bool {
	var a struct {
		ActionType string `json:"action_type"`
	}
	return json.Unmarshal(body, &a) == nil && a.ActionType == "InstanceStart"
}

func bad(format string, a ...any) *fault {
	return &fault{status: http.StatusBadRequest, msg: fmt.Sprintf(format, a...), violation: true}
}

// handle runs with s.mu held. It returns a JSON response (GET) or nil for
// 204, or a fault.
func (s *Server) handle(method, path string, body []byte) (any, *fault) {
	op, params, err := s.Checker.Check(method, path, body)
	if err != nil {
		return nil, bad("%v", err)
	}
	if s.API != "" && slices.Contains(op.Missing, s.API) {
		// An older Firecracker: not a contract violation, its answer.
		return nil, &fault{status: http.StatusBadRequest, msg: fmt.Sprintf("Invalid request method and/or path: %s %s.", method, path)}
	}
	if lacks := op.MissingFields[s.API]; s.API != "" && len(lacks) > 0 {
		// An older Firecracker refuses a field it does not know (serde
		// deny_unknown_fields): its answer, not a contract violation.
		return nil, &fault{status: http.StatusBadRequest, msg: fmt.Sprintf("An error occurred when deserializing the json body of a request: unknown field `%s`.", lacks[0])}
	}
	var obj map[string]any
	if len(bytes.TrimSpace(body)) > 0 {
		_ = json.Unmarshal(body, &obj)
	}

	// Ordering: Firecracker's pre-/post-boot rules, as the spec states them.
	if method != "GET" {
		if op.PreBootOnly && s.state != notStarted {
			return nil, bad("The requested operation (%s %s) is not supported after starting the microVM.", method, path)
		}
		if op.PostBootOnly && s.state == notStarted {
			return nil, bad("The requested operation (%s %s) is not supported before starting the microVM.", method, path)
		}
		if s.state != notStarted && !postBootAllowed(method, op.Template, obj) {
			return nil, bad("%s %s after InstanceStart: only actions and post-boot PATCH requests are allowed once the microVM runs", method, path)
		}
	}

	switch method + " " + op.Template {
	case "GET /":
		return map[string]any{"app_name": "Firecracker", "id": s.ID, "state": s.state.String(), "vmm_version": "1.17.0-dev-fcstandin"}, nil
	case "GET /version":
		return map[string]any{"firecracker_version": "1.17.0-dev-fcstandin"}, nil
	case "GET /machine-config":
		return s.machine, nil
	case "GET /vm/config":
		return map[string]any{"machine-config": s.machine, "boot-source": s.bootSource}, nil
	case "PUT /machine-config":
		s.machine = obj
		s.configured = append(s.configured, "machine-config")
	case "PUT /boot-source":
		for _, k := range []string{"kernel_image_path", "initrd_path"} {
			if p, ok := obj[k].(string); ok {
				if f := s.needFile(k, p); f != nil {
					return nil, f
				}
			}
		}
		if b, err := os.ReadFile(s.Resolve(obj["kernel_image_path"].(string))); err == nil && !bytes.HasPrefix(b, []byte("\x7fELF")) {
			return nil, bad("Cannot load kernel due to invalid memory configuration or invalid kernel image: %s is not an ELF vmlinux", obj["kernel_image_path"])
		}
		if a, _ := obj["boot_args"].(string); len(a) >= 2048 {
			return nil, bad("boot_args is %d bytes; the kernel command line is limited to 2048", len(a))
		}
		s.bootSource = obj
		s.configured = append(s.configured, "boot-source")
	case "PUT /drives/{drive_id}":
		if obj["drive_id"] != params["drive_id"] {
			return nil, bad("The id from the path [%s] does not match the id from the body [%v]!", params["drive_id"], obj["drive_id"])
		}
		if p, ok := obj["path_on_host"].(string); ok {
			if f := s.needFile("path_on_host", p); f != nil {
				return nil, f
			}
		}
		if root, _ := obj["is_root_device"].(bool); root {
			for id, d := range s.drives {
				if r, _ := d["is_root_device"].(bool); r && id != params["drive_id"] {
					return nil, bad("A root block device already exists!")
				}
			}
		}
		if _, seen := s.drives[params["drive_id"]]; !seen {
			s.driveOrder = append(s.driveOrder, params["drive_id"])
		}
		s.drives[params["drive_id"]] = obj
		s.configured = append(s.configured, "drive")
	case "PUT /network-interfaces/{iface_id}":
		if obj["iface_id"] != params["iface_id"] {
			return nil, bad("The id from the path [%s] does not match the id from the body [%v]!", params["iface_id"], obj["iface_id"])
		}
		if name, _ := obj["host_dev_name"].(string); name != "" {
			if f := s.openTap(name); f != nil {
				return nil, f
			}
		}
		s.ifaces[params["iface_id"]] = obj
		s.configured = append(s.configured, "network-interface")
	case "PUT /logger":
		if p, ok := obj["log_path"].(string); ok {
			if f := s.needFile("log_path", p); f != nil {
				return nil, f
			}
			s.vmmLog = s.Resolve(p)
		}
	case "PUT /metrics":
		if f := s.needFile("metrics_path", fmt.Sprint(obj["metrics_path"])); f != nil {
			return nil, f
		}
	case "PUT /vsock":
		uds, _ := obj["uds_path"].(string)
		cid, _ := obj["guest_cid"].(float64)
		if f := s.bindVsock(uds); f != nil {
			return nil, f
		}
		s.vsock = &vsockDev{CID: int64(cid), UDSPath: uds}
		s.configured = append(s.configured, "vsock")
	case "PUT /entropy", "PUT /balloon", "PUT /mmds/config", "PUT /cpu-config", "PUT /serial":
		s.configured = append(s.configured, strings.TrimPrefix(op.Template, "/"))
	case "PUT /actions":
		switch obj["action_type"] {
		case "InstanceStart":
			if s.state != notStarted {
				return nil, bad("The requested operation (InstanceStart) is not supported after starting the microVM.")
			}
			if s.bootSource == nil {
				return nil, bad("Cannot start microvm without kernel configuration.")
			}
			s.state = running
		case "SendCtrlAltDel", "FlushMetrics":
			if s.state == notStarted {
				return nil, bad("The requested operation (%v) is not supported before starting the microVM.", obj["action_type"])
			}
		}
	case "PATCH /vm":
		if s.state == notStarted {
			return nil, bad("The requested operation (PATCH /vm) is not supported before starting the microVM.")
		}
		if obj["state"] == "Paused" {
			s.state = paused
		} else {
			s.state = running
		}
	case "PUT /snapshot/create":
		if s.state != paused {
			return nil, bad("Create snapshot: the microVM must be paused (state is %s)", s.state)
		}
		for _, k := range []string{"snapshot_path", "mem_file_path"} {
			p := s.Resolve(fmt.Sprint(obj[k]))
			if _, err := os.Stat(filepath.Dir(p)); err != nil {
				return nil, &fault{status: 400, msg: fmt.Sprintf("Cannot create snapshot file %s: %v", obj[k], err)}
			}
		}
		state, _ := json.Marshal(snapState{Machine: s.machine, Boot: s.bootSource, Drives: s.drives, Ifaces: s.ifaces,
			Vsock: s.vsock, Guest: s.guest, GuestWarm: s.guestWarm})
		if err := os.WriteFile(s.Resolve(fmt.Sprint(obj["snapshot_path"])), state, 0o600); err != nil {
			return nil, &fault{status: 400, msg: err.Error()}
		}
		if err := os.WriteFile(s.Resolve(fmt.Sprint(obj["mem_file_path"])), []byte("guest memory (fcstandin)"), 0o600); err != nil {
			return nil, &fault{status: 400, msg: err.Error()}
		}
	case "PUT /snapshot/load":
		f := s.loadSnapshot(obj)
		if f != nil {
			s.loadFailed = true
			return nil, f
		}
	default:
		if method == "GET" {
			return nil, &fault{status: 400, msg: fmt.Sprintf("%s is not emulated by fcstandin", path)}
		}
	}
	return nil, nil
}

// postBootAllowed is what Firecracker accepts once the guest runs: GETs,
// actions other than InstanceStart, PATCHes, snapshot creation and MMDS data.
func postBootAllowed(method, tmpl string, obj map[string]any) bool {
	switch {
	case method == "PATCH":
		return true
	case method == "PUT" && tmpl == "/actions":
		return obj["action_type"] != "InstanceStart"
	case method == "PUT" && (tmpl == "/snapshot/create" || tmpl == "/mmds"):
		return true
	}
	return false
}

func (s *Server) needFile(what, p string) *fault {
	if p == "" {
		return bad("%s is empty", what)
	}
	if _, err := os.Stat(s.Resolve(p)); err != nil {
		// Firecracker opens the file inside its (jail) root: a path that does
		// not resolve there is a driver bug, so it counts as a violation.
		return bad("%s %s: cannot open inside the VMM root %s: %v", what, p, s.Root, err)
	}
	return nil
}
