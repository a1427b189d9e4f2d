package config

import (
	"bytes"
	"os"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

// The documents that describe every configuration field.
const (
	exampleFile = "../../config.example.yaml"
	configPage  = "../../docs/configuration.md"
)

// field is one leaf of the configuration: its dotted YAML path and its
// default as Default() renders it.
type field struct {
	path, def string
}

// fields walks Config's yaml tags recursively and renders each leaf of
// Default(): the list the documentation is held to.
func fields(t *testing.T) []field {
	t.Helper()
	var out []field
	var walk func(prefix string, v reflect.Value)
	walk = func(prefix string, v reflect.Value) {
		for i := 0; i < v.NumField(); i++ {
			sf := v.Type().Field(i)
			name, _, _ := strings.Cut(sf.Tag.Get("yaml"), ",")
			if name == "" || name == "-" {
				t.Fatalf("field %s%s has no yaml name: the docs test cannot hold it to the documentation", prefix, sf.Name)
			}
			f := v.Field(i)
			if f.Kind() == reflect.Struct && f.Type() != reflect.TypeOf(time.Duration(0)) {
				walk(prefix+name+".", f)
				continue
			}
			out = append(out, field{prefix + name, render(t, prefix+name, f)})
		}
	}
	walk("", reflect.ValueOf(Default()))
	if len(out) < 50 { // the walk itself must work, or the checks below prove nothing
		t.Fatalf("only %d config fields found: %v", len(out), out)
	}
	return out
}

// render writes a default the way the documentation shows it: durations in
// Go syntax (1h0m0s), "" for an empty string, [] for an empty list.
func render(t *testing.T, path string, v reflect.Value) string {
	if d, ok := v.Interface().(time.Duration); ok {
		return d.String()
	}
	switch v.Kind() {
	case reflect.String:
		if v.String() == "" {
			return `""`
		}
		return v.String()
	case reflect.Bool:
		return strconv.FormatBool(v.Bool())
	case reflect.Int, reflect.Int64, reflect.Int32:
		return strconv.FormatInt(v.Int(), 10)
	case reflect.Slice:
		var items []string
		for i := 0; i < v.Len(); i++ {
			items = append(items, render(t, path, v.Index(i)))
		}
		return "[" + strings.Join(items, ", ") + "]"
	}
	t.Fatalf("%s: cannot render a %s default; teach render", path, v.Type())
	return ""
}

// exampleValues maps each leaf path of a YAML document to its value,
// rendered like render does.
func exampleValues(t *testing.T, b []byte) map[string]string {
	t.Helper()
	var doc yaml.Node
	if err := yaml.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	var walk func(prefix string, n *yaml.Node)
	walk = func(prefix string, n *yaml.Node) {
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i].Value, n.Content[i+1]
			switch v.Kind {
			case yaml.MappingNode:
				walk(prefix+k+".", v)
			case yaml.SequenceNode:
				var items []string
				for _, it := range v.Content {
					items = append(items, it.Value)
				}
				out[prefix+k] = "[" + strings.Join(items, ", ") + "]"
			default:
				if v.Value == "" {
					out[prefix+k] = `""`
				} else {
					out[prefix+k] = v.Value
				}
			}
		}
	}
	if len(doc.Content) != 1 || doc.Content[0].Kind != yaml.MappingNode {
		t.Fatalf("%s is not a YAML mapping", exampleFile)
	}
	walk("", doc.Content[0])
	return out
}

// TestExampleDocumentsEveryField: config.example.yaml spells out every
// field of Config with its default, and nothing else. (Decoding alone
// cannot tell: a field left out of the file decodes to its zero value.)
func TestExampleDocumentsEveryField(t *testing.T) {
	b, err := os.ReadFile(exampleFile)
	if err != nil {
		t.Fatal(err)
	}
	got := exampleValues(t, b)
	for _, f := range fields(t) {
		v, ok := got[f.path]
		switch {
		case !ok:
			t.Errorf("%s: %s is missing (default %s)", exampleFile, f.path, f.def)
		case v != f.def:
			t.Errorf("%s: %s is %s, but its default is %s", exampleFile, f.path, v, f.def)
		}
		delete(got, f.path)
	}
	for p := range got {
		t.Errorf("%s: %s is not a configuration field", exampleFile, p)
	}
}

// pageRow is a row of the configuration page's table: "| `path` | `default` ... | meaning |".
var pageRow = regexp.MustCompile("^\\| `([a-z_.]+)` \\| ([^|]*) \\|")

// TestPageDocumentsEveryField: docs/configuration.md has a row for every
// field of Config whose default cell shows the default as Default()
// renders it, and no row for a field that does not exist.
func TestPageDocumentsEveryField(t *testing.T) {
	b, err := os.ReadFile(configPage)
	if err != nil {
		t.Fatal(err)
	}
	rows := map[string]string{}
	for _, l := range bytes.Split(b, []byte("\n")) {
		if m := pageRow.FindSubmatch(l); m != nil {
			if _, dup := rows[string(m[1])]; dup {
				t.Errorf("%s: two rows for %s", configPage, m[1])
			}
			rows[string(m[1])] = string(m[2])
		}
	}
	for _, f := range fields(t) {
		cell, ok := rows[f.path]
		switch {
		case !ok:
			t.Errorf("%s: no row for %s (default `%s`)", configPage, f.path, f.def)
		case !strings.Contains(cell, "`"+f.def+"`"):
			t.Errorf("%s: the row of %s shows the default %q; Default() renders it as `%s`", configPage, f.path, strings.TrimSpace(cell), f.def)
		}
		delete(rows, f.path)
	}
	var extra []string
	for p := range rows {
		extra = append(extra, p)
	}
	sort.Strings(extra)
	for _, p := range extra {
		t.Errorf("%s: row %s is not a configuration field", configPage, p)
	}
}
