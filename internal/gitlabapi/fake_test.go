package gitlabapi

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strconv"
	"sync"
	"testing"
)

// fakeGitLab is an httptest GitLab that follows the documented REST shapes
// of the endpoints FireRunner uses: PRIVATE-TOKEN auth, offset pagination
// headers (X-Page, X-Next-Page, X-Total...), {"message": ...} error bodies.
type fakeGitLab struct {
	t     *testing.T
	srv   *httptest.Server
	token string

	mu       sync.Mutex
	faults   map[string][]fault // key "METHOD /path" -> responses served first
	calls    map[string]int
	bodies   map[string][]map[string]any
	queries  map[string][]url.Values
	jobs     map[int64]map[string]any // job id -> job JSON
	pending  map[int64][]int64        // project -> pending job ids
	projects map[int64][]int64        // group -> project ids
	runners  map[int64]map[string]any
	nextID   int64
}

type fault struct {
	status int
	header map[string]string
	body   string
	block  bool // hang until the client gives up
}

func newFake(t *testing.T) *fakeGitLab {
	f := &fakeGitLab{t: t, token: "glpat" + "-TESTTOKEN0123456789", faults: map[string][]fault{}, calls: map[string]int{},
		bodies: map[string][]map[string]any{}, queries: map[string][]url.Values{}, jobs: map[int64]map[string]any{},
		pending: map[int64][]int64{}, projects: map[int64][]int64{}, runners: map[int64]map[string]any{}, nextID: 9000}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeGitLab) fail(key string, fs ...fault) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.faults[key] = append(f.faults[key], fs...)
}

func (f *fakeGitLab) count(key string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[key]
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

var (
	reJob      = regexp.MustCompile(`^/api/v4/projects/(\d+)/jobs/(\d+)$`)
	reJobs     = regexp.MustCompile(`^/api/v4/projects/(\d+)/jobs$`)
	reGroupPrj = regexp.MustCompile(`^/api/v4/groups/(\d+)/projects$`)
	reRunner   = regexp.MustCompile(`^/api/v4/runners/(\d+)$`)
)

func atoi(s string) int64 { n, _ := strconv.ParseInt(s, 10, 64); return n }

func (f *fakeGitLab) serve(w http.ResponseWriter, r *http.Request) {
	key := r.Method + " " + r.URL.Path
	var body map[string]any
	if b, _ := io.ReadAll(r.Body); len(b) > 0 {
		_ = json.Unmarshal(b, &body)
	}
	f.mu.Lock()
	f.calls[key]++
	f.bodies[key] = append(f.bodies[key], body)
	f.queries[key] = append(f.queries[key], r.URL.Query())
	var ft *fault
	if q := f.faults[key]; len(q) > 0 {
		ft, f.faults[key] = &q[0], q[1:]
	}
	f.mu.Unlock()

	// POST /runners authenticates with the registration token in the body.
	if !(r.Method == http.MethodPost && r.URL.Path == "/api/v4/runners") && r.Header.Get("PRIVATE-TOKEN") != f.token {
		writeJSON(w, http.StatusUnauthorized, map[string]string{"message": "401 Unauthorized"})
		return
	}
	if ft != nil {
		if ft.block {
			<-r.Context().Done()
			return
		}
		for k, v := range ft.header {
			w.Header().Set(k, v)
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(ft.status)
		_, _ = io.WriteString(w, ft.body)
		return
	}

	f.mu.Lock()
	defer f.mu.Unlock()
	switch m := (struct{ a, b []string }{}); {
	case r.Method == http.MethodGet && reJob.MatchString(r.URL.Path):
		m.a = reJob.FindStringSubmatch(r.URL.Path)
		j, ok := f.jobs[atoi(m.a[2])]
		if !ok {
			writeJSON(w, http.StatusNotFound, map[string]string{"message": "404 Not found"})
			return
		}
		writeJSON(w, http.StatusOK, j)
	case r.Method == http.MethodGet && reJobs.MatchString(r.URL.Path):
		m.a = reJobs.FindStringSubmatch(r.URL.Path)
		var items []any
		if sc := r.URL.Query()["scope[]"]; len(sc) == 1 && sc[0] == "pending" {
			for _, id := range f.pending[atoi(m.a[1])] {
				items = append(items, f.jobs[id])
			}
		} else {
			f.t.Errorf("jobs listed without scope[]=pending: %s", r.URL.RawQuery)
		}
		f.paginate(w, r, items)
	case r.Method == http.MethodGet && reGroupPrj.MatchString(r.URL.Path):
		m.a = reGroupPrj.FindStringSubmatch(r.URL.Path)
		var items []any
		for _, id := range f.projects[atoi(m.a[1])] {
			items = append(items, map[string]any{"id": id, "name": fmt.Sprintf("p%d", id), "path_with_namespace": fmt.Sprintf("g/p%d", id)})
		}
		f.paginate(w, r, items)
	case r.Method == http.MethodPost && r.URL.Path == "/api/v4/user/runners":
		f.nextID++
		f.runners[f.nextID] = body
		writeJSON(w, http.StatusCreated, map[string]any{"id": f.nextID, "token": fmt.Sprintf("glrt-t1_runnerSecret%d", f.nextID), "token_expires_at": nil})
	case r.Method == http.MethodPost && r.URL.Path == "/api/v4/runners":
		if body["token"] != "GR1348941legacyRegToken" {
			writeJSON(w, http.StatusForbidden, map[string]string{"message": "403 Forbidden"})
			return
		}
		f.nextID++
		f.runners[f.nextID] = body
		writeJSON(w, http.StatusCreated, map[string]any{"id": f.nextID, "token": fmt.Sprintf("glrt-legacySecret%d", f.nextID), "token_expires_at": nil})
	case r.Method == http.MethodDelete && reRunner.MatchString(r.URL.Path):
		id := atoi(reRunner.FindStringSubmatch(r.URL.Path)[1])
		if _, ok := f.runners[id]; !ok {
			writeJSON(w, http.StatusNotFound, map[string]string{"message": "404 Runner Not Found"})
			return
		}
		delete(f.runners, id)
		w.WriteHeader(http.StatusNoContent)
	case r.Method == http.MethodGet && (r.URL.Path == "/api/v4/runners" || r.URL.Path == "/api/v4/runners/all"):
		var items []any
		for id := int64(9001); id <= f.nextID; id++ {
			if rb, ok := f.runners[id]; ok {
				items = append(items, map[string]any{"id": id, "description": rb["description"], "active": true, "paused": false,
					"is_shared": false, "runner_type": "project_type", "name": "gitlab-runner", "online": false, "status": "never_contacted"})
			}
		}
		f.paginate(w, r, items)
	default:
		writeJSON(w, http.StatusNotFound, map[string]string{"message": "404 Not found"})
	}
}

// paginate applies GitLab's offset pagination and headers.
func (f *fakeGitLab) paginate(w http.ResponseWriter, r *http.Request, items []any) {
	page, _ := strconv.Atoi(r.URL.Query().Get("page"))
	per, _ := strconv.Atoi(r.URL.Query().Get("per_page"))
	if page < 1 {
		page = 1
	}
	if per < 1 {
		per = 20
	}
	if per > 100 {
		per = 100
	}
	total := len(items)
	pages := max((total+per-1)/per, 1)
	lo, hi := min((page-1)*per, total), min(page*per, total)
	h := w.Header()
	h.Set("X-Page", strconv.Itoa(page))
	h.Set("X-Per-Page", strconv.Itoa(per))
	h.Set("X-Total", strconv.Itoa(total))
	h.Set("X-Total-Pages", strconv.Itoa(pages))
	if page < pages {
		h.Set("X-Next-Page", strconv.Itoa(page+1))
	} else {
		h.Set("X-Next-Page", "")
	}
	if page > 1 {
		h.Set("X-Prev-Page", strconv.Itoa(page-1))
	}
	out := items[lo:hi]
	if out == nil {
		out = []any{}
	}
	writeJSON(w, http.StatusOK, out)
}

func jobJSON(id, project int64, status string, tags ...string) map[string]any {
	if tags == nil {
		tags = []string{}
	}
	return map[string]any{
		"id": id, "name": "test", "ref": "main", "stage": "test", "status": status, "tag": false,
		"tag_list": tags, "created_at": "2025-05-21T16:06:01.000Z", "started_at": nil, "finished_at": nil,
		"allow_failure": false, "web_url": fmt.Sprintf("https://gitlab.example.com/g/p/-/jobs/%d", id),
		"pipeline": map[string]any{"id": 2366, "project_id": project, "ref": "main", "sha": "2293ada6", "status": "pending"},
		"project":  map[string]any{"ci_job_token_scope_enabled": false},
		"runner":   nil, "user": map[string]any{"id": 1, "username": "root"},
	}
}
