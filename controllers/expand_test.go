package controllers

// Online expansion (issue #18: spec.size may grow, never shrink): which
// member grows next (Decide, growStep), what the Expanding condition says,
// and the requests the reconciler sends, against the in-memory fake agents.

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/events"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/pkg/agentapi"
	"github.com/tandem-storage/tandem/pkg/agentapi/agentapitest"
)

const (
	mi     = int64(1) << 20
	before = 16 * mi // the size the members serve
	after  = 32 * mi // spec.size once it grew
)

// grownThree is a healthy pair of three (three) whose members serve a, b
// and c bytes, with spec.size after.
func grownThree(a, b, c int64) View {
	v := three("")
	v.Size = after
	for i, n := range []int64{a, b, c} {
		v.all()[i].Status.Size = n
	}
	return v
}

// TestGrowOrder: which member grows next. The backups that answer grow
// first, one a step, in spec order; the writer once every backup that
// answers serves spec.size. Before online expansion a larger spec.size was
// never acted upon (nothing grew: Decide returned None).
func TestGrowOrder(t *testing.T) {
	tests := []struct {
		name   string
		v      func() View
		want   StepKind
		target string
	}{
		{"nothing to grow", func() View { return grownThree(after, after, after) }, StepNone, ""},
		{"spec.size grew: spec.backup first", func() View { return grownThree(before, before, before) }, StepGrow, "b"},
		{"then the additional backup", func() View { return grownThree(before, after, before) }, StepGrow, "c"},
		{"then the writer", func() View { return grownThree(before, after, after) }, StepGrow, "a"},
		{"a backup that does not answer: the writer does not wait for it", func() View {
			v := grownThree(before, after, before)
			v.More[0] = MemberView{Node: "c"} // no answer, and no report
			return v
		}, StepGrow, "a"},
		{"a suspect backup that still answers is grown", func() View {
			v := grownThree(before, before, after)
			v.Backup.Suspect = true
			return v
		}, StepGrow, "b"},
		{"a backup refused: the other backup still grows", func() View {
			v := grownThree(before, before, before)
			v.Backup.GrowRefused = "no space left on device"
			return v
		}, StepGrow, "c"},
		{"a backup refused: the writer does not grow past it", func() View {
			v := grownThree(before, before, after)
			v.Backup.GrowRefused = "no space left on device"
			return v
		}, StepNone, ""},
		{"the writer refused: asked again later", func() View {
			v := grownThree(before, after, after)
			v.Primary.GrowRefused = "file too large"
			return v
		}, StepNone, ""},
		{"a backup without a replica yet: created at spec.size by Configure", func() View {
			v := grownThree(before, after, after)
			v.Backup.Status = nil
			return v
		}, StepConfigure, "a"},
		{"a returning backup: its roles first, then it grows, before the writer streams to it", func() View {
			v := grownThree(after, before, after)
			v.Backup.Status.Epoch = 0
			return v
		}, StepConfigure, "a"},
		{"a returning backup, configured: it grows", func() View { return grownThree(after, before, after) }, StepGrow, "b"},
		{"a failback hold: the writer grows after it", func() View {
			v := grownThree(before, after, after)
			v.Primary.Status.Holding = true
			return v
		}, StepReleaseHold, "a"},
		{"a lost writer is failed over first", func() View {
			v := grownThree(before, before, before)
			v.Primary = lost("a")
			v.Authority.Expired = true
			return v
		}, StepFailover, "b"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Decide(tt.v())
			if got.Kind != tt.want || (tt.target != "" && got.Target != tt.target) {
				t.Fatalf("Decide = %s → %s (%s), want %s → %s", got.Kind, got.Target, got.Message, tt.want, tt.target)
			}
		})
	}
}

// TestExpandingCondition: what the Expanding condition says at each point
// of an expansion.
func TestExpandingCondition(t *testing.T) {
	noLast := func(string) int64 { return 0 }
	tests := []struct {
		name     string
		v        func() View
		last     func(string) int64
		status   metav1.ConditionStatus
		reason   string
		contains []string
	}{
		{"nothing to grow", func() View { return grownThree(after, after, after) }, noLast, metav1.ConditionFalse, ReasonNotExpanding,
			[]string{"every member serves 32Mi (spec.size)"}},
		{"backups first", func() View { return grownThree(before, after, before) }, noLast, metav1.ConditionTrue, ReasonExpanding,
			[]string{"growing from 16Mi to 32Mi: backups first (b done; c next), then the writer a"}},
		{"the writer next", func() View { return grownThree(before, after, after) }, noLast, metav1.ConditionTrue, ReasonExpanding,
			[]string{"growing from 16Mi to 32Mi: backups first (b, c done), then the writer a (next)"}},
		{"a backup refused", func() View {
			v := grownThree(before, before, after)
			v.Backup.GrowRefused = "no space left on device"
			return v
		}, noLast, metav1.ConditionTrue, ReasonExpansionRefused,
			[]string{"growing from 16Mi to 32Mi: the agent on b refused to grow: no space left on device; the writer a serves 16Mi"}},
		{"the writer refused", func() View {
			v := grownThree(before, after, after)
			v.Primary.GrowRefused = "file too large"
			return v
		}, noLast, metav1.ConditionTrue, ReasonExpansionRefused,
			[]string{"the backups serve 32Mi, but the agent on the writer a refused to grow: file too large; the volume stays 16Mi"}},
		{"grown but for a member that does not answer", func() View {
			v := grownThree(after, after, after)
			v.More[0] = MemberView{Node: "c"}
			return v
		}, func(n string) int64 {
			if n == "c" {
				return before
			}
			return 0
		}, metav1.ConditionTrue, ReasonExpanding,
			[]string{"grown to 32Mi: the writer a serves it", "c does not answer and grows to 32Mi when it returns, before its resync"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := tt.v()
			writer, others := v.member(v.Authority.Holder), v.others(v.Authority.Holder)
			var conds []metav1.Condition
			setExpandingCondition(&conds, 1, expansionOf(&v, writer, others, tt.last))
			c := meta.FindStatusCondition(conds, v1.ConditionExpanding)
			if c == nil || c.Status != tt.status || c.Reason != tt.reason {
				t.Fatalf("condition %+v, want %s/%s", c, tt.status, tt.reason)
			}
			for _, w := range tt.contains {
				if !strings.Contains(c.Message, w) {
					t.Errorf("message %q lacks %q", c.Message, w)
				}
			}
		})
	}
}

// growPair is newFakePair grown to spec.size after while both replicas
// serve before, a writing and b its backup, at epoch 3.
func growPair(t *testing.T) (*fakePair, *scope) {
	t.Helper()
	f := newFakePair()
	f.r.Recorder = events.NewFakeRecorder(10)
	f.r.probes = map[types.NamespacedName]map[string]*probeState{}
	f.r.Now = time.Now
	f.vp.Status.DataInitialized = true
	for _, ag := range []*agentapitest.Agent{f.a, f.b} {
		ag.Update("ns", "db", func(s *agentapi.Status) {
			s.Size, s.RegionSize, s.Joined, s.PairUID, s.DataState = before, 64<<10, true, uid, agentapi.UpToDate
		})
	}
	f.vp.Spec.Size = resource.MustParse("32Mi")
	a, _ := f.a.Volume("ns", "db")
	b, _ := f.b.Volume("ns", "db")
	s := f.scope("a", 3, up("a", &a), up("b", &b))
	s.view.Size = after
	return f, s
}

// TestConfigureKeepsSizes: configure sends each member its own size while
// it is smaller than spec.size (growing is grow's, in order), and
// spec.size to a replica it creates. Before, every request carried
// spec.size: the writer's configure grew it along with the backup's, and
// an agent without the pair's new size refused the roles themselves.
func TestConfigureKeepsSizes(t *testing.T) {
	f, s := growPair(t)
	if err := f.r.configure(context.Background(), s, false); err != nil {
		t.Fatal(err)
	}
	for _, c := range f.agents.Calls() {
		if c.Request.Size != before {
			t.Errorf("%s: configure sent size %d, want the replica's own %d", c.Endpoint, c.Request.Size, before)
		}
	}
	f2 := newFakePair()
	f2.vp.Spec.Size = resource.MustParse("32Mi")
	s2 := f2.scope("a", 1, up("a", nil), up("b", nil))
	s2.view.Size = after
	if err := f2.r.configure(context.Background(), s2, false); err != nil {
		t.Fatal(err)
	}
	for _, c := range f2.agents.Calls() {
		if c.Request.Size != after {
			t.Errorf("%s: a new replica created with size %d, want spec.size %d", c.Endpoint, c.Request.Size, after)
		}
	}
}

// TestGrowAct: a Grow step sends the target its usual request with
// spec.size; the agent grows. A refusal is recorded for the member (not
// the step failing), with one Warning event naming the node and the
// agent's answer; a call that never reached the agent fails the step.
func TestGrowAct(t *testing.T) {
	f, s := growPair(t)
	s.step = Step{Kind: StepGrow, Target: "b"}
	if err := f.r.act(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	calls := f.agents.Calls()
	if len(calls) != 1 || calls[0].Endpoint != ctlB || calls[0].Request.Size != after || calls[0].Request.Spec.Role != agentapi.RoleBackup ||
		calls[0].Request.Spec.PeerNode != "a" || calls[0].Request.Spec.Epoch != 3 {
		t.Fatalf("calls %+v, want one Put to b as a's backup at epoch 3 with size %d", calls, after)
	}
	if b, _ := f.b.Volume("ns", "db"); b.Size != after {
		t.Fatalf("b serves %d, want %d", b.Size, after)
	}

	// The writer's agent refuses: recorded, one event, no step error.
	f.a.Fail(agentapitest.OpPut, &agentapi.APIError{Code: http.StatusBadRequest, Message: "grow to 33554432 bytes: file too large"})
	s.step = Step{Kind: StepGrow, Target: "a"}
	for range 2 {
		if err := f.r.act(context.Background(), s); err != nil {
			t.Fatalf("a refusal failed the step: %v", err)
		}
	}
	ps := f.r.probeState(types.NamespacedName{Namespace: "ns", Name: "db"}, "a")
	if ps.growRefused.size != after || !strings.Contains(ps.growRefused.msg, "file too large") {
		t.Fatalf("refusal recorded as %+v", ps.growRefused)
	}
	// This round's status says so already (the retry round's too: the
	// condition does not flip back to Expanding while the agent is asked).
	if msg := s.view.Primary.GrowRefused; !strings.Contains(msg, "file too large") {
		t.Fatalf("the round's view: GrowRefused %q", msg)
	}
	rec := f.r.Recorder.(*events.FakeRecorder)
	if n := len(rec.Events); n != 1 {
		t.Fatalf("%d events, want 1 (the same refusal again is not announced again)", n)
	}
	if ev := <-rec.Events; !strings.Contains(ev, "Warning ExpansionRefused the agent on a refused to grow its replica from 16Mi to 32Mi (spec.size): grow to 33554432 bytes: file too large") {
		t.Fatalf("event %q", ev)
	}

	// No answer at all: the step fails, and is tried again next round.
	f.a.Fail(agentapitest.OpPut, nil)
	f.a.SetReachable(false)
	if err := f.r.act(context.Background(), s); !errors.Is(err, agentapi.ErrNotSent) || !strings.Contains(err.Error(), "grow a from 16Mi to 32Mi") {
		t.Fatalf("unreachable: %v", err)
	}
	f.a.SetReachable(true)
	if err := f.r.act(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	if a, _ := f.a.Volume("ns", "db"); a.Size != after || f.r.probeState(types.NamespacedName{Namespace: "ns", Name: "db"}, "a").growRefused.size != 0 {
		t.Fatalf("a serves %d (refusal %+v), want %d and the refusal forgotten", a.Size, f.r.probeState(types.NamespacedName{Namespace: "ns", Name: "db"}, "a").growRefused, after)
	}
}
