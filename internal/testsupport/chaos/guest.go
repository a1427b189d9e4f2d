package chaos

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/vm"
)

// picksEnv names the file where guests log each job they took ("<job id>
// <vm id> <runner token's last 4>" per line, O_APPEND): the harness's own
// record of executions, independent of GitLab's and FireRunner's.
const picksEnv = "FIRERUNNER_CHAOS_PICKS"

// jobMSEnv bounds a job's run time in the guest, in ms (default 400): the
// fleet run gives the host it kills long jobs, so some still run when its
// lease ends.
const jobMSEnv = "FIRERUNNER_CHAOS_JOB_MS"

// Guest is the program a fake VM runs (its stdout is the VM's console): it
// reads the config drive the driver wrote in dir, and plays gitlab-runner
// run-single --max-builds 1 --wait-timeout against the stand-in's runner
// API with the runner token it found there: ask for a job until one comes
// or the wait timeout passes, run it (a short sleep), report success, print
// the exit marker and "power off". It returns the process exit code.
func Guest(dir string) int {
	f, err := os.Open(filepath.Join(dir, vm.ConfigDrive))
	if err != nil {
		fmt.Println("guest: no config drive:", err)
		return 1
	}
	cfg, err := guestconfig.Decode(f)
	f.Close()
	if err != nil || cfg.RunnerToken == "" {
		fmt.Println("guest: bad config drive:", err)
		return 1
	}
	fmt.Println(guestconfig.MarkerAgentStart)
	base := strings.TrimSuffix(cfg.GitLabURL, "/") + "/api/v4"
	client := &http.Client{Timeout: 30 * time.Second}
	exit := func(code int) int {
		fmt.Printf("%s%d\n%s\n", guestconfig.ExitMarker, code, guestconfig.MarkerPowerOff)
		return 0
	}
	wait := time.Duration(cfg.WaitTimeoutSec) * time.Second
	if wait <= 0 {
		wait = time.Minute
	}
	deadline := time.Now().Add(wait)
	for time.Now().Before(deadline) {
		status, body, err := call(client, http.MethodPost, base+"/jobs/request", map[string]any{
			"token": cfg.RunnerToken,
			"info":  map[string]any{"name": "chaos-guest", "version": "chaos", "executor": "shell"},
		})
		switch {
		case err != nil || status >= 500:
			time.Sleep(100 * time.Millisecond)
		case status == http.StatusCreated:
			return exit(runJob(client, base, cfg.Hostname, cfg.RunnerToken, body))
		case status == http.StatusForbidden:
			fmt.Println("guest: runner token refused (runner deleted)")
			return exit(1)
		case status != http.StatusNoContent:
			fmt.Printf("guest: job request: HTTP %d\n", status)
			time.Sleep(100 * time.Millisecond)
		}
	}
	fmt.Println("guest: no job within the wait timeout")
	return exit(0)
}

// runJob runs the job GitLab handed out and reports its end.
func runJob(client *http.Client, base, vmID, runnerToken string, body []byte) int {
	var j struct {
		ID    int64  `json:"id"`
		Token string `json:"token"`
	}
	if err := json.Unmarshal(body, &j); err != nil || j.ID == 0 {
		fmt.Println("guest: bad job payload:", err)
		return 1
	}
	if p := os.Getenv(picksEnv); p != "" {
		if f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600); err == nil {
			fmt.Fprintf(f, "%d %s %s\n", j.ID, vmID, runnerToken[len(runnerToken)-4:])
			f.Close()
		}
	}
	fmt.Println(guestconfig.MarkerJobStart, j.ID)
	maxMS := 400
	if n, err := strconv.Atoi(os.Getenv(jobMSEnv)); err == nil && n > 0 {
		maxMS = n
	}
	time.Sleep(time.Duration(rand.IntN(maxMS)) * time.Millisecond)
	for try := 0; try < 50; try++ {
		status, _, err := call(client, http.MethodPut, fmt.Sprintf("%s/jobs/%d", base, j.ID),
			map[string]any{"token": j.Token, "state": "success", "exit_code": 0})
		if err == nil && (status == http.StatusOK || status == http.StatusForbidden) {
			break // 403: the job is no longer running (canceled)
		}
		time.Sleep(100 * time.Millisecond)
	}
	fmt.Println(guestconfig.MarkerJobEnd, j.ID)
	return 0
}

func call(client *http.Client, method, url string, body any) (int, []byte, error) {
	b, _ := json.Marshal(body)
	req, err := http.NewRequest(method, url, bytes.NewReader(b))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	var out bytes.Buffer
	_, err = out.ReadFrom(resp.Body)
	return resp.StatusCode, out.Bytes(), err
}
