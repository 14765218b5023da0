// Package agentapitest is an in-memory stand-in for agents' control API
// (agentapi.API), for unit tests of the controller that should not start
// agents: each Agent is a map of volumes; every call is recorded; errors
// can be injected per operation; an agent can be made unreachable.
//
// An Agents set hands out clients by control endpoint, as the controller's
// agentapi.NewFunc does:
//
//	agents := agentapitest.NewAgents()
//	a := agents.Add("http://node-a:7400", agentapitest.NewAgent("node-a", token))
//	r := &VolumePairReconciler{NewAgentClient: agents.New, AgentToken: token}
//	... a.Calls(), a.Fail(agentapitest.OpPut, err), a.SetReachable(false) ...
//
// What it models is the contract, not the engine: an unknown volume is a
// 404 (agentapi.IsNotFound), except that purging one succeeds; a wrong
// token is a 401; a Put creates the replica
// (Inconsistent, or UpToDate and joined when the spec initializes the
// pair's data as primary), refuses other geometry with 409, and copies the
// spec's role, epoch, mode, peer and pair UID into the status; an
// unreachable agent fails every call with agentapi.ErrNotSent. It does not
// model the engine's rules (epoch order, which member may be promoted,
// replication, copies, holds): a test sets the status it needs with Update
// and injects the refusals it needs with Fail.
package agentapitest

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"

	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// Op names an agentapi.API method.
type Op string

// Operations.
const (
	OpGet          Op = "Get"
	OpPut          Op = "Put"
	OpDelete       Op = "Delete"
	OpPeerOutdated Op = "PeerOutdated"
)

// Call is one call a fake agent received (or refused).
type Call struct {
	// Endpoint is the control endpoint the client was made for ("" for a
	// client from Agent.Client).
	Endpoint        string
	Op              Op
	Namespace, Name string
	// Request is Put's body.
	Request agentapi.VolumeRequest
	// Member is PeerOutdated's member ("" when none was named).
	Member string
	// Epoch is PeerOutdated's.
	Epoch uint64
	// Purge is Delete's.
	Purge bool
	// Err is what the call returned.
	Err error
}

// Agent is one fake agent. Its methods are safe for concurrent use.
type Agent struct {
	node  string
	token string

	mu        sync.Mutex
	volumes   map[string]agentapi.Status // by "namespace/name"
	calls     []Call
	fail      map[Op]error
	reachable bool
	log       *callLog // of the Agents set it belongs to, if any
}

// NewAgent returns an empty, reachable agent on node that accepts token
// ("" accepts any).
func NewAgent(node, token string) *Agent {
	return &Agent{node: node, token: token, volumes: map[string]agentapi.Status{}, fail: map[Op]error{}, reachable: true}
}

// Client returns a client of a, as if made for token.
func (a *Agent) Client(token string) agentapi.API { return &client{agent: a, token: token} }

// Fail makes every later call of op fail with err, before it acts, until
// Fail(op, nil). err is returned as it is: an *agentapi.APIError for a
// refusal, an error wrapping agentapi.ErrNotSent for a call that never
// left, anything else for a call that may have acted.
func (a *Agent) Fail(op Op, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err == nil {
		delete(a.fail, op)
		return
	}
	a.fail[op] = err
}

// SetReachable makes the agent answer (true, the default) or not: while it
// does not, every call fails with an error wrapping agentapi.ErrNotSent and
// changes nothing.
func (a *Agent) SetReachable(ok bool) {
	a.mu.Lock()
	a.reachable = ok
	a.mu.Unlock()
}

// Update changes the status of ns/name with fn, creating the volume (with
// Name set and the rest zero) if it does not exist, as the engine's own
// progress would: a copy finishing, the link going down, a write held.
func (a *Agent) Update(ns, name string, fn func(*agentapi.Status)) {
	a.mu.Lock()
	defer a.mu.Unlock()
	key := ns + "/" + name
	st, ok := a.volumes[key]
	if !ok {
		st = agentapi.Status{Name: key}
	}
	fn(&st)
	a.volumes[key] = st
}

// Volume returns the status of ns/name, and whether the agent holds it.
func (a *Agent) Volume(ns, name string) (agentapi.Status, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	st, ok := a.volumes[ns+"/"+name]
	return st, ok
}

// Calls returns the calls a received, in order.
func (a *Agent) Calls() []Call {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.calls)
}

// call runs one call: it records it, and returns the injected error if
// any, or else what do returns.
func (a *Agent) call(c Call, token string, do func() (agentapi.Status, error)) (agentapi.Status, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	var st agentapi.Status
	var err error
	switch {
	case !a.reachable:
		err = fmt.Errorf("%s %s/%s on %s: %w: the fake agent is unreachable", c.Op, c.Namespace, c.Name, a.node, agentapi.ErrNotSent)
	case a.token != "" && token != a.token:
		err = &agentapi.APIError{Code: http.StatusUnauthorized, Message: "authentication required: send Authorization: Bearer <token>"}
	case a.fail[c.Op] != nil:
		err = a.fail[c.Op]
	default:
		st, err = do()
	}
	c.Err = err
	a.calls = append(a.calls, c)
	if a.log != nil {
		a.log.add(c)
	}
	return st, err
}

func (a *Agent) notFound(ns, name string) error {
	return &agentapi.APIError{Code: http.StatusNotFound, Message: fmt.Sprintf("no volume %s/%s on node %s", ns, name, a.node)}
}

// get, put, remove and peerOutdated run with a.mu held.

func (a *Agent) get(ns, name string) (agentapi.Status, error) {
	st, ok := a.volumes[ns+"/"+name]
	if !ok {
		return agentapi.Status{}, a.notFound(ns, name)
	}
	return st, nil
}

func (a *Agent) put(ns, name string, req agentapi.VolumeRequest) (agentapi.Status, error) {
	key := ns + "/" + name
	st, ok := a.volumes[key]
	if req.Size <= 0 || req.RegionSize <= 0 {
		return agentapi.Status{}, &agentapi.APIError{Code: http.StatusBadRequest,
			Message: fmt.Sprintf("size (%d) and regionSize (%d) must be positive", req.Size, req.RegionSize)}
	}
	switch {
	case !ok:
		st = agentapi.Status{Name: key, Size: req.Size, RegionSize: req.RegionSize, Role: agentapi.RoleNone,
			DataState: agentapi.Inconsistent, DataStateReason: "the replica is new"}
	case st.RegionSize != req.RegionSize:
		return agentapi.Status{}, &agentapi.APIError{Code: http.StatusConflict,
			Message: fmt.Sprintf("volume %s exists with size %d and region size %d, asked %d and %d", key, st.Size, st.RegionSize, req.Size, req.RegionSize)}
	case req.Size < st.Size:
		// As the agent: a volume never shrinks.
		return agentapi.Status{}, &agentapi.APIError{Code: http.StatusConflict,
			Message: fmt.Sprintf("volume %s has size %d; %d asked is smaller, and a volume never shrinks", key, st.Size, req.Size)}
	default:
		// A larger size grows the replica, as the agent does.
		st.Size = req.Size
	}
	s := req.Spec
	if s.Initialize && s.Role == agentapi.RolePrimary && !st.Joined {
		st.DataState, st.DataStateReason, st.Joined = agentapi.UpToDate, "", true
	}
	st.Role, st.Epoch, st.Mode, st.PeerNode = s.Role, s.Epoch, s.Mode, s.PeerNode
	// A replica of a pair of three or more reports its members (a real
	// agent reports them for two as well; the fake keeps the summary
	// fields tests set for two). Links start disconnected.
	st.Tracked, st.Peers = nil, nil
	if peers := s.Peers(); len(peers) > 1 {
		for _, p := range peers {
			st.Tracked = append(st.Tracked, p.Node)
			if s.Role == agentapi.RolePrimary {
				st.Peers = append(st.Peers, agentapi.PeerStatus{Node: p.Node, Mode: p.Mode})
			}
		}
	}
	if s.PairUID != "" {
		st.PairUID = s.PairUID
	}
	st.Writable = s.Role == agentapi.RolePrimary && st.Joined
	st.Reason = ""
	if !st.Writable {
		st.Reason = fmt.Sprintf("member %s is %s at epoch %d", a.node, st.Role, st.Epoch)
	}
	a.volumes[key] = st
	return st, nil
}

// remove is the agent's: closing a replica it does not hold is a 404, but
// purging one succeeds (the agent removes whatever files are left).
func (a *Agent) remove(ns, name string, purge bool) error {
	key := ns + "/" + name
	if _, ok := a.volumes[key]; !ok && !purge {
		return a.notFound(ns, name)
	}
	delete(a.volumes, key)
	return nil
}

func (a *Agent) peerOutdated(ns, name string) (agentapi.Status, error) {
	key := ns + "/" + name
	st, ok := a.volumes[key]
	if !ok {
		return agentapi.Status{}, a.notFound(ns, name)
	}
	st.WaitingForPeerOutdated = 0
	a.volumes[key] = st
	return st, nil
}

// client is one agentapi.API of an Agent.
type client struct {
	agent    *Agent
	endpoint string
	token    string
}

var _ agentapi.API = (*client)(nil)

func (c *client) Get(_ context.Context, ns, name string) (agentapi.Status, error) {
	return c.agent.call(Call{Endpoint: c.endpoint, Op: OpGet, Namespace: ns, Name: name}, c.token,
		func() (agentapi.Status, error) { return c.agent.get(ns, name) })
}

func (c *client) Put(_ context.Context, ns, name string, req agentapi.VolumeRequest) (agentapi.Status, error) {
	return c.agent.call(Call{Endpoint: c.endpoint, Op: OpPut, Namespace: ns, Name: name, Request: req}, c.token,
		func() (agentapi.Status, error) { return c.agent.put(ns, name, req) })
}

func (c *client) Delete(_ context.Context, ns, name string, purge bool) error {
	_, err := c.agent.call(Call{Endpoint: c.endpoint, Op: OpDelete, Namespace: ns, Name: name, Purge: purge}, c.token,
		func() (agentapi.Status, error) { return agentapi.Status{}, c.agent.remove(ns, name, purge) })
	return err
}

func (c *client) PeerOutdated(_ context.Context, ns, name string, epoch uint64, node ...string) (agentapi.Status, error) {
	return c.agent.call(Call{Endpoint: c.endpoint, Op: OpPeerOutdated, Namespace: ns, Name: name, Epoch: epoch, Member: strings.Join(node, ",")}, c.token,
		func() (agentapi.Status, error) { return c.agent.peerOutdated(ns, name) })
}

// callLog is the calls of a set of agents, in the order they were made.
type callLog struct {
	mu    sync.Mutex
	calls []Call
}

func (l *callLog) add(c Call) {
	l.mu.Lock()
	l.calls = append(l.calls, c)
	l.mu.Unlock()
}

// Agents is a set of fake agents by control endpoint. Its New method is an
// agentapi.NewFunc.
type Agents struct {
	mu  sync.Mutex
	by  map[string]*Agent
	log callLog
}

// NewAgents returns an empty set.
func NewAgents() *Agents { return &Agents{by: map[string]*Agent{}} }

// Add makes a the agent at endpoint and returns it. An agent belongs to one
// set at most.
func (s *Agents) Add(endpoint string, a *Agent) *Agent {
	s.mu.Lock()
	s.by[endpoint] = a
	s.mu.Unlock()
	a.mu.Lock()
	a.log = &s.log
	a.mu.Unlock()
	return a
}

// New returns a client of the agent at endpoint; with no agent there, every
// call of the client fails with agentapi.ErrNotSent, as a call to an address
// nobody listens on does.
func (s *Agents) New(endpoint, token string) agentapi.API {
	s.mu.Lock()
	a := s.by[endpoint]
	s.mu.Unlock()
	if a == nil {
		return nobody{endpoint}
	}
	return &client{agent: a, endpoint: endpoint, token: token}
}

var _ agentapi.NewFunc = (*Agents)(nil).New

// Calls returns the calls every agent of the set received, in the order
// they were made.
func (s *Agents) Calls() []Call {
	s.log.mu.Lock()
	defer s.log.mu.Unlock()
	return slices.Clone(s.log.calls)
}

// nobody is the client of an endpoint with no agent.
type nobody struct{ endpoint string }

func (n nobody) err(op Op) error {
	return fmt.Errorf("%s via %s: %w: no fake agent at this endpoint", op, n.endpoint, agentapi.ErrNotSent)
}

func (n nobody) Get(context.Context, string, string) (agentapi.Status, error) {
	return agentapi.Status{}, n.err(OpGet)
}

func (n nobody) Put(context.Context, string, string, agentapi.VolumeRequest) (agentapi.Status, error) {
	return agentapi.Status{}, n.err(OpPut)
}

func (n nobody) Delete(context.Context, string, string, bool) error { return n.err(OpDelete) }

func (n nobody) PeerOutdated(context.Context, string, string, uint64, ...string) (agentapi.Status, error) {
	return agentapi.Status{}, n.err(OpPeerOutdated)
}
