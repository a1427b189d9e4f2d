// Package tags implements the firecracker-{N}cpu-{M}gb job tag grammar that
// selects a job's microVM size, and the rules for rejecting bad size tags.
//
// Rules (decided here, documented for users in the README):
//
//   - A job is FireRunner's when at least one of its tags, after trimming
//     surrounding whitespace and ASCII-lowercasing, starts with "firecracker-".
//     A tag exactly "firecracker" (no dash) or any other tag is not a size tag.
//     Jobs with no such tag are ignored (ok=false, err=nil).
//   - Matching is case-insensitive: "Firecracker-4CPU-8GB" means 4 vCPUs, 8 GiB.
//     GitLab matches runner tags to job tags itself; FireRunner copies the
//     job's tags verbatim to the runner, so the spelling never matters there.
//   - The full form is firecracker-{N}cpu-{M}gb with N and M decimal integers
//     without sign, without leading zeros and without inner whitespace.
//     Anything else starting with "firecracker-" is "malformed".
//   - N=0 or M=0 is "zero_size". N above Limits.MaxVCPUs or M above
//     Limits.MaxMemoryGiB is "over_limit" (a zero limit means no limit beyond
//     an absolute sanity bound of 1024 vCPUs / 4096 GiB).
//   - Several size tags spelling the same size are fine; two different sizes
//     are "ambiguous".
//   - Any error means: log it, count it, never start a VM for the job, and
//     leave the job for other runners. The first error in tag order is
//     reported, except that an invalid tag always wins over ambiguity.
package tags

import (
	"fmt"
	"strings"
)

// Absolute sanity bounds applied even when Limits are zero, so that sizes
// can never overflow MiB arithmetic.
const (
	AbsMaxVCPUs     = 1024
	AbsMaxMemoryGiB = 4096
)

// Prefix starts every size tag (compared case-insensitively).
const Prefix = "firecracker-"

// Reasons reported in Error.Reason; short, fixed metric labels.
const (
	ReasonMalformed = "malformed"
	ReasonZeroSize  = "zero_size"
	ReasonOverLimit = "over_limit"
	ReasonAmbiguous = "ambiguous"
)

// Size is a VM size selected by a tag.
type Size struct{ VCPUs, MemoryGiB int }

// Tag is the canonical (lowercase) tag for the size, e.g. "firecracker-4cpu-8gb".
func (s Size) Tag() string { return fmt.Sprintf("firecracker-%dcpu-%dgb", s.VCPUs, s.MemoryGiB) }

// MemoryMiB is the memory in MiB.
func (s Size) MemoryMiB() int { return s.MemoryGiB * 1024 }

// String is the canonical tag.
func (s Size) String() string { return s.Tag() }

// Limits bound the sizes FireRunner will serve; zero fields mean "no limit"
// beyond AbsMaxVCPUs/AbsMaxMemoryGiB.
type Limits struct{ MaxVCPUs, MaxMemoryGiB int }

// Error is a size tag FireRunner refuses. Tag is the offending tag as given
// (truncated to 64 bytes, safe to log); Reason is one of the Reason* labels.
type Error struct{ Tag, Reason string }

func (e *Error) Error() string {
	switch e.Reason {
	case ReasonMalformed:
		return fmt.Sprintf("tag %q: malformed size tag, want firecracker-{N}cpu-{M}gb (e.g. firecracker-4cpu-8gb)", e.Tag)
	case ReasonZeroSize:
		return fmt.Sprintf("tag %q: vCPUs and memory must be at least 1", e.Tag)
	case ReasonOverLimit:
		return fmt.Sprintf("tag %q: size exceeds this host's per-VM maximum; job left for other runners", e.Tag)
	case ReasonAmbiguous:
		return fmt.Sprintf("tags %s: job asks for two different VM sizes; use exactly one firecracker-{N}cpu-{M}gb tag", e.Tag)
	}
	return fmt.Sprintf("tag %q: %s", e.Tag, e.Reason)
}

// IsSizeTag reports whether t is meant as a size tag (valid or not).
func IsSizeTag(t string) bool {
	t = strings.TrimSpace(t)
	return len(t) >= len(Prefix) && strings.EqualFold(t[:len(Prefix)], Prefix)
}

// Parse finds the size tag in a job's tag list.
// ok=false, err=nil: no firecracker tag at all (not FireRunner's job).
// err is a *Error: an invalid, over-limit or ambiguous size tag; never start a VM.
func Parse(tagList []string, lim Limits) (size Size, ok bool, err error) {
	var found Size
	var foundTag string
	var ambiguous *Error
	for _, raw := range tagList {
		if !IsSizeTag(raw) {
			continue
		}
		s, perr := parseOne(raw, lim)
		if perr != nil {
			return Size{}, false, perr
		}
		switch {
		case foundTag == "":
			found, foundTag = s, raw
		case s != found && ambiguous == nil:
			ambiguous = &Error{Tag: clip(foundTag) + ", " + clip(raw), Reason: ReasonAmbiguous}
		}
	}
	if ambiguous != nil {
		return Size{}, false, ambiguous
	}
	if foundTag == "" {
		return Size{}, false, nil
	}
	return found, true, nil
}

// parseOne parses one tag already known to start with Prefix.
func parseOne(raw string, lim Limits) (Size, error) {
	bad := func(reason string) (Size, error) { return Size{}, &Error{Tag: clip(raw), Reason: reason} }
	t := strings.ToLower(strings.TrimSpace(raw))[len(Prefix):]
	n, rest, ok := number(t)
	if !ok || !strings.HasPrefix(rest, "cpu-") {
		return bad(ReasonMalformed)
	}
	m, rest, ok := number(rest[len("cpu-"):])
	if !ok || rest != "gb" {
		return bad(ReasonMalformed)
	}
	if n == 0 || m == 0 {
		return bad(ReasonZeroSize)
	}
	maxC, maxM := AbsMaxVCPUs, AbsMaxMemoryGiB
	if lim.MaxVCPUs > 0 && lim.MaxVCPUs < maxC {
		maxC = lim.MaxVCPUs
	}
	if lim.MaxMemoryGiB > 0 && lim.MaxMemoryGiB < maxM {
		maxM = lim.MaxMemoryGiB
	}
	if n > maxC || m > maxM {
		return bad(ReasonOverLimit)
	}
	return Size{VCPUs: n, MemoryGiB: m}, nil
}

// number reads a decimal without sign or leading zeros ("0" itself is allowed
// so that zero sizes get their own reason). Values beyond 7 digits saturate,
// which is over any limit, so no overflow is possible.
func number(s string) (n int, rest string, ok bool) {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		if n < 10_000_000 {
			n = n*10 + int(s[i]-'0')
		}
		i++
	}
	if i == 0 || (i > 1 && s[0] == '0') {
		return 0, s, false
	}
	return n, s[i:], true
}

// clip bounds a tag for logs and metrics-adjacent messages.
func clip(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}
