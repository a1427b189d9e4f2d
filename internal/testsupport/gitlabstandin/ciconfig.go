package gitlabstandin

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// ParseCIConfig turns a small subset of .gitlab-ci.yml into job specs:
// stages, global and job variables, default/global before_script,
// after_script, image and services, and per job stage, script,
// before_script, after_script, tags, variables, timeout, allow_failure,
// image and services (a name, or a hash of name, alias, entrypoint, command),
// artifacts (paths) and dependencies. Hidden jobs (".name") and
// other keywords are ignored; include, extends, rules and needs are not supported.
func ParseCIConfig(src []byte) ([]JobSpec, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(src, &doc); err != nil {
		return nil, err
	}
	if len(doc.Content) == 0 || doc.Content[0].Kind != yaml.MappingNode {
		return nil, fmt.Errorf("config should be a hash")
	}
	type jobDef struct {
		Stage        string            `yaml:"stage"`
		Script       stringList        `yaml:"script"`
		BeforeScript *stringList       `yaml:"before_script"`
		AfterScript  *stringList       `yaml:"after_script"`
		Tags         []string          `yaml:"tags"`
		Variables    map[string]string `yaml:"variables"`
		Timeout      string            `yaml:"timeout"`
		AllowFailure bool              `yaml:"allow_failure"`
		Image        *imageDef         `yaml:"image"`
		Services     *[]imageDef       `yaml:"services"`
		Artifacts    *struct {
			Paths []string `yaml:"paths"`
		} `yaml:"artifacts"`
		Dependencies *[]string `yaml:"dependencies"`
	}
	var (
		stages             = []string{".pre", "build", "test", "deploy", ".post"}
		globalVars         map[string]string
		before, after      stringList
		names              []string
		defs               = map[string]jobDef{}
		reserved           = []string{"image", "services", "workflow", "include", "cache", "default", "stages", "variables", "before_script", "after_script", "spec"}
		root               = doc.Content[0]
		defaultBefore, dAf *stringList
		image              *imageDef
		services           []imageDef
	)
	for i := 0; i+1 < len(root.Content); i += 2 {
		key, val := root.Content[i].Value, root.Content[i+1]
		var err error
		switch key {
		case "stages":
			var st []string
			err = val.Decode(&st)
			stages = append(append([]string{".pre"}, st...), ".post")
		case "variables":
			err = val.Decode(&globalVars)
		case "before_script":
			err = val.Decode(&before)
		case "after_script":
			err = val.Decode(&after)
		case "image":
			err = val.Decode(&image)
		case "services":
			err = val.Decode(&services)
		case "default":
			var d struct {
				BeforeScript *stringList `yaml:"before_script"`
				AfterScript  *stringList `yaml:"after_script"`
				Image        *imageDef   `yaml:"image"`
				Services     *[]imageDef `yaml:"services"`
			}
			err = val.Decode(&d)
			defaultBefore, dAf = d.BeforeScript, d.AfterScript
			if d.Image != nil {
				image = d.Image
			}
			if d.Services != nil {
				services = *d.Services
			}
		default:
			if strings.HasPrefix(key, ".") || slices.Contains(reserved, key) {
				continue
			}
			var d jobDef
			if err = val.Decode(&d); err == nil {
				names = append(names, key)
				defs[key] = d
			}
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", key, err)
		}
	}
	if defaultBefore != nil {
		before = *defaultBefore
	}
	if dAf != nil {
		after = *dAf
	}
	var jobs []JobSpec
	for _, stage := range stages {
		for _, name := range names {
			d := defs[name]
			if d.Stage == "" {
				d.Stage = "test"
			}
			if !slices.Contains(stages, d.Stage) {
				return nil, fmt.Errorf("%s job: chosen stage %s does not exist", name, d.Stage)
			}
			if d.Stage != stage {
				continue
			}
			if len(d.Script) == 0 {
				return nil, fmt.Errorf("jobs %s config should implement the script: or a trigger: keyword", name)
			}
			js := JobSpec{Name: name, Stage: d.Stage, Tags: d.Tags, AllowFailure: d.AllowFailure}
			b, a := before, after
			if d.BeforeScript != nil {
				b = *d.BeforeScript
			}
			if d.AfterScript != nil {
				a = *d.AfterScript
			}
			// GitLab sends before_script and script as one "script" step.
			js.Script = append(append([]string(nil), b...), d.Script...)
			js.AfterScript = a
			if im := d.Image; im != nil || image != nil {
				if im == nil {
					im = image
				}
				spec := ImageSpec(*im)
				js.Image = &spec
			}
			svcs := services
			if d.Services != nil {
				svcs = *d.Services
			}
			for _, s := range svcs {
				js.Services = append(js.Services, ImageSpec(s))
			}
			for _, vars := range []map[string]string{globalVars, d.Variables} {
				keys := make([]string, 0, len(vars))
				for k := range vars {
					keys = append(keys, k)
				}
				slices.Sort(keys)
				for _, k := range keys {
					js.Variables = append(js.Variables, Variable{Key: k, Value: vars[k]})
				}
			}
			if d.Artifacts != nil {
				js.Artifacts = d.Artifacts.Paths
			}
			if d.Dependencies != nil {
				js.Dependencies = append([]string{}, *d.Dependencies...)
			}
			if d.Timeout != "" {
				t, err := time.ParseDuration(strings.ReplaceAll(d.Timeout, " ", ""))
				if err != nil {
					return nil, fmt.Errorf("%s job: timeout %q: %w", name, d.Timeout, err)
				}
				js.Timeout = t
			}
			jobs = append(jobs, js)
		}
	}
	if len(jobs) == 0 {
		return nil, fmt.Errorf("no jobs")
	}
	return jobs, nil
}

// imageDef decodes an image or service entry: a name or a hash.
type imageDef ImageSpec

func (d *imageDef) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.ScalarNode {
		*d = imageDef{Name: n.Value}
		return nil
	}
	var s ImageSpec
	if err := n.Decode(&s); err != nil {
		return err
	}
	if s.Name == "" {
		return fmt.Errorf("image config should contain a name")
	}
	*d = imageDef(s)
	return nil
}

// stringList decodes a string or a list of strings.
type stringList []string

func (l *stringList) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.ScalarNode {
		*l = []string{n.Value}
		return nil
	}
	var s []string
	if err := n.Decode(&s); err != nil {
		return err
	}
	*l = s
	return nil
}

// createPipeline is POST /projects/:id/pipeline?ref=...: the jobs come from
// the .gitlab-ci.yml at that ref (see ParseCIConfig).
func (s *Server) createPipeline(w http.ResponseWriter, r *http.Request, pref string) {
	if !s.auth(w, r, ScopeAPI) {
		return
	}
	q, err := readParams(r)
	if err != nil {
		msg(w, 400, "400 Bad request - "+err.Error())
		return
	}
	ref := q.str("ref")
	if ref == "" {
		writeJSON(w, 400, map[string]any{"error": "ref is missing"})
		return
	}
	s.mu.Lock()
	p := s.findProjectLocked(pref)
	s.mu.Unlock()
	if p == nil {
		msg(w, 404, "404 Project Not Found")
		return
	}
	src, err := git(p.repoDir, "show", "refs/heads/"+ref+":.gitlab-ci.yml")
	if err != nil {
		writeJSON(w, 400, map[string]any{"message": map[string][]string{"base": {"Missing CI config file"}}})
		return
	}
	jobs, err := ParseCIConfig([]byte(src))
	if err != nil {
		writeJSON(w, 400, map[string]any{"message": map[string][]string{"base": {err.Error()}}})
		return
	}
	pl, err := s.CreatePipelineSpec(p.id, PipelineSpec{Ref: ref, Jobs: jobs})
	if err != nil { // ParseCIConfig checked the jobs: the stand-in's own failure
		msg(w, http.StatusInternalServerError, "500 Internal Server Error")
		return
	}
	writeJSON(w, http.StatusCreated, map[string]any{
		"id": pl.ID, "iid": pl.ID, "project_id": p.id, "sha": pl.SHA, "ref": pl.Ref, "status": "pending",
		"source": "api", "web_url": fmt.Sprintf("%s/%s/-/pipelines/%d", s.baseURL, p.path, pl.ID),
	})
}
