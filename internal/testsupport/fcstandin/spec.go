// Package fcstandin is a Firecracker API stand-in for contract tests: it serves
// the API on a Unix socket and checks every request against official swagger specs.
package fcstandin

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/go-openapi/loads"
	"github.com/go-openapi/spec"
	"github.com/go-openapi/strfmt"
	"github.com/go-openapi/validate"
)

// Spec is one loaded Firecracker swagger document, indexed by operation.
type Spec struct {
	Path    string
	Version string // info.version, e.g. "1.4.1"
	ops     []*Op
}

// Op is one API operation (method + path template) of a spec.
type Op struct {
	Method   string // upper case
	Template string // e.g. /drives/{drive_id}
	Summary  string
	// PreBootOnly / PostBootOnly come from the spec's own summaries
	// ("Pre-boot only." / "Post-boot only.").
	PreBootOnly, PostBootOnly bool
	// Missing lists the versions of the Checker's specs without this
	// operation (Checker.Check fills it).
	Missing []string
	// MissingFields maps a spec version to the body fields of this request
	// that version's schema lacks (Checker.OptionalFields only).
	MissingFields map[string][]string

	re           *regexp.Regexp
	params       []string
	body         *spec.Schema
	bodyRequired bool
}

// LoadSpec reads a swagger 2.0 document and expands its $refs. Object schemas
// that do not say otherwise are made strict (no unknown fields), because
// Firecracker's API server rejects unknown fields (serde deny_unknown_fields).
func LoadSpec(path string) (*Spec, error) {
	doc, err := loads.Spec(path)
	if err != nil {
		return nil, fmt.Errorf("load swagger spec %s: %w", path, err)
	}
	exp, err := doc.Expanded()
	if err != nil {
		return nil, fmt.Errorf("expand swagger spec %s: %w", path, err)
	}
	sw := exp.Spec()
	s := &Spec{Path: path}
	if sw.Info != nil {
		s.Version = sw.Info.Version
	}
	if sw.Paths == nil {
		return nil, fmt.Errorf("%s: no paths", path)
	}
	for tmpl, item := range sw.Paths.Paths {
		for method, op := range map[string]*spec.Operation{
			"GET": item.Get, "PUT": item.Put, "PATCH": item.Patch, "POST": item.Post, "DELETE": item.Delete,
		} {
			if op == nil {
				continue
			}
			o := &Op{Method: method, Template: tmpl, Summary: op.Summary}
			o.PreBootOnly = strings.Contains(op.Summary, "Pre-boot only")
			o.PostBootOnly = strings.Contains(op.Summary, "Post-boot only")
			o.re, o.params = templateRegexp(tmpl)
			for _, p := range append(append([]spec.Parameter{}, item.Parameters...), op.Parameters...) {
				if p.In == "body" && p.Schema != nil {
					sc := strict(*p.Schema)
					o.body, o.bodyRequired = &sc, p.Required
				}
			}
			s.ops = append(s.ops, o)
		}
	}
	if len(s.ops) == 0 {
		return nil, fmt.Errorf("%s: no operations", path)
	}
	sort.Slice(s.ops, func(i, j int) bool { return s.ops[i].Template < s.ops[j].Template })
	return s, nil
}

// strict returns s with additionalProperties=false on every object schema
// that declares properties and leaves additionalProperties unset.
func strict(s spec.Schema) spec.Schema {
	if len(s.Properties) > 0 {
		if s.AdditionalProperties == nil {
			s.AdditionalProperties = &spec.SchemaOrBool{Allows: false}
		}
		props := make(spec.SchemaProperties, len(s.Properties))
		for k, v := range s.Properties {
			props[k] = strict(v)
		}
		s.Properties = props
	}
	if s.Items != nil && s.Items.Schema != nil {
		c := strict(*s.Items.Schema)
		s.Items = &spec.SchemaOrArray{Schema: &c}
	}
	if len(s.AllOf) > 0 {
		all := make([]spec.Schema, len(s.AllOf))
		for i, a := range s.AllOf {
			all[i] = strict(a)
		}
		s.AllOf = all
	}
	return s
}

var paramRe = regexp.MustCompile(`\{([^}]+)\}`)

func templateRegexp(tmpl string) (*regexp.Regexp, []string) {
	var params []string
	quoted := regexp.QuoteMeta(tmpl)
	// QuoteMeta escapes braces: match the escaped form.
	quoted = regexp.MustCompile(`\\\{([^}\\]+)\\\}`).ReplaceAllStringFunc(quoted, func(m string) string {
		name := paramRe.FindStringSubmatch(strings.ReplaceAll(m, `\`, ""))[1]
		params = append(params, name)
		return `([^/]+)`
	})
	return regexp.MustCompile("^" + quoted + "$"), params
}

// Find returns the operation for method and path, with its path parameters.
func (s *Spec) Find(method, path string) (*Op, map[string]string) {
	for _, o := range s.ops {
		if o.Method != method {
			continue
		}
		if m := o.re.FindStringSubmatch(path); m != nil {
			params := map[string]string{}
			for i, n := range o.params {
				params[n] = m[i+1]
			}
			return o, params
		}
	}
	return nil, nil
}

// Has reports whether the spec has method on path.
func (s *Spec) Has(method, path string) bool {
	o, _ := s.Find(method, path)
	return o != nil
}

// hasField reports whether the operation's body schema has a top-level
// property name.
func (o *Op) hasField(name string) bool {
	if o.body == nil {
		return false
	}
	_, ok := o.body.Properties[name]
	return ok
}

// CheckRequest validates one request against this spec: the operation must
// exist and the body must match the operation's body schema.
func (s *Spec) CheckRequest(method, path string, body []byte) (*Op, map[string]string, error) {
	o, params := s.Find(method, path)
	if o == nil {
		return nil, nil, fmt.Errorf("API %s: %s %s is not an operation of the spec", s.Version, method, path)
	}
	if o.body == nil {
		if len(bytes.TrimSpace(body)) > 0 {
			return o, params, fmt.Errorf("API %s: %s %s takes no body", s.Version, method, path)
		}
		return o, params, nil
	}
	if len(bytes.TrimSpace(body)) == 0 {
		if o.bodyRequired {
			return o, params, fmt.Errorf("API %s: %s %s: body is required", s.Version, method, path)
		}
		return o, params, nil
	}
	var data any
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(&data); err != nil {
		return o, params, fmt.Errorf("API %s: %s %s: body is not JSON: %v", s.Version, method, path, err)
	}
	if err := validate.AgainstSchema(o.body, data, strfmt.Default); err != nil {
		return o, params, fmt.Errorf("API %s: %s %s: body violates schema: %v", s.Version, method, path, err)
	}
	return o, params, nil
}

// Checker checks requests against several specs at once: a request passes
// only if every spec accepts it, so the driver stays compatible with both the
// API the SDK was generated from and the newest official API. The one
// exception is Optional: operations that older specs lack and that the
// driver sends only with a fallback for a Firecracker without them (it
// goes on when one answers 400 "Invalid request method"). Those are checked
// against the specs that have them; Op.Missing lists the others.
type Checker struct {
	Specs []*Spec
	// Optional holds "METHOD /template" keys, e.g. "PUT /serial".
	Optional map[string]bool
	// OptionalFields, by "METHOD /template", are top-level body fields a
	// newer spec has and an older one lacks: a spec without the field
	// checks the body without it (and Op.MissingFields says so), a spec
	// with it checks it. A field no spec has is still a violation.
	OptionalFields map[string][]string
}

// NewerOptionalFields are the body fields FireRunner's Firecracker driver
// sends though the SDK's API 1.4.1 lacks them: PUT /snapshot/load's
// network_overrides (each clone on its own tap) and clock_realtime. The
// driver sends them only to restore a pool's clone, which an older
// Firecracker cannot make anyway (it refuses the unknown field, and the
// pool boots the VM cold instead).
var NewerOptionalFields = map[string][]string{
	"PUT /snapshot/load": {"network_overrides", "clock_realtime", "vsock_override"},
}

// NewerOptional are the operations FireRunner's Firecracker driver sends
// though the SDK's API 1.4.1 lacks them, each with a fallback for a
// Firecracker that answers 400: PUT /serial (the serial console's rate
// limiter).
var NewerOptional = []string{"PUT /serial"}

// LoadChecker loads every spec path.
func LoadChecker(paths ...string) (*Checker, error) {
	if len(paths) == 0 {
		return nil, errors.New("fcstandin: no swagger specs given")
	}
	c := &Checker{}
	for _, p := range paths {
		s, err := LoadSpec(p)
		if err != nil {
			return nil, err
		}
		c.Specs = append(c.Specs, s)
	}
	return c, nil
}

// Check validates a request against every spec. The returned Op merges the
// specs' phase notes (pre-boot only if any spec says so).
func (c *Checker) Check(method, path string, body []byte) (Op, map[string]string, error) {
	var merged Op
	var params map[string]string
	var errs, missing []error
	var missingIn []string
	found := false
	var missingFields map[string][]string
	for _, s := range c.Specs {
		if !s.Has(method, path) {
			missingIn = append(missingIn, s.Version)
			missing = append(missing, fmt.Errorf("API %s: %s %s is not an operation of the spec", s.Version, method, path))
			continue
		}
		b := body
		if so, _ := s.Find(method, path); so != nil {
			var lacks []string
			b, lacks = c.stripOptional(so, b)
			if len(lacks) > 0 {
				if missingFields == nil {
					missingFields = map[string][]string{}
				}
				missingFields[s.Version] = lacks
			}
		}
		o, p, err := s.CheckRequest(method, path, b)
		if err != nil {
			errs = append(errs, err)
		}
		if o != nil {
			if !found {
				merged, params, found = *o, p, true
			}
			merged.PreBootOnly = merged.PreBootOnly || o.PreBootOnly
			merged.PostBootOnly = merged.PostBootOnly || o.PostBootOnly
		}
	}
	merged.Missing = missingIn
	merged.MissingFields = missingFields
	for _, lacks := range missingFields {
		for _, f := range lacks {
			if !c.anySpecHas(method, path, f) {
				errs = append(errs, fmt.Errorf("%s %s: field %q is in none of the specs", method, path, f))
			}
		}
	}
	if len(missing) > 0 && (!found || !c.Optional[method+" "+merged.Template]) {
		errs = append(missing, errs...)
	}
	return merged, params, errors.Join(errs...)
}

// stripOptional removes from body the optional fields of o's operation
// that o's schema lacks, and names those that were present.
func (c *Checker) stripOptional(o *Op, body []byte) ([]byte, []string) {
	fields := c.OptionalFields[o.Method+" "+o.Template]
	if len(fields) == 0 || len(bytes.TrimSpace(body)) == 0 {
		return body, nil
	}
	var obj map[string]json.RawMessage
	if json.Unmarshal(body, &obj) != nil {
		return body, nil
	}
	var lacks []string
	for _, f := range fields {
		if _, in := obj[f]; in && !o.hasField(f) {
			delete(obj, f)
			lacks = append(lacks, f)
		}
	}
	if len(lacks) == 0 {
		return body, nil
	}
	b, _ := json.Marshal(obj)
	return b, lacks
}

func (c *Checker) anySpecHas(method, path, field string) bool {
	for _, s := range c.Specs {
		if o, _ := s.Find(method, path); o != nil && o.hasField(field) {
			return true
		}
	}
	return false
}

// Versions lists the loaded spec versions.
func (c *Checker) Versions() []string {
	var v []string
	for _, s := range c.Specs {
		v = append(v, s.Version)
	}
	return v
}

// SDKModule is the firecracker-go-sdk module whose client/swagger.yaml is the
// spec the SDK was generated from.
const SDKModule = "github.com/firecracker-microvm/firecracker-go-sdk"

// OfficialSpecName is the newest official spec, kept in the shared specs
// directory beside the repository (../shared/specs relative to the repo root).
const OfficialSpecName = "firecracker-api-1.17.0-dev.yaml"

// Specs are the swagger specs the contract tests check every request
// against. The SDK's own spec comes with the module, so a clone anywhere has
// it; the newest official spec lives outside the repository and is checked
// only where it was put.
type Specs struct {
	// SDK is the SDK's client/swagger.yaml (the API it was generated from).
	SDK string
	// Official is SharedDir/OfficialSpecName, or "" when SharedDir does not
	// exist.
	Official string
	// SharedDir is ../shared/specs from the repository root.
	SharedDir string
	// Bundled is set when Official is the repository's own copy (a clone
	// without ../shared/specs).
	Bundled bool
}

// BundledSpec is the repository's copy of the official spec, relative to
// the repository root: a clone without ../shared still checks the newest
// API (the driver sends operations and fields the SDK's 1.4.1 lacks).
var BundledSpec = filepath.Join("internal", "testsupport", "fcstandin", "testdata", OfficialSpecName)

// Paths lists the specs to check against, the SDK's first.
func (s Specs) Paths() []string {
	if s.Official == "" {
		return []string{s.SDK}
	}
	return []string{s.SDK, s.Official}
}

// Note is what a test should say when the official spec is not checked
// (loudly: the requests are then checked against the older API only), or ""
// when it is.
func (s Specs) Note() string {
	if s.Bundled {
		return fmt.Sprintf("checked against the repository's copy of the official Firecracker API spec (%s does not exist)", s.SharedDir)
	}
	if s.Official != "" {
		return ""
	}
	return fmt.Sprintf("!!!!!!!! NOT CHECKED against the newest Firecracker API: %s does not exist, so requests are checked against the SDK's %s only; put %s there to check both",
		s.SharedDir, s.SDK, OfficialSpecName)
}

// RepoRoot walks up from dir to the directory holding go.mod.
func RepoRoot(dir string) (string, error) {
	d, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
		parent := filepath.Dir(d)
		if parent == d {
			return "", fmt.Errorf("no go.mod above %s", dir)
		}
		d = parent
	}
}

// FindSpecs finds the SDK's swagger.yaml (in the module cache, via `go list
// -m`), which must exist, and the official spec in ../shared/specs from the
// repository root. A missing ../shared/specs means the repository's copy
// (BundledSpec), or none if that is gone too; a
// ../shared/specs without the spec is an error, since whoever made the
// directory meant the spec to be checked.
func FindSpecs() (Specs, error) {
	root, err := RepoRoot(".")
	if err != nil {
		return Specs{}, err
	}
	cmd := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", SDKModule)
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			err = fmt.Errorf("%v: %s", err, ee.Stderr)
		}
		return Specs{}, fmt.Errorf("locate %s in the module cache (go list -m): %w", SDKModule, err)
	}
	dir := strings.TrimSpace(string(out))
	if dir == "" {
		return Specs{}, fmt.Errorf("%s is not downloaded; run go mod download %s", SDKModule, SDKModule)
	}
	return specsIn(root, dir)
}

// specsIn finds the specs for the repository at root with the SDK module at
// sdkDir.
func specsIn(root, sdkDir string) (Specs, error) {
	s := Specs{SDK: filepath.Join(sdkDir, "client", "swagger.yaml"), SharedDir: filepath.Join(filepath.Dir(root), "shared", "specs")}
	if _, err := os.Stat(s.SDK); err != nil {
		return Specs{}, fmt.Errorf("the SDK's firecracker API spec is missing: %w", err)
	}
	if _, err := os.Stat(s.SharedDir); errors.Is(err, os.ErrNotExist) {
		if b := filepath.Join(root, BundledSpec); fileExists(b) {
			s.Official, s.Bundled = b, true
		}
		return s, nil
	} else if err != nil {
		return Specs{}, fmt.Errorf("shared specs directory: %w", err)
	}
	s.Official = filepath.Join(s.SharedDir, OfficialSpecName)
	if _, err := os.Stat(s.Official); err != nil {
		return Specs{}, fmt.Errorf("%s exists but the official firecracker API spec is missing from it: %w", s.SharedDir, err)
	}
	return s, nil
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
