package controllers

import (
	"context"
	"errors"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

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
	case StepGrow:
		return r.grow(ctx, s)
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
// connection to the agent was made, agentapi.ErrNotSent) and this round is the
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
	peer := s.step.Member
	if peer == "" {
		peer = s.view.other(writer).Node
	}
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
	_, err := r.NewAgentClient(info.control, r.agentToken()).PeerOutdated(ctx, vp.Namespace, vp.Name, s.view.Authority.Epoch, peer)
	if err != nil && marked && errors.Is(err, agentapi.ErrNotSent) {
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

// push is one member's desired state, as configure and grow send it.
type push struct {
	m   *MemberView
	req agentapi.VolumeRequest
	// skip: configure leaves the member as it is (a held member fenced
	// already, or without a replica to keep).
	skip bool
}

// pushes are the requests for every member, backups first (in spec order),
// the writer last: the roles the authority says at its epoch, the spec's
// mode, members, resync settings and clients. Each carries spec.size, or
// the member's own size when its replica is smaller: growing it is grow's,
// which asks the members in the order growStep says; configure never
// grows a replica (a writer grown before its backups would export more than
// they hold).
func (r *VolumePairReconciler) pushes(s *scope, hold bool) []push {
	vp := s.vp
	a := s.view.Authority
	writer, others := s.view.member(a.Holder), s.view.others(a.Holder)
	merge := vp.Spec.MergesPrimaryBitmap()
	// Only the first writer of a pair whose data no member ever held
	// starts the pair's data; a writer without the data is never made to
	// serve (it would serve an empty volume: invariant 8, docs/architecture.md).
	initialize := !s.view.PairHasData()
	writerRole := agentapi.RolePrimary
	if !initialize && !HoldsData(writer, s.view.PairUID) && writer.Status != nil && writer.Status.Role != agentapi.RolePrimary {
		writerRole = agentapi.RoleNone
	}
	if !initialize && writer.Status == nil && s.view.PairHasData() {
		writerRole = agentapi.RoleNone
	}
	req := func(m *MemberView, role agentapi.Role, peer, peerAddr string, more []agentapi.Peer, h bool) agentapi.VolumeRequest {
		size := vp.Spec.SizeBytes()
		if s.view.Smaller(m) {
			size = m.Status.Size
		}
		return agentapi.VolumeRequest{Size: size, RegionSize: vp.Spec.RegionSizeBytes(), Spec: agentapi.Spec{
			PairUID: string(vp.UID), Role: role, Epoch: a.Epoch, Mode: vp.Spec.Mode, PeerNode: peer, PeerAddress: peerAddr,
			MoreBackups: more, MergePeerBitmap: &merge, MaxBytesPerSecond: vp.Spec.Resync.MaxBytesPerSecond, Hold: h,
			Initialize: initialize && role == agentapi.RolePrimary, Clients: s.view.Clients,
		}}
	}
	var out []push
	for _, o := range others {
		// A backup knows the other backups: it tracks what they lack of
		// what it applies (watermarks), for when it is promoted.
		var siblings []agentapi.Peer
		for _, sib := range others {
			if sib != o {
				siblings = append(siblings, agentapi.Peer{Node: sib.Node})
			}
		}
		role := agentapi.RoleBackup
		if s.view.IsHeld(o) {
			// Fenced at this epoch: it refuses the writer's stream, so
			// its data stays as it came back until the hold is lifted.
			role = agentapi.RoleNone
		}
		out = append(out, push{m: o, req: req(o, role, writer.Node, "", siblings, false), skip: s.view.matchesHeld(o)})
	}
	first := others[0]
	var more []agentapi.Peer
	for _, o := range others[1:] {
		more = append(more, agentapi.Peer{Node: o.Node, Address: s.agents[o.Node].replication, Mode: s.view.modeOf(o)})
	}
	// The first backup's mode is the spec's (spec.primary or
	// spec.backup: the pair's mode).
	out = append(out, push{m: writer, req: req(writer, writerRole, first.Node, s.agents[first.Node].replication, more, hold && writerRole == agentapi.RolePrimary)})
	return out
}

// configure pushes the desired roles to the agents: first the members that
// must not write (so two writers never overlap), then the writer.
func (r *VolumePairReconciler) configure(ctx context.Context, s *scope, hold bool) error {
	vp := s.vp
	writer := s.view.member(s.view.Authority.Holder)
	var errs []error
	for _, p := range r.pushes(s, hold) {
		o := p.m
		if !o.Reachable || p.skip {
			continue
		}
		info, ok := s.agents[o.Node]
		if !ok {
			continue
		}
		if o == writer {
			if len(errs) > 0 {
				break
			}
			if _, err := r.NewAgentClient(info.control, r.agentToken()).Put(ctx, vp.Namespace, vp.Name, p.req); err != nil {
				errs = append(errs, fmt.Errorf("configure %s as primary: %w", writer.Node, err))
			}
			break
		}
		role := p.req.Spec.Role
		if _, err := r.NewAgentClient(info.control, r.agentToken()).Put(ctx, vp.Namespace, vp.Name, p.req); err != nil {
			what := "backup"
			if role == agentapi.RoleNone {
				what = "fenced member (held out of resync)"
			}
			errs = append(errs, fmt.Errorf("configure %s as %s: %w", o.Node, what, err))
			continue
		}
		if role == agentapi.RoleNone {
			r.Recorder.Eventf(vp, nil, corev1.EventTypeWarning, ReasonResyncHeld, "Hold",
				"%s is held out of resync (%s): fenced with its data as it is; remove it from the annotation to resync it from %s, which overwrites what it wrote since it left",
				o.Node, v1.AnnotationHoldResync, writer.Node)
		}
	}
	return errors.Join(errs...)
}

// Online expansion events.
const (
	// ReasonVolumeExpanded (Normal): the writer serves the larger
	// spec.size, after every backup that answered grew.
	ReasonVolumeExpanded = "VolumeExpanded"
	// ReasonExpansionRefused (Warning): an agent refused to grow its
	// replica; the message names the node and the agent's answer.
	ReasonExpansionRefused = "ExpansionRefused"
)

// growRetry is how long after an agent refused to grow its replica it is
// asked again (sooner when spec.size changes).
const growRetry = 30 * time.Second

// grow grows s.step.Target's replica to spec.size: the request configure
// sends it, with spec.size. The agent grows the replica durably before it
// answers. A refusal (the agent answered an error: its file system cannot
// hold the size, an agent without online expansion) is not the step
// failing: it is recorded for the member (MemberView.GrowRefused, asked
// again after growRetry or once spec.size changes), with a Warning event
// the first time it says this, and the Expanding condition names it; the
// pair keeps serving at the old size. Anything else (no answer) fails the
// step and the next round tries again.
func (r *VolumePairReconciler) grow(ctx context.Context, s *scope) error {
	vp := s.vp
	node, size := s.step.Target, vp.Spec.SizeBytes()
	info, ok := s.agents[node]
	if !ok {
		return fmt.Errorf("no agent endpoint for %s", node)
	}
	var req agentapi.VolumeRequest
	for _, p := range r.pushes(s, false) {
		if p.m.Node == node {
			req = p.req
		}
	}
	from := int64(0)
	if m := s.view.member(node); m.Status != nil {
		from = m.Status.Size
	}
	req.Size = size
	st, err := r.NewAgentClient(info.control, r.agentToken()).Put(ctx, vp.Namespace, vp.Name, req)
	var refusal *agentapi.APIError
	switch {
	case errors.As(err, &refusal):
		r.refuseGrow(s, node, size, from, refusal.Message)
		return nil
	case err != nil:
		return fmt.Errorf("grow %s from %s to %s: %w", node, human(from), human(size), err)
	case st.Size < size:
		r.refuseGrow(s, node, size, from, fmt.Sprintf("the agent answered with size %d bytes (%s)", st.Size, human(st.Size)))
		return nil
	}
	r.probeState(client.ObjectKeyFromObject(vp), node).growRefused = growRefusal{}
	log.FromContext(ctx).Info("Grew a replica", "node", node, "from", from, "to", size)
	return nil
}

// refuseGrow records that node's agent refused to grow to size, with a
// Warning event unless it said the same for this size before; this round's
// status says so too.
func (r *VolumePairReconciler) refuseGrow(s *scope, node string, size, from int64, msg string) {
	vp := s.vp
	s.view.member(node).GrowRefused = msg
	ps := r.probeState(client.ObjectKeyFromObject(vp), node)
	if prev := ps.growRefused; prev.size != size || prev.msg != msg {
		r.Recorder.Eventf(vp, nil, corev1.EventTypeWarning, ReasonExpansionRefused, "Grow",
			"the agent on %s refused to grow its replica from %s to %s (spec.size): %s; the volume keeps its size, asked again in %v or when spec.size changes",
			node, human(from), human(size), msg, growRetry)
	}
	ps.growRefused = growRefusal{size: size, msg: msg, at: r.Now()}
}

// human is a size in bytes as a quantity ("16Mi").
func human(n int64) string { return resource.NewQuantity(n, resource.BinarySI).String() }
