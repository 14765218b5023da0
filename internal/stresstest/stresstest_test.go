package stresstest

import (
	"testing"
)

func TestKnobs(t *testing.T) {
	if testing.Short() {
		// One trial at most, whatever the environment says.
		t.Setenv("TANDEM_STRESS_TRIALS", "30")
		if Trials(3) != 1 || Trials(0) != 0 {
			t.Fatalf("-short: Trials(3)=%d Trials(0)=%d, want 1 and 0", Trials(3), Trials(0))
		}
		return
	}
	t.Setenv("TANDEM_STRESS_TRIALS", "")
	t.Setenv("TANDEM_STRESS_SEED", "")
	if Trials(3) != 3 || Seed(7) != 7 {
		t.Fatalf("defaults: Trials(3)=%d Seed(7)=%d", Trials(3), Seed(7))
	}
	t.Setenv("TANDEM_STRESS_TRIALS", "30")
	t.Setenv("TANDEM_STRESS_SEED", "12345")
	if Trials(3) != 30 || Seed(7) != 12345 {
		t.Fatalf("from the environment: Trials=%d Seed=%d", Trials(3), Seed(7))
	}
	for _, bad := range []string{"0", "-2", "x"} {
		t.Setenv("TANDEM_STRESS_TRIALS", bad)
		if Trials(3) != 3 {
			t.Errorf("TANDEM_STRESS_TRIALS=%q: Trials(3) = %d, want the default", bad, Trials(3))
		}
	}
}

func TestLine(t *testing.T) {
	got := Line("crash-matrix", "TestCrashMatrix/node-Sync", 30, 31, 0)
	want := "RELIABILITY suite=crash-matrix case=TestCrashMatrix/node-Sync trials=30 faults=31 violations=0"
	if got != want {
		t.Fatalf("Line = %q, want %q", got, want)
	}
}
