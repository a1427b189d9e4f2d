package daemon

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/image"
	"github.com/firerunner/firerunner/internal/testenv"
	"github.com/firerunner/firerunner/internal/testsupport/gitlabstandin"
)

// fakeImage writes an image directory image.Load accepts (no VM is
// started in these tests).
func fakeImage(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	m := image.Manifest{Format: 1, Artifacts: map[string]image.Artifact{}}
	for _, a := range []string{image.ArtVMLinux, image.ArtInitrd, image.ArtRootfs} {
		if err := os.WriteFile(filepath.Join(dir, a), []byte(a), 0o644); err != nil {
			t.Fatal(err)
		}
		m.Artifacts[a] = image.Artifact{File: a}
	}
	b, _ := json.Marshal(m)
	if err := os.WriteFile(filepath.Join(dir, image.ManifestFile), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// The whole daemon with tls and metrics_listen: GitLab's webhook reaches
// /webhook over HTTPS only (authenticated as always), and /metrics,
// /healthz, /readyz are on the metrics address only.
func TestStartServesTLSAndMetricsListen(t *testing.T) {
	dir := t.TempDir()
	gl, err := gitlabstandin.New(gitlabstandin.Options{Logger: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	defer gl.Close()
	// Assembled at runtime: no literal in the tree looks like a real token.
	apiToken := "glpat" + "-" + "daemon-test-token"
	gl.AddToken(apiToken, gitlabstandin.ScopeAPI)
	secrets := filepath.Join(dir, "secrets")
	os.Mkdir(secrets, 0o700)
	for n, v := range map[string]string{"token": apiToken, "hook": "daemon-test-hook-secret"} {
		if err := os.WriteFile(filepath.Join(secrets, n), []byte(v), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	certFile, keyFile := filepath.Join(secrets, "cert.pem"), filepath.Join(secrets, "key.pem")
	pool := selfSigned(t, certFile, keyFile, 0o600, 7)
	cfg := config.Default()
	cfg.Listen, cfg.MetricsListen = "127.0.0.1:0", "127.0.0.1:0"
	cfg.TLS = config.TLS{CertFile: certFile, KeyFile: keyFile}
	cfg.StateDir = filepath.Join(dir, "state")
	cfg.GitLab.URL = gl.URL()
	cfg.GitLab.TokenFile, cfg.GitLab.WebhookSecretFile = filepath.Join(secrets, "token"), filepath.Join(secrets, "hook")
	cfg.VM.Driver, cfg.VM.ImageDir, cfg.QEMU.Accel, cfg.QEMU.AllowForDevelopment = "qemu", fakeImage(t), "tcg", true
	cfg.Network.Mode, cfg.Network.AllowUserModeForDevelopment = "user", true
	cfg.Limits.DrainTimeout = time.Second
	logs := &testenv.Buffer{}
	d, err := Start(context.Background(), cfg, quietLogTo(logs))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Shutdown(context.Background())
	if d.Addr() == d.MetricsAddr() {
		t.Fatalf("metrics on the webhook address %s", d.Addr())
	}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	post := func(token string) int {
		req, _ := http.NewRequest(http.MethodPost, "https://"+d.Addr()+"/webhook", bytes.NewReader([]byte(`{"object_kind":"push"}`)))
		req.Header.Set("X-Gitlab-Token", token)
		req.Header.Set("X-Gitlab-Event", "Push Hook")
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := post("wrong"); code != http.StatusUnauthorized {
		t.Errorf("webhook with a wrong token over https: %d, want 401", code)
	}
	if code := post("daemon-test-hook-secret"); code != http.StatusNoContent {
		t.Errorf("push hook over https: %d, want 204 (ignored)", code)
	}
	plain := &http.Client{Timeout: 10 * time.Second}
	for p, want := range map[string]int{"/metrics": 200, "/healthz": 200, "/readyz": 200} {
		if code, body, err := get(t, plain, "http://"+d.MetricsAddr()+p); err != nil || code != want {
			t.Errorf("GET metrics_listen %s: %d %v", p, code, err)
		} else if p == "/metrics" && !strings.Contains(body, "firerunner_webhook_events_total") {
			t.Errorf("/metrics lacks firerunner_webhook_events_total")
		}
		if code, _, err := get(t, hc, "https://"+d.Addr()+p); err != nil || code != 404 {
			t.Errorf("GET listen %s: %d %v, want 404 (served on metrics_listen only)", p, code, err)
		}
	}
	if !strings.Contains(logs.String(), `"tls":true`) {
		t.Errorf("start-up log does not say tls is on:\n%s", logs.String())
	}
}
