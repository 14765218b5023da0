package controllers

import (
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// TestDecideForcePromote: storage.tandem.dev/force-promote promotes the
// member it names once the writer is lost and its authority expired,
// overriding only what may lose acknowledged writes or what the policy
// leaves to a request; never while the writer may still serve, never a
// member whose data is Inconsistent or that is unreachable.
func TestDecideForcePromote(t *testing.T) {
	outdated := func(v *View) { v.Backup.RecordedOutdated = true }
	lostWriter := func() View {
		return View{
			Primary: lost("a"), Backup: up("b", st(agentapi.RoleBackup, 1, agentapi.UpToDate, false)),
			Mode: v1.ModeSync, FailoverPolicy: v1.PolicyAutomatic, FailbackPolicy: v1.PolicyManual,
			Authority: AuthorityView{Exists: true, Holder: "a", Epoch: 1, Expired: true}, PairUID: "uid-1",
		}
	}
	tests := []struct {
		name        string
		mut         func(*View)
		want        StepKind
		target      string
		blocked     string
		forcedOver  string
		msgContains string
	}{
		{"Outdated backup, no force: blocked, and the message names the way out", outdated, StepNone, "", BlockedBackupOutdated, "", "kubectl tandem promote --force b"},
		{"Outdated backup, forced: promoted", func(v *View) { outdated(v); v.ForcePromote = "b" }, StepFailover, "b", BlockedNone, BlockedBackupOutdated, ""},
		{"Manual policy, forced: promoted", func(v *View) { v.FailoverPolicy = v1.PolicyManual; v.ForcePromote = "b" }, StepFailover, "b", BlockedNone, BlockedManualPolicy, ""},
		{"held backup, no force: blocked", func(v *View) { v.Backup.Held = true }, StepNone, "", BlockedBackupHeld, "", "force-promote"},
		{"held backup, forced: promoted", func(v *View) { v.Backup.Held = true; v.ForcePromote = "b" }, StepFailover, "b", BlockedNone, BlockedBackupHeld, ""},
		{"nothing to override: promoted, not forced", func(v *View) { v.ForcePromote = "b" }, StepFailover, "b", BlockedNone, "", ""},
		{"authority not expired: never", func(v *View) { outdated(v); v.ForcePromote = "b"; v.Authority.Expired = false },
			StepNone, "", BlockedAuthorityNotExpired, "", "force-promote b"},
		{"Inconsistent backup: never", func(v *View) {
			v.ForcePromote = "b"
			v.Backup.Status = st(agentapi.RoleBackup, 1, agentapi.Inconsistent, false)
		}, StepNone, "", BlockedBackupInconsistent, "", ""},
		{"unreachable backup: never", func(v *View) { v.ForcePromote = "b"; v.Backup = lost("b") }, StepNone, "", BlockedBackupUnreachable, "", ""},
		{"three members: the named one, not the most current", func(v *View) {
			v.More = []MemberView{up("c", st(agentapi.RoleBackup, 1, agentapi.UpToDate, false))}
			v.More[0].Mode = v1.ModeAsync
			v.ForcePromote = "c"
		}, StepFailover, "c", BlockedNone, BlockedBackupAsync, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := lostWriter()
			tt.mut(&v)
			got := Decide(v)
			if got.Kind != tt.want || got.Target != tt.target || got.Blocked != tt.blocked || got.ForcedOver != tt.forcedOver || got.Forced != (tt.forcedOver != "") {
				t.Fatalf("Decide = %+v, want %s target %q blocked %q forced over %q", got, tt.want, tt.target, tt.blocked, tt.forcedOver)
			}
			if !strings.Contains(got.Message, tt.msgContains) {
				t.Fatalf("message %q does not contain %q", got.Message, tt.msgContains)
			}
		})
	}
}

// TestStaleForcePromote: a force-promote of the writer, of a non-member, or
// while the writer serves, is cleared.
func TestStaleForcePromote(t *testing.T) {
	serving := View{
		Primary: up("a", st(agentapi.RolePrimary, 1, agentapi.UpToDate, true)), Backup: up("b", st(agentapi.RoleBackup, 1, agentapi.UpToDate, true)),
		Mode: v1.ModeSync, Authority: AuthorityView{Exists: true, Holder: "a", Epoch: 1}, PairUID: "uid-1",
	}
	for _, tt := range []struct {
		name, node string
		lost       bool
		age        time.Duration
		want       string
	}{
		{"the writer serves", "b", false, 0, "serves the volume"},
		{"names the writer", "a", true, 0, "already holds"},
		{"names no member", "z", true, 0, "not a member"},
		{"the writer is lost", "b", true, 0, ""},
		{"the writer is lost, waiting for 9 minutes", "b", true, 9 * time.Minute, ""},
		{"the writer is lost, waiting for 11 minutes: expired", "b", true, 11 * time.Minute, "expired and cleared"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			v := serving
			v.ForcePromote, v.ForcePromoteAge = tt.node, tt.age
			if tt.lost {
				v.Primary = lost("a")
			}
			ann, msg := StaleRequest(v)
			if (tt.want == "") != (ann == "") || !strings.Contains(msg, tt.want) || (ann != "" && ann != v1.AnnotationForcePromote) {
				t.Fatalf("StaleRequest = %q, %q; want %q", ann, msg, tt.want)
			}
		})
	}
}

// TestDecideHeldMember: a member held out of resync is fenced (role None)
// rather than configured as a backup, and once fenced nothing more is done
// to it; its link stays down, so no failback goes to it.
func TestDecideHeldMember(t *testing.T) {
	base := func() View {
		return View{
			// node-a returned after a failover: fenced at the old epoch.
			Primary: up("a", st(agentapi.RoleNone, 1, agentapi.UpToDate, false)),
			Backup:  up("b", st(agentapi.RolePrimary, 2, agentapi.UpToDate, false)),
			Mode:    v1.ModeAsync, FailoverPolicy: v1.PolicyAutomatic, FailbackPolicy: v1.PolicyAutomatic,
			Authority: AuthorityView{Exists: true, Holder: "b", Epoch: 2, FailedOver: true}, PairUID: "uid-1",
		}
	}
	v := base()
	if got := Decide(v); got.Kind != StepConfigure {
		t.Fatalf("not held: %+v, want Configure (resync it)", got)
	}
	v.Primary.Held = true
	if got := Decide(v); got.Kind != StepConfigure {
		t.Fatalf("held, fenced at the old epoch: %+v, want Configure (fence it at this one)", got)
	}
	v.Primary.Status.Epoch = 2
	if got := Decide(v); got.Kind != StepNone || got.Blocked != BlockedNone {
		t.Fatalf("held and fenced at this epoch: %+v, want nothing", got)
	}
	v.Primary.Status = nil
	if got := Decide(v); got.Kind != StepNone {
		t.Fatalf("held without a replica: %+v, want nothing", got)
	}
	// A hold names a returning member: it never applies to the writer.
	w := base()
	w.Backup.Held = true
	if w.IsHeld(&w.Backup) {
		t.Fatal("the writer counts as held")
	}
}

// TestForceAge: how long a force-promote request has been seen counts from
// its first sight recorded in status.forcePromoteSeen (which a restarted
// manager reads), restarts when it names another node, and is forgotten
// once the request is gone.
func TestForceAge(t *testing.T) {
	now := time.Date(2026, 12, 7, 8, 0, 0, 0, time.UTC)
	var st v1.VolumePairStatus
	step := func(d time.Duration, node string, want time.Duration) {
		t.Helper()
		now = now.Add(d)
		if got := forceAge(&st, node, now); got != want {
			t.Fatalf("forceAge(%q) after %v = %v, want %v", node, d, got, want)
		}
		if node == "" && st.ForcePromoteSeen != nil || node != "" && (st.ForcePromoteSeen == nil || st.ForcePromoteSeen.Node != node || !st.ForcePromoteSeen.Since.Time.Equal(now.Add(-want))) {
			t.Fatalf("forceAge(%q) after %v left status.forcePromoteSeen %+v", node, d, st.ForcePromoteSeen)
		}
	}
	step(0, "b", 0)
	step(4*time.Minute, "b", 4*time.Minute)
	step(7*time.Minute, "b", 11*time.Minute)
	step(time.Minute, "c", 0) // another node: a new request
	step(time.Minute, "c", time.Minute)
	step(time.Minute, "", 0)  // gone
	step(time.Minute, "c", 0) // asked again: from now
	// A manager whose clock is behind the one that recorded the sight
	// counts no negative age.
	seen := st.ForcePromoteSeen.Since
	if got := forceAge(&st, "c", now.Add(-time.Hour)); got != 0 || !st.ForcePromoteSeen.Since.Equal(&seen) {
		t.Fatalf("a clock an hour behind: age %v, since %v (want 0, %v kept)", got, st.ForcePromoteSeen.Since, seen)
	}
	// A manager that starts with a recorded sight (its predecessor's)
	// counts from it.
	st.ForcePromoteSeen.Since = metav1.NewTime(now.Add(-11 * time.Minute))
	step(0, "c", 11*time.Minute)
}
