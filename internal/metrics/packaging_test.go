package metrics

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/testenv"
	dto "github.com/prometheus/client_model/go"
	"go.yaml.in/yaml/v3"
)

// The operator packaging checked here (docs/operations.md, "Dashboards and
// alerts").
const (
	dashboardFile  = "../../packaging/grafana/firerunner.json"
	rulesDir       = "../../packaging/prometheus"
	rulesFile      = "firerunner-alerts.yml"
	rulesTestsFile = "firerunner-alerts.test.yml"
)

// covered are the metrics the dashboard must show and the alerts must use
// (issue 12: start latency, queue, capacity, runner-limit errors, webhook
// rejects, reconcile corrections).
var covered = []string{
	"firerunner_job_stage_duration_seconds_bucket",
	"firerunner_queue_depth",
	"firerunner_vcpus_in_use", "firerunner_vcpus_capacity",
	"firerunner_memory_mib_in_use", "firerunner_memory_mib_capacity",
	"firerunner_runner_limit_errors_total",
	"firerunner_webhook_rejects_total",
	"firerunner_reconcile_actions_total",
}

// registeredSeries is every series name FireRunner's registry exports:
// registeredFamilies with histograms and summaries expanded into their
// _bucket/_sum/_count series.
func registeredSeries(t *testing.T) map[string]bool {
	t.Helper()
	names := map[string]bool{}
	for _, mf := range registeredFamilies(t) {
		n := mf.GetName()
		switch mf.GetType() {
		case dto.MetricType_HISTOGRAM, dto.MetricType_GAUGE_HISTOGRAM:
			names[n+"_bucket"], names[n+"_sum"], names[n+"_count"] = true, true, true
		case dto.MetricType_SUMMARY:
			names[n], names[n+"_sum"], names[n+"_count"] = true, true, true
		default:
			names[n] = true
		}
	}
	// The gathering itself must be complete, or the checks below prove
	// nothing.
	for _, want := range append([]string{"firerunner_jobs", "firerunner_runners", "firerunner_tag_rejects_total", "go_goroutines"}, covered...) {
		if !names[want] {
			t.Fatalf("registry lacks %s; gathered: %v", want, sortedKeys(names))
		}
	}
	return names
}

// registeredFamilies is every metric family FireRunner's registry exports:
// it builds New's collectors, creates one child of every labelled vector (a
// vector without children exports nothing) and gathers.
func registeredFamilies(t *testing.T) []*dto.MetricFamily {
	t.Helper()
	m := New(func() Snapshot {
		return Snapshot{JobsByState: map[string]int{"queued": 1}, VMsByState: map[string]int{"stopping": 1}, PoolIdle: map[string]int{"firecracker-1cpu-1gb": 1}, PoolPolling: map[string]int{"firecracker-1cpu-1gb": 1}, RunnersByTags: map[string]int{"firecracker-1cpu-1gb": 1}}
	})
	v := reflect.ValueOf(m).Elem()
	for i := 0; i < v.NumField(); i++ {
		f := v.Field(i)
		get := f.MethodByName("GetMetricWithLabelValues")
		if !get.IsValid() {
			continue
		}
		made := false
		for n := 0; n <= 10 && !made; n++ { // the first label count the vector accepts
			args := make([]reflect.Value, n)
			for j := range args {
				args[j] = reflect.ValueOf("x")
			}
			out := get.Call(args)
			made = out[1].IsNil()
		}
		if !made {
			t.Fatalf("cannot create a child of Metrics.%s", v.Type().Field(i).Name)
		}
	}
	fams, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	return fams
}

func sortedKeys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// stageNames are the stage label values FireRunner observes: every stage of
// a job's and a VM's timeline whose every timestamp is set.
func stageNames(t *testing.T) map[string]bool {
	t.Helper()
	var tl job.Timeline
	var vt job.VMTimeline
	at := time.Unix(1_700_000_000, 0)
	for _, x := range []any{&tl, &vt} {
		v := reflect.ValueOf(x).Elem()
		for i := 0; i < v.NumField(); i++ {
			if f := v.Field(i); f.Type() == reflect.TypeOf(time.Time{}) && f.CanSet() {
				at = at.Add(time.Second)
				f.Set(reflect.ValueOf(at))
			}
		}
	}
	names := map[string]bool{}
	for _, s := range append(tl.Stages(), vt.Stages()...) {
		names[s.Name] = true
	}
	if !names["webhook_to_vm_start_request"] || !names["total"] {
		t.Fatalf("job stages %v lack webhook_to_vm_start_request or total", sortedKeys(names))
	}
	return names
}

var (
	promqlString   = regexp.MustCompile("\"(?:[^\"\\\\]|\\\\.)*\"|'(?:[^'\\\\]|\\\\.)*'|`[^`]*`")
	promqlVariable = regexp.MustCompile(`\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*`)
	promqlRange    = regexp.MustCompile(`\[[^\]]*\]`)
	promqlMatchers = regexp.MustCompile(`\{[^}]*\}`)
	promqlGrouping = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	promqlToken    = regexp.MustCompile(`[A-Za-z_:][A-Za-z0-9_:]*|[0-9][0-9A-Za-z_.+]*|\S`)
	labelValues    = regexp.MustCompile(`^label_values\((.+),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)$`)
	promqlStage    = regexp.MustCompile(`\bstage\s*(=|!=|=~|!~)\s*"([^"]*)"`)
	promqlKeywords = map[string]bool{"and": true, "or": true, "unless": true, "bool": true, "offset": true,
		"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true,
		"inf": true, "nan": true, "Inf": true, "NaN": true, "atan2": true}
)

// metricNames returns the metric names a PromQL expression selects (with
// Grafana variables such as $instance and $__rate_interval allowed).
// Strings, label matchers, ranges, grouping label lists, numbers, keywords
// and function names are not metric names.
func metricNames(expr string) []string {
	s := promqlString.ReplaceAllString(expr, `""`)
	s = promqlVariable.ReplaceAllString(s, "1m")
	s = promqlRange.ReplaceAllString(s, " ")
	s = promqlMatchers.ReplaceAllString(s, " ")
	s = promqlGrouping.ReplaceAllString(s, " ")
	toks := promqlToken.FindAllString(s, -1)
	var out []string
	for i, tok := range toks {
		if c := tok[0]; !(c == '_' || c == ':' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z') || promqlKeywords[tok] {
			continue
		}
		if i+1 < len(toks) && toks[i+1] == "(" { // a function or aggregation
			continue
		}
		out = append(out, tok)
	}
	return out
}

func TestMetricNames(t *testing.T) {
	for expr, want := range map[string]string{
		`up{job="firerunner"} == 0`: "up",
		`histogram_quantile(0.95, sum by (instance, le) (rate(firerunner_job_stage_duration_seconds_bucket{stage="x",instance=~"$instance"}[$__rate_interval]))) > 300`: "firerunner_job_stage_duration_seconds_bucket",
		`sum(a_total) / sum without(le) (b) > 1e3 and on() c offset 5m`:     "a_total b c",
		`label_replace(x, "dst", "$1", "src", "(.*)") or vector(0)`:         "x",
		`min_over_time(firerunner_queue_depth[30m:1m]) > 0 unless d{l='}'}`: "firerunner_queue_depth d",
		`sum by (state) (firerunner_jobs{state!~"done|failed"}) * 1048576`:  "firerunner_jobs",
	} {
		if got := strings.Join(metricNames(expr), " "); got != want {
			t.Errorf("metricNames(%s) = %q, want %q", expr, got, want)
		}
	}
}

// checkExpr reports names in expr that FireRunner does not export (allowed
// adds others, such as Prometheus's own up) and unknown stage labels, and
// records what it saw in used.
func checkExpr(t *testing.T, where, expr string, registered, allowed, stages, used map[string]bool) {
	t.Helper()
	names := metricNames(expr)
	if len(names) == 0 {
		t.Errorf("%s: no metric in %q", where, expr)
	}
	for _, n := range names {
		used[n] = true
		if !registered[n] && !allowed[n] {
			t.Errorf("%s: %s is not a metric FireRunner exports (expr %q)", where, n, expr)
		}
	}
	for _, m := range promqlStage.FindAllStringSubmatch(expr, -1) {
		if m[1] == "=" && !stages[m[2]] {
			t.Errorf("%s: stage %q is not a job stage (stages: %v)", where, m[2], sortedKeys(stages))
		}
	}
}

// TestDashboard: the Grafana dashboard is valid JSON with a uid and title,
// every panel is well formed, and every query selects only metrics that
// FireRunner's registry exports.
func TestDashboard(t *testing.T) {
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	type target struct {
		Expr  string `json:"expr"`
		RefID string `json:"refId"`
	}
	type panel struct {
		ID      int               `json:"id"`
		Type    string            `json:"type"`
		Title   string            `json:"title"`
		GridPos map[string]int    `json:"gridPos"`
		Targets []target          `json:"targets"`
		Panels  []json.RawMessage `json:"panels"`
	}
	var d struct {
		UID           string            `json:"uid"`
		Title         string            `json:"title"`
		SchemaVersion int               `json:"schemaVersion"`
		Panels        []json.RawMessage `json:"panels"`
		Templating    struct {
			List []struct {
				Name       string          `json:"name"`
				Type       string          `json:"type"`
				Query      json.RawMessage `json:"query"`
				Definition string          `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s is not valid JSON: %v", dashboardFile, err)
	}
	if d.UID == "" || d.Title == "" || d.SchemaVersion == 0 {
		t.Fatalf("dashboard uid %q, title %q, schemaVersion %d: all must be set", d.UID, d.Title, d.SchemaVersion)
	}
	registered, stages := registeredSeries(t), stageNames(t)
	used := map[string]bool{}
	ids := map[int]bool{}
	queries := 0
	var walk func(raw []json.RawMessage)
	walk = func(raw []json.RawMessage) {
		for _, r := range raw {
			var p panel
			if err := json.Unmarshal(r, &p); err != nil {
				t.Fatalf("panel %s: %v", r, err)
			}
			where := "panel " + p.Title
			if p.ID == 0 || ids[p.ID] {
				t.Errorf("%s: id %d is missing or used twice", where, p.ID)
			}
			ids[p.ID] = true
			if p.Title == "" || p.Type == "" || p.GridPos["w"] <= 0 || p.GridPos["h"] <= 0 {
				t.Errorf("panel %d: needs a title, type and gridPos (got %q, %q, %v)", p.ID, p.Title, p.Type, p.GridPos)
			}
			if p.Type != "row" && len(p.Targets) == 0 {
				t.Errorf("%s: no queries", where)
			}
			refs := map[string]bool{}
			for _, tg := range p.Targets {
				if tg.RefID == "" || refs[tg.RefID] {
					t.Errorf("%s: refId %q is missing or used twice", where, tg.RefID)
				}
				refs[tg.RefID] = true
				checkExpr(t, where, tg.Expr, registered, nil, stages, used)
				queries++
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		// Grafana's label_values(SELECTOR, LABEL) is not PromQL: check SELECTOR.
		m := labelValues.FindStringSubmatch(v.Definition)
		if m == nil {
			t.Errorf("variable %s: %q is not label_values(selector, label)", v.Name, v.Definition)
			continue
		}
		checkExpr(t, "variable "+v.Name, m[1], registered, nil, stages, used)
	}
	for _, n := range covered {
		if !used[n] {
			t.Errorf("the dashboard does not show %s", n)
		}
	}
	t.Logf("%d panels, %d queries, metrics used: %v", len(ids), queries, sortedKeys(used))
}

type ruleFile struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Record      string            `yaml:"record"`
			Expr        string            `yaml:"expr"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

// TestAlertRules: promtool accepts the rules and their unit tests pass; every
// alert has a severity, a summary and a unit test in which it fires; every
// expression selects only metrics FireRunner exports (or Prometheus's up).
func TestAlertRules(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(rulesDir, rulesFile))
	if err != nil {
		t.Fatal(err)
	}
	var rf ruleFile
	if err := yaml.Unmarshal(b, &rf); err != nil {
		t.Fatalf("%s: %v", rulesFile, err)
	}
	registered, stages := registeredSeries(t), stageNames(t)
	used := map[string]bool{}
	alerts := map[string]bool{}
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				continue
			}
			alerts[r.Alert] = true
			if r.Labels["severity"] != "warning" && r.Labels["severity"] != "critical" {
				t.Errorf("alert %s: severity %q, want warning or critical", r.Alert, r.Labels["severity"])
			}
			if r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("alert %s: needs a summary and a description", r.Alert)
			}
			checkExpr(t, "alert "+r.Alert, r.Expr, registered, map[string]bool{"up": true}, stages, used)
		}
	}
	for _, n := range covered {
		if n != "firerunner_vcpus_capacity" && n != "firerunner_memory_mib_capacity" && !used[n] {
			t.Errorf("no alert uses %s", n)
		}
	}

	// Every alert fires in at least one unit test.
	tb, err := os.ReadFile(filepath.Join(rulesDir, rulesTestsFile))
	if err != nil {
		t.Fatal(err)
	}
	var tests struct {
		RuleFiles []string `yaml:"rule_files"`
		Tests     []struct {
			AlertRuleTest []struct {
				Alertname string           `yaml:"alertname"`
				ExpAlerts []map[string]any `yaml:"exp_alerts"`
			} `yaml:"alert_rule_test"`
		} `yaml:"tests"`
	}
	if err := yaml.Unmarshal(tb, &tests); err != nil {
		t.Fatalf("%s: %v", rulesTestsFile, err)
	}
	if len(tests.RuleFiles) != 1 || tests.RuleFiles[0] != rulesFile {
		t.Errorf("%s tests %v, want [%s]", rulesTestsFile, tests.RuleFiles, rulesFile)
	}
	fires := map[string]bool{}
	for _, tc := range tests.Tests {
		for _, a := range tc.AlertRuleTest {
			if !alerts[a.Alertname] {
				t.Errorf("%s tests unknown alert %s", rulesTestsFile, a.Alertname)
			}
			if len(a.ExpAlerts) > 0 {
				fires[a.Alertname] = true
			}
		}
	}
	for a := range alerts {
		if !fires[a] {
			t.Errorf("alert %s never fires in %s", a, rulesTestsFile)
		}
	}

	promtool := testenv.Promtool(t)
	for _, args := range [][]string{{"check", "rules", rulesFile}, {"test", "rules", rulesTestsFile}} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = rulesDir
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "SUCCESS") {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
			continue
		}
		t.Logf("promtool %s:\n%s", strings.Join(args, " "), strings.TrimSpace(string(out)))
	}
}
