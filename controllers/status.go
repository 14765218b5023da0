package controllers

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

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
	view.More = slices.Clone(view.More)
	for i := range view.More {
		view.More[i] = lastKnown(view.More[i], r.probeState(key, view.More[i].Node).last)
	}
	gen := vp.Generation
	if s.writerReplaced != nil {
		// The writer keeps serving, but nothing would fail it over. Its
		// member entry stays (it is not a removed member: nothing of it
		// is deleted while it holds the authority).
		st.Members, st.RemovedMembers = s.base.Status.Members, s.base.Status.RemovedMembers
		set(&st.Conditions, gen, v1.ConditionFailoverBlocked, true, BlockedWriterReplaced, s.writerReplaced.Error())
		set(&st.Conditions, gen, v1.ConditionDegraded, true, BlockedWriterReplaced, s.writerReplaced.Error())
		if err := r.Status().Patch(ctx, vp, client.MergeFrom(s.base)); err != nil {
			return fmt.Errorf("patch status: %w", err)
		}
		return nil
	}
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
	if s.step.Pending != "" {
		patchPending(vp, &view, s.step)
		if ok {
			st.ObservedGeneration = gen
		}
		recordMetrics(vp)
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
	writer, others := view.member(st.ActivePrimary), view.others(st.ActivePrimary)

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
		// status.copy: the first copy running, in spec order (each
		// member's is in its entry).
		for _, o := range others {
			if c := copyProgress(o.Node, LinkTo(writer, o).Copy); c != nil {
				st.Copy = c
				break
			}
		}
	}
	// What the writer enforces of spec.clients: the CSI driver's
	// ControllerUnpublishVolume waits for a node to be gone from it.
	if w := writer.Status; w != nil && writer.Reachable && !writer.Stale {
		st.Clients = nil
		if w.Clients != nil {
			st.Clients = &v1.ClientsSpec{Nodes: append([]string{}, w.Clients.Nodes...)}
		}
	}
	if writer.Status != nil {
		st.UnmergedRegions = unmerged(append([]*MemberView{writer}, others...)...)
	}
	holding := 0
	if w := writer.Status; w != nil && w.Role == agentapi.RolePrimary && w.DataState == agentapi.UpToDate {
		holding++
	}
	for _, o := range others {
		if InSync(writer, o) {
			holding++
		}
	}
	st.MembersInSync = fmt.Sprintf("%d/%d", holding, len(others)+1)
	for _, m := range view.all() {
		if m.Status != nil && m.Status.Joined && m.Status.PairUID == string(vp.UID) && !m.Stale {
			st.DataInitialized = true
		}
	}
	for _, m := range view.all() {
		inSync := InSync(writer, m)
		isOther := m != writer
		setMemberState(vp, m.Node, func(ms *v1.MemberStatus) {
			ms.Mode, ms.Copy = "", nil
			if isOther {
				ms.Mode = view.modeOf(m)
			}
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
					ms.Role = m.Status.Role
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
				ms.Role = m.Status.Role
				ms.OutOfSyncBytes = m.Status.OutOfSyncBytes
				if isOther && writer.Status != nil {
					link := LinkTo(writer, m)
					ms.OutOfSyncBytes = link.OutOfSyncBytes
					ms.Copy = copyProgress(m.Node, link.Copy)
				}
				reported := m.Status.DataState
				switch {
				case ms.DataState == v1.DataOutdated && isOther && !inSync:
					// Keep the controller's Outdated record until the
					// writer has brought this member back in sync.
				default:
					ms.DataState = reported
				}
				if !m.Status.Writable && m == writer {
					ms.Message = m.Status.Reason
				}
				if m.Status.DataStateReason != "" && m.Status.DataState != agentapi.UpToDate {
					ms.Message = m.Status.DataStateReason
				}
				if m.Status.LastError != "" {
					ms.Message = m.Status.LastError
				}
			}
			if ms.DataState != v1.DataOutdated {
				ms.OutdatedConfirmation = ""
			}
			// Why a member does not answer, when its Node or agent is
			// gone, says more than its last report (Stale) does.
			if !m.Reachable || m.Stale {
				switch {
				case m.NodeMissing:
					ms.Message = "its node no longer exists (no Node object); if it is gone for good, replace it in " + m.Field
				case m.Unregistered:
					ms.Message = "no Tandem agent registered on this node"
				}
			}
			if isOther && m.Held && m.Reachable {
				ms.Message = "held out of resync (" + v1.AnnotationHoldResync + "): its data stays as it came back; remove it from the annotation to resync it"
			}
			ms.Message = truncate(ms.Message, 1024)
		})
	}
	setReadyCondition(&st.Conditions, gen, writer)
	setSynchronizedCondition(&st.Conditions, gen, writer, others)
	oldDegraded := meta.FindStatusCondition(s.base.Status.Conditions, v1.ConditionDegraded)
	setDegradedCondition(&st.Conditions, gen, writer, others)
	if c := meta.FindStatusCondition(st.Conditions, v1.ConditionDegraded); c.Reason == ReasonMemberNotFound && (oldDegraded == nil || oldDegraded.Message != c.Message) {
		r.Recorder.Eventf(vp, nil, corev1.EventTypeWarning, ReasonMemberNotFound, "Degrade", "%s", c.Message)
	}
	setFailoverBlockedCondition(&st.Conditions, gen, s.step)
	// Online expansion: status.size is what the writer serves (it grows
	// last); the Expanding condition says how far the members got.
	exp := expansionOf(&view, writer, others, func(node string) int64 {
		if last := r.probeState(key, node).last; last != nil {
			return last.Size
		}
		return 0
	})
	setExpandingCondition(&st.Conditions, gen, exp)
	if w := writer.Status; w != nil && w.Size > 0 {
		if old := s.base.Status.Size; old == nil || old.Value() != w.Size {
			st.Size = resource.NewQuantity(w.Size, resource.BinarySI)
			if old != nil && w.Size > old.Value() {
				msg := fmt.Sprintf("the writer %s serves %s (was %s)", writer.Node, human(w.Size), human(old.Value()))
				if len(exp.next) > 0 {
					msg += "; " + strings.Join(exp.next, ", ") + " grows next"
				} else {
					msg += ", as every member that answers does"
				}
				if a := exp.awayMsg(); a != "" {
					msg += "; " + a
				}
				r.Recorder.Eventf(vp, nil, corev1.EventTypeNormal, ReasonVolumeExpanded, "Grow", "%s", msg)
			}
		}
	}
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

// copyProgress is a member's copy as the status shows it (nil when none
// runs).
func copyProgress(target string, c agentapi.CopyStatus) *v1.CopyProgress {
	if !c.Running {
		return nil
	}
	start := metav1.NewTime(c.StartTime)
	return &v1.CopyProgress{Target: target, TotalBytes: c.TotalBytes, DoneBytes: c.DoneBytes,
		BytesPerSecond: c.BytesPerSecond, ETASeconds: c.ETASeconds, StartTime: &start, FullCopy: c.FullCopy,
		Reason: truncate(c.Reason, 512)}
}

// lastKnown returns m as the status shows it: a member that did not answer
// the last probe but is not suspect yet (fewer than failureThreshold failed
// probes, its Node Ready) is shown with its last report, marked Stale.
func lastKnown(m MemberView, last *agentapi.Status) MemberView {
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
	requests := []string{v1.AnnotationFailoverRequested, v1.AnnotationFailbackRequested, v1.AnnotationForcePromote, v1.AnnotationForcePromoteBy}
	if !slices.ContainsFunc(requests, func(a string) bool { return vp.Annotations[a] != "" }) {
		return nil
	}
	base := vp.DeepCopy()
	for _, a := range requests {
		delete(vp.Annotations, a)
	}
	if err := r.Patch(ctx, vp, client.MergeFrom(base)); err != nil {
		return fmt.Errorf("clear request annotations: %w", err)
	}
	return nil
}

// clearStaleRequest removes a request annotation StaleRequest finds
// pointless, with a Warning event saying why, so it cannot act later
// unasked.
func (r *VolumePairReconciler) clearStaleRequest(ctx context.Context, s *scope) error {
	ann, msg := StaleRequest(s.view)
	if ann == "" {
		return nil
	}
	vp := s.vp
	patch := client.MergeFrom(vp.DeepCopy())
	delete(vp.Annotations, ann)
	if ann == v1.AnnotationForcePromote {
		delete(vp.Annotations, v1.AnnotationForcePromoteBy)
	}
	if err := r.Patch(ctx, vp, patch); err != nil {
		return fmt.Errorf("clear %s: %w", ann, err)
	}
	s.base.Annotations, s.base.ResourceVersion = maps.Clone(vp.Annotations), vp.ResourceVersion
	switch ann {
	case v1.AnnotationFailoverRequested:
		s.view.FailoverRequested = false
	case v1.AnnotationFailbackRequested:
		s.view.FailbackRequested = false
	case v1.AnnotationForcePromote:
		s.view.ForcePromote = ""
	}
	r.Recorder.Eventf(vp, nil, corev1.EventTypeWarning, ReasonRequestIgnored, "ClearRequest", "%s", msg)
	log.FromContext(ctx).Info("Cleared a request that asks for nothing possible", "volumePair", klog.KObj(vp), "annotation", ann)
	return nil
}

// announcePending records a Warning event when a new pair starts waiting,
// or waits for another reason (the Ready condition's reason is the last
// one recorded).
func (r *VolumePairReconciler) announcePending(s *scope) {
	if s.step.Pending == "" {
		return
	}
	if c := meta.FindStatusCondition(s.vp.Status.Conditions, v1.ConditionReady); c != nil && c.Reason == s.step.Pending && c.Message == s.step.Message {
		return
	}
	r.Recorder.Eventf(s.vp, nil, corev1.EventTypeWarning, s.step.Pending, "Wait", "%s", s.step.Message)
}

// patchPending is the status of a new pair that waits (Decide's Pending):
// phase PENDING, Ready False with the reason, each member with what it
// lacks. Nothing was created for it yet.
func patchPending(vp *v1.VolumePair, view *View, step Step) {
	st := &vp.Status
	gen := vp.Generation
	st.Phase = v1.PhasePending
	st.ActivePrimary, st.Endpoint, st.Epoch = "", "", 0
	st.MembersInSync = fmt.Sprintf("0/%d", len(view.all()))
	for _, m := range view.all() {
		setMemberState(vp, m.Node, func(ms *v1.MemberStatus) {
			ms.Role, ms.DataState, ms.Connected, ms.Copy, ms.Mode = "", v1.DataUnknown, false, nil, ""
			switch {
			case m.NodeMissing:
				ms.Message = "no such node"
			case m.Unregistered:
				ms.Message = "no Tandem agent registered on this node"
			case !m.Reachable:
				ms.Message = "agent unreachable"
			case m.Suspect:
				ms.Message = "Node not Ready"
			default:
				ms.Message = "ready; waiting for the other members"
			}
		})
	}
	set(&st.Conditions, gen, v1.ConditionReady, false, step.Pending, step.Message)
	set(&st.Conditions, gen, v1.ConditionSynchronized, false, step.Pending, "the pair has not started")
	set(&st.Conditions, gen, v1.ConditionDegraded, false, step.Pending, "the pair has not started")
	setFailoverBlockedCondition(&st.Conditions, gen, step)
}
