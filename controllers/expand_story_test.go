package controllers

// Online expansion stories: the controller against a real API server,
// with fake agents (agentapitest) behind agent Leases, which grow a
// replica on a Put with a larger size and refuse a smaller one, as real
// agents do.

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/pkg/agentapi"
	"github.com/tandem-storage/tandem/pkg/agentapi/agentapitest"
)

// fakeStory is a story whose members are fake agents.
type fakeStory struct {
	*story
	agents *agentapitest.Agents
	node   map[string]*agentapitest.Agent // by node name
	names  []string                       // spec.primary, spec.backup, additional backups
}

// newFakeStory registers n fake agents (an agent Lease each, in the
// operator namespace), starts a manager that talks to them, and prepares
// an Async pair of 16Mi on them (not created yet).
func newFakeStory(t *testing.T, n int) *fakeStory {
	needEnvtest(t)
	ctx := context.Background()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "grow-"}}
	if err := k8s.Create(ctx, ns); err != nil {
		t.Fatal(err)
	}
	f := &fakeStory{story: &story{t: t, log: &testLog{}, name: "db", ns: ns.Name}, agents: agentapitest.NewAgents(), node: map[string]*agentapitest.Agent{}}
	t.Cleanup(func() {
		if t.Failed() {
			f.log.dump(t)
			for _, c := range f.agents.Calls() {
				t.Logf("call: %s %s size=%d role=%s epoch=%d err=%v", c.Endpoint, c.Op, c.Request.Size, c.Request.Spec.Role, c.Request.Spec.Epoch, c.Err)
			}
		}
	})
	for i := range n {
		name := fmt.Sprintf("node-%c-%s", 'a'+i, ns.Name)
		endpoint := "http://" + name + ":7400"
		f.node[name] = f.agents.Add(endpoint, agentapitest.NewAgent(name, token))
		f.names = append(f.names, name)
		now := metav1.NewMicroTime(time.Now())
		l := &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Namespace: opNS, Name: v1.AgentLeaseName(name),
				Labels: map[string]string{v1.LabelComponent: "agent", v1.LabelNode: name},
				Annotations: map[string]string{v1.AnnControlEndpoint: endpoint, v1.AnnReplicationEndpoint: name + ":7401",
					v1.AnnNBDEndpoint: name + ":10809"}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(name), LeaseDurationSeconds: ptr.To(int32(10)), AcquireTime: &now, RenewTime: &now},
		}
		if err := k8s.Create(ctx, l); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = k8s.Delete(context.Background(), l) })
	}
	f.vp = &v1.VolumePair{
		ObjectMeta: metav1.ObjectMeta{Namespace: f.ns, Name: f.name},
		Spec: v1.VolumePairSpec{
			Size: resource.MustParse("16Mi"), RegionSize: ptr.To(resource.MustParse("64Ki")), Mode: v1.ModeAsync,
			Primary: v1.Member{Node: f.names[0]}, Backup: v1.Member{Node: f.names[1]},
			Failover: v1.FailoverSpec{Policy: v1.PolicyAutomatic, ProbePeriodSeconds: 1, FailureThreshold: 2, LeaseDurationSeconds: 3},
		},
	}
	for _, name := range f.names[2:] {
		f.vp.Spec.AdditionalBackups = append(f.vp.Spec.AdditionalBackups, v1.BackupMember{Node: name})
	}
	startManager(t, f.log, f.agents.New)
	return f
}

// start creates the pair and waits until the writer serves 16Mi; then the
// backups report the pair's data UpToDate, as after their first copy.
func (f *fakeStory) start() {
	f.t.Helper()
	if err := k8s.Create(context.Background(), f.vp); err != nil {
		f.t.Fatal(err)
	}
	f.waitFor(20*time.Second, "the writer serves 16Mi", func(vp *v1.VolumePair) bool {
		return cond(vp, v1.ConditionReady) && vp.Status.Size != nil && vp.Status.Size.Value() == 16*mi
	})
	for _, name := range f.names[1:] {
		f.node[name].Update(f.ns, f.name, func(s *agentapi.Status) {
			s.DataState, s.DataStateReason, s.Joined = agentapi.UpToDate, "", true
		})
	}
}

// resize sets spec.size.
func (f *fakeStory) resize(size string) error {
	vp := f.get()
	patch := client.MergeFrom(vp.DeepCopy())
	vp.Spec.Size = resource.MustParse(size)
	return k8s.Patch(context.Background(), vp, patch)
}

// size is what node's fake agent serves.
func (f *fakeStory) size(node string) int64 {
	st, _ := f.node[node].Volume(f.ns, f.name)
	return st.Size
}

// grewAt is the index in every agent's calls, in order, of the first Put
// that asked node for size (-1: none).
func (f *fakeStory) grewAt(node string, size int64) int {
	for i, c := range f.agents.Calls() {
		if c.Op == agentapitest.OpPut && c.Endpoint == "http://"+node+":7400" && c.Request.Size == size && c.Err == nil {
			return i
		}
	}
	return -1
}

func expanding(reason string, msg ...string) func(*v1.VolumePair) bool {
	return func(vp *v1.VolumePair) bool {
		c := condOf(vp, v1.ConditionExpanding)
		if c == nil || c.Reason != reason || (c.Status == metav1.ConditionTrue) != (reason != ReasonNotExpanding) {
			return false
		}
		for _, m := range msg {
			if !strings.Contains(c.Message, m) {
				return false
			}
		}
		return true
	}
}

func servesSize(n int64) func(*v1.VolumePair) bool {
	return func(vp *v1.VolumePair) bool { return vp.Status.Size != nil && vp.Status.Size.Value() == n }
}

// TestExpandHealthyPair (issue #18): spec.size grows on a live pair: the
// backup grows first, the writer once the backup serves the new size;
// status.size follows the writer, the Expanding condition ends
// NotExpanding, a VolumeExpanded event says so. A shrink is refused by the
// API server. Before, a larger spec.size was refused (immutable), and a
// controller that got one would have sent it to both agents in one
// configure, the writer's Put not waiting for the backup's growth.
func TestExpandHealthyPair(t *testing.T) {
	f := newFakeStory(t, 2)
	a, b := f.names[0], f.names[1]
	f.start()
	if err := f.resize("32Mi"); err != nil {
		t.Fatalf("grow spec.size: %v", err)
	}
	vp := f.waitFor(20*time.Second, "the writer serves 32Mi", servesSize(32*mi))
	if f.size(a) != 32*mi || f.size(b) != 32*mi {
		t.Fatalf("the agents serve %d and %d, want %d", f.size(a), f.size(b), 32*mi)
	}
	if ib, ia := f.grewAt(b, 32*mi), f.grewAt(a, 32*mi); ib < 0 || ia < ib {
		t.Fatalf("the writer %s was grown at call %d, the backup %s at call %d: want the backup first", a, ia, b, ib)
	}
	f.waitFor(10*time.Second, "Expanding False", expanding(ReasonNotExpanding, "every member serves 32Mi (spec.size)"))
	if !cond(vp, v1.ConditionReady) {
		t.Fatalf("not Ready after the expansion: %+v", vp.Status.Conditions)
	}
	testkit.Eventually(t, 10*time.Second, "a VolumeExpanded event", func() (bool, string) {
		ev := f.events()
		return strings.Contains(ev, ReasonVolumeExpanded+": the writer "+a+" serves 32Mi (was 16Mi), as every member that answers does"), ev
	})

	err := f.resize("16Mi")
	if err == nil || !strings.Contains(err.Error(), "spec.size cannot shrink (from 32Mi to 16Mi): a volume only grows") {
		t.Fatalf("shrink: %v, want a refusal naming both sizes", err)
	}
	f.eventsWithout("StepFailed", ReasonExpansionRefused, "Failover")
}

// TestExpandWithBackupAway: a backup that does not answer does not hold
// the expansion up: the other backup grows, then the writer (the writer
// never streams to the absent member, and an agent refuses the stream of a
// larger writer until it grew). The condition says the absent member grows
// when it returns; it does, before anything else, and the expansion ends.
func TestExpandWithBackupAway(t *testing.T) {
	f := newFakeStory(t, 3)
	a, b, c := f.names[0], f.names[1], f.names[2]
	f.start()
	f.node[c].SetReachable(false)
	f.waitFor(15*time.Second, c+" unreachable", func(vp *v1.VolumePair) bool {
		ms := vp.Status.MemberStatus(c)
		return ms != nil && ms.Message == "agent unreachable"
	})
	if err := f.resize("32Mi"); err != nil {
		t.Fatal(err)
	}
	f.waitFor(20*time.Second, "the writer serves 32Mi", servesSize(32*mi))
	if ib, ia := f.grewAt(b, 32*mi), f.grewAt(a, 32*mi); ib < 0 || ia < ib {
		t.Fatalf("the writer was grown at call %d, the backup %s at %d: want the backup first", ia, b, ib)
	}
	if f.size(c) != 16*mi {
		t.Fatalf("%s serves %d while unreachable", c, f.size(c))
	}
	f.waitFor(10*time.Second, "Expanding, waiting for "+c, expanding(ReasonExpanding, "grown to 32Mi", c+" does not answer and grows to 32Mi when it returns, before its resync"))
	testkit.Eventually(t, 10*time.Second, "a VolumeExpanded event naming the absent member", func() (bool, string) {
		ev := f.events()
		return strings.Contains(ev, ReasonVolumeExpanded+": the writer "+a+" serves 32Mi (was 16Mi)") && strings.Contains(ev, c+" does not answer"), ev
	})

	f.node[c].SetReachable(true)
	f.waitFor(20*time.Second, "Expanding False", expanding(ReasonNotExpanding, "every member serves 32Mi"))
	if f.size(c) != 32*mi {
		t.Fatalf("%s serves %d after it returned, want %d", c, f.size(c), 32*mi)
	}
	f.eventsWithout("StepFailed", ReasonExpansionRefused, "Failover")
}

// TestExpandRefused: a backup's agent refuses to grow (its file system
// cannot hold the size). The writer is not grown past it: the pair keeps
// serving the old size, Ready; the Expanding condition and a Warning event
// name the node and the agent's answer. A new spec.size is asked again at
// once, and once the agent accepts, the expansion completes.
func TestExpandRefused(t *testing.T) {
	f := newFakeStory(t, 2)
	a, b := f.names[0], f.names[1]
	f.start()
	f.node[b].Fail(agentapitest.OpPut, &agentapi.APIError{Code: http.StatusBadRequest, Message: "grow to 33554432 bytes: no space left on device"})
	if err := f.resize("32Mi"); err != nil {
		t.Fatal(err)
	}
	vp := f.waitFor(15*time.Second, "ExpansionRefused", expanding(ReasonExpansionRefused,
		"growing from 16Mi to 32Mi: the agent on "+b+" refused to grow: grow to 33554432 bytes: no space left on device; the writer "+a+" serves 16Mi"))
	if !cond(vp, v1.ConditionReady) || vp.Status.Size.Value() != 16*mi {
		t.Fatalf("status while refused: %+v", vp.Status)
	}
	testkit.Eventually(t, 10*time.Second, "an ExpansionRefused event", func() (bool, string) {
		ev := f.events()
		return strings.Contains(ev, ReasonExpansionRefused+": the agent on "+b+" refused to grow its replica from 16Mi to 32Mi (spec.size): grow to 33554432 bytes: no space left on device"), ev
	})
	time.Sleep(3 * time.Second) // three probe periods
	if f.size(a) != 16*mi || f.grewAt(a, 32*mi) >= 0 {
		t.Fatalf("the writer was grown past a backup that refused: it serves %d", f.size(a))
	}
	if n := strings.Count(f.events(), ReasonExpansionRefused+":"); n != 1 {
		t.Fatalf("%d ExpansionRefused events, want 1:\n%s", n, f.events())
	}

	f.node[b].Fail(agentapitest.OpPut, nil)
	if err := f.resize("48Mi"); err != nil {
		t.Fatal(err)
	}
	f.waitFor(20*time.Second, "the writer serves 48Mi", servesSize(48*mi))
	f.waitFor(10*time.Second, "Expanding False", expanding(ReasonNotExpanding, "every member serves 48Mi"))
	if f.size(b) != 48*mi {
		t.Fatalf("%s serves %d, want %d", b, f.size(b), 48*mi)
	}
	f.eventsWithout("StepFailed", "Failover")
}
