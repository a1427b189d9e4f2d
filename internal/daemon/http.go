package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/firerunner/firerunner/internal/config"
)

// servers are FireRunner's HTTP listeners: the public one on listen
// (/webhook; HTTPS with tls.cert_file/key_file), and with metrics_listen a
// second one for /metrics, /healthz and /readyz, so the operations
// endpoints need not share the port GitLab posts to. Without
// metrics_listen the public listener serves them too.
type servers struct {
	public, ops     *http.Server
	publicLn, opsLn net.Listener
	errs            chan error // each server's Serve result
}

// route is one path of the operations endpoints.
type route struct {
	path string
	h    http.Handler
}

func newHTTPServer(h http.Handler) *http.Server {
	return &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout: time.Minute, WriteTimeout: time.Minute, IdleTimeout: 2 * time.Minute}
}

// listen binds the listeners (failing before anything is served) and
// starts serving.
func listen(cfg config.Config, webhook http.Handler, ops []route, log *slog.Logger) (_ *servers, err error) {
	s := &servers{errs: make(chan error, 2)}
	pub := http.NewServeMux()
	pub.Handle("/webhook", webhook)
	opsMux := pub
	if cfg.MetricsListen != "" {
		opsMux = http.NewServeMux()
	}
	for _, r := range ops {
		opsMux.Handle(r.path, r.h)
	}
	s.public = newHTTPServer(pub)
	if cfg.TLS.Enabled() {
		rl, err := newCertReloader(cfg.TLS.CertFile, cfg.TLS.KeyFile, log)
		if err != nil {
			return nil, err
		}
		s.public.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: rl.get}
	}
	if s.publicLn, err = net.Listen("tcp", cfg.Listen); err != nil {
		return nil, fmt.Errorf("listen: %w", err)
	}
	if cfg.MetricsListen != "" {
		s.ops = newHTTPServer(opsMux)
		if s.opsLn, err = net.Listen("tcp", cfg.MetricsListen); err != nil {
			s.publicLn.Close()
			return nil, fmt.Errorf("metrics_listen: %w", err)
		}
		go func() { s.errs <- s.ops.Serve(s.opsLn) }()
	}
	go func() {
		if s.public.TLSConfig != nil {
			s.errs <- s.public.ServeTLS(s.publicLn, "", "")
			return
		}
		s.errs <- s.public.Serve(s.publicLn)
	}()
	return s, nil
}

// metricsAddr is where /metrics is served.
func (s *servers) metricsAddr() string {
	if s.opsLn != nil {
		return s.opsLn.Addr().String()
	}
	return s.publicLn.Addr().String()
}

// shutdown stops the public listener first, the operations one last (so
// /metrics and /readyz answer until the end).
func (s *servers) shutdown(ctx context.Context) {
	_ = s.public.Shutdown(ctx)
	if s.ops != nil {
		_ = s.ops.Shutdown(ctx)
	}
}

func (s *servers) close() {
	_ = s.public.Close()
	if s.ops != nil {
		_ = s.ops.Close()
	}
}

// certReloader serves tls.cert_file/key_file and re-reads them when either
// changes (a renewed certificate needs no restart, which would drain VMs).
// A pair that fails to load is logged and the previous one kept.
type certReloader struct {
	certFile, keyFile string
	log               *slog.Logger

	mu      sync.Mutex
	cur     *tls.Certificate
	stamp   [2]fileStamp
	checked time.Time
}

// fileStamp identifies a version of a file.
type fileStamp struct {
	ino, size int64
	mtime     time.Time
}

func stampOf(path string) (fileStamp, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{}, err
	}
	st := fileStamp{size: fi.Size(), mtime: fi.ModTime()}
	if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
		st.ino = int64(sys.Ino)
	}
	return st, nil
}

// reloadCheck bounds how often a handshake stats the two files.
var reloadCheck = time.Second

func newCertReloader(certFile, keyFile string, log *slog.Logger) (*certReloader, error) {
	r := &certReloader{certFile: certFile, keyFile: keyFile, log: log}
	if err := r.load(); err != nil {
		return nil, err
	}
	return r, nil
}

// load reads the pair; the key file must be 0600 or stricter, like every
// secret FireRunner reads.
func (r *certReloader) load() error {
	var st [2]fileStamp
	var err error
	if st[0], err = stampOf(r.certFile); err != nil {
		return fmt.Errorf("tls.cert_file: %w", err)
	}
	if st[1], err = stampOf(r.keyFile); err != nil {
		return fmt.Errorf("tls.key_file: %w", err)
	}
	fi, err := os.Stat(r.keyFile)
	if err != nil {
		return fmt.Errorf("tls.key_file: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("tls.key_file: %s has mode %04o; it must be 0600 or stricter (chmod 600 %s)", r.keyFile, fi.Mode().Perm(), r.keyFile)
	}
	c, err := tls.LoadX509KeyPair(r.certFile, r.keyFile)
	if err != nil {
		return fmt.Errorf("tls: %w", err)
	}
	leaf, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil {
		return fmt.Errorf("tls.cert_file: %w", err)
	}
	c.Leaf = leaf
	r.mu.Lock()
	r.cur, r.stamp = &c, st
	r.mu.Unlock()
	r.log.Info("tls certificate loaded", "cert_file", r.certFile, "subject", leaf.Subject.String(),
		"dns_names", fmt.Sprint(leaf.DNSNames), "not_after", leaf.NotAfter.UTC().Format(time.RFC3339))
	return nil
}

// get is tls.Config.GetCertificate: the current pair, re-read first when a
// file changed since it was loaded.
func (r *certReloader) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	r.mu.Lock()
	due := time.Since(r.checked) >= reloadCheck
	if due {
		r.checked = time.Now()
	}
	old := r.stamp
	r.mu.Unlock()
	if due {
		a, errA := stampOf(r.certFile)
		b, errB := stampOf(r.keyFile)
		if err := errors.Join(errA, errB); err != nil {
			r.log.Error("tls: cannot stat the certificate files; serving the loaded certificate", "err", err)
		} else if a != old[0] || b != old[1] {
			if err := r.load(); err != nil {
				r.log.Error("tls: reloading the changed certificate failed; serving the previous one", "err", err)
				r.mu.Lock()
				r.stamp = [2]fileStamp{a, b} // do not retry until they change again
				r.mu.Unlock()
			}
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cur, nil
}
