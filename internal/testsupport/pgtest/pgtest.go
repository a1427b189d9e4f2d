// Package pgtest is a throwaway PostgreSQL server for tests: initdb in a
// temporary directory, a server listening only on a Unix socket there,
// stopped and removed afterwards. One cluster serves a whole test binary
// (Shared), each test gets its own database (NewDatabase).
package pgtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/firerunner/firerunner/internal/testenv"
)

// Cluster is one running throwaway PostgreSQL server.
type Cluster struct {
	Dir  string // holds data/ and the server's socket
	cmd  *exec.Cmd
	done chan struct{}
	seq  atomic.Int64
	mu   sync.Mutex
	dbs  []string
}

// binDir finds initdb and postgres: $PATH first, then Debian's versioned dirs.
func binDir() (string, error) {
	if p, err := exec.LookPath("initdb"); err == nil {
		if _, err := exec.LookPath("postgres"); err == nil {
			return filepath.Dir(p), nil
		}
	}
	ms, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	if len(ms) == 0 {
		return "", errors.New("initdb not found on $PATH nor in /usr/lib/postgresql/*/bin")
	}
	return filepath.Dir(ms[len(ms)-1]), nil
}

// Available reports why PostgreSQL cannot be started here ("" if it can).
func Available() string {
	if _, err := binDir(); err != nil {
		return err.Error()
	}
	return ""
}

// Options tune a cluster.
type Options struct {
	// Durable keeps fsync and synchronous_commit on (benchmarks); tests
	// turn them off, a crash of the machine loses nothing that matters.
	Durable bool
}

// Start creates and starts a cluster. Run as root, the server runs as the
// "postgres" system user (PostgreSQL refuses root).
func Start(o Options) (*Cluster, error) {
	bin, err := binDir()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "firerunner-pg-")
	if err != nil {
		return nil, err
	}
	var cred *syscall.Credential
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("running as root needs the postgres system user: %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		if err := os.Chown(dir, uid, gid); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
	}
	data := filepath.Join(dir, "data")
	run := func(name string, args ...string) *exec.Cmd {
		c := exec.Command(filepath.Join(bin, name), args...)
		c.Dir = dir
		c.Env = append(os.Environ(), "LC_ALL=C")
		c.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Setpgid: true, Pdeathsig: syscall.SIGKILL}
		return c
	}
	if out, err := run("initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "--locale=C").CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("initdb: %v: %s", err, out)
	}
	args := []string{"-D", data, "-k", dir, "-c", "listen_addresses=", "-c", "max_connections=200", "-c", "shared_buffers=64MB"}
	if !o.Durable {
		args = append(args, "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")
	}
	c := &Cluster{Dir: dir, done: make(chan struct{})}
	log, _ := os.Create(filepath.Join(dir, "server.log"))
	c.cmd = run("postgres", args...)
	c.cmd.Stdout, c.cmd.Stderr = log, log
	if err := c.cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	go func() { c.cmd.Wait(); log.Close(); close(c.done) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		conn, err := pgx.Connect(context.Background(), c.DSN("postgres"))
		if err == nil {
			conn.Close(context.Background())
			return c, nil
		}
		select {
		case <-c.done:
			b, _ := os.ReadFile(filepath.Join(dir, "server.log"))
			os.RemoveAll(dir)
			return nil, fmt.Errorf("postgres exited: %s", b)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			c.Stop()
			return nil, fmt.Errorf("postgres did not accept connections in 30s: %v", err)
		}
	}
}

// DSN is the connection string of database db (no password: trust auth
// on a socket only this machine's users reach).
func (c *Cluster) DSN(db string) string {
	return fmt.Sprintf("host=%s port=5432 user=postgres dbname=%s sslmode=disable", c.Dir, db)
}

// CreateDatabase makes a fresh, empty database and returns its DSN.
func (c *Cluster) CreateDatabase() (string, error) {
	name := fmt.Sprintf("t%d_%d", os.Getpid(), c.seq.Add(1))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.DSN("postgres"))
	if err != nil {
		return "", err
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		return "", err
	}
	c.mu.Lock()
	c.dbs = append(c.dbs, name)
	c.mu.Unlock()
	return c.DSN(name), nil
}

// Stop stops the server (fast shutdown) and removes its directory.
func (c *Cluster) Stop() {
	if c.cmd.Process != nil {
		_ = c.cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-c.done:
		case <-time.After(20 * time.Second):
			_ = syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
			<-c.done
		}
	}
	os.RemoveAll(c.Dir)
}

var (
	shared     *Cluster
	sharedErr  error
	sharedOnce sync.Once
)

// Shared returns the test binary's cluster, starting it on first use; a
// package using it calls Main from its TestMain so it is stopped at the end.
// Without PostgreSQL the test skips loudly, or fails under
// FIRERUNNER_TEST_REQUIRE=1 (internal/testenv).
func Shared(t testing.TB) *Cluster {
	t.Helper()
	Require(t)
	sharedOnce.Do(func() { shared, sharedErr = Start(Options{}) })
	if sharedErr != nil {
		t.Fatalf("starting a throwaway PostgreSQL: %v", sharedErr)
	}
	return shared
}

// Require stops the test unless PostgreSQL's binaries are here: a loud
// skip, or a failure under FIRERUNNER_TEST_REQUIRE=1 (for tests that start
// a cluster of their own rather than the shared one).
func Require(t testing.TB) {
	t.Helper()
	if why := Available(); why != "" {
		testenv.Missing(t, "PostgreSQL server binaries", why+"; apt-get install postgresql, or run make deps")
	}
}

// NewDatabase returns the DSN of a fresh database in the shared cluster.
func NewDatabase(t testing.TB) string {
	t.Helper()
	dsn, err := Shared(t).CreateDatabase()
	if err != nil {
		t.Fatal(err)
	}
	return dsn
}

// Main runs the tests and stops the shared cluster, if one was started.
func Main(m *testing.M) int {
	code := m.Run()
	if shared != nil {
		shared.Stop()
	}
	return code
}

// DSNFile writes dsn to a 0600 file in dir, as operators store it.
func DSNFile(t testing.TB, dir, dsn string) string {
	t.Helper()
	p := filepath.Join(dir, "postgres.dsn")
	if err := os.WriteFile(p, []byte(strings.TrimSpace(dsn)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
