package gitlabstandin

import (
	"bytes"
	"crypto/subtle"
	"fmt"
	"net/http"
	"net/http/cgi"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
)

func (s *Server) repoDir(fullPath string) string {
	return filepath.Join(s.dir, "repos", filepath.FromSlash(fullPath)+".git")
}

// gitEnv isolates git from the host's configuration.
func gitEnv() []string {
	return append(os.Environ(),
		"GIT_CONFIG_NOSYSTEM=1", "GIT_CONFIG_GLOBAL=/dev/null", "GIT_TERMINAL_PROMPT=0",
		"GIT_AUTHOR_NAME=Administrator", "GIT_AUTHOR_EMAIL=admin@example.com",
		"GIT_COMMITTER_NAME=Administrator", "GIT_COMMITTER_EMAIL=admin@example.com",
	)
}

func git(dir string, args ...string) (string, error) {
	cmd := exec.Command("git", args...)
	cmd.Dir = dir
	cmd.Env = gitEnv()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("git %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return strings.TrimSpace(out.String()), nil
}

func initRepo(dir, branch string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if _, err := git(dir, "init", "--bare", "--quiet", "--initial-branch="+branch); err != nil {
		return err
	}
	// Let `git http-backend` serve the repo without git-daemon-export-ok.
	_, err := git(dir, "config", "http.receivepack", "false")
	return err
}

// commitFiles commits files on top of branch (or of HEAD when branch is new)
// in the bare repo, via a throwaway work tree and index.
func commitFiles(repo, branch string, files map[string]string, message string) (string, error) {
	work, err := os.MkdirTemp("", "standin-commit-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(work)
	index := filepath.Join(work, ".index")
	tree := filepath.Join(work, "tree")
	run := func(args ...string) (string, error) {
		cmd := exec.Command("git", append([]string{"--git-dir=" + repo, "--work-tree=" + tree}, args...)...)
		cmd.Env = append(gitEnv(), "GIT_INDEX_FILE="+index)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil {
			return "", fmt.Errorf("git %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
		}
		return strings.TrimSpace(out.String()), nil
	}
	parent, _ := revParse(repo, "refs/heads/"+branch)
	if parent == "" {
		parent, _ = revParse(repo, "HEAD")
	}
	if parent != "" {
		if _, err := run("read-tree", parent); err != nil {
			return "", err
		}
	}
	names := make([]string, 0, len(files))
	for name := range files {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		if name == "" || strings.Contains(name, "..") || strings.HasPrefix(name, "/") {
			return "", fmt.Errorf("bad file name %q", name)
		}
		p := filepath.Join(tree, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return "", err
		}
		mode := os.FileMode(0o644)
		if strings.HasSuffix(name, ".sh") {
			mode = 0o755
		}
		if err := os.WriteFile(p, []byte(files[name]), mode); err != nil {
			return "", err
		}
		if _, err := run("add", "--", name); err != nil {
			return "", err
		}
	}
	treeID, err := run("write-tree")
	if err != nil {
		return "", err
	}
	args := []string{"commit-tree", treeID, "-m", message}
	if parent != "" {
		args = append(args, "-p", parent)
	}
	sha, err := run(args...)
	if err != nil {
		return "", err
	}
	if err := updateRef(repo, "refs/heads/"+branch, sha); err != nil {
		return "", err
	}
	return sha, nil
}

func revParse(repo, ref string) (string, error) {
	return git(repo, "rev-parse", "--verify", "--quiet", ref+"^{commit}")
}

func updateRef(repo, ref, sha string) error {
	_, err := git(repo, "update-ref", ref, sha)
	return err
}

// serveGit serves clones and fetches over smart HTTP with `git http-backend`.
// Like GitLab it wants HTTP basic auth: gitlab-ci-token + the token of a job
// running in that project, or any user name + a personal access token with
// read_repository or api. Pushes are refused.
func (s *Server) serveGit(w http.ResponseWriter, r *http.Request) {
	path := r.URL.Path
	i := strings.Index(path, ".git/")
	if i < 0 {
		i = len(path) - len(".git")
	}
	repoPath := strings.TrimPrefix(path[:i], "/")
	if r.URL.Query().Get("service") == "git-receive-pack" || strings.HasSuffix(path, "/git-receive-pack") {
		http.Error(w, "pushes are not supported by the stand-in", http.StatusForbidden)
		return
	}
	s.mu.Lock()
	var p *project
	for _, pr := range s.projects {
		if pr.path == repoPath {
			p = pr
		}
	}
	user, pass, hasAuth := r.BasicAuth()
	allowed := false
	if p != nil && hasAuth {
		if user == "gitlab-ci-token" {
			for _, j := range s.jobs {
				if j.projectID == p.id && (j.status == StatusRunning || j.status == StatusCanceling) &&
					subtle.ConstantTimeCompare([]byte(j.token), []byte(pass)) == 1 {
					allowed = true
				}
			}
		} else if t, ok := s.tokens[pass]; ok && t.has(ScopeAPI, ScopeReadRepository) {
			allowed = true
		}
	}
	s.mu.Unlock()
	if !allowed {
		// GitLab answers 401 for both unknown projects and bad credentials.
		w.Header().Set("WWW-Authenticate", `Basic realm="GitLab"`)
		http.Error(w, "HTTP Basic: Access denied", http.StatusUnauthorized)
		return
	}
	gitPath, err := exec.LookPath("git")
	if err != nil {
		http.Error(w, "git not installed", http.StatusInternalServerError)
		return
	}
	h := &cgi.Handler{
		Path: gitPath,
		Args: []string{"http-backend"},
		Dir:  s.dir,
		Env: []string{
			"GIT_PROJECT_ROOT=" + filepath.Join(s.dir, "repos"),
			"GIT_HTTP_EXPORT_ALL=1",
			"GIT_CONFIG_NOSYSTEM=1",
			"GIT_CONFIG_GLOBAL=/dev/null",
			"REMOTE_USER=" + user,
		},
	}
	h.ServeHTTP(w, r)
}
