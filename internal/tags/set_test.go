package tags

import "testing"

func TestSetIdentityAndCovers(t *testing.T) {
	if k := Key([]string{" Linux", "firecracker-1cpu-1gb", "linux", ""}); k != "firecracker-1cpu-1gb,linux" {
		t.Fatalf("key %q", k)
	}
	cases := []struct {
		runner, job []string
		want        bool
	}{
		{[]string{"a", "b"}, []string{"a"}, true},
		{[]string{"a", "b"}, []string{"B", "a "}, true},
		{[]string{"a"}, []string{"a", "b"}, false},
		{[]string{"a", "c"}, []string{"b"}, false},
		{[]string{"a"}, nil, true}, // GitLab: untagged jobs only with run_untagged, which FireRunner never sets
		{nil, []string{"a"}, false},
	}
	for _, c := range cases {
		if got := NewSet(c.runner).Covers(NewSet(c.job)); got != c.want {
			t.Errorf("%v covers %v = %v, want %v", c.runner, c.job, got, c.want)
		}
	}
}
