package daemon

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/config"
)

// selfSigned writes a fresh self-signed certificate for 127.0.0.1 and
// localhost (cert 0644, key keyMode) and returns its serial and a pool
// that trusts it.
func selfSigned(t *testing.T, certFile, keyFile string, keyMode os.FileMode, serial int64) *x509.CertPool {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "firerunner-test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	// Written by rename, as certificate renewal tools do.
	write := func(path string, b []byte, mode os.FileMode) {
		tmp := path + ".new"
		if err := os.WriteFile(tmp, b, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(tmp, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	write(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	write(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), keyMode)
	c, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(c)
	return pool
}

func okHandler(body string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, body) })
}

func testRoutes() []route {
	return []route{{"/metrics", okHandler("metrics")}, {"/healthz", okHandler("ok")}, {"/readyz", okHandler("ready")}}
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func get(t *testing.T, c *http.Client, url string) (int, string, error) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

// With tls.cert_file/key_file the webhook listener speaks only HTTPS, with
// the configured certificate; a renewed certificate is served without a
// restart; a broken renewal keeps the previous one.
func TestWebhookListenerTLS(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	pool := selfSigned(t, certFile, keyFile, 0o600, 1)
	cfg := config.Default()
	cfg.Listen, cfg.TLS = "127.0.0.1:0", config.TLS{CertFile: certFile, KeyFile: keyFile}
	s, err := listen(cfg, okHandler("hook"), testRoutes(), quietLog())
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	addr := s.publicLn.Addr().String()
	client := func(pool *x509.CertPool) *http.Client {
		return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, DisableKeepAlives: true}}
	}
	for _, p := range []string{"/webhook", "/healthz", "/metrics"} {
		if code, body, err := get(t, client(pool), "https://"+addr+p); err != nil || code != 200 {
			t.Fatalf("https %s: %d %q %v", p, code, body, err)
		}
	}
	// Plain HTTP is not served on a TLS listener.
	if code, _, err := get(t, &http.Client{Timeout: 5 * time.Second}, "http://"+addr+"/webhook"); err == nil && code != http.StatusBadRequest {
		t.Fatalf("plain http to the TLS listener: %d", code)
	}
	// An untrusted client refuses the server: it is really TLS with our cert.
	if _, _, err := get(t, client(x509.NewCertPool()), "https://"+addr+"/healthz"); err == nil {
		t.Fatal("a client trusting nothing accepted the server's certificate")
	}

	defer func(d time.Duration) { reloadCheck = d }(reloadCheck)
	reloadCheck = 0
	serial := func() int64 {
		conn, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0].SerialNumber.Int64()
	}
	if n := serial(); n != 1 {
		t.Fatalf("serial %d, want 1", n)
	}
	pool2 := selfSigned(t, certFile, keyFile, 0o600, 2)
	if n := serial(); n != 2 {
		t.Fatalf("after renewal: serial %d, want 2", n)
	}
	if code, _, err := get(t, client(pool2), "https://"+addr+"/webhook"); err != nil || code != 200 {
		t.Fatalf("https with the renewed certificate: %d %v", code, err)
	}
	// A renewal whose key does not match is refused; the last good pair stays.
	other := filepath.Join(dir, "other")
	selfSigned(t, other+".cert", other+".key", 0o600, 3)
	b, _ := os.ReadFile(other + ".key")
	if err := os.WriteFile(keyFile, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if n := serial(); n != 2 {
		t.Fatalf("after a broken renewal: serial %d, want the previous 2", n)
	}
}

// The TLS key is a secret: a key file readable by group or others is
// refused at start, like every secret FireRunner reads; so is a missing one.
func TestTLSKeyMustBe0600(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	selfSigned(t, certFile, keyFile, 0o640, 1)
	cfg := config.Default()
	cfg.Listen, cfg.TLS = "127.0.0.1:0", config.TLS{CertFile: certFile, KeyFile: keyFile}
	if _, err := listen(cfg, okHandler("hook"), testRoutes(), quietLog()); err == nil || !strings.Contains(err.Error(), "tls.key_file") || !strings.Contains(err.Error(), "0600") {
		t.Fatalf("key file 0640: %v", err)
	}
	cfg.TLS.KeyFile = filepath.Join(dir, "missing.pem")
	if _, err := listen(cfg, okHandler("hook"), testRoutes(), quietLog()); err == nil || !strings.Contains(err.Error(), "tls.key_file") {
		t.Fatalf("missing key file: %v", err)
	}
}

// With metrics_listen, /metrics, /healthz and /readyz are served there and
// only there; the public listener serves /webhook alone.
func TestMetricsListen(t *testing.T) {
	cfg := config.Default()
	cfg.Listen, cfg.MetricsListen = "127.0.0.1:0", "127.0.0.1:0"
	s, err := listen(cfg, okHandler("hook"), testRoutes(), quietLog())
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	pub, ops := "http://"+s.publicLn.Addr().String(), "http://"+s.metricsAddr()
	if pub == ops {
		t.Fatalf("one listener for both: %s", pub)
	}
	c := &http.Client{Timeout: 5 * time.Second}
	for _, tc := range []struct {
		url  string
		code int
		body string
	}{
		{pub + "/webhook", 200, "hook"},
		{pub + "/metrics", 404, ""}, {pub + "/healthz", 404, ""}, {pub + "/readyz", 404, ""},
		{ops + "/metrics", 200, "metrics"}, {ops + "/healthz", 200, "ok"}, {ops + "/readyz", 200, "ready"},
		{ops + "/webhook", 404, ""},
	} {
		code, body, err := get(t, c, tc.url)
		if err != nil || code != tc.code || (tc.body != "" && body != tc.body) {
			t.Errorf("GET %s: %d %q %v; want %d %q", tc.url, code, body, err, tc.code, tc.body)
		}
	}
	s.shutdown(context.Background())
	// Without metrics_listen everything is on the one listener.
	cfg.MetricsListen = ""
	s2, err := listen(cfg, okHandler("hook"), testRoutes(), quietLog())
	if err != nil {
		t.Fatal(err)
	}
	defer s2.close()
	if s2.metricsAddr() != s2.publicLn.Addr().String() {
		t.Fatalf("metrics addr %s, want the listen addr %s", s2.metricsAddr(), s2.publicLn.Addr())
	}
	for _, p := range []string{"/webhook", "/metrics", "/healthz", "/readyz"} {
		if code, _, err := get(t, c, "http://"+s2.publicLn.Addr().String()+p); err != nil || code != 200 {
			t.Errorf("GET %s without metrics_listen: %d %v", p, code, err)
		}
	}
}

// A metrics_listen address that is taken fails the start and releases
// the public listener it had bound.
func TestMetricsListenBusy(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	cfg := config.Default()
	cfg.Listen, cfg.MetricsListen = "127.0.0.1:0", busy.Addr().String()
	if _, err := listen(cfg, okHandler("hook"), testRoutes(), quietLog()); err == nil || !strings.Contains(err.Error(), "metrics_listen") {
		t.Fatalf("busy metrics_listen: %v", err)
	}
}

func quietLogTo(w io.Writer) *slog.Logger { return slog.New(slog.NewJSONHandler(w, nil)) }
