package gitlabstandin

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/testenv"
)

// runnerProc is a real `gitlab-runner run-single` (shell executor) on the host.
type runnerProc struct {
	cmd  *exec.Cmd
	out  *testenv.Buffer
	done chan error
}

// startRunner runs one job with the real gitlab-runner; the token goes via
// the environment, not argv.
func startRunner(t *testing.T, bin string, s *Server, token string) *runnerProc {
	t.Helper()
	home := t.TempDir()
	cmd := exec.Command(bin, "run-single", "--executor", "shell",
		"--max-builds", "1", "--wait-timeout", "120",
		"--builds-dir", home+"/builds", "--cache-dir", home+"/cache")
	cmd.Env = append(os.Environ(), "HOME="+home, "CI_SERVER_URL="+s.URL(), "CI_SERVER_TOKEN="+token)
	rp := &runnerProc{cmd: cmd, out: &testenv.Buffer{}, done: make(chan error, 1)}
	cmd.Stdout, cmd.Stderr = rp.out, rp.out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { rp.done <- cmd.Wait() }()
	t.Cleanup(func() {
		select {
		case <-rp.done:
		default:
			_ = cmd.Process.Kill()
			<-rp.done
		}
		if t.Failed() {
			t.Logf("gitlab-runner output:\n%s", rp.out.String())
		}
	})
	return rp
}

// wait waits for the runner to exit after its one job.
func (rp *runnerProc) wait(t *testing.T) {
	t.Helper()
	select {
	case err := <-rp.done:
		rp.done <- err
		if err != nil {
			t.Fatalf("gitlab-runner exited: %v", err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("gitlab-runner did not exit after its job")
	}
}

func waitJob(t *testing.T, s *Server, id int64, cond func(JobState) bool) JobState {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	st, err := s.WaitJob(ctx, id, cond)
	if err != nil {
		t.Fatalf("%v; trace so far:\n%s", err, st.Trace)
	}
	return st
}

func projectRunner(t *testing.T, s *Server, p Project, tags ...string) RunnerState {
	t.Helper()
	r, err := s.CreateRunner(RunnerSpec{ProjectID: p.ID, Tags: tags, RunUntagged: len(tags) == 0, Description: t.Name()})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestRealRunnerSuccessCloneAtRefMaskedVariable(t *testing.T) {
	bin := testenv.GitLabRunner(t)
	s := newServer(t, Options{})
	p, err := s.AddProject(ProjectSpec{Path: "acme/app", Files: map[string]string{"data.txt": "from main\n"}})
	if err != nil {
		t.Fatal(err)
	}
	featureSHA, err := s.Commit(p.ID, "feature", map[string]string{"data.txt": "from feature\n"}, "feature commit")
	if err != nil {
		t.Fatal(err)
	}
	const secret = "hunter2-very-secret-value"
	if err := s.SetProjectVariables(p.ID, Variable{Key: "MY_SECRET", Value: secret, Masked: true}); err != nil {
		t.Fatal(err)
	}
	pl, err := s.CreatePipelineSpec(p.ID, PipelineSpec{Ref: "feature", Jobs: []JobSpec{{
		Name:        "build",
		Tags:        []string{"firecracker-1cpu-1gb"},
		Script:      []string{"cat data.txt", "echo head=$(git rev-parse HEAD)", `echo "secret=$MY_SECRET"`, "echo plain=$PLAIN", `echo "job-secret=$JOB_SECRET"`},
		AfterScript: []string{"echo after-script-ran"},
		Variables:   []Variable{{Key: "PLAIN", Value: "visible-value"}, {Key: "JOB_SECRET", Value: "job-level-secret-42", Masked: true}},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	r := projectRunner(t, s, p, "firecracker-1cpu-1gb")
	rp := startRunner(t, bin, s, r.Token)
	st := waitJob(t, s, pl.JobIDs[0], nil)
	rp.wait(t)

	if st.Status != StatusSuccess || st.RunnerID != r.ID {
		t.Fatalf("status %s runner %d; trace:\n%s", st.Status, st.RunnerID, st.Trace)
	}
	for _, want := range []string{"from feature", "head=" + featureSHA, "secret=[MASKED]", "job-secret=[MASKED]", "plain=visible-value", "after-script-ran", "Job succeeded"} {
		if !strings.Contains(st.Trace, want) {
			t.Errorf("trace lacks %q", want)
		}
	}
	if strings.Contains(st.Trace, secret) || strings.Contains(st.Trace, "job-level-secret-42") || strings.Contains(st.Trace, "from main") {
		t.Errorf("trace leaks the secret or has the wrong ref")
	}
	if t.Failed() {
		t.Logf("trace:\n%s", st.Trace)
	}
}

func TestRealRunnerScriptFailureExitCode(t *testing.T) {
	bin := testenv.GitLabRunner(t)
	s := newServer(t, Options{})
	p := addProject(t, s, "acme/app")
	pl, err := s.CreatePipeline(p.ID, JobSpec{Name: "fail", Script: []string{"echo about-to-fail", "exit 3"}})
	if err != nil {
		t.Fatal(err)
	}
	r := projectRunner(t, s, p)
	rp := startRunner(t, bin, s, r.Token)
	st := waitJob(t, s, pl.JobIDs[0], nil)
	rp.wait(t)
	if st.Status != StatusFailed || st.FailureReason != "script_failure" || st.ExitCode != 3 {
		t.Fatalf("status %s reason %q exit %d; trace:\n%s", st.Status, st.FailureReason, st.ExitCode, st.Trace)
	}
	if !strings.Contains(st.Trace, "about-to-fail") || !strings.Contains(st.Trace, "Job failed: exit status 3") {
		t.Fatalf("trace:\n%s", st.Trace)
	}
}

func TestRealRunnerCancel(t *testing.T) {
	bin := testenv.GitLabRunner(t)
	for _, hard := range []bool{false, true} {
		t.Run(fmt.Sprintf("hard=%v", hard), func(t *testing.T) { testRealRunnerCancel(t, bin, hard) })
	}
}

func testRealRunnerCancel(t *testing.T, bin string, hard bool) {
	s := newServer(t, Options{TraceUpdateInterval: time.Second, HardCancel: hard})
	p := addProject(t, s, "acme/app")
	pl, err := s.CreatePipeline(p.ID, JobSpec{Name: "long", Script: []string{"echo started-long-job", "sleep 300"},
		AfterScript: []string{"echo after-cancel"}})
	if err != nil {
		t.Fatal(err)
	}
	r := projectRunner(t, s, p)
	rp := startRunner(t, bin, s, r.Token)
	waitJob(t, s, pl.JobIDs[0], func(j JobState) bool { return strings.Contains(j.Trace, "started-long-job") })
	canceledAt := time.Now()
	if err := s.Cancel(pl.JobIDs[0]); err != nil {
		t.Fatal(err)
	}
	if st, _ := s.Job(pl.JobIDs[0]); hard && st.Status != StatusCanceled || !hard && st.Status != StatusCanceling {
		t.Fatalf("right after Cancel: %s", st.Status)
	}
	st := waitJob(t, s, pl.JobIDs[0], nil)
	if st.Status != StatusCanceled {
		t.Fatalf("status %s; trace:\n%s", st.Status, st.Trace)
	}
	// The runner must notice (Job-Status header) and stop, not sleep 300 s.
	rp.wait(t)
	if testing.Verbose() {
		t.Logf("gitlab-runner output:\n%s", rp.out.String())
	}
	t.Logf("runner exited %s after Cancel", time.Since(canceledAt).Round(time.Millisecond))
	// What each mode is for: a graceful cancel (GitLab's "canceling", for a
	// runner announcing cancel_gracefully) still runs after_script, after
	// the script was stopped; a hard cancel ("canceled" at once) does not.
	started, after := outputLine(st.Trace, "started-long-job"), outputLine(st.Trace, "after-cancel")
	switch {
	case !hard && (after < 0 || after < started):
		t.Errorf("graceful cancel: after_script did not run after the script; trace:\n%s", st.Trace)
	case hard && after >= 0:
		t.Errorf("hard cancel: after_script ran; trace:\n%s", st.Trace)
	}
	if strings.Contains(st.Trace, "Job succeeded") {
		t.Errorf("a canceled job's trace says it succeeded:\n%s", st.Trace)
	}
}

var (
	ansiEscape = regexp.MustCompile(`\x1b\[[0-9;]*[A-Za-z]`)
	// traceStamp starts each line of gitlab-runner's timestamped trace:
	// time, stream number, O(ut) or E(rr), + for a continued line.
	traceStamp = regexp.MustCompile(`^[0-9]{4}-[0-9]{2}-[0-9]{2}T\S+Z [0-9A-Fa-f]{2}[OE]\+? ?`)
)

// outputLine is the number of the first trace line whose text is exactly
// out (timestamp, colours and CRs dropped), so a command's output is told
// from the "$ echo out" line that shows the command; -1 when there is none.
func outputLine(trace, out string) int {
	for i, l := range strings.Split(ansiEscape.ReplaceAllString(trace, ""), "\n") {
		l = traceStamp.ReplaceAllString(strings.ReplaceAll(l, "\r", ""), "")
		if strings.TrimSpace(l) == out {
			return i
		}
	}
	return -1
}

func TestOutputLine(t *testing.T) {
	trace := "2026-11-30T05:42:59.498270Z 01O \x1b[32;1m$ echo after-cancel\x1b[0;m\n" +
		"2026-11-30T05:42:59.498300Z 01O+after-cancel\r\n" +
		"plain line\n"
	for out, want := range map[string]int{"after-cancel": 1, "plain line": 2, "$ echo after-cancel": 0, "after": -1} {
		if got := outputLine(trace, out); got != want {
			t.Errorf("outputLine(%q) = %d, want %d", out, got, want)
		}
	}
}

// runnerAPI posts to the runner API like gitlab-runner does.
func runnerAPI(t *testing.T, s *Server, method, path string, hdr map[string]string, body any) (*http.Response, []byte) {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case []byte:
		rd = bytes.NewReader(b)
	default:
		js, _ := json.Marshal(b)
		rd = bytes.NewReader(js)
	}
	req, _ := http.NewRequest(method, s.URL()+"/api/v4/"+path, rd)
	req.Header.Set("Content-Type", "application/json")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp, out
}

func TestJobAssignmentRules(t *testing.T) {
	s := newServer(t, Options{LongPoll: -1})
	p := addProject(t, s, "acme/app")
	other := addProject(t, s, "acme/other")
	pl, err := s.CreatePipeline(p.ID,
		JobSpec{Name: "ab", Script: []string{"true"}, Tags: []string{"a", "b"}},
		JobSpec{Name: "untagged", Script: []string{"true"}},
		JobSpec{Name: "a", Script: []string{"true"}, Tags: []string{"a"}})
	if err != nil {
		t.Fatal(err)
	}
	request := func(tok string) (int, int64) {
		resp, body := runnerAPI(t, s, "POST", "jobs/request", nil, map[string]any{"token": tok, "info": map[string]any{}})
		var j struct {
			ID int64 `json:"id"`
		}
		_ = json.Unmarshal(body, &j)
		return resp.StatusCode, j.ID
	}
	onlyA := projectRunner(t, s, p, "a")
	otherProj := projectRunner(t, s, other, "a", "b")
	if code, _ := request("glrt-unknown"); code != 403 {
		t.Fatalf("unknown runner token: %d", code)
	}
	if code, _ := request(otherProj.Token); code != 204 {
		t.Fatalf("runner of another project got a job: %d", code)
	}
	// Runner tagged [a]: not "ab" (tags ⊄), not "untagged" (run_untagged false) → "a".
	if code, id := request(onlyA.Token); code != 201 || id != pl.JobIDs[2] {
		t.Fatalf("runner [a]: %d job %d", code, id)
	}
	if st, _ := s.Runner(onlyA.ID); st.FirstRequestAt.IsZero() || len(st.JobIDs) != 1 {
		t.Fatalf("runner state %+v", st)
	}
	if code, _ := request(onlyA.Token); code != 204 {
		t.Fatalf("runner [a] second request: %d", code)
	}
	group, err := s.CreateRunner(RunnerSpec{Type: "group_type", GroupID: p.GroupID, Tags: []string{"a", "b", "c"}, RunUntagged: true})
	if err != nil {
		t.Fatal(err)
	}
	got := map[int64]bool{}
	for range 2 {
		code, id := request(group.Token)
		if code != 201 {
			t.Fatalf("group runner: %d", code)
		}
		got[id] = true
	}
	if !got[pl.JobIDs[0]] || !got[pl.JobIDs[1]] {
		t.Fatalf("group runner got %v", got)
	}
	if code, _ := request(group.Token); code != 204 {
		t.Fatal("a job was handed out twice")
	}
	if st, _ := s.Job(pl.JobIDs[0]); st.Status != StatusRunning || st.RunnerID != group.ID {
		t.Fatalf("job %+v", st)
	}
}

func TestTraceRangesAndCancelStatus(t *testing.T) {
	s := newServer(t, Options{LongPoll: -1})
	p := addProject(t, s, "acme/app")
	pl, err := s.CreatePipeline(p.ID, JobSpec{Name: "x", Script: []string{"true"}})
	if err != nil {
		t.Fatal(err)
	}
	r := projectRunner(t, s, p)
	resp, body := runnerAPI(t, s, "POST", "jobs/request", nil, map[string]any{"token": r.Token, "info": map[string]any{}})
	if resp.StatusCode != 201 {
		t.Fatalf("request: %d", resp.StatusCode)
	}
	var job struct {
		ID      int64  `json:"id"`
		Token   string `json:"token"`
		GitInfo struct {
			RepoURL  string   `json:"repo_url"`
			Refspecs []string `json:"refspecs"`
			Sha      string   `json:"sha"`
		} `json:"git_info"`
		Steps []struct {
			Name   string   `json:"name"`
			Script []string `json:"script"`
		} `json:"steps"`
		RunnerInfo struct {
			Timeout int `json:"timeout"`
		} `json:"runner_info"`
	}
	if err := json.Unmarshal(body, &job); err != nil {
		t.Fatal(err)
	}
	if job.ID != pl.JobIDs[0] || job.GitInfo.Sha != p.HeadSHA || !strings.Contains(job.GitInfo.RepoURL, "gitlab-ci-token:"+job.Token+"@") ||
		len(job.Steps) != 1 || job.Steps[0].Name != "script" || job.RunnerInfo.Timeout != 3600 {
		t.Fatalf("payload %s", body)
	}
	patch := func(tok, rng, data string) *http.Response {
		resp, _ := runnerAPI(t, s, "PATCH", fmt.Sprintf("jobs/%d/trace", job.ID),
			map[string]string{"JOB-TOKEN": tok, "Content-Range": rng}, []byte(data))
		return resp
	}
	if resp := patch("wrong", "0-4", "hello"); resp.StatusCode != 403 {
		t.Fatalf("wrong job token: %d", resp.StatusCode)
	}
	if resp := patch(job.Token, "0-4", "hello"); resp.StatusCode != 202 || resp.Header.Get("Range") != "0-5" || resp.Header.Get("Job-Status") != "running" {
		t.Fatalf("patch: %d %v", resp.StatusCode, resp.Header)
	}
	if resp := patch(job.Token, "7-9", "abc"); resp.StatusCode != 416 || resp.Header.Get("Range") != "0-5" {
		t.Fatalf("gap: %d %v", resp.StatusCode, resp.Header)
	}
	if resp := patch(job.Token, "5-10", " world"); resp.StatusCode != 202 {
		t.Fatalf("append: %d", resp.StatusCode)
	}
	if st, _ := s.Job(job.ID); st.Trace != "hello world" {
		t.Fatalf("trace %q", st.Trace)
	}
	// Without graceful-cancel support the job is canceled at once and the
	// runner learns it from a 403 carrying Job-Status.
	if err := s.Cancel(job.ID); err != nil {
		t.Fatal(err)
	}
	if resp := patch(job.Token, "11-11", "!"); resp.StatusCode != 403 || resp.Header.Get("Job-Status") != "canceled" {
		t.Fatalf("patch after cancel: %d %v", resp.StatusCode, resp.Header)
	}
	resp, _ = runnerAPI(t, s, "PUT", fmt.Sprintf("jobs/%d", job.ID), nil, map[string]any{"token": job.Token, "state": "failed"})
	if resp.StatusCode != 403 || resp.Header.Get("Job-Status") != "canceled" {
		t.Fatalf("update after cancel: %d %v", resp.StatusCode, resp.Header)
	}
}

func TestLongPollHandsOutNewJob(t *testing.T) {
	s := newServer(t, Options{LongPoll: time.Minute})
	p := addProject(t, s, "acme/app")
	r := projectRunner(t, s, p, "x")
	type result struct {
		code int
		body []byte
	}
	done := make(chan result, 1)
	go func() {
		resp, body := runnerAPI(t, s, "POST", "jobs/request", nil, map[string]any{"token": r.Token, "info": map[string]any{}})
		done <- result{resp.StatusCode, body}
	}()
	// Create the job only once the runner is waiting.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.Wait(ctx, func() bool { st, _ := s.Runner(r.ID); return !st.FirstRequestAt.IsZero() }); err != nil {
		t.Fatal(err)
	}
	pl, err := s.CreatePipeline(p.ID, JobSpec{Name: "x", Script: []string{"true"}, Tags: []string{"x"}})
	if err != nil {
		t.Fatal(err)
	}
	res := <-done
	if res.code != 201 || !strings.Contains(string(res.body), fmt.Sprintf(`"id":%d`, pl.JobIDs[0])) {
		t.Fatalf("long poll: %d %s", res.code, res.body)
	}
}

func TestLegacyRegistration(t *testing.T) {
	s := newServer(t, Options{})
	p := addProject(t, s, "acme/app")
	if resp, _ := runnerAPI(t, s, "POST", "runners", nil, map[string]any{"token": "wrong"}); resp.StatusCode != 403 {
		t.Fatalf("bad registration token: %d", resp.StatusCode)
	}
	resp, body := runnerAPI(t, s, "POST", "runners", nil, map[string]any{"token": p.RunnersToken, "tag_list": "a,b", "run_untagged": false})
	var reg struct {
		ID    int64  `json:"id"`
		Token string `json:"token"`
	}
	if err := json.Unmarshal(body, &reg); err != nil || resp.StatusCode != 201 || !strings.HasPrefix(reg.Token, "glrtr-") {
		t.Fatalf("register: %d %s", resp.StatusCode, body)
	}
	st, _ := s.Runner(reg.ID)
	if st.Type != "project_type" || len(st.Tags) != 2 || st.RunUntagged {
		t.Fatalf("registered runner %+v", st)
	}
	if resp, _ := runnerAPI(t, s, "POST", "runners/verify", nil, map[string]any{"token": reg.Token}); resp.StatusCode != 200 {
		t.Fatalf("verify: %d", resp.StatusCode)
	}
	if resp, _ := runnerAPI(t, s, "DELETE", "runners", nil, map[string]any{"token": reg.Token}); resp.StatusCode != 204 {
		t.Fatalf("unregister: %d", resp.StatusCode)
	}
	if resp, _ := runnerAPI(t, s, "POST", "runners/verify", nil, map[string]any{"token": reg.Token}); resp.StatusCode != 403 {
		t.Fatalf("verify after unregister: %d", resp.StatusCode)
	}
}

// startManager runs `gitlab-runner run-single -c DIR/config.toml` with a
// pre-written DIR/.runner_system_id, as FireRunner's guest agent does: many
// such processes share one runner token, each a runner manager of its own.
func startManager(t *testing.T, bin string, s *Server, token, systemID string) *runnerProc {
	t.Helper()
	dir := t.TempDir()
	cfg := fmt.Sprintf("concurrent = 1\n\n[[runners]]\n  name = \"m\"\n  url = %q\n  token = %q\n  executor = \"shell\"\n  builds_dir = %q\n  cache_dir = %q\n",
		s.URL(), token, dir+"/builds", dir+"/cache")
	if err := os.WriteFile(dir+"/config.toml", []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dir+"/.runner_system_id", []byte(systemID+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "run-single", "-c", dir+"/config.toml", "-r", "m", "--max-builds", "1", "--wait-timeout", "120")
	cmd.Env = append(os.Environ(), "HOME="+dir)
	rp := &runnerProc{cmd: cmd, out: &testenv.Buffer{}, done: make(chan error, 1)}
	cmd.Stdout, cmd.Stderr = rp.out, rp.out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { rp.done <- cmd.Wait() }()
	t.Cleanup(func() {
		select {
		case <-rp.done:
		default:
			_ = cmd.Process.Kill()
			<-rp.done
		}
		if t.Failed() {
			t.Logf("gitlab-runner %s output:\n%s", systemID, rp.out.String())
		}
	})
	return rp
}

// TestRealRunnerManagersShareOneToken: two real gitlab-runner processes use
// one runner's token, each with its own .runner_system_id. GitLab (the
// stand-in) keeps a runner manager per system_id, the job API names the
// manager that ran each job (runner_manager.system_id), GET
// /runners/:id/jobs?system_id= lists one manager's jobs, and after POST
// /runners/:id/reset_authentication_token the old token is refused.
func TestRealRunnerManagersShareOneToken(t *testing.T) {
	bin := testenv.GitLabRunner(t)
	s := newServer(t, Options{})
	p := addProject(t, s, "acme/app")
	const tag = "firecracker-1cpu-1gb"
	pl, err := s.CreatePipeline(p.ID, JobSpec{Name: "a", Tags: []string{tag}, Script: []string{"echo a"}},
		JobSpec{Name: "b", Tags: []string{tag}, Script: []string{"echo b"}})
	if err != nil {
		t.Fatal(err)
	}
	r := projectRunner(t, s, p, tag)
	ids := []string{"s_fr0000000001", "s_fr0000000002"}
	procs := []*runnerProc{startManager(t, bin, s, r.Token, ids[0]), startManager(t, bin, s, r.Token, ids[1])}
	ran := map[string]int64{}
	for _, id := range pl.JobIDs {
		st := waitJob(t, s, id, nil)
		if st.Status != StatusSuccess || st.RunnerID != r.ID {
			t.Fatalf("job %d: %s on runner %d", id, st.Status, st.RunnerID)
		}
		ran[st.RunnerManagerSystemID] = id
	}
	for _, rp := range procs {
		rp.wait(t)
	}
	if len(ran) != 2 || ran[ids[0]] == 0 || ran[ids[1]] == 0 {
		t.Fatalf("each manager should have run one job: %v", ran)
	}

	tok := "glpat-" + "managers-test-0001"
	s.AddToken(tok, ScopeAPI)
	get := func(path string, out any) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, s.URL()+path, nil)
		req.Header.Set("PRIVATE-TOKEN", tok)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("GET %s: HTTP %d", path, resp.StatusCode)
		}
		if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
			t.Fatal(err)
		}
	}
	var job struct {
		RunnerManager struct {
			ID       int64  `json:"id"`
			SystemID string `json:"system_id"`
			Status   string `json:"status"`
		} `json:"runner_manager"`
	}
	get(fmt.Sprintf("/api/v4/projects/%d/jobs/%d", p.ID, ran[ids[1]]), &job)
	if job.RunnerManager.SystemID != ids[1] || job.RunnerManager.ID == 0 || job.RunnerManager.Status != "online" {
		t.Fatalf("job API runner_manager: %+v", job.RunnerManager)
	}
	var managers []struct {
		SystemID string `json:"system_id"`
		Version  string `json:"version"`
	}
	get(fmt.Sprintf("/api/v4/runners/%d/managers", r.ID), &managers)
	if len(managers) != 2 || managers[0].Version == "" {
		t.Fatalf("managers: %+v", managers)
	}
	var jobs []struct {
		ID int64 `json:"id"`
	}
	get(fmt.Sprintf("/api/v4/runners/%d/jobs?system_id=%s", r.ID, ids[0]), &jobs)
	if len(jobs) != 1 || jobs[0].ID != ran[ids[0]] {
		t.Fatalf("jobs of manager %s: %+v", ids[0], jobs)
	}
	get(fmt.Sprintf("/api/v4/runners/%d/jobs?system_id=s_unknown00000", r.ID), &jobs)
	if len(jobs) != 0 {
		t.Fatalf("jobs of an unknown manager: %+v", jobs)
	}

	req, _ := http.NewRequest(http.MethodPost, fmt.Sprintf("%s/api/v4/runners/%d/reset_authentication_token", s.URL(), r.ID), nil)
	req.Header.Set("PRIVATE-TOKEN", tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var reset struct {
		Token string `json:"token"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&reset)
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated || reset.Token == "" || reset.Token == r.Token {
		t.Fatalf("reset: HTTP %d", resp.StatusCode)
	}
	for tk, want := range map[string]int{r.Token: http.StatusForbidden, reset.Token: http.StatusNoContent} {
		body, _ := json.Marshal(map[string]any{"token": tk, "system_id": ids[0]})
		resp, err := http.Post(s.URL()+"/api/v4/jobs/request", "application/json", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("job request with the %s token: HTTP %d, want %d", map[bool]string{true: "old", false: "new"}[tk == r.Token], resp.StatusCode, want)
		}
	}
}

// TestRealRunnerArtifactsBetweenStages: the real gitlab-runner uploads a
// job's artifacts (artifacts-uploader, a multipart zip) and a job of a
// later stage downloads them (artifacts-downloader, with its own job
// token); a job with `dependencies: []` gets none.
func TestRealRunnerArtifactsBetweenStages(t *testing.T) {
	bin := testenv.GitLabRunner(t)
	s := newServer(t, Options{})
	p, err := s.AddProject(ProjectSpec{Path: "acme/art", Files: map[string]string{"README.md": "x\n"}})
	if err != nil {
		t.Fatal(err)
	}
	jobs, err := ParseCIConfig([]byte(`
stages: [build, test]
build:
  stage: build
  script: ["mkdir -p out", "echo built-by-$CI_JOB_ID > out/result.txt"]
  artifacts:
    paths: [out/]
use:
  stage: test
  script: ["cat out/result.txt"]
isolated:
  stage: test
  dependencies: []
  script: ["test ! -e out/result.txt && echo no-artifacts-here"]
`))
	if err != nil {
		t.Fatal(err)
	}
	pl, err := s.CreatePipeline(p.ID, jobs...)
	if err != nil {
		t.Fatal(err)
	}
	r := projectRunner(t, s, p)
	for i, id := range pl.JobIDs {
		rp := startRunner(t, bin, s, r.Token)
		st := waitJob(t, s, id, nil)
		rp.wait(t)
		if st.Status != StatusSuccess {
			t.Fatalf("job %d (%s): %s; trace:\n%s", id, jobs[i].Name, st.Status, st.Trace)
		}
		switch jobs[i].Name {
		case "build":
			if !strings.Contains(st.Trace, "Uploading artifacts") {
				t.Errorf("build: no upload in the trace:\n%s", st.Trace)
			}
		case "use":
			if want := fmt.Sprintf("built-by-%d", pl.JobIDs[0]); !strings.Contains(st.Trace, want) {
				t.Errorf("use: trace lacks %q (the build job's artifact):\n%s", want, st.Trace)
			}
		case "isolated":
			if !strings.Contains(st.Trace, "no-artifacts-here") || strings.Contains(st.Trace, "Downloading artifacts") {
				t.Errorf("isolated: got artifacts despite dependencies: []:\n%s", st.Trace)
			}
		}
	}
}

// TestArtifactsAuth: a job's archive is served only to a running job of
// the same pipeline; an upload needs the job's own token.
func TestArtifactsAuth(t *testing.T) {
	s := newServer(t, Options{})
	p, err := s.AddProject(ProjectSpec{Path: "acme/auth", Files: map[string]string{"README.md": "x\n"}})
	if err != nil {
		t.Fatal(err)
	}
	resp, _ := runnerAPI(t, s, "GET", "jobs/1/artifacts", map[string]string{"JOB-TOKEN": "glcbt-nope"}, nil)
	if resp.StatusCode != 403 {
		t.Errorf("download with an unknown token: %d, want 403", resp.StatusCode)
	}
	if _, err := s.CreatePipeline(p.ID, JobSpec{Name: "a", Script: []string{"true"}, Artifacts: []string{"x"}}); err != nil {
		t.Fatal(err)
	}
	resp, _ = runnerAPI(t, s, "POST", "jobs/1/artifacts", map[string]string{"JOB-TOKEN": "glcbt-nope"}, nil)
	if resp.StatusCode != 400 && resp.StatusCode != 403 {
		t.Errorf("upload without a form or token: %d, want 400 or 403", resp.StatusCode)
	}
}
