package tags

import (
	"errors"
	"strings"
	"testing"
)

// FuzzParse checks invariants: never a panic; a size within limits when ok;
// an *Error with a known reason otherwise; the canonical tag round-trips.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"firecracker-4cpu-8gb", "firecracker-2cpu-4gb\nlinux", "FIRECRACKER-1CPU-1GB", "firecracker-0cpu-1gb",
		"firecracker-02cpu-4gb", "firecracker-2cpu-4gb\nfirecracker-4cpu-8gb", "docker\nlinux", "firecracker-x",
		" firecracker-16cpu-32gb ", "firecracker-99999999999cpu-1gb", "firecracker-", "firecracker",
	} {
		f.Add(s, 8, 16)
	}
	reasons := map[string]bool{ReasonMalformed: true, ReasonZeroSize: true, ReasonOverLimit: true, ReasonAmbiguous: true}
	f.Fuzz(func(t *testing.T, joined string, maxC, maxM int) {
		tagList := strings.Split(joined, "\n")
		lim := Limits{MaxVCPUs: maxC, MaxMemoryGiB: maxM}
		size, ok, err := Parse(tagList, lim)
		if err != nil {
			var te *Error
			if !errors.As(err, &te) || !reasons[te.Reason] || ok || size != (Size{}) {
				t.Fatalf("bad error result: %v %v %#v", size, ok, err)
			}
			return
		}
		hasSizeTag := false
		for _, tg := range tagList {
			hasSizeTag = hasSizeTag || IsSizeTag(tg)
		}
		if ok != hasSizeTag {
			t.Fatalf("ok=%v but size tag present=%v", ok, hasSizeTag)
		}
		if !ok {
			return
		}
		if size.VCPUs < 1 || size.MemoryGiB < 1 || size.VCPUs > AbsMaxVCPUs || size.MemoryGiB > AbsMaxMemoryGiB ||
			(maxC > 0 && size.VCPUs > maxC) || (maxM > 0 && size.MemoryGiB > maxM) {
			t.Fatalf("size %v outside limits %+v", size, lim)
		}
		again, ok2, err2 := Parse([]string{size.Tag()}, lim)
		if err2 != nil || !ok2 || again != size {
			t.Fatalf("canonical tag %q does not round-trip: %v %v %v", size.Tag(), again, ok2, err2)
		}
	})
}
