package gitlabstandin

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"

	gitlab "gitlab.com/gitlab-org/api/client-go"
)

// do sends one raw request and returns the status and the trimmed body.
func do(t *testing.T, s *Server, method, path, token, ctype, body string, hdr ...string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, s.URL()+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("PRIVATE-TOKEN", token)
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b))
}

// raw sends a request as written (half-closing the connection after it)
// and returns the status and trimmed body of the answer.
func raw(t *testing.T, s *Server, req string) (int, string) {
	t.Helper()
	conn, err := net.Dial("tcp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, req); err != nil {
		t.Fatal(err)
	}
	_ = conn.(*net.TCPConn).CloseWrite()
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b))
}

// TestEveryBadRequestRule sends one request per 400 rule of the stand-in
// (GitLab's answers: Grape's parameter errors as {"error": ...}, model
// validation errors as {"message": {field: [...]}}, other refusals as
// {"message": "..."}), and checks the exact answer.
func TestEveryBadRequestRule(t *testing.T) {
	s := newServer(t, Options{ProjectRunnerCap: 1, GroupRunnerCap: 1, LongPoll: -1})
	p, err := s.AddProject(ProjectSpec{Path: "acme/app", Files: map[string]string{
		"README.md": "hello\n", ".gitlab-ci.yml": "build:\n  script: [make]\n"}})
	if err != nil {
		t.Fatal(err)
	}
	g, _ := s.AddGroup("acme")
	for branch, ci := range map[string]string{"broken": "build: [unclosed\n", "nojobs": "stages: [build]\n"} {
		if _, err := s.Commit(p.ID, branch, map[string]string{".gitlab-ci.yml": ci}, branch); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Commit(p.ID, "noci", map[string]string{".gitlab-ci.yml": ""}, "no CI"); err != nil {
		t.Fatal(err)
	}
	// A runner to update and list, a job it took (for the job-token routes).
	rn, err := s.CreateRunner(RunnerSpec{ProjectID: p.ID, Tags: []string{"x"}})
	if err != nil {
		t.Fatal(err)
	}
	pl, err := s.CreatePipeline(p.ID, JobSpec{Name: "j", Tags: []string{"x"}, Script: []string{"true"}})
	if err != nil {
		t.Fatal(err)
	}
	code, body := do(t, s, "POST", "/api/v4/jobs/request", "", "application/json", `{"token":"`+rn.Token+`"}`)
	var picked struct {
		ID    int64  `json:"id"`
		Token string `json:"token"`
	}
	if code != 201 || json.Unmarshal([]byte(body), &picked) != nil || picked.ID != pl.JobIDs[0] {
		t.Fatalf("job request: %d %s", code, body)
	}
	const js = "application/json"
	const form = "application/x-www-form-urlencoded"
	proj, grp, run := fmt.Sprint(p.ID), fmt.Sprint(g.ID), fmt.Sprint(rn.ID)
	jobPath := fmt.Sprintf("/api/v4/jobs/%d", picked.ID)
	grape := func(e string) string { return `{"error":"` + e + `"}` }
	message := func(m string) string { return `{"message":"` + m + `"}` }
	field := func(f, m string) string { return `{"message":{"` + f + `":["` + m + `"]}}` }
	badJSON := message("400 Bad request - unexpected end of JSON input")
	atLeastOne := grape("description, active, paused, tag_list, run_untagged, locked, access_level, maximum_timeout, maintenance_note are missing, at least one parameter must be provided")
	for _, c := range []struct {
		name, method, path, ctype, body, want string
		hdr                                   []string
	}{
		// Bodies that are not JSON, on every route that reads one.
		{"group projects: body", "GET", "/api/v4/groups/" + grp + "/projects", js, "{", badJSON, nil},
		{"jobs: body", "GET", "/api/v4/projects/" + proj + "/jobs", js, "{", badJSON, nil},
		{"runners: body", "GET", "/api/v4/runners", js, "{", badJSON, nil},
		{"runner jobs: body", "GET", "/api/v4/runners/" + run + "/jobs", js, "{", badJSON, nil},
		{"update runner: body", "PUT", "/api/v4/runners/" + run, js, "{", badJSON, nil},
		{"create runner: body", "POST", "/api/v4/user/runners", js, "{", badJSON, nil},
		{"pipeline: body", "POST", "/api/v4/projects/" + proj + "/pipeline", js, "{", badJSON, nil},
		{"legacy register: body", "POST", "/api/v4/runners", js, "{", badJSON, nil},
		{"unregister: body", "DELETE", "/api/v4/runners", js, "{", badJSON, nil},
		{"verify: body", "POST", "/api/v4/runners/verify", js, "{", badJSON, nil},
		{"job request: body", "POST", "/api/v4/jobs/request", js, "{", badJSON, nil},
		{"job update: body", "PUT", jobPath, js, "{", badJSON, nil},
		// Pagination and filters.
		{"page", "GET", "/api/v4/projects/" + proj + "/jobs?page=x", "", "", grape("page or per_page is invalid"), nil},
		{"per_page", "GET", "/api/v4/runners?per_page=-x", "", "", grape("page or per_page is invalid"), nil},
		{"include_subgroups", "GET", "/api/v4/groups/" + grp + "/projects?include_subgroups=maybe", "", "", grape("include_subgroups is invalid"), nil},
		{"job scope", "GET", "/api/v4/projects/" + proj + "/jobs?scope[]=pending&scope[]=bogus", "", "", grape("scope does not have a valid value"), nil},
		{"runners type", "GET", "/api/v4/runners?type=shared", "", "", grape("type does not have a valid value"), nil},
		{"runners status", "GET", "/api/v4/runners/all?status=active", "", "", grape("status does not have a valid value"), nil},
		{"runners scope", "GET", "/api/v4/runners?scope=specific", "", "", message("Scope contains invalid value"), nil},
		{"all runners scope", "GET", "/api/v4/runners/all?scope=mine", "", "", message("Scope contains invalid value"), nil},
		{"runners paused", "GET", "/api/v4/runners?paused=sometimes", "", "", grape("paused is invalid"), nil},
		{"runner jobs status", "GET", "/api/v4/runners/" + run + "/jobs?status=pending", "", "", grape("status does not have a valid value"), nil},
		{"runner jobs sort", "GET", "/api/v4/runners/" + run + "/jobs?sort=up", "", "", grape("sort does not have a valid value"), nil},
		{"runner jobs order_by", "GET", "/api/v4/runners/" + run + "/jobs?order_by=name", "", "", grape("order_by does not have a valid value"), nil},
		// PUT /runners/:id.
		{"update: nothing", "PUT", "/api/v4/runners/" + run, js, `{}`, atLeastOne, nil},
		{"update: active and paused", "PUT", "/api/v4/runners/" + run, js, `{"active":true,"paused":true}`, grape("active, paused are mutually exclusive"), nil},
		{"update: active", "PUT", "/api/v4/runners/" + run, form, "active=maybe", grape("active is invalid"), nil},
		{"update: run_untagged", "PUT", "/api/v4/runners/" + run, form, "run_untagged=maybe", grape("run_untagged is invalid"), nil},
		{"update: locked", "PUT", "/api/v4/runners/" + run, form, "locked=maybe", grape("locked is invalid"), nil},
		{"update: paused", "PUT", "/api/v4/runners/" + run, form, "paused=maybe", grape("paused is invalid"), nil},
		{"update: maximum_timeout type", "PUT", "/api/v4/runners/" + run, form, "maximum_timeout=1h", grape("maximum_timeout is invalid"), nil},
		{"update: maximum_timeout", "PUT", "/api/v4/runners/" + run, js, `{"maximum_timeout":599}`, field("maximum_timeout", "needs to be at least 10 minutes"), nil},
		{"update: no tags, tagged only", "PUT", "/api/v4/runners/" + run, js, `{"tag_list":[]}`, field("tags_list", "can not be empty when runner is not allowed to pick untagged jobs"), nil},
		// POST /user/runners.
		{"create: run_untagged", "POST", "/api/v4/user/runners", form, "runner_type=instance_type&run_untagged=maybe", grape("run_untagged is invalid"), nil},
		{"create: locked", "POST", "/api/v4/user/runners", form, "runner_type=instance_type&locked=maybe", grape("locked is invalid"), nil},
		{"create: paused", "POST", "/api/v4/user/runners", form, "runner_type=instance_type&paused=maybe", grape("paused is invalid"), nil},
		{"create: active", "POST", "/api/v4/user/runners", form, "runner_type=instance_type&active=maybe", grape("active is invalid"), nil},
		{"create: maximum_timeout type", "POST", "/api/v4/user/runners", form, "runner_type=instance_type&maximum_timeout=x", grape("maximum_timeout is invalid"), nil},
		{"create: runner_type missing", "POST", "/api/v4/user/runners", js, `{"tag_list":["x"]}`, grape("runner_type is missing"), nil},
		{"create: runner_type", "POST", "/api/v4/user/runners", js, `{"runner_type":"shared","tag_list":["x"]}`, grape("runner_type does not have a valid value"), nil},
		{"create: project_id missing", "POST", "/api/v4/user/runners", js, `{"runner_type":"project_type","tag_list":["x"]}`, grape("project_id is missing"), nil},
		{"create: group_id missing", "POST", "/api/v4/user/runners", js, `{"runner_type":"group_type","tag_list":["x"]}`, grape("group_id is missing"), nil},
		{"create: maximum_timeout", "POST", "/api/v4/user/runners", js, `{"runner_type":"instance_type","tag_list":["x"],"maximum_timeout":300}`, field("maximum_timeout", "needs to be at least 10 minutes"), nil},
		{"create: no tags, tagged only", "POST", "/api/v4/user/runners", js, `{"runner_type":"instance_type","run_untagged":false}`, field("tags_list", "can not be empty when runner is not allowed to pick untagged jobs"), nil},
		{"create: project cap", "POST", "/api/v4/user/runners", js, `{"runner_type":"project_type","project_id":` + proj + `,"tag_list":["x"]}`, field("runner_projects.base", "Maximum number of ci registered project runners (1) exceeded"), nil},
		// POST /runners (legacy registration).
		{"register: token missing", "POST", "/api/v4/runners", js, `{"tag_list":["x"]}`, grape("token is missing"), nil},
		{"register: locked", "POST", "/api/v4/runners", form, "token=" + p.RunnersToken + "&locked=maybe", grape("locked is invalid"), nil},
		{"register: maximum_timeout", "POST", "/api/v4/runners", js, `{"token":"` + p.RunnersToken + `","tag_list":["x"],"maximum_timeout":60}`, field("maximum_timeout", "needs to be at least 10 minutes"), nil},
		// Job updates and traces.
		{"job update: state", "PUT", jobPath, js, `{"token":"` + picked.Token + `","state":"exploded"}`, grape("state does not have a valid value"), nil},
		{"trace: no Content-Range", "PATCH", jobPath + "/trace", "text/plain", "log", message("400 Missing header Content-Range"), []string{"JOB-TOKEN", picked.Token}},
		{"trace: bad Content-Range", "PATCH", jobPath + "/trace", "text/plain", "log", message("400 Bad request - invalid Content-Range"), []string{"JOB-TOKEN", picked.Token, "Content-Range", "bytes 0-2"}},
		// POST /projects/:id/pipeline.
		{"pipeline: ref missing", "POST", "/api/v4/projects/" + proj + "/pipeline", js, `{}`, grape("ref is missing"), nil},
		{"pipeline: no CI file", "POST", "/api/v4/projects/" + proj + "/pipeline?ref=nosuchbranch", "", "", field("base", "Missing CI config file"), nil},
		{"pipeline: CI file unparsable", "POST", "/api/v4/projects/" + proj + "/pipeline?ref=broken", "", "", field("base", "yaml: line 1: did not find expected ',' or ']'"), nil},
		{"pipeline: no jobs", "POST", "/api/v4/projects/" + proj + "/pipeline?ref=nojobs", "", "", field("base", "no jobs"), nil},
		{"pipeline: empty CI file", "POST", "/api/v4/projects/" + proj + "/pipeline?ref=noci", "", "", field("base", "config should be a hash"), nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			code, body := do(t, s, c.method, c.path, adminToken, c.ctype, c.body, c.hdr...)
			if code != http.StatusBadRequest || body != c.want {
				t.Errorf("%s %s: %d %s\nwant 400 %s", c.method, c.path, code, body, c.want)
			}
		})
	}
	// The group cap, through client-go like FireRunner.
	rt := "group_type"
	if _, _, err := client(t, s, adminToken).Users.CreateUserRunner(&gitlab.CreateUserRunnerOptions{RunnerType: &rt, GroupID: &g.ID,
		TagList: &[]string{"x"}}); err != nil {
		t.Fatal(err)
	}
	code, body = do(t, s, "POST", "/api/v4/user/runners", adminToken, js, `{"runner_type":"group_type","group_id":`+grp+`,"tag_list":["x"]}`)
	if want := field("runner_namespaces.base", "Maximum number of ci registered group runners (1) exceeded"); code != 400 || body != want {
		t.Errorf("group cap: %d %s, want 400 %s", code, body, want)
	}
	// The model's own type check (the Go API; REST checks first).
	if _, err := s.CreateRunner(RunnerSpec{Type: "shared", Tags: []string{"x"}}); err == nil ||
		err.Error() != "create runner: 400 map[error:runner_type does not have a valid value]" {
		t.Errorf("Go API runner type: %v", err)
	}
	// A body cut short: the trace is read before anything else.
	if code, body := raw(t, s, fmt.Sprintf("PATCH %s/trace HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nJOB-TOKEN: %s\r\nContent-Range: 0-9\r\n\r\nshort",
		jobPath, picked.Token)); code != 400 || body != message("400 Bad request") {
		t.Errorf("trace cut short: %d %s", code, body)
	}
	// A path with a bad escape never reaches the API: net/http refuses it.
	if code, body := raw(t, s, "GET /api/v4/projects/%zz HTTP/1.1\r\nHost: x\r\n\r\n"); code != 400 || body != "400 Bad Request" {
		t.Errorf("bad escape: %d %s", code, body)
	}
	// None of the refused writes changed anything.
	if r, _ := s.Runner(rn.ID); r.Paused || r.RunUntagged || !slices.Equal(r.Tags, []string{"x"}) || r.MaximumTimeout != 0 {
		t.Errorf("runner changed by refused updates: %+v", r)
	}
	if js, _ := s.Job(picked.ID); js.Status != StatusRunning || js.Trace != "" {
		t.Errorf("job changed by refused updates: %s %q", js.Status, js.Trace)
	}
}

// TestRunnersVersusRunnersAll: GET /runners ("List owned runners") lists
// the project and group runners of the user's projects and groups, never
// instance runners, for administrators too (current_user.ci_owned_runners);
// GET /runners/all lists every runner and is for administrators only
// (authenticated_as_admin!). Both need api or read_api.
func TestRunnersVersusRunnersAll(t *testing.T) {
	s := newServer(t, Options{})
	p := addProject(t, s, "acme/app")
	g, _ := s.AddGroup("acme")
	proj, _ := s.CreateRunner(RunnerSpec{ProjectID: p.ID, Description: "project", RunUntagged: true})
	grp, _ := s.CreateRunner(RunnerSpec{Type: "group_type", GroupID: g.ID, Description: "group", RunUntagged: true})
	inst, _ := s.CreateRunner(RunnerSpec{Type: "instance_type", Description: "instance", RunUntagged: true, Paused: true})
	s.AddUserToken("glpat-user", ScopeReadAPI)
	s.AddToken("glpat-manage", ScopeManageRunner)
	ids := func(tok string, all bool, opt gitlab.ListRunnersOptions) ([]int64, int) {
		c := client(t, s, tok)
		list, f := c.Runners.ListRunners, "owned"
		if all {
			list, f = c.Runners.ListAllRunners, "all"
		}
		rs, _, err := list(&opt)
		if err != nil {
			return nil, statusOf(err)
		}
		var out []int64
		for _, r := range rs {
			out = append(out, r.ID)
		}
		_ = f
		return out, 200
	}
	str := func(s string) *string { return &s }
	for _, c := range []struct {
		name string
		tok  string
		all  bool
		opt  gitlab.ListRunnersOptions
		want []int64
		code int
	}{
		{"owned, admin", adminToken, false, gitlab.ListRunnersOptions{}, []int64{proj.ID, grp.ID}, 200},
		{"owned, user", "glpat-user", false, gitlab.ListRunnersOptions{}, []int64{proj.ID, grp.ID}, 200},
		{"owned, instance type asked", adminToken, false, gitlab.ListRunnersOptions{Type: str("instance_type")}, nil, 200},
		{"owned, group type", adminToken, false, gitlab.ListRunnersOptions{Type: str("group_type")}, []int64{grp.ID}, 200},
		{"all, admin", adminToken, true, gitlab.ListRunnersOptions{}, []int64{proj.ID, grp.ID, inst.ID}, 200},
		{"all, user", "glpat-user", true, gitlab.ListRunnersOptions{}, nil, 403},
		{"owned, manage_runner only", "glpat-manage", false, gitlab.ListRunnersOptions{}, nil, 403},
		{"all, manage_runner only", "glpat-manage", true, gitlab.ListRunnersOptions{}, nil, 403},
	} {
		got, code := ids(c.tok, c.all, c.opt)
		if code != c.code || !slices.Equal(got, c.want) {
			t.Errorf("%s: %d %v, want %d %v", c.name, code, got, c.code, c.want)
		}
	}
	// The deprecated scope filter (raw: client-go marks it deprecated).
	for scope, want := range map[string][]int64{"shared": {inst.ID}, "paused": {inst.ID}, "specific": {proj.ID, grp.ID}, "active": {proj.ID, grp.ID}} {
		code, body := do(t, s, "GET", "/api/v4/runners/all?scope="+scope, adminToken, "", "")
		var rs []struct{ ID int64 }
		_ = json.Unmarshal([]byte(body), &rs)
		var got []int64
		for _, r := range rs {
			got = append(got, r.ID)
		}
		if code != 200 || !slices.Equal(got, want) {
			t.Errorf("/runners/all?scope=%s: %d %v, want %v", scope, code, got, want)
		}
	}
	// The 403s say why: not an administrator, or the token's scope.
	if code, body := do(t, s, "GET", "/api/v4/runners/all", "glpat-user", "", ""); code != 403 || body != `{"message":"403 Forbidden"}` {
		t.Errorf("non-admin /runners/all: %d %s", code, body)
	}
	if code, body := do(t, s, "GET", "/api/v4/runners", "glpat-manage", "", ""); code != 403 || !strings.Contains(body, `"error":"insufficient_scope"`) {
		t.Errorf("manage_runner /runners: %d %s", code, body)
	}
}
