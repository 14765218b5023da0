package controllers

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	toolscache "k8s.io/client-go/tools/cache"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/authority"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// observe fills s.view: agents, probes, Node readiness, authority.
func (r *VolumePairReconciler) observe(ctx context.Context, s *scope) error {
	vp := s.vp
	s.agents = map[string]agentInfo{}
	key := client.ObjectKeyFromObject(vp)
	s.view = View{
		PairUID: string(vp.UID), DataInitialized: vp.Status.DataInitialized, Size: vp.Spec.SizeBytes(),
		Mode: vp.Spec.Mode, FailoverPolicy: vp.Spec.Failover.Policy, FailbackPolicy: vp.Spec.Failback.Policy,
		FailoverRequested: vp.Annotations[v1.AnnotationFailoverRequested] != "",
		FailbackRequested: vp.Annotations[v1.AnnotationFailbackRequested] != "",
		ForcePromote:      strings.TrimSpace(vp.Annotations[v1.AnnotationForcePromote]),
	}
	s.view.ForcePromoteAge = forceAge(&vp.Status, s.view.ForcePromote, r.Now())
	clients, err := r.desiredClients(ctx, vp)
	if err != nil {
		return err
	}
	s.view.Clients = clients
	period, threshold := probeTiming(vp)
	// Probe every member at once, each bounded by the probe period (at most
	// 1 s), so an unreachable member costs one short timeout per round.
	timeout := min(max(period, 200*time.Millisecond), time.Second)
	nodes := vp.Spec.MemberNodes()
	type probeResult struct {
		info         agentInfo
		infoOK       bool
		unregistered bool // no agent Lease for the node
		st           *agentapi.Status
		reachable    bool
	}
	results := make([]probeResult, len(nodes))
	var wg sync.WaitGroup
	for i, node := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			info, err := r.agentInfo(ctx, node)
			if err != nil {
				results[i].unregistered = apierrors.IsNotFound(err)
				return
			}
			results[i].info, results[i].infoOK = info, true
			t := timeout
			if r.probeState(key, node).failures > 0 {
				// Already failing: a short look is enough to notice it is
				// back, and keeps rounds (and failovers) fast.
				t = min(t, 250*time.Millisecond)
			}
			pctx, cancel := context.WithTimeout(ctx, t)
			defer cancel()
			st, perr := r.probe(pctx, info, vp)
			if perr == nil {
				results[i].st, results[i].reachable = st, true
			}
		}()
	}
	wg.Wait()
	haveNodes, err := r.clusterHasNodes(ctx)
	if err != nil {
		return err
	}
	held := HeldMembers(vp)
	for i, node := range nodes {
		m := MemberView{Node: node, Field: memberField(i), Unregistered: results[i].unregistered, Held: slices.Contains(held, node)}
		found, notReady := r.nodeState(ctx, node)
		m.NodeMissing = haveNodes && !found
		if ms := vp.Status.MemberStatus(node); ms != nil && ms.DataState == v1.DataOutdated {
			m.RecordedOutdated = true
			m.OutdatedNotSent = ms.OutdatedConfirmation == v1.OutdatedNotSent
		}
		if results[i].infoOK {
			s.agents[node] = results[i].info
			m.Reachable, m.Status = results[i].reachable, results[i].st
		}
		ps := r.probeState(key, node)
		now := r.Now()
		if g := ps.growRefused; g.size == vp.Spec.SizeBytes() && now.Sub(g.at) < growRetry {
			m.GrowRefused = g.msg
		}
		if m.Reachable {
			ps.failures, ps.lastSeen, ps.lostAt, ps.last = 0, now, time.Time{}, m.Status
		} else {
			ps.failures++
		}
		// Suspect after failureThreshold failed probes in a row, or when
		// nothing answered for failureThreshold probe periods (rounds take
		// longer than a period when probes time out), or when the Node is
		// not Ready.
		silent := !ps.lastSeen.IsZero() && now.Sub(ps.lastSeen) >= time.Duration(threshold)*period
		m.Suspect = ps.failures >= threshold || silent || notReady
		if m.Suspect && ps.lostAt.IsZero() {
			ps.lostAt = now
		}
		if i >= 2 {
			m.Mode = vp.Spec.ModeOf(node)
		}
		switch i {
		case 0:
			s.view.Primary = m
		case 1:
			s.view.Backup = m
		default:
			s.view.More = append(s.view.More, m)
		}
	}
	lease, err := r.readAuthority(ctx, vp)
	switch {
	case err != nil:
		return err
	case lease == nil:
		return nil
	}
	if err := authority.CheckOwner(lease, authority.PairOf(vp)); err != nil {
		s.notOwned = err
		return nil
	}
	s.authority = lease
	a := AuthorityView{Exists: true, FailedOver: authority.FailedOver(lease)}
	if a.Holder, a.Epoch, err = authority.Holder(lease); err != nil {
		return err
	}
	// Expiry on this controller's clock, from when it saw the Lease change
	// (the agent's renewTime is never compared with this clock).
	obs := r.leases.Observe(lease)
	s.authorityExpiry, a.Expired = obs.ExpiresAt, obs.Expired
	if !vp.Spec.IsMember(a.Holder) {
		// The writer's node was replaced in the spec (the Lease is this
		// pair's: CheckOwner above). Nothing is done until the user sets
		// it back; the writer keeps serving meanwhile.
		s.writerReplaced = writerNotMember(vp, a.Holder)
		return nil
	}
	s.view.Authority = a
	if last := r.probeState(key, a.Holder).last; last != nil {
		s.view.LastWriterPeers = last.Peers
	}
	if gaveUp := r.probeState(key, a.Holder).holdGaveUp; !gaveUp.IsZero() && r.Now().Sub(gaveUp) < holdBackoff {
		s.view.HoldBackoff = true
	}
	// A member that held the authority before its last move must have
	// reached the API server since before it is given the authority back:
	// this controller must have seen its agent Lease change after it saw
	// the current holder arrive (its own move, or its first sight of the
	// Lease after a restart, which may cost one agent renewal, 2 s).
	for _, m := range s.view.all() {
		if info, ok := s.agents[m.Node]; ok && m.Node != a.Holder && !info.changed.After(obs.HolderSince) {
			m.APILost = true
		}
	}
	return nil
}

func (r *VolumePairReconciler) probeState(key types.NamespacedName, node string) *probeState {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := r.probes[key]
	if m == nil {
		m = map[string]*probeState{}
		r.probes[key] = m
	}
	if m[node] == nil {
		m[node] = &probeState{}
	}
	return m[node]
}

func (r *VolumePairReconciler) lastSeen(key types.NamespacedName, node string) time.Time {
	return r.probeState(key, node).lastSeen
}

// CacheOptions is the manager's cache configuration for this controller:
// Leases only in the operator namespace and only the agents' (their
// endpoints; the manager may not list Leases elsewhere), Nodes for their
// readiness. Reading these from the cache instead of the API server saves
// four requests per pair and probe period; 16 pairs on a busy API server
// made each round, and so each failover step, take a second.
func CacheOptions(namespace string) cache.Options {
	// csi-node: the CSI node plugins' heartbeats (internal/csi).
	ours, err := labels.Parse(v1.LabelComponent + " in (agent,authority,csi-node)")
	if err != nil {
		panic(fmt.Sprintf("controllers: Lease selector: %v", err)) // a constant
	}
	return cache.Options{ByObject: map[client.Object]cache.ByObject{
		&coordinationv1.Lease{}: {Namespaces: map[string]cache.Config{namespace: {}}, Label: ours},
	}}
}

// watchLeases times every renewal of an agent or authority Lease when the
// watch delivers it, not when the next round reads the Lease: a round reads
// the authority Lease once per probe period, so the last renewal of a writer
// that died was seen up to a period late, and its failover came up to a
// period late too (expiry counts from the observation, never from a time
// another node wrote). Rounds still read the authority Lease live.
func (r *VolumePairReconciler) watchLeases(ctx context.Context, c cache.Cache) error {
	inf, err := c.GetInformer(ctx, &coordinationv1.Lease{})
	if err != nil {
		return fmt.Errorf("informer for Leases: %w", err)
	}
	_, err = inf.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { r.observeLease(obj) },
		UpdateFunc: func(_, obj any) { r.observeLease(obj) },
		DeleteFunc: func(obj any) {
			if tomb, ok := obj.(toolscache.DeletedFinalStateUnknown); ok {
				obj = tomb.Obj
			}
			if l, ok := obj.(*coordinationv1.Lease); ok && l.Labels[v1.LabelComponent] == "authority" {
				r.leases.Forget(l.Namespace, l.Name)
			}
		},
	})
	if err != nil {
		return fmt.Errorf("watch Leases: %w", err)
	}
	return nil
}

// observeLease records a Lease the watch delivered.
func (r *VolumePairReconciler) observeLease(obj any) {
	if l, ok := obj.(*coordinationv1.Lease); ok && l.Namespace == r.Namespace {
		r.leases.Observe(l)
	}
}

// agentInfo reads a node's agent Lease; an expired Lease still gives the
// endpoints (probes decide liveness).
func (r *VolumePairReconciler) agentInfo(ctx context.Context, node string) (agentInfo, error) {
	l := &coordinationv1.Lease{}
	if err := r.Get(ctx, client.ObjectKey{Namespace: r.Namespace, Name: v1.AgentLeaseName(node)}, l); err != nil {
		return agentInfo{}, fmt.Errorf("agent Lease of %s: %w", node, err)
	}
	info := agentInfo{control: l.Annotations[v1.AnnControlEndpoint], replication: l.Annotations[v1.AnnReplicationEndpoint],
		nbd: l.Annotations[v1.AnnNBDEndpoint], dataDir: l.Annotations[v1.AnnDataDir]}
	info.changed = r.leases.Observe(l).LastChange
	if info.control == "" {
		return agentInfo{}, fmt.Errorf("agent Lease of %s has no control endpoint", node)
	}
	return info, nil
}

// probe asks the agent for the replica's status. An agent that answers but
// has no replica yet is reachable with a nil status.
func (r *VolumePairReconciler) probe(ctx context.Context, info agentInfo, vp *v1.VolumePair) (*agentapi.Status, error) {
	c := r.NewAgentClient(info.control, r.agentToken())
	st, err := c.Get(ctx, vp.Namespace, vp.Name)
	if agentapi.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return &st, nil
}

// nodeState reads the member's Node object: whether it exists, and whether
// it is not Ready. Without a Node object (or when it cannot be read) probes
// alone decide whether the member is lost.
func (r *VolumePairReconciler) nodeState(ctx context.Context, node string) (found, notReady bool) {
	n := &corev1.Node{}
	if err := r.Get(ctx, client.ObjectKey{Name: node}, n); err != nil {
		return !apierrors.IsNotFound(err), false
	}
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return true, c.Status != corev1.ConditionTrue
		}
	}
	return true, false
}

// clusterHasNodes reports whether the API server has any Node object. A
// member whose Node does not exist is missing only then: a control plane
// without Node objects (the controller's envtest suites) has agents but no
// Nodes, and there probes alone decide.
func (r *VolumePairReconciler) clusterHasNodes(ctx context.Context) (bool, error) {
	var nodes corev1.NodeList
	if err := r.List(ctx, &nodes, client.Limit(1)); err != nil {
		return false, fmt.Errorf("list Nodes: %w", err)
	}
	return len(nodes.Items) > 0, nil
}

// forceAge is how long the pair's force-promote request for node ("":
// none) has been seen, counted from its first sight recorded in
// status.forcePromoteSeen (so a manager restart or a leader change does not
// restart the count). It records a new request, one that names another
// node, and forgets one that is gone.
func forceAge(st *v1.VolumePairStatus, node string, now time.Time) time.Duration {
	switch {
	case node == "":
		st.ForcePromoteSeen = nil
		return 0
	case st.ForcePromoteSeen != nil && st.ForcePromoteSeen.Node == node:
		return max(now.Sub(st.ForcePromoteSeen.Since.Time), 0)
	}
	st.ForcePromoteSeen = &v1.ForcePromoteSeen{Node: node, Since: metav1.NewTime(now)}
	return 0
}

// HeldMembers is the storage.tandem.dev/hold-resync annotation's list of
// nodes.
func HeldMembers(vp *v1.VolumePair) []string {
	var out []string
	for _, n := range strings.Split(vp.Annotations[v1.AnnotationHoldResync], ",") {
		if n = strings.TrimSpace(n); n != "" && !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}

// memberField is the spec field that names the i-th member (in
// VolumePairSpec.MemberNodes order), for messages.
func memberField(i int) string {
	switch i {
	case 0:
		return "spec.primary.node"
	case 1:
		return "spec.backup.node"
	}
	return fmt.Sprintf("spec.additionalBackups[%d].node", i-2)
}

// desiredClients is spec.clients with the nodes' addresses (the InternalIP
// addresses of their Node objects; a node without a Node object or an
// address contributes none, so its clients are refused).
func (r *VolumePairReconciler) desiredClients(ctx context.Context, vp *v1.VolumePair) (*agentapi.Clients, error) {
	if vp.Spec.Clients == nil {
		return nil, nil
	}
	c := &agentapi.Clients{Nodes: append([]string{}, vp.Spec.Clients.Nodes...), Addresses: []string{}}
	for _, name := range vp.Spec.Clients.Nodes {
		n := &corev1.Node{}
		if err := r.Get(ctx, client.ObjectKey{Name: name}, n); err != nil {
			if apierrors.IsNotFound(err) {
				continue
			}
			return nil, fmt.Errorf("client node %s: %w", name, err)
		}
		for _, a := range n.Status.Addresses {
			if a.Type == corev1.NodeInternalIP && !slices.Contains(c.Addresses, a.Address) {
				c.Addresses = append(c.Addresses, a.Address)
			}
		}
	}
	return c, nil
}
