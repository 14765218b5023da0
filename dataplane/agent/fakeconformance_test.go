package agent_test

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/tandem-storage/tandem/dataplane/agent"
	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/pkg/agentapi"
	"github.com/tandem-storage/tandem/pkg/agentapi/agentapitest"
)

// TestFakeAgentConforms runs one sequence of control API calls against a
// real agent and against the fake controller tests use instead
// (agentapitest), and compares what the fake promises to model: which
// calls fail and how (404, 401, 409, 400, not sent), and the status fields a
// Put sets. A fake that drifts from the agent would let controller unit
// tests pass against behaviour no agent has.
func TestFakeAgentConforms(t *testing.T) {
	const token = "s3cret"
	url := startAgent(t, agent.Options{Config: agent.Config{Node: "node-a", Token: token}}).ep.Control
	closed := "http://" + testkit.RefusingAddr(t) // nothing listens there

	fakes := agentapitest.NewAgents()
	fakes.Add(url, agentapitest.NewAgent("node-a", token))
	impls := []struct {
		name string
		new  agentapi.NewFunc
	}{
		{"agent", agentapi.NewAPI},
		{"fake", fakes.New},
	}
	run := func(newAPI agentapi.NewFunc) []string {
		ctx := context.Background()
		c := newAPI(url, token)
		spec := func(role agentapi.Role, epoch uint64, init bool) agentapi.Spec {
			return agentapi.Spec{PairUID: "uid-1", Role: role, Epoch: epoch, Mode: agentapi.ModeAsync, PeerNode: "node-b", Initialize: init}
		}
		var out []string
		see := func(step string, st agentapi.Status, err error) {
			out = append(out, fmt.Sprintf("%s: %s", step, outcome(err)))
			if err == nil && st.Name != "" {
				out = append(out, fmt.Sprintf("%s: name=%s size=%d rs=%d role=%s epoch=%d mode=%s peer=%s data=%s joined=%v writable=%v",
					step, st.Name, st.Size, st.RegionSize, st.Role, st.Epoch, st.Mode, st.PeerNode, st.DataState, st.Joined, st.Writable))
			}
		}
		st, err := c.Get(ctx, "ns", "vol")
		see("get missing", st, err)
		st, err = c.PeerOutdated(ctx, "ns", "vol", 1)
		see("peer-outdated missing", st, err)
		see("delete missing", agentapi.Status{}, c.Delete(ctx, "ns", "vol", false))
		see("purge missing", agentapi.Status{}, c.Delete(ctx, "ns", "vol", true))
		st, err = c.Put(ctx, "ns", "vol", agentapi.VolumeRequest{Size: 1 << 20, RegionSize: 64 << 10, Spec: spec(agentapi.RoleBackup, 1, false)})
		see("put new backup", st, err)
		st, err = c.Get(ctx, "ns", "vol")
		see("get backup", st, err)
		st, err = c.Put(ctx, "ns", "vol", agentapi.VolumeRequest{Size: 2 << 20, RegionSize: 64 << 10, Spec: spec(agentapi.RoleBackup, 1, false)})
		see("put larger size (grows)", st, err)
		st, err = c.Put(ctx, "ns", "vol", agentapi.VolumeRequest{Size: 1 << 20, RegionSize: 64 << 10, Spec: spec(agentapi.RoleBackup, 1, false)})
		see("put smaller size", st, err)
		st, err = c.Put(ctx, "ns", "vol", agentapi.VolumeRequest{Size: 2 << 20, RegionSize: 128 << 10, Spec: spec(agentapi.RoleBackup, 1, false)})
		see("put other region size", st, err)
		st, err = c.Put(ctx, "ns", "zero", agentapi.VolumeRequest{Spec: spec(agentapi.RoleBackup, 1, false)})
		see("put size 0", st, err)
		st, err = c.Put(ctx, "ns", "init", agentapi.VolumeRequest{Size: 1 << 20, RegionSize: 64 << 10, Spec: spec(agentapi.RolePrimary, 1, true)})
		see("put initializing primary", st, err)
		st, err = newAPI(url, "wrong").Get(ctx, "ns", "init")
		see("get with a wrong token", st, err)
		see("delete", agentapi.Status{}, c.Delete(ctx, "ns", "vol", false))
		st, err = c.Get(ctx, "ns", "vol")
		see("get deleted", st, err)
		see("delete initialized", agentapi.Status{}, c.Delete(ctx, "ns", "init", true))
		st, err = newAPI(closed, token).Get(ctx, "ns", "vol")
		see("get from nobody", st, err)
		return out
	}
	var results [][]string
	for _, impl := range impls {
		results = append(results, run(impl.new))
	}
	for i := range max(len(results[0]), len(results[1])) {
		var x, y string
		if i < len(results[0]) {
			x = results[0][i]
		}
		if i < len(results[1]) {
			y = results[1][i]
		}
		if x != y {
			t.Errorf("%s: %s\n%s: %s", impls[0].name, x, impls[1].name, y)
		} else {
			t.Log(x)
		}
	}
}

// outcome classifies a call's error as the controller tells them apart.
func outcome(err error) string {
	var e *agentapi.APIError
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, agentapi.ErrNotSent):
		return "not sent"
	case errors.As(err, &e):
		return fmt.Sprintf("%d", e.Code)
	}
	return "error: " + err.Error()
}
