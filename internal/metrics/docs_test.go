package metrics

import (
	"os"
	"regexp"
	"sort"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
)

// metricsPage lists every metric FireRunner registers.
const metricsPage = "../../docs/metrics.md"

// backticked finds `code` spans: the metric names in a row's first cell,
// the label names in its labels cell.
var backticked = regexp.MustCompile("`([^`]+)`")

var docTypes = map[dto.MetricType]string{
	dto.MetricType_COUNTER:   "counter",
	dto.MetricType_GAUGE:     "gauge",
	dto.MetricType_HISTOGRAM: "histogram",
	dto.MetricType_SUMMARY:   "summary",
}

type docRow struct {
	typ, labels string
}

// TestPageDocumentsEveryMetric: docs/metrics.md has a row for every
// firerunner_ metric the registry exports, with its type and every label
// name, and no row for a metric that does not exist; the Go and process
// collectors' families are named as go_* and process_*.
func TestPageDocumentsEveryMetric(t *testing.T) {
	b, err := os.ReadFile(metricsPage)
	if err != nil {
		t.Fatal(err)
	}
	page := string(b)
	rows := map[string]docRow{}
	// A table row: | `name`[, `name`] | type | labels | meaning |
	for _, l := range strings.Split(page, "\n") {
		if !strings.HasPrefix(l, "| `firerunner_") {
			continue
		}
		cells := strings.Split(strings.Trim(l, "| "), " | ")
		if len(cells) != 4 {
			t.Errorf("%s: row %q does not have the 4 cells metric, type, labels, meaning", metricsPage, l)
			continue
		}
		for _, n := range backticked.FindAllStringSubmatch(cells[0], -1) {
			if _, dup := rows[n[1]]; dup {
				t.Errorf("%s: two rows for %s", metricsPage, n[1])
			}
			rows[n[1]] = docRow{typ: cells[1], labels: cells[2]}
		}
	}
	fams := registeredFamilies(t)
	seen := map[string]bool{}
	for _, mf := range fams {
		name := mf.GetName()
		seen[name] = true
		switch {
		case strings.HasPrefix(name, "go_"):
			if !strings.Contains(page, "`go_*`") {
				t.Errorf("%s does not mention the Go collector's `go_*` metrics (%s)", metricsPage, name)
			}
			continue
		case strings.HasPrefix(name, "process_"):
			if !strings.Contains(page, "`process_*`") {
				t.Errorf("%s does not mention the process collector's `process_*` metrics (%s)", metricsPage, name)
			}
			continue
		case !strings.HasPrefix(name, "firerunner_"):
			t.Errorf("metric %s is neither FireRunner's nor a standard collector's: document it and teach this test", name)
			continue
		}
		row, ok := rows[name]
		if !ok {
			t.Errorf("%s: no row for %s (%s)", metricsPage, name, mf.GetHelp())
			continue
		}
		if want := docTypes[mf.GetType()]; row.typ != want {
			t.Errorf("%s: %s is a %s, the page says %s", metricsPage, name, want, row.typ)
		}
		// Every child made by registeredFamilies carries all the labels.
		if len(mf.GetMetric()) == 0 {
			t.Fatalf("%s gathered without a series: its labels cannot be checked", name)
		}
		documented := map[string]bool{}
		for _, l := range backticked.FindAllStringSubmatch(row.labels, -1) {
			documented[l[1]] = true
		}
		for _, lp := range mf.GetMetric()[0].GetLabel() {
			if !documented[lp.GetName()] {
				t.Errorf("%s: the row of %s does not name its label `%s` (labels cell %q)", metricsPage, name, lp.GetName(), row.labels)
			}
		}
	}
	var stale []string
	for n := range rows {
		if !seen[n] {
			stale = append(stale, n)
		}
	}
	sort.Strings(stale)
	for _, n := range stale {
		t.Errorf("%s: %s is not a metric FireRunner registers", metricsPage, n)
	}
	if len(rows) < 15 { // the parsing itself must work, or the checks above prove little
		t.Fatalf("only %d metric rows parsed from %s", len(rows), metricsPage)
	}
}
