package job

import "testing"

func TestStateMachine(t *testing.T) {
	// Every non-terminal state can reach cleaning or a terminal state, so a
	// job can always be torn down; terminal states are final.
	for _, s := range States {
		if !s.Valid() {
			t.Fatalf("%s invalid", s)
		}
		if s.Terminal() {
			if len(transitions[s]) != 0 {
				t.Errorf("terminal %s has transitions", s)
			}
			continue
		}
		if !CanTransition(s, Cleaning) && !(CanTransition(s, Failed) && CanTransition(s, Canceled)) {
			t.Errorf("%s cannot be torn down", s)
		}
	}
	for from, tos := range transitions {
		for _, to := range tos {
			if !to.Valid() || !from.Valid() {
				t.Errorf("unknown state in %s → %s", from, to)
			}
		}
	}
	happy := []State{Queued, RunnerCreated, VMStarting, Running, Cleaning, Done}
	for i := 1; i < len(happy); i++ {
		if !CanTransition(happy[i-1], happy[i]) {
			t.Errorf("happy path broken at %s → %s", happy[i-1], happy[i])
		}
	}
	for _, bad := range [][2]State{{Queued, Running}, {Running, VMStarting}, {Done, Queued}, {Cleaning, Running}, {Running, Done}} {
		if CanTransition(bad[0], bad[1]) {
			t.Errorf("%s → %s must be refused", bad[0], bad[1])
		}
	}
	if State("bogus").Valid() {
		t.Error("bogus state valid")
	}
}

func TestVMID(t *testing.T) {
	for _, id := range []int64{1, 101, 4242424242, 1 << 50} {
		v := VMIDFor(id)
		if len(v) > 15 || v[:3] != "fr-" {
			t.Fatalf("%d → %q", id, v)
		}
		back, ok := JobIDForVM(v)
		if !ok || back != id {
			t.Fatalf("%q → %d %v, want %d", v, back, ok, id)
		}
	}
	if _, ok := JobIDForVM("fr-UPPER"); ok {
		t.Fatal("accepted a foreign id")
	}
}
