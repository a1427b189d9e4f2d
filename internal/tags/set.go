package tags

import (
	"slices"
	"strings"
)

// Set is a canonical tag set: trimmed, lower-cased, sorted, without
// duplicates or empty tags. It is THE tag-set identity of FireRunner: runner
// counts, the planner and metrics all key on Set.Key.
type Set []string

// NewSet canonicalises a tag list.
func NewSet(list []string) Set {
	s := make(Set, 0, len(list))
	for _, t := range list {
		if t = strings.ToLower(strings.TrimSpace(t)); t != "" {
			s = append(s, t)
		}
	}
	slices.Sort(s)
	return slices.Compact(s)
}

// Key is the set as one comparable string ("a,b,c").
func (s Set) Key() string { return strings.Join(s, ",") }

// Covers reports whether a runner with tags s may run a job with tags job:
// GitLab hands a runner any pending job whose tags are a subset of the
// runner's, so a runner made for one job may take another.
func (s Set) Covers(job Set) bool {
	i := 0
	for _, t := range job {
		for i < len(s) && s[i] < t {
			i++
		}
		if i == len(s) || s[i] != t {
			return false
		}
		i++
	}
	return true
}

// Key is the canonical key of a tag list (NewSet(list).Key()).
func Key(list []string) string { return NewSet(list).Key() }
