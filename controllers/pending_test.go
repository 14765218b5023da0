package controllers

import (
	"strings"
	"testing"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// TestDecidePending: a new pair is given a writer only once every member's
// agent has registered and spec.primary's answers; before, it waits with a
// reason naming the member and its field (a writer on a node without an
// agent was lost at once: a failover that never was).
func TestDecidePending(t *testing.T) {
	base := func() View {
		return View{
			Primary: MemberView{Node: "a", Field: "spec.primary.node", Reachable: true},
			Backup:  MemberView{Node: "b", Field: "spec.backup.node", Reachable: true},
			Mode:    v1.ModeAsync, FailoverPolicy: v1.PolicyAutomatic, PairUID: "uid-1",
		}
	}
	tests := []struct {
		name    string
		mut     func(*View)
		want    StepKind
		pending string
		target  string
		msg     []string // the message names these
	}{
		{"every agent registered, the primary answers: create", func(v *View) {}, StepCreateAuthority, "", "a", nil},
		{"the backup unreachable but registered: create (the writer tracks it)", func(v *View) { v.Backup.Reachable = false }, StepCreateAuthority, "", "a", nil},
		{"the primary names a node without an agent", func(v *View) { v.Primary = MemberView{Node: "z", Field: "spec.primary.node", Unregistered: true} },
			StepNone, PendingAgentNotRegistered, "z", []string{"spec.primary.node", `"z"`, "no Tandem agent", "starts once it registers"}},
		{"the primary names a node that does not exist", func(v *View) {
			v.Primary = MemberView{Node: "z", Field: "spec.primary.node", Unregistered: true, NodeMissing: true}
		}, StepNone, PendingMemberNotFound, "z", []string{"spec.primary.node", `"z"`, "does not exist", "correct the node name"}},
		{"the backup has no agent", func(v *View) { v.Backup = MemberView{Node: "y", Field: "spec.backup.node", Unregistered: true} },
			StepNone, PendingAgentNotRegistered, "y", []string{"spec.backup.node", `"y"`}},
		{"an additional backup names a missing node", func(v *View) {
			v.More = []MemberView{{Node: "x", Field: "spec.additionalBackups[0].node", Unregistered: true, NodeMissing: true}}
		}, StepNone, PendingMemberNotFound, "x", []string{"spec.additionalBackups[0].node", `"x"`}},
		{"the primary's agent registered but does not answer", func(v *View) { v.Primary.Reachable = false },
			StepNone, PendingPrimaryNotReady, "a", []string{"spec.primary.node", "does not answer"}},
		{"the primary's Node is not Ready", func(v *View) { v.Primary.Suspect = true },
			StepNone, PendingPrimaryNotReady, "a", []string{"not Ready"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := base()
			tt.mut(&v)
			got := Decide(v)
			if got.Kind != tt.want || got.Pending != tt.pending || got.Target != tt.target || got.Blocked != BlockedNone {
				t.Fatalf("Decide = %+v, want %s pending %q target %q", got, tt.want, tt.pending, tt.target)
			}
			for _, w := range tt.msg {
				if !strings.Contains(got.Message, w) {
					t.Errorf("message %q does not name %q", got.Message, w)
				}
			}
		})
	}
	// Once the pair has a writer, an unregistered member is a lost member
	// like any other: pending is for new pairs only.
	v := base()
	v.Authority = AuthorityView{Exists: true, Holder: "a", Epoch: 1}
	v.Primary.Status = st(agentapi.RolePrimary, 1, agentapi.UpToDate, false)
	v.Backup = MemberView{Node: "b", Field: "spec.backup.node", Unregistered: true, NodeMissing: true, Suspect: true}
	if got := Decide(v); got.Pending != "" {
		t.Fatalf("Decide = %+v for a started pair", got)
	}
}

// TestStaleRequest: a failover request while the writer serves, or a
// failback request while spec.primary writes, asks for nothing possible;
// left in place it would act later, unasked (a Manual failover policy would
// promote a backup the moment the writer was next lost).
func TestStaleRequest(t *testing.T) {
	serving := func() View {
		return View{
			Primary: up("a", st(agentapi.RolePrimary, 1, agentapi.UpToDate, true)), Backup: up("b", st(agentapi.RoleBackup, 1, agentapi.UpToDate, true)),
			Mode: v1.ModeAsync, FailoverPolicy: v1.PolicyManual, FailbackPolicy: v1.PolicyManual,
			Authority: AuthorityView{Exists: true, Holder: "a", Epoch: 1}, PairUID: "uid-1",
		}
	}
	tests := []struct {
		name string
		mut  func(*View)
		want string
	}{
		{"no request", func(v *View) {}, ""},
		{"failover while the writer serves", func(v *View) { v.FailoverRequested = true }, v1.AnnotationFailoverRequested},
		{"failover while the writer is lost", func(v *View) { v.FailoverRequested = true; v.Primary = lost("a") }, ""},
		{"failover while the writer misses probes (not suspect yet)", func(v *View) {
			v.FailoverRequested = true
			v.Primary.Reachable = false
		}, ""},
		{"failover while the writer fenced itself", func(v *View) {
			v.FailoverRequested = true
			v.Primary.Status.Writable = false
		}, ""},
		{"failover while the writer's agent is stopping", func(v *View) {
			v.FailoverRequested = true
			v.Primary.Status.Stopping = true
		}, ""},
		{"failover while the writer is at an older epoch", func(v *View) {
			v.FailoverRequested = true
			v.Authority.Epoch = 2
		}, ""},
		{"no authority yet", func(v *View) { v.FailoverRequested = true; v.Authority = AuthorityView{} }, ""},
		{"failback while spec.primary writes", func(v *View) { v.FailbackRequested = true }, v1.AnnotationFailbackRequested},
		{"failback while the backup writes (SWAP)", func(v *View) {
			v.FailbackRequested = true
			v.Authority = AuthorityView{Exists: true, Holder: "b", Epoch: 2, FailedOver: true}
			v.Backup.Status = st(agentapi.RolePrimary, 2, agentapi.UpToDate, false)
			v.Primary = lost("a")
		}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := serving()
			tt.mut(&v)
			got, msg := StaleRequest(v)
			if got != tt.want {
				t.Fatalf("StaleRequest = %q (%s), want %q", got, msg, tt.want)
			}
			if got != "" && !strings.Contains(msg, "ignored and cleared") {
				t.Fatalf("message %q does not say the request was cleared", msg)
			}
		})
	}
}
