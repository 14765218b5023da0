// Package controllers holds the VolumePair reconciler: it probes each
// member's agent, holds the per-pair authority Lease with its epoch, fences a
// lost primary by waiting for that Lease to expire, and drives the phases
// PAIR → SWAP → COPY → NORMAL → PAIR, writing status a user can read with
// kubectl. Agents act; the controller decides (DESIGN §2–§4).
package controllers

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/events"
	"k8s.io/client-go/util/retry"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/log"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/dataplane/agent"
	"github.com/tandem-storage/tandem/dataplane/volume"
	"github.com/tandem-storage/tandem/internal/authority"
)

// +kubebuilder:rbac:groups=storage.tandem.dev,resources=volumepairs,verbs=get;list;watch;update;patch
// +kubebuilder:rbac:groups=storage.tandem.dev,resources=volumepairs/status,verbs=get;update;patch
// +kubebuilder:rbac:groups=storage.tandem.dev,resources=volumepairs/finalizers,verbs=update
// +kubebuilder:rbac:groups=core,resources=nodes,verbs=get;list;watch
// +kubebuilder:rbac:groups=core;events.k8s.io,resources=events,verbs=create;patch
// Leases (the agents' registrations, the per-pair authority Leases, leader
// election) live in the operator namespace only: the namespaced Role in
// config/rbac/leader_election_role.yaml grants them, not this ClusterRole.

// BlockedAuthorityNotOwned is the FailoverBlocked (and Ready) reason while
// the pair's authority Lease belongs to another pair: no step is taken.
const BlockedAuthorityNotOwned = "AuthorityLeaseNotOwned"

// maxConcurrentReconciles is how many VolumePairs are reconciled at once
// (never the same one twice: the work queue hands a key to one worker at a
// time). A reconcile mostly waits: probes of both members (up to 1 s when
// one is unreachable), Lease and Node reads, agent calls, a status patch. With
// controller-runtime's default of 1, every pair waits for all the others, so
// with 16 pairs each was looked at every ~2.5 s instead of every probe period
// and a lost node's pairs failed over one after the other, up to 13 s late.
const maxConcurrentReconciles = 16

// VolumePairReconciler reconciles VolumePairs.
type VolumePairReconciler struct {
	client.Client
	// APIReader reads the authority Leases live, bypassing the cache: the
	// failover decision rests on seeing them change. Agent Leases
	// (endpoints) and Nodes (readiness) come from the cache (CacheOptions).
	APIReader client.Reader
	Recorder  events.EventRecorder
	// Namespace is the operator namespace holding agent and authority Leases.
	Namespace string
	// AgentToken authenticates to the agents' control API.
	AgentToken string
	// NewAgentClient builds a control API client (tests may override).
	NewAgentClient func(endpoint, token string) *agent.Client
	// Clock is the controller's clock (default clock.RealClock{}): Lease
	// expiry is counted on it from when this process saw a Lease change
	// (authority.Observer), never from a time written by another node.
	Clock clock.PassiveClock
	// Now is Clock.Now unless set.
	Now func() time.Time

	mu     sync.Mutex
	probes map[types.NamespacedName]map[string]*probeState
	leases *authority.Observer
	// legacyGone: pairs whose Lease of the older naming is known gone.
	legacyGone map[types.UID]bool
}

type probeState struct {
	failures int32
	lastSeen time.Time
	lostAt   time.Time      // when the member became suspect
	last     *volume.Status // the member's last report (nil: none, or no replica)
	// holdGaveUp is when a failback hold on this member (as the writer)
	// was released because it did not drain in time.
	holdGaveUp time.Time
}

// holdBackoff is how long after a failback hold that did not drain in time
// the next one may start.
const holdBackoff = 5 * time.Second

// scope is what one reconcile learns and decides.
type scope struct {
	vp        *v1.VolumePair
	base      *v1.VolumePair
	view      View
	agents    map[string]agentInfo
	authority *coordinationv1.Lease
	step      Step
	stepErr   error
	acted     bool
	// authorityExpiry is when the authority Lease counts as expired.
	authorityExpiry time.Time
	// notOwned is set when the pair's authority Lease belongs to another
	// pair (authority.NotOwnedError): no step is taken.
	notOwned error
}

type agentInfo struct {
	control, replication, nbd string
	dataDir                   string
	// changed is when this controller last saw the agent Lease change
	// (its clock): the agent reached the API server shortly before.
	changed time.Time
}

// SetupWithManager registers the reconciler.
func (r *VolumePairReconciler) SetupWithManager(mgr ctrl.Manager) error {
	if r.NewAgentClient == nil {
		r.NewAgentClient = agent.NewClient
	}
	if r.Clock == nil {
		r.Clock = clock.RealClock{}
	}
	if r.Now == nil {
		r.Now = r.Clock.Now
	}
	r.probes = map[types.NamespacedName]map[string]*probeState{}
	r.leases = authority.NewObserver(r.Clock)
	r.legacyGone = map[types.UID]bool{}
	return ctrl.NewControllerManagedBy(mgr).For(&v1.VolumePair{}).Named("volumepair").
		WithOptions(controller.Options{MaxConcurrentReconciles: maxConcurrentReconciles}).Complete(r)
}

// Reconcile runs one round for a VolumePair: observe, decide one step, act,
// and patch status once.
func (r *VolumePairReconciler) Reconcile(ctx context.Context, req ctrl.Request) (res ctrl.Result, retErr error) {
	logger := log.FromContext(ctx)
	vp := &v1.VolumePair{}
	if err := r.Get(ctx, req.NamespacedName, vp); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if !vp.DeletionTimestamp.IsZero() {
		return r.reconcileDelete(ctx, vp)
	}
	if !controllerutil.ContainsFinalizer(vp, v1.Finalizer) {
		patch := client.MergeFrom(vp.DeepCopy())
		controllerutil.AddFinalizer(vp, v1.Finalizer)
		if err := r.Patch(ctx, vp, patch); err != nil {
			return ctrl.Result{}, fmt.Errorf("add finalizer: %w", err)
		}
		//lint:ignore SA1019 an immediate, rate-limited requeue has no RequeueAfter equivalent; kept until the envtest suites can confirm dropping it (the finalizer patch's own event requeues the pair).
		return ctrl.Result{Requeue: true}, nil
	}

	s := &scope{vp: vp, base: vp.DeepCopy()}
	defer func() {
		if err := r.patchStatus(ctx, s, retErr == nil && s.stepErr == nil); err != nil {
			retErr = errors.Join(retErr, err)
		}
	}()

	if err := r.observe(ctx, s); err != nil {
		return ctrl.Result{}, err
	}
	if s.notOwned != nil {
		// Another pair's Lease: acting on it would move that pair's writer.
		period, _ := probeTiming(vp)
		s.step = Step{Kind: StepNone, Blocked: BlockedAuthorityNotOwned, Message: s.notOwned.Error()}
		logger.Error(s.notOwned, "Not acting on the authority Lease")
		if c := meta.FindStatusCondition(vp.Status.Conditions, v1.ConditionFailoverBlocked); c == nil || c.Reason != BlockedAuthorityNotOwned {
			r.Recorder.Eventf(vp, nil, corev1.EventTypeWarning, BlockedAuthorityNotOwned, "Refuse", "%v", s.notOwned)
		}
		return ctrl.Result{RequeueAfter: period}, nil
	}
	s.step = Decide(s.view)
	if s.step.Kind != StepNone {
		logger.Info("Taking step", "step", s.step.Kind, "target", s.step.Target, "epoch", s.view.Authority.Epoch)
		s.stepErr = r.act(ctx, s)
		s.acted = true
		if s.stepErr != nil {
			logger.Error(s.stepErr, "Step failed", "step", s.step.Kind, "target", s.step.Target)
			r.Recorder.Eventf(vp, nil, corev1.EventTypeWarning, "StepFailed", string(s.step.Kind), "%s towards %s failed: %v", s.step.Kind, s.step.Target, s.stepErr)
		}
	}
	period, threshold := probeTiming(vp)
	now := r.Now()
	rt := roundTiming{period: period, acted: s.acted && s.stepErr == nil, blocked: s.step.Blocked,
		stepNone: s.step.Kind == StepNone, writerFenced: WriterFenced(s.view), expired: s.view.Authority.Expired}
	if s.view.Authority.Exists {
		if w := s.view.member(s.view.Authority.Holder); w.Status != nil && w.Status.Holding {
			rt.holding = true
		}
	}
	if !s.authorityExpiry.IsZero() {
		rt.untilExpiry = s.authorityExpiry.Sub(now)
	}
	if s.view.Authority.Exists {
		w := s.view.member(s.view.Authority.Holder)
		if ps := r.probeState(client.ObjectKeyFromObject(vp), w.Node); !w.Reachable && !w.Suspect && !ps.lastSeen.IsZero() {
			rt.writerFailing = true
			rt.untilSilent = ps.lastSeen.Add(time.Duration(threshold) * period).Sub(now)
		}
	}
	return ctrl.Result{RequeueAfter: rt.next()}, nil
}

// probeTiming is the pair's probe period and failure threshold (the CRD
// defaults when unset).
func probeTiming(vp *v1.VolumePair) (time.Duration, int32) {
	period := time.Duration(vp.Spec.Failover.ProbePeriodSeconds) * time.Second
	if period <= 0 {
		period = 2 * time.Second
	}
	threshold := vp.Spec.Failover.FailureThreshold
	if threshold <= 0 {
		threshold = 3
	}
	return period, threshold
}

// roundTiming is what decides when the next round runs.
type roundTiming struct {
	period        time.Duration // the probe period
	acted         bool          // this round took a step, successfully
	blocked       string        // the step's Blocked reason
	stepNone      bool
	writerFenced  bool          // WriterFenced
	expired       bool          // the authority Lease has expired
	untilExpiry   time.Duration // until it counts as expired (0: no Lease)
	writerFailing bool          // the writer missed its last probe, not suspect yet
	untilSilent   time.Duration // until it counts as silent (suspect)
	holding       bool          // the writer holds writes for a failback
}

// next is the delay before the next round: a probe period, shorter when
// something is about to change. A step is followed quickly (the next one
// usually depends on it). A writer that is lost or fenced is looked at
// again right when its authority expires, and one that missed a probe right
// when its silence makes it suspect: failover happens at the later of the
// two, not up to a period after. A writer playing its role but not yet
// writable, while its authority holds, is usually a promoted one waiting for
// its first renewal: it is looked at every 250 ms so Ready and the endpoint
// follow within a renewal.
func (t roundTiming) next() time.Duration {
	if t.acted {
		return 100 * time.Millisecond
	}
	d := t.period
	soon := func(x time.Duration) {
		if x > 0 && x < d {
			d = x
		}
	}
	waitingOnWriter := t.stepNone && t.writerFenced && !t.expired
	if (t.blocked == BlockedAuthorityNotExpired || waitingOnWriter) && t.untilExpiry != 0 {
		soon(t.untilExpiry + 50*time.Millisecond)
	}
	if waitingOnWriter {
		soon(250 * time.Millisecond)
	}
	if t.writerFailing {
		soon(t.untilSilent + 50*time.Millisecond)
	}
	if t.holding {
		// Every client write waits while the writer holds: switch as soon
		// as it has drained.
		soon(50 * time.Millisecond)
	}
	return d
}

// observe fills s.view: agents, probes, Node readiness, authority.
func (r *VolumePairReconciler) observe(ctx context.Context, s *scope) error {
	vp := s.vp
	s.agents = map[string]agentInfo{}
	key := client.ObjectKeyFromObject(vp)
	s.view = View{
		PairUID: string(vp.UID), DataInitialized: vp.Status.DataInitialized,
		Mode: vp.Spec.Mode, FailoverPolicy: vp.Spec.Failover.Policy, FailbackPolicy: vp.Spec.Failback.Policy,
		FailoverRequested: vp.Annotations[v1.AnnotationFailoverRequested] != "",
		FailbackRequested: vp.Annotations[v1.AnnotationFailbackRequested] != "",
	}
	period, threshold := probeTiming(vp)
	// Probe both members at once, each bounded by the probe period (at most
	// 1 s), so an unreachable member costs one short timeout per round.
	timeout := min(max(period, 200*time.Millisecond), time.Second)
	nodes := []string{vp.Spec.Primary.Node, vp.Spec.Backup.Node}
	type probeResult struct {
		info      agentInfo
		infoOK    bool
		st        *volume.Status
		reachable bool
	}
	results := make([]probeResult, len(nodes))
	var wg sync.WaitGroup
	for i, node := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			info, err := r.agentInfo(ctx, node)
			if err != nil {
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
	for i, node := range nodes {
		m := MemberView{Node: node}
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
		m.Suspect = ps.failures >= threshold || silent || r.nodeNotReady(ctx, node)
		if m.Suspect && ps.lostAt.IsZero() {
			ps.lostAt = now
		}
		if i == 0 {
			s.view.Primary = m
		} else {
			s.view.Backup = m
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
	if a.Holder != vp.Spec.Primary.Node && a.Holder != vp.Spec.Backup.Node {
		// Members are immutable except for swaps, so this is an
		// authority left from an older object of the same name.
		return fmt.Errorf("authority Lease %s names %q, which is not a member", lease.Name, a.Holder)
	}
	s.view.Authority = a
	if gaveUp := r.probeState(key, a.Holder).holdGaveUp; !gaveUp.IsZero() && r.Now().Sub(gaveUp) < holdBackoff {
		s.view.HoldBackoff = true
	}
	// A member that held the authority before its last move must have
	// reached the API server since before it is given the authority back:
	// this controller must have seen its agent Lease change after it saw
	// the current holder arrive (its own move, or its first sight of the
	// Lease after a restart, which may cost one agent renewal, 2 s).
	for _, m := range []*MemberView{&s.view.Primary, &s.view.Backup} {
		if info, ok := s.agents[m.Node]; ok && m.Node != a.Holder && !info.changed.After(obs.HolderSince) {
			m.APILost = true
		}
	}
	return nil
}

// readAuthority reads the pair's authority Lease live (nil if there is
// none).
//
// A pair created before Leases were named after the pair's UID has its Lease
// under the older name ("tandem-pair-<namespace>-<name>"); it is adopted
// once: created under the new name with the same holder, epoch and
// failed-over mark, and the old one deleted (authority.Adopt). A Lease of the
// older name that names this pair must be gone before the controller acts on
// the new one, since an agent not yet upgraded may still renew it and write
// under it: its deletion is checked once per pair and process, and until it
// succeeds the round fails. The new Lease's expiry counts from this
// controller's first sight of it, after that deletion, so a writer that
// renewed the old one has fenced itself before the new one can expire. A
// Lease of the older name that names another pair ("team/a-db" for
// "team-a/db"), or carries a UID, is left alone.
func (r *VolumePairReconciler) readAuthority(ctx context.Context, vp *v1.VolumePair) (*coordinationv1.Lease, error) {
	name, err := authority.LeaseName(vp.UID)
	if err != nil {
		return nil, err
	}
	key := client.ObjectKey{Namespace: r.Namespace, Name: name}
	lease := &coordinationv1.Lease{}
	err = r.APIReader.Get(ctx, key, lease)
	found := err == nil
	if err != nil && !apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("get authority Lease %s: %w", name, err)
	}
	r.mu.Lock()
	checked := r.legacyGone[vp.UID]
	r.mu.Unlock()
	if !checked {
		adopted, err := r.retireLegacy(ctx, vp, found)
		if err != nil {
			return nil, err
		}
		if adopted {
			if err := r.APIReader.Get(ctx, key, lease); err != nil {
				return nil, fmt.Errorf("get adopted authority Lease %s: %w", name, err)
			}
			found = true
		}
		r.mu.Lock()
		r.legacyGone[vp.UID] = true
		r.mu.Unlock()
	}
	if !found {
		return nil, nil
	}
	return lease, nil
}

// retireLegacy adopts (unless the new Lease exists already) and deletes the
// pair's Lease of the older naming, if there is one; adopted says whether
// it created the new Lease.
func (r *VolumePairReconciler) retireLegacy(ctx context.Context, vp *v1.VolumePair, haveNew bool) (adopted bool, err error) {
	pair := authority.PairOf(vp)
	old := &coordinationv1.Lease{}
	err = r.APIReader.Get(ctx, client.ObjectKey{Namespace: r.Namespace, Name: authority.LegacyLeaseName(vp.Namespace, vp.Name)}, old)
	switch {
	case apierrors.IsNotFound(err):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("get authority Lease of the older naming: %w", err)
	case !authority.Adoptable(old, pair):
		return false, nil
	}
	if !haveNew {
		l, err := authority.Adopt(old, pair, r.Now())
		if err != nil {
			return false, fmt.Errorf("adopt authority Lease %s: %w", old.Name, err)
		}
		if err := r.Create(ctx, l); err != nil && !apierrors.IsAlreadyExists(err) {
			return false, fmt.Errorf("adopt authority Lease %s as %s: %w", old.Name, l.Name, err)
		}
		adopted = true
		holder, epoch, _ := authority.Holder(l)
		r.Recorder.Eventf(vp, nil, corev1.EventTypeNormal, "AuthorityAdopted", "Adopt",
			"Authority Lease %s (older naming) replaced by %s: %s is the writer at epoch %d", old.Name, l.Name, holder, epoch)
	}
	if err := r.Delete(ctx, old, client.Preconditions{UID: &old.UID}); err != nil && !apierrors.IsNotFound(err) {
		return adopted, fmt.Errorf("delete authority Lease %s of the older naming (an agent not yet upgraded may renew it): %w", old.Name, err)
	}
	return adopted, nil
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
	agents := labels.SelectorFromSet(labels.Set{v1.LabelComponent: "agent"})
	return cache.Options{ByObject: map[client.Object]cache.ByObject{
		&coordinationv1.Lease{}: {Namespaces: map[string]cache.Config{namespace: {}}, Label: agents},
	}}
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
func (r *VolumePairReconciler) probe(ctx context.Context, info agentInfo, vp *v1.VolumePair) (*volume.Status, error) {
	c := r.NewAgentClient(info.control, r.AgentToken)
	st, err := c.Get(ctx, vp.Namespace, vp.Name)
	var apiErr *agent.APIError
	if errors.As(err, &apiErr) && apiErr.Code == 404 {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return &st, nil
}

func (r *VolumePairReconciler) nodeNotReady(ctx context.Context, node string) bool {
	n := &corev1.Node{}
	if err := r.Get(ctx, client.ObjectKey{Name: node}, n); err != nil {
		return false // no Node object: probes alone decide
	}
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status != corev1.ConditionTrue
		}
	}
	return false
}

// act carries out s.step.
func (r *VolumePairReconciler) act(ctx context.Context, s *scope) error {
	vp := s.vp
	switch s.step.Kind {
	case StepCreateAuthority:
		return r.createAuthority(ctx, vp)
	case StepConfigure:
		return r.configure(ctx, s, false)
	case StepHold:
		return r.configure(ctx, s, true)
	case StepReleaseHold:
		if s.step.Message == HoldTimedOut {
			r.probeState(client.ObjectKeyFromObject(vp), s.step.Target).holdGaveUp = r.Now()
			r.Recorder.Eventf(vp, nil, corev1.EventTypeWarning, "FailbackHoldReleased", "ReleaseHold", "%s: the hold on %s did not drain within %.1fs; writes go on, failback is tried again in %v", HoldTimedOut, s.step.Target, MaxHoldSeconds, holdBackoff)
		}
		return r.configure(ctx, s, false)
	case StepRecordOutdated:
		// The deferred status patch writes it; the next round confirms to
		// the writer, so the record is durable before anyone relies on it.
		// Until a confirmation may have left, the record says NotSent.
		setMemberState(vp, s.step.Target, func(m *v1.MemberStatus) {
			m.DataState, m.OutdatedConfirmation = v1.DataOutdated, v1.OutdatedNotSent
		})
		r.Recorder.Eventf(vp, nil, corev1.EventTypeWarning, "MemberOutdated", "RecordOutdated", "Recorded %s as Outdated: the writer continues alone", s.step.Target)
		return nil
	case StepConfirmOutdated:
		return r.confirmOutdated(ctx, s)
	case StepFailover, StepSwitch:
		if err := r.moveAuthority(ctx, s, s.step.Target, s.step.Kind == StepFailover); err != nil {
			return err
		}
		// The next round's step is always Configure (the members play the
		// old roles); taking it now saves a round on the way to a serving
		// writer. It is the same push, in the same order (the old writer
		// first, if it answers); if it fails, that Configure step retries.
		if err := r.configure(ctx, s, false); err != nil {
			log.FromContext(ctx).Info("Roles not pushed with the authority move; the next round retries", "reason", err.Error())
		}
		return nil
	}
	return nil
}

// confirmOutdated tells the writer (s.step.Target) that its peer is recorded
// Outdated, so it may acknowledge sync writes alone (invariant 2, step 2).
//
// From the moment the confirmation may reach the writer, the peer may lack
// acknowledged writes and must never be promoted automatically; until then
// it holds every acknowledged write. So the record first says Sent, durably,
// and only then is the confirmation sent. If it provably never left (no
// connection to the agent was made, agent.ErrNotSent) and this round is the
// one that marked it Sent, the record goes back to NotSent: should the
// writer now be lost, the peer may still be promoted. Any other failure, an
// answer lost for instance, leaves Sent.
func (r *VolumePairReconciler) confirmOutdated(ctx context.Context, s *scope) error {
	vp := s.vp
	writer := s.step.Target
	info, ok := s.agents[writer]
	if !ok {
		return fmt.Errorf("no agent endpoint for %s", writer)
	}
	peer := s.view.other(writer).Node
	ms := vp.Status.MemberStatus(peer)
	if ms == nil || ms.DataState != v1.DataOutdated {
		return fmt.Errorf("%s is not recorded Outdated", peer)
	}
	marked := false
	if ms.OutdatedConfirmation == v1.OutdatedNotSent {
		if err := r.setOutdatedConfirmation(ctx, s, peer, v1.OutdatedSent); err != nil {
			return fmt.Errorf("record the Outdated confirmation of %s as sent: %w", peer, err)
		}
		marked = true
	}
	_, err := r.NewAgentClient(info.control, r.AgentToken).PeerOutdated(ctx, vp.Namespace, vp.Name, s.view.Authority.Epoch)
	if err != nil && marked && errors.Is(err, agent.ErrNotSent) {
		if rerr := r.setOutdatedConfirmation(ctx, s, peer, v1.OutdatedNotSent); rerr != nil {
			return errors.Join(err, fmt.Errorf("record the Outdated confirmation of %s as not sent: %w", peer, rerr))
		}
	}
	return err
}

// setOutdatedConfirmation patches status now (not at the end of the round):
// the confirmation must not be sent before the record says it may have been.
// On failure the in-memory status says Sent, whatever c was: the server may
// hold either value, and Sent is the one that is safe to keep.
func (r *VolumePairReconciler) setOutdatedConfirmation(ctx context.Context, s *scope, node string, c v1.OutdatedConfirmation) error {
	vp := s.vp
	base := vp.DeepCopy()
	setMemberState(vp, node, func(m *v1.MemberStatus) { m.OutdatedConfirmation = c })
	if err := r.Status().Patch(ctx, vp, client.MergeFrom(base)); err != nil {
		setMemberState(vp, node, func(m *v1.MemberStatus) { m.OutdatedConfirmation = v1.OutdatedSent })
		return err
	}
	// vp now carries the server's metadata (a new resourceVersion): so must
	// the base of the round's status patch, or that patch would carry the
	// metadata difference too.
	s.base.ObjectMeta = *vp.ObjectMeta.DeepCopy()
	return nil
}

func (r *VolumePairReconciler) createAuthority(ctx context.Context, vp *v1.VolumePair) error {
	l, err := authority.NewLease(r.Namespace, authority.PairOf(vp), vp.Spec.Primary.Node, 1,
		time.Duration(vp.Spec.Failover.LeaseDurationSeconds)*time.Second, r.Now())
	if err != nil {
		return fmt.Errorf("create authority Lease: %w", err)
	}
	if err := r.Create(ctx, l); err != nil {
		if apierrors.IsAlreadyExists(err) {
			return nil // the next round reads it (and checks whose it is)
		}
		return fmt.Errorf("create authority Lease: %w", err)
	}
	r.leases.Observe(l)
	r.Recorder.Eventf(vp, nil, corev1.EventTypeNormal, "AuthorityCreated", "CreateAuthority", "%s is the writer at epoch 1", vp.Spec.Primary.Node)
	return nil
}

// moveAuthority hands the writer role to target with the next epoch. The
// update is conditional on the Lease's resourceVersion, so two controllers
// cannot both promote (no double promotion after a restart either).
func (r *VolumePairReconciler) moveAuthority(ctx context.Context, s *scope, target string, failover bool) error {
	epoch := s.view.Authority.Epoch + 1
	l := s.authority.DeepCopy()
	pair := authority.PairOf(s.vp)
	dur := time.Duration(s.vp.Spec.Failover.LeaseDurationSeconds) * time.Second
	// The writer renews the Lease every second, so the update may conflict
	// with a renewal. Retry on a fresh copy only while it is still this
	// pair's and names the holder and epoch this decision was based on; a
	// failover also needs it to still be expired, which a renewal seen now
	// rules out (the observer sees it change).
	err := retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		authority.Move(l, target, epoch, failover, dur, r.Now())
		err := r.Update(ctx, l)
		if err == nil {
			r.leases.Observe(l) // the move: its expiry counts from now
			return nil
		}
		if !apierrors.IsConflict(err) {
			return err
		}
		fresh := &coordinationv1.Lease{}
		if gerr := r.APIReader.Get(ctx, client.ObjectKeyFromObject(l), fresh); gerr != nil {
			return gerr
		}
		if oerr := authority.CheckOwner(fresh, pair); oerr != nil {
			return oerr
		}
		holder, fepoch, herr := authority.Holder(fresh)
		if herr != nil || holder != s.view.Authority.Holder || fepoch != s.view.Authority.Epoch {
			return fmt.Errorf("authority changed meanwhile (now %q at epoch %d, %v): %w", holder, fepoch, herr, err)
		}
		if obs := r.leases.Observe(fresh); failover && !obs.Expired {
			return fmt.Errorf("the writer renewed its authority meanwhile: %w", err)
		}
		l = fresh
		return err
	})
	if err != nil {
		return fmt.Errorf("move authority to %s at epoch %d: %w", target, epoch, err)
	}
	from := s.view.Authority.Holder
	s.view.Authority.Holder, s.view.Authority.Epoch, s.view.Authority.FailedOver = target, epoch, failover
	now2 := metav1.NewTime(r.Now())
	if failover {
		s.vp.Status.LastFailoverTime = &now2
		lostAt := r.probeState(client.ObjectKeyFromObject(s.vp), from).lostAt
		if !lostAt.IsZero() {
			failoverSeconds.Observe(r.Now().Sub(lostAt).Seconds())
		}
		failoversTotal.WithLabelValues(s.vp.Namespace, s.vp.Name).Inc()
		r.Recorder.Eventf(s.vp, nil, corev1.EventTypeWarning, "Failover", "Promote", "Writer %s lost; promoted %s at epoch %d", from, target, epoch)
	} else {
		s.vp.Status.LastFailbackTime = &now2
		r.Recorder.Eventf(s.vp, nil, corev1.EventTypeNormal, "Failback", "Switch", "Writes drained; %s hands the writer role to %s at epoch %d", from, target, epoch)
	}
	return nil
}

// configure pushes the desired roles to the agents: first the member that
// must not write (so two writers never overlap), then the writer.
func (r *VolumePairReconciler) configure(ctx context.Context, s *scope, hold bool) error {
	vp := s.vp
	a := s.view.Authority
	writer, other := s.view.member(a.Holder), s.view.other(a.Holder)
	merge := vp.Spec.MergesPrimaryBitmap()
	// Only the first writer of a pair whose data no member ever held
	// starts the pair's data; a writer without the data is never made to
	// serve (it would serve an empty volume, DESIGN invariant 8).
	initialize := !s.view.PairHasData()
	writerRole := volume.RolePrimary
	if !initialize && !HoldsData(writer, s.view.PairUID) && writer.Status != nil && writer.Status.Role != volume.RolePrimary {
		writerRole = volume.RoleNone
	}
	if !initialize && writer.Status == nil && s.view.PairHasData() {
		writerRole = volume.RoleNone
	}
	req := func(role volume.Role, peer string, peerAddr string, h bool) agent.VolumeRequest {
		return agent.VolumeRequest{Size: vp.Spec.SizeBytes(), RegionSize: vp.Spec.RegionSizeBytes(), Spec: volume.Spec{
			PairUID: string(vp.UID), Role: role, Epoch: a.Epoch, Mode: volume.Mode(vp.Spec.Mode), PeerNode: peer, PeerAddress: peerAddr,
			MergePeerBitmap: &merge, MaxBytesPerSecond: vp.Spec.Resync.MaxBytesPerSecond, Hold: h,
			Initialize: initialize && role == volume.RolePrimary,
		}}
	}
	var errs []error
	if other.Reachable {
		if info, ok := s.agents[other.Node]; ok {
			if _, err := r.NewAgentClient(info.control, r.AgentToken).Put(ctx, vp.Namespace, vp.Name, req(volume.RoleBackup, writer.Node, "", false)); err != nil {
				errs = append(errs, fmt.Errorf("configure %s as backup: %w", other.Node, err))
			}
		}
	}
	if writer.Reachable && len(errs) == 0 {
		info := s.agents[writer.Node]
		peerAddr := s.agents[other.Node].replication
		if _, err := r.NewAgentClient(info.control, r.AgentToken).Put(ctx, vp.Namespace, vp.Name, req(writerRole, other.Node, peerAddr, hold && writerRole == volume.RolePrimary)); err != nil {
			errs = append(errs, fmt.Errorf("configure %s as primary: %w", writer.Node, err))
		}
	}
	return errors.Join(errs...)
}

func setMemberState(vp *v1.VolumePair, node string, fn func(*v1.MemberStatus)) {
	if m := vp.Status.MemberStatus(node); m != nil {
		fn(m)
		return
	}
	vp.Status.Members = append(vp.Status.Members, v1.MemberStatus{Node: node})
	fn(&vp.Status.Members[len(vp.Status.Members)-1])
}

// patchStatus computes the status from the observations and writes it in one
// patch. observedGeneration moves only when the round succeeded.
func (r *VolumePairReconciler) patchStatus(ctx context.Context, s *scope, ok bool) error {
	vp := s.vp
	st := &vp.Status
	key := client.ObjectKeyFromObject(vp)
	// The status shows a member whose last probe failed, but that is not
	// suspect yet, as it last reported: one slow answer under load must not
	// clear the endpoint or flip Ready. Decide saw the failed probe.
	view := s.view
	view.Primary = lastKnown(view.Primary, r.probeState(key, view.Primary.Node).last)
	view.Backup = lastKnown(view.Backup, r.probeState(key, view.Backup.Node).last)
	gen := vp.Generation
	if s.notOwned != nil {
		// Nothing else is known for sure; say why nothing happens.
		set(&st.Conditions, gen, v1.ConditionFailoverBlocked, true, BlockedAuthorityNotOwned, s.notOwned.Error())
		set(&st.Conditions, gen, v1.ConditionReady, false, BlockedAuthorityNotOwned,
			"no step is taken while the pair's authority Lease is not its own; the writer cannot renew it and fences itself")
		if err := r.Status().Patch(ctx, vp, client.MergeFrom(s.base)); err != nil {
			return fmt.Errorf("patch status: %w", err)
		}
		return nil
	}
	if !view.Authority.Exists && s.step.Kind != StepCreateAuthority {
		return nil
	}
	if view.Authority.Exists {
		st.Epoch = int64(view.Authority.Epoch)
		st.ActivePrimary = view.Authority.Holder
	} else {
		st.Epoch, st.ActivePrimary = 1, vp.Spec.Primary.Node
	}
	writer, other := view.member(st.ActivePrimary), view.other(st.ActivePrimary)

	oldPhase := s.base.Status.Phase
	st.Phase = DerivePhase(view, oldPhase)

	nbd := ""
	if info, ok := s.agents[writer.Node]; ok && info.nbd != "" {
		nbd = "nbd://" + info.nbd + "/" + vp.Namespace + "/" + vp.Name
	}
	st.Endpoint = endpointFor(s.base.Status, st.ActivePrimary, st.Epoch, writer, nbd)
	st.OutOfSyncBytes = 0
	st.Copy = nil
	if w := writer.Status; w != nil {
		st.OutOfSyncBytes = w.OutOfSyncBytes
		if w.Copy.Running {
			start := metav1.NewTime(w.Copy.StartTime)
			st.Copy = &v1.CopyProgress{Target: other.Node, TotalBytes: w.Copy.TotalBytes, DoneBytes: w.Copy.DoneBytes,
				BytesPerSecond: w.Copy.BytesPerSecond, ETASeconds: w.Copy.ETASeconds, StartTime: &start, FullCopy: w.Copy.FullCopy,
				Reason: truncate(w.Copy.Reason, 512)}
		}
	}
	inSync := InSync(writer, other)
	if writer.Status != nil && other.Status != nil {
		st.UnmergedRegions = unmerged(writer, other)
	}
	for _, m := range []*MemberView{&view.Primary, &view.Backup} {
		if m.Status != nil && m.Status.Joined && m.Status.PairUID == string(vp.UID) && !m.Stale {
			st.DataInitialized = true
		}
	}
	for _, m := range []*MemberView{&view.Primary, &view.Backup} {
		setMemberState(vp, m.Node, func(ms *v1.MemberStatus) {
			ms.Connected = m.Reachable && m.Status != nil && m.Status.PeerConnected
			if seen := r.lastSeen(key, m.Node); !seen.IsZero() {
				t := metav1.NewTime(seen)
				ms.LastSeen = &t
			}
			ms.Message = ""
			switch {
			case m.Stale:
				ms.Message = "no answer to the last probe; showing its previous report"
				if m.Status != nil {
					ms.Role = v1.MemberRole(m.Status.Role)
				}
			case !m.Reachable:
				ms.Role = ""
				if ms.DataState != v1.DataOutdated {
					ms.DataState = v1.DataUnknown
				}
				ms.Message = "agent unreachable"
			case m.Status == nil:
				ms.Role, ms.DataState, ms.Message = "", v1.DataUnknown, "replica not created yet"
			default:
				ms.Role = v1.MemberRole(m.Status.Role)
				ms.OutOfSyncBytes = m.Status.OutOfSyncBytes
				reported := v1.DataState(m.Status.DataState)
				switch {
				case ms.DataState == v1.DataOutdated && m == other && !inSync:
					// Keep the controller's Outdated record until the
					// writer has brought this member back in sync.
				default:
					ms.DataState = reported
				}
				if !m.Status.Writable && m == writer {
					ms.Message = m.Status.Reason
				}
				if m.Status.DataStateReason != "" && m.Status.DataState != volume.UpToDate {
					ms.Message = m.Status.DataStateReason
				}
				if m.Status.LastError != "" {
					ms.Message = m.Status.LastError
				}
			}
			if ms.DataState != v1.DataOutdated {
				ms.OutdatedConfirmation = ""
			}
			ms.Message = truncate(ms.Message, 1024)
		})
	}
	setReadyCondition(&st.Conditions, gen, writer)
	setSynchronizedCondition(&st.Conditions, gen, writer, other)
	setDegradedCondition(&st.Conditions, gen, writer, other)
	setFailoverBlockedCondition(&st.Conditions, gen, s.step)
	if ok {
		st.ObservedGeneration = gen
	}
	if st.Phase != oldPhase {
		r.Recorder.Eventf(vp, nil, corev1.EventTypeNormal, "Phase"+string(st.Phase), "PhaseChange", "Phase %s → %s (writer %s, epoch %d)", orNone(oldPhase), st.Phase, st.ActivePrimary, st.Epoch)
		log.FromContext(ctx).Info("Phase changed", "volumePair", klog.KObj(vp), "from", oldPhase, "to", st.Phase)
	}
	recordMetrics(vp)
	// A merge patch carries only changed fields; make it always carry
	// outOfSyncBytes so a pair in sync shows 0 rather than nothing.
	s.base.Status.OutOfSyncBytes = -1
	if err := r.Status().Patch(ctx, vp, client.MergeFrom(s.base)); err != nil {
		return fmt.Errorf("patch status: %w", err)
	}
	// Clear one-shot requests once acted upon.
	if s.step.Kind == StepFailover || s.step.Kind == StepSwitch {
		return r.clearRequests(ctx, vp)
	}
	return nil
}

// lastKnown returns m as the status shows it: a member that did not answer
// the last probe but is not suspect yet (fewer than failureThreshold failed
// probes, its Node Ready) is shown with its last report, marked Stale.
func lastKnown(m MemberView, last *volume.Status) MemberView {
	if m.Reachable || m.Suspect || last == nil {
		return m
	}
	m.Reachable, m.Status, m.Stale = true, last, true
	return m
}

// endpointFor is status.endpoint: the writer's export (nbd, empty when its
// agent Lease names none) while the writer accepts writes. While the writer
// does not answer the controller, the endpoint it had at the same epoch
// stays: the writer may well still serve (a partition from the controller
// only), and clients that follow the endpoint should not be sent away until
// another member holds the authority or the writer says it does not accept
// writes.
func endpointFor(prev v1.VolumePairStatus, holder string, epoch int64, writer *MemberView, nbd string) string {
	switch {
	case writer.Reachable && writer.Status != nil && writer.Status.Writable:
		return nbd
	case !writer.Reachable && prev.ActivePrimary == holder && prev.Epoch == epoch && prev.Endpoint != "":
		return prev.Endpoint
	}
	return ""
}

func orNone(p v1.Phase) string {
	if p == "" {
		return "(new)"
	}
	return string(p)
}

func (r *VolumePairReconciler) clearRequests(ctx context.Context, vp *v1.VolumePair) error {
	if vp.Annotations[v1.AnnotationFailoverRequested] == "" && vp.Annotations[v1.AnnotationFailbackRequested] == "" {
		return nil
	}
	base := vp.DeepCopy()
	delete(vp.Annotations, v1.AnnotationFailoverRequested)
	delete(vp.Annotations, v1.AnnotationFailbackRequested)
	if err := r.Patch(ctx, vp, client.MergeFrom(base)); err != nil {
		return fmt.Errorf("clear request annotations: %w", err)
	}
	return nil
}

// reconcileDelete removes the replicas from both agents (kept with the
// storage.tandem.dev/retain-data annotation), the authority Lease and the
// finalizer. Unreachable agents keep their files; an event says so.
func (r *VolumePairReconciler) reconcileDelete(ctx context.Context, vp *v1.VolumePair) (ctrl.Result, error) {
	if !controllerutil.ContainsFinalizer(vp, v1.Finalizer) {
		return ctrl.Result{}, nil
	}
	purge := vp.Annotations[v1.AnnRetainData] != "true"
	for _, node := range []string{vp.Spec.Primary.Node, vp.Spec.Backup.Node} {
		info, err := r.agentInfo(ctx, node)
		if err == nil {
			err = r.NewAgentClient(info.control, r.AgentToken).Delete(ctx, vp.Namespace, vp.Name, purge)
			var apiErr *agent.APIError
			if errors.As(err, &apiErr) && apiErr.Code == 404 {
				err = nil
			}
		}
		if err != nil {
			r.Recorder.Eventf(vp, nil, corev1.EventTypeWarning, "TeardownIncomplete", "Delete", "%s", orphanMessage(vp, node, info.dataDir, purge, err))
		}
	}
	if err := r.deleteAuthority(ctx, vp); err != nil {
		return ctrl.Result{}, err
	}
	r.mu.Lock()
	delete(r.probes, client.ObjectKeyFromObject(vp))
	delete(r.legacyGone, vp.UID)
	r.mu.Unlock()
	forgetMetrics(vp)
	patch := client.MergeFrom(vp.DeepCopy())
	controllerutil.RemoveFinalizer(vp, v1.Finalizer)
	if err := r.Patch(ctx, vp, patch); err != nil {
		return ctrl.Result{}, fmt.Errorf("remove finalizer: %w", err)
	}
	return ctrl.Result{}, nil
}

// orphanMessage is the TeardownIncomplete event for a replica on node that
// could not be removed: where its files are and how to remove them. dataDir
// is what the agent advertised on its Lease ("" if its Lease is gone).
func orphanMessage(vp *v1.VolumePair, node, dataDir string, purge bool, err error) string {
	dir := agent.ReplicaDir(dataDir, vp.Namespace, vp.Name)
	if dataDir == "" {
		dir = agent.ReplicaDir("<agent data dir, default /var/lib/tandem>", vp.Namespace, vp.Name)
	}
	if !purge {
		return fmt.Sprintf("Replica on %s not closed: %v. Its files stay (retain-data) in %s on %s", node, err, dir, node)
	}
	return fmt.Sprintf("Replica on %s not removed: %v. Its files stay in %s on node %s: once the pair is gone for good, "+
		"remove that directory on the node (rm -rf %s), with the agent stopped or after it has restarted without a VolumePair of this name",
		node, err, dir, node, dir)
}

// deleteAuthority deletes the pair's own authority Lease, with a UID
// precondition so that only the object read and checked here is deleted,
// and a Lease of the older naming that names this pair. A Lease under the
// pair's name that belongs to another pair is left alone and reported.
func (r *VolumePairReconciler) deleteAuthority(ctx context.Context, vp *v1.VolumePair) error {
	pair := authority.PairOf(vp)
	name, err := authority.LeaseName(vp.UID)
	if err != nil {
		return err
	}
	for _, n := range []string{name, authority.LegacyLeaseName(vp.Namespace, vp.Name)} {
		l := &coordinationv1.Lease{}
		err := r.APIReader.Get(ctx, client.ObjectKey{Namespace: r.Namespace, Name: n}, l)
		switch {
		case apierrors.IsNotFound(err):
			continue
		case err != nil:
			return fmt.Errorf("get authority Lease %s: %w", n, err)
		}
		if n == name {
			if oerr := authority.CheckOwner(l, pair); oerr != nil {
				r.Recorder.Eventf(vp, nil, corev1.EventTypeWarning, BlockedAuthorityNotOwned, "Delete", "Not deleted: %v", oerr)
				continue
			}
		} else if !authority.Adoptable(l, pair) {
			continue // another pair's Lease of the older naming
		}
		if err := r.Delete(ctx, l, client.Preconditions{UID: &l.UID}); err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("delete authority Lease %s: %w", n, err)
		}
		r.leases.Forget(l.Namespace, l.Name)
	}
	return nil
}
