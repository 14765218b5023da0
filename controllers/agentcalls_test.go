package controllers

// The reconciler's calls to agents, against the in-memory fake
// (agentapitest): no API server, no agents.

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/pkg/agentapi"
	"github.com/tandem-storage/tandem/pkg/agentapi/agentapitest"
)

const (
	ctlA, ctlB = "http://a:7400", "http://b:7400"
	uid        = "uid-1"
)

// fakePair is a VolumePair on nodes a (spec primary) and b, each with a
// fake agent, and a reconciler that talks to them.
type fakePair struct {
	agents *agentapitest.Agents
	a, b   *agentapitest.Agent
	r      *VolumePairReconciler
	vp     *v1.VolumePair
}

func newFakePair() *fakePair {
	f := &fakePair{agents: agentapitest.NewAgents()}
	f.a = f.agents.Add(ctlA, agentapitest.NewAgent("a", token))
	f.b = f.agents.Add(ctlB, agentapitest.NewAgent("b", token))
	f.r = &VolumePairReconciler{NewAgentClient: f.agents.New, AgentToken: token}
	f.vp = &v1.VolumePair{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "db", UID: uid},
		Spec: v1.VolumePairSpec{
			Size: resource.MustParse("16Mi"), RegionSize: ptr.To(resource.MustParse("64Ki")), Mode: v1.ModeSync,
			Primary: v1.Member{Node: "a"}, Backup: v1.Member{Node: "b"},
			Resync: v1.ResyncSpec{MaxBytesPerSecond: 1 << 20},
		},
	}
	return f
}

// scope is a round in which holder holds the authority at epoch.
func (f *fakePair) scope(holder string, epoch uint64, a, b MemberView) *scope {
	return &scope{vp: f.vp, view: View{
		Primary: a, Backup: b, PairUID: uid, Mode: f.vp.Spec.Mode,
		Authority: AuthorityView{Exists: true, Holder: holder, Epoch: epoch},
	}, agents: map[string]agentInfo{
		"a": {control: ctlA, replication: "a:7401"},
		"b": {control: ctlB, replication: "b:7401"},
	}}
}

// put describes one Put as the test expects it.
func put(endpoint string, role agentapi.Role, peer, peerAddr string, hold, initialize bool) string {
	return fmt.Sprintf("%s Put %s peer=%s addr=%q hold=%v init=%v", endpoint, role, peer, peerAddr, hold, initialize)
}

func puts(calls []agentapitest.Call) []string {
	var out []string
	for _, c := range calls {
		s := c.Request.Spec
		out = append(out, put(c.Endpoint, s.Role, s.PeerNode, s.PeerAddress, s.Hold, s.Initialize))
	}
	return out
}

// TestConfigurePushesRoles: configure pushes the member that must not write
// first and the writer only once that succeeded, with the pair's
// geometry, mode, epoch and resync settings; the writer's role follows
// whether it holds the pair's data (invariant 8).
func TestConfigurePushesRoles(t *testing.T) {
	joined := &agentapi.Status{Role: agentapi.RoleBackup, Epoch: 1, DataState: agentapi.UpToDate, Joined: true, PairUID: uid}
	wiped := &agentapi.Status{Role: agentapi.RoleBackup, Epoch: 1, DataState: agentapi.Inconsistent}
	up := func(node string, st *agentapi.Status) MemberView {
		return MemberView{Node: node, Reachable: true, Status: st}
	}
	refused := &agentapi.APIError{Code: http.StatusConflict, Message: "refused"}
	tests := []struct {
		name    string
		holder  string
		a, b    MemberView
		dataIn  bool  // status.dataInitialized
		hold    bool  // StepHold
		failB   error // b's agent refuses Puts
		want    []string
		wantErr string
	}{
		{"new pair: backup first, then the first writer starts the data", "a", up("a", nil), up("b", nil), false, false, nil,
			[]string{put(ctlB, agentapi.RoleBackup, "a", "", false, false), put(ctlA, agentapi.RolePrimary, "b", "b:7401", false, true)}, ""},
		{"backup refuses: the writer is not configured", "a", up("a", nil), up("b", nil), false, false, refused,
			[]string{put(ctlB, agentapi.RoleBackup, "a", "", false, false)}, "configure b as backup"},
		{"backup unreachable: only the writer", "a", up("a", joined), MemberView{Node: "b"}, true, false, nil,
			[]string{put(ctlA, agentapi.RolePrimary, "b", "b:7401", false, false)}, ""},
		{"writer unreachable: only the backup", "b", up("a", joined), MemberView{Node: "b"}, true, false, nil,
			[]string{put(ctlA, agentapi.RoleBackup, "b", "", false, false)}, ""},
		{"failback hold: on the writer only", "b", up("a", joined), up("b", joined), true, true, nil,
			[]string{put(ctlA, agentapi.RoleBackup, "b", "", false, false), put(ctlB, agentapi.RolePrimary, "a", "a:7401", true, false)}, ""},
		{"writer without the pair's data stays fenced", "b", up("a", joined), up("b", wiped), true, true, nil,
			[]string{put(ctlA, agentapi.RoleBackup, "b", "", false, false), put(ctlB, agentapi.RoleNone, "a", "a:7401", false, false)}, ""},
		{"writer without a replica while the pair has data", "b", up("a", joined), up("b", nil), true, false, nil,
			[]string{put(ctlA, agentapi.RoleBackup, "b", "", false, false), put(ctlB, agentapi.RoleNone, "a", "a:7401", false, false)}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakePair()
			f.vp.Status.DataInitialized = tt.dataIn
			f.b.Fail(agentapitest.OpPut, tt.failB)
			s := f.scope(tt.holder, 3, tt.a, tt.b)
			err := f.r.configure(context.Background(), s, tt.hold)
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("configure: %v, want error %q", err, tt.wantErr)
			}
			calls := f.agents.Calls()
			if got := puts(calls); strings.Join(got, "\n") != strings.Join(tt.want, "\n") {
				t.Fatalf("calls:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tt.want, "\n"))
			}
			for _, c := range calls {
				r := c.Request
				if c.Namespace != "ns" || c.Name != "db" || r.Size != 16<<20 || r.RegionSize != 64<<10 || r.Spec.PairUID != uid ||
					r.Spec.Epoch != 3 || r.Spec.Mode != agentapi.ModeSync || r.Spec.MaxBytesPerSecond != 1<<20 || !r.Spec.MergesPeerBitmap() {
					t.Errorf("%s: request %+v", c.Endpoint, r)
				}
			}
		})
	}
}

// TestProbe: an agent that answers 404 is reachable with no replica (nil
// status, no error); one that cannot be reached, or fails otherwise, is an
// error.
func TestProbe(t *testing.T) {
	f := newFakePair()
	info := agentInfo{control: ctlA}
	ctx := context.Background()
	if st, err := f.r.probe(ctx, info, f.vp); st != nil || err != nil {
		t.Fatalf("no replica: %+v, %v; want nil, nil", st, err)
	}
	f.a.Update("ns", "db", func(s *agentapi.Status) { s.Role, s.Epoch = agentapi.RolePrimary, 2 })
	if st, err := f.r.probe(ctx, info, f.vp); err != nil || st == nil || st.Role != agentapi.RolePrimary || st.Epoch != 2 {
		t.Fatalf("replica: %+v, %v", st, err)
	}
	f.a.Fail(agentapitest.OpGet, &agentapi.APIError{Code: http.StatusInternalServerError, Message: "disk"})
	if st, err := f.r.probe(ctx, info, f.vp); st != nil || err == nil {
		t.Fatalf("agent error: %+v, %v; want an error", st, err)
	}
	f.a.Fail(agentapitest.OpGet, nil)
	f.a.SetReachable(false)
	if st, err := f.r.probe(ctx, info, f.vp); st != nil || !errors.Is(err, agentapi.ErrNotSent) {
		t.Fatalf("unreachable: %+v, %v; want ErrNotSent", st, err)
	}
	if st, err := f.r.probe(ctx, agentInfo{control: "http://nobody:7400"}, f.vp); st != nil || err == nil {
		t.Fatalf("no agent at the endpoint: %+v, %v; want an error", st, err)
	}
	f.r.AgentToken = "wrong"
	f.a.SetReachable(true)
	if st, err := f.r.probe(ctx, info, f.vp); st != nil || err == nil {
		t.Fatalf("wrong token: %+v, %v; want an error", st, err)
	}
}
