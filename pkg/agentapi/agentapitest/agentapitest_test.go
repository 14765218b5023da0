package agentapitest_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"sync"
	"testing"

	"github.com/tandem-storage/tandem/pkg/agentapi"
	"github.com/tandem-storage/tandem/pkg/agentapi/agentapitest"
)

const tok = "s3cret"

func req(role agentapi.Role, epoch uint64, init bool) agentapi.VolumeRequest {
	return agentapi.VolumeRequest{Size: 1 << 20, RegionSize: 4096, Spec: agentapi.Spec{
		PairUID: "uid-1", Role: role, Epoch: epoch, Mode: agentapi.ModeSync, PeerNode: "peer", Initialize: init}}
}

func code(err error) int {
	var e *agentapi.APIError
	if errors.As(err, &e) {
		return e.Code
	}
	return 0
}

// TestAgentVolumes: the volume lifecycle through the API: 404 until a Put
// creates the replica, the spec shows in the status, other geometry is
// refused, Delete removes it.
func TestAgentVolumes(t *testing.T) {
	ctx := context.Background()
	a := agentapitest.NewAgent("node-a", tok)
	c := a.Client(tok)
	if _, err := c.Get(ctx, "ns", "vol"); !agentapi.IsNotFound(err) {
		t.Fatalf("Get of a missing volume: %v, want a 404", err)
	}
	if _, err := c.PeerOutdated(ctx, "ns", "vol", 1); !agentapi.IsNotFound(err) {
		t.Fatalf("PeerOutdated of a missing volume: %v, want a 404", err)
	}
	if err := c.Delete(ctx, "ns", "vol", false); !agentapi.IsNotFound(err) {
		t.Fatalf("Delete of a missing volume: %v, want a 404", err)
	}
	if err := c.Delete(ctx, "ns", "vol", true); err != nil {
		t.Fatalf("Delete with purge of a missing volume: %v, want success (the agent purges what is left)", err)
	}

	st, err := c.Put(ctx, "ns", "vol", req(agentapi.RoleBackup, 1, false))
	if err != nil {
		t.Fatal(err)
	}
	want := agentapi.Status{Name: "ns/vol", Size: 1 << 20, RegionSize: 4096, Role: agentapi.RoleBackup, Epoch: 1,
		Mode: agentapi.ModeSync, PeerNode: "peer", PairUID: "uid-1", DataState: agentapi.Inconsistent}
	if st.Name != want.Name || st.Size != want.Size || st.RegionSize != want.RegionSize || st.Role != want.Role ||
		st.Epoch != want.Epoch || st.Mode != want.Mode || st.PeerNode != want.PeerNode || st.PairUID != want.PairUID ||
		st.DataState != want.DataState || st.Joined || st.Writable {
		t.Fatalf("new backup: %+v, want %+v", st, want)
	}
	if got, err := c.Get(ctx, "ns", "vol"); err != nil || !reflect.DeepEqual(got, st) {
		t.Fatalf("Get after Put: %+v, %v; want %+v", got, err, st)
	}

	if _, err := c.Put(ctx, "ns", "vol", agentapi.VolumeRequest{Size: 1 << 20, RegionSize: 8192}); code(err) != http.StatusConflict {
		t.Fatalf("Put with another region size: %v, want a 409", err)
	}
	if _, err := c.Put(ctx, "ns", "vol", agentapi.VolumeRequest{Size: 1<<20 - 4096, RegionSize: 4096}); code(err) != http.StatusConflict {
		t.Fatalf("Put with a smaller size: %v, want a 409", err)
	}
	// A larger size grows the replica, as the agent does.
	if _, err := c.Put(ctx, "ns", "grown", req(agentapi.RoleBackup, 1, false)); err != nil {
		t.Fatal(err)
	}
	g := req(agentapi.RoleBackup, 1, false)
	g.Size = 3 << 20
	if st, err := c.Put(ctx, "ns", "grown", g); err != nil || st.Size != 3<<20 {
		t.Fatalf("Put with a larger size: %+v, %v; want size %d", st, err, 3<<20)
	}
	if _, err := c.Put(ctx, "ns", "other", agentapi.VolumeRequest{}); code(err) != http.StatusBadRequest {
		t.Fatalf("Put creating a volume of size 0: %v, want a 400", err)
	}

	// The first writer of a pair's data: UpToDate, joined, writable.
	st, err = c.Put(ctx, "ns", "new", req(agentapi.RolePrimary, 1, true))
	if err != nil || st.DataState != agentapi.UpToDate || !st.Joined || !st.Writable {
		t.Fatalf("initializing primary: %+v, %v", st, err)
	}
	// A primary without the pair's data does not become writable by being told so.
	st, err = c.Put(ctx, "ns", "vol", req(agentapi.RolePrimary, 2, false))
	if err != nil || st.Writable || st.DataState != agentapi.Inconsistent || st.Role != agentapi.RolePrimary || st.Epoch != 2 {
		t.Fatalf("primary without the data: %+v, %v", st, err)
	}

	a.Update("ns", "vol", func(s *agentapi.Status) { s.WaitingForPeerOutdated = 3 })
	if st, err := c.PeerOutdated(ctx, "ns", "vol", 2); err != nil || st.WaitingForPeerOutdated != 0 {
		t.Fatalf("PeerOutdated: %+v, %v; want no write waiting", st, err)
	}

	if err := c.Delete(ctx, "ns", "vol", false); err != nil {
		t.Fatal(err)
	}
	if _, ok := a.Volume("ns", "vol"); ok {
		t.Fatal("volume still there after Delete")
	}
	if _, ok := a.Volume("ns", "new"); !ok {
		t.Fatal("Delete removed another volume")
	}
}

// TestAgentFailures: a wrong token is a 401, an injected error is returned
// as it is until cleared, an unreachable agent fails with ErrNotSent; none
// of them changes anything, and every one is recorded.
func TestAgentFailures(t *testing.T) {
	ctx := context.Background()
	a := agentapitest.NewAgent("node-a", tok)
	if _, err := a.Client("wrong").Put(ctx, "ns", "vol", req(agentapi.RoleBackup, 1, false)); code(err) != http.StatusUnauthorized {
		t.Fatalf("wrong token: %v, want a 401", err)
	}
	if _, err := agentapitest.NewAgent("node-b", "").Client("any").Put(ctx, "ns", "vol", req(agentapi.RoleBackup, 1, false)); err != nil {
		t.Fatalf("an agent without a token refused a call: %v", err)
	}

	c := a.Client(tok)
	refused := &agentapi.APIError{Code: http.StatusConflict, Message: "refused"}
	a.Fail(agentapitest.OpPut, refused)
	if _, err := c.Put(ctx, "ns", "vol", req(agentapi.RoleBackup, 1, false)); !errors.Is(err, refused) {
		t.Fatalf("injected error: %v, want %v", err, refused)
	}
	if _, err := c.Put(ctx, "ns", "vol", req(agentapi.RoleBackup, 1, false)); !errors.Is(err, refused) {
		t.Fatalf("injected error, second call: %v, want %v", err, refused)
	}
	if _, ok := a.Volume("ns", "vol"); ok {
		t.Fatal("a refused Put created the volume")
	}
	if _, err := c.Get(ctx, "ns", "vol"); !agentapi.IsNotFound(err) {
		t.Fatalf("Get while Put fails: %v, want the 404 (only Put was made to fail)", err)
	}
	a.Fail(agentapitest.OpPut, nil)
	if _, err := c.Put(ctx, "ns", "vol", req(agentapi.RoleBackup, 1, false)); err != nil {
		t.Fatalf("Put after the failure was cleared: %v", err)
	}

	a.SetReachable(false)
	if _, err := c.Put(ctx, "ns", "vol", req(agentapi.RolePrimary, 2, false)); !errors.Is(err, agentapi.ErrNotSent) {
		t.Fatalf("unreachable agent: %v, want ErrNotSent", err)
	}
	if err := c.Delete(ctx, "ns", "vol", true); !errors.Is(err, agentapi.ErrNotSent) {
		t.Fatalf("unreachable agent: %v, want ErrNotSent", err)
	}
	a.SetReachable(true)
	if st, err := c.Get(ctx, "ns", "vol"); err != nil || st.Role != agentapi.RoleBackup || st.Epoch != 1 {
		t.Fatalf("after being unreachable: %+v, %v; want the backup at epoch 1 still", st, err)
	}

	calls := a.Calls()
	var ops []string
	for _, c := range calls {
		ops = append(ops, fmt.Sprintf("%s:%v", c.Op, c.Err != nil))
	}
	want := []string{"Put:true", "Put:true", "Put:true", "Get:true", "Put:false", "Put:true", "Delete:true", "Get:false"}
	if fmt.Sprint(ops) != fmt.Sprint(want) {
		t.Fatalf("recorded calls %v, want %v", ops, want)
	}
	if calls[5].Request.Spec.Epoch != 2 || calls[6].Purge != true {
		t.Fatalf("recorded arguments: %+v, %+v", calls[5], calls[6])
	}
}

// TestAgentsByEndpoint: the set hands out clients by endpoint and records
// the calls of all its agents in the order they were made; an endpoint with
// no agent is unreachable.
func TestAgentsByEndpoint(t *testing.T) {
	ctx := context.Background()
	set := agentapitest.NewAgents()
	a := set.Add("http://a:7400", agentapitest.NewAgent("node-a", tok))
	b := set.Add("http://b:7400", agentapitest.NewAgent("node-b", tok))
	var newAPI agentapi.NewFunc = set.New

	if _, err := newAPI("http://b:7400", tok).Put(ctx, "ns", "vol", req(agentapi.RoleBackup, 1, false)); err != nil {
		t.Fatal(err)
	}
	if _, err := newAPI("http://a:7400", tok).Put(ctx, "ns", "vol", req(agentapi.RolePrimary, 1, true)); err != nil {
		t.Fatal(err)
	}
	if _, err := newAPI("http://a:7400", tok).PeerOutdated(ctx, "ns", "vol", 1); err != nil {
		t.Fatal(err)
	}
	if st, _ := a.Volume("ns", "vol"); st.Role != agentapi.RolePrimary {
		t.Errorf("a: %+v", st)
	}
	if st, _ := b.Volume("ns", "vol"); st.Role != agentapi.RoleBackup {
		t.Errorf("b: %+v", st)
	}
	for _, op := range []func(agentapi.API) error{
		func(c agentapi.API) error { _, err := c.Get(ctx, "ns", "vol"); return err },
		func(c agentapi.API) error {
			_, err := c.Put(ctx, "ns", "vol", req(agentapi.RoleBackup, 1, false))
			return err
		},
		func(c agentapi.API) error { return c.Delete(ctx, "ns", "vol", false) },
		func(c agentapi.API) error { _, err := c.PeerOutdated(ctx, "ns", "vol", 1); return err },
	} {
		if err := op(newAPI("http://c:7400", tok)); !errors.Is(err, agentapi.ErrNotSent) {
			t.Errorf("call to an endpoint with no agent: %v, want ErrNotSent", err)
		}
	}

	var got []string
	for _, c := range set.Calls() {
		got = append(got, c.Endpoint+" "+string(c.Op))
	}
	want := []string{"http://b:7400 Put", "http://a:7400 Put", "http://a:7400 PeerOutdated"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("calls %v, want %v", got, want)
	}
	if n := len(b.Calls()); n != 1 {
		t.Fatalf("b recorded %d calls, want 1", n)
	}
}

// TestAgentConcurrent: clients may be used from several goroutines, as the
// controller's reconciles do (run with -race).
func TestAgentConcurrent(t *testing.T) {
	ctx := context.Background()
	set := agentapitest.NewAgents()
	a := set.Add("http://a:7400", agentapitest.NewAgent("node-a", tok))
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := set.New("http://a:7400", tok)
			name := fmt.Sprintf("v%d", i)
			for e := range uint64(20) {
				if _, err := c.Put(ctx, "ns", name, req(agentapi.RoleBackup, e, false)); err != nil {
					t.Error(err)
					return
				}
				if _, err := c.Get(ctx, "ns", name); err != nil {
					t.Error(err)
					return
				}
				a.Update("ns", name, func(s *agentapi.Status) { s.OutOfSyncRegions++ })
			}
		}()
	}
	wg.Wait()
	if n := len(set.Calls()); n != 8*20*2 {
		t.Fatalf("%d calls recorded, want %d", n, 8*20*2)
	}
	if st, _ := a.Volume("ns", "v3"); st.OutOfSyncRegions != 20 || st.Epoch != 19 {
		t.Fatalf("v3: %+v", st)
	}
}
