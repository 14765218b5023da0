package controllers

import (
	"context"
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/log"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// Member replacement (docs/architecture.md, "Replacing a member"). The user
// changes one member's node in the spec; the writer cannot be replaced (it
// holds the authority: switch over or fail over first). The new node's
// agent gets a new replica, which is Inconsistent and receives a full copy
// (it holds none of the pair's data; the writer's bitmaps describe another
// member, which the data path also knows: a replica whose peer changed
// copies everything). The old node's replica is deleted once the pair is in
// sync with the new member, so that the old copy is there until redundancy
// is back; until then, and while the old node does not answer, it is listed
// in status.removedMembers.

// BlockedWriterReplaced is the FailoverBlocked (and Ready) reason while the
// authority's holder is no longer a member of the spec.
const BlockedWriterReplaced = "WriterReplaced"

// trackRemoved moves the status entries of nodes that are no longer
// members into status.removedMembers, and takes a node that is a member
// again off that list. It reads the stored status, so it is level-based: a
// replacement seen once is recorded in the same status patch that drops the
// old member. It returns the nodes it just moved, for announceRemoved (the
// events wait until the replacement is known not to drop the writer).
func trackRemoved(vp *v1.VolumePair) []string {
	members := vp.Spec.MemberNodes()
	st := &vp.Status
	st.RemovedMembers = slices.DeleteFunc(st.RemovedMembers, func(m v1.RemovedMember) bool { return slices.Contains(members, m.Node) })
	var kept []v1.MemberStatus
	var moved []string
	// A pair that never started (PENDING: no writer was ever given, so no
	// member holds a replica) just forgets a member taken out of its spec:
	// a corrected node name, nothing to delete.
	neverStarted := st.Phase == v1.PhasePending && !st.DataInitialized
	for _, m := range st.Members {
		if slices.Contains(members, m.Node) {
			kept = append(kept, m)
			continue
		}
		if neverStarted {
			continue
		}
		if !slices.ContainsFunc(st.RemovedMembers, func(rm v1.RemovedMember) bool { return rm.Node == m.Node }) {
			st.RemovedMembers = append(st.RemovedMembers, v1.RemovedMember{Node: m.Node, Message: waitingForCopy})
			moved = append(moved, m.Node)
		}
	}
	st.Members = kept
	return moved
}

// announceRemoved records a MemberReplaced event for each node just
// replaced.
func (r *VolumePairReconciler) announceRemoved(vp *v1.VolumePair, moved []string) {
	var added []string
	for _, n := range vp.Spec.MemberNodes() {
		if vp.Status.MemberStatus(n) == nil {
			added = append(added, n)
		}
	}
	for i, old := range moved {
		if i < len(added) {
			r.Recorder.Eventf(vp, nil, corev1.EventTypeNormal, "MemberReplaced", "Replace",
				"%s replaces %s: it receives a full copy; the replica on %s is deleted once the pair is in sync again", added[i], old, old)
			continue
		}
		r.Recorder.Eventf(vp, nil, corev1.EventTypeNormal, "MemberReplaced", "Replace",
			"%s was removed from the pair; its replica is deleted once the other members are in sync", old)
	}
}

const waitingForCopy = "deleted once the new member holds the data and the pair is in sync"

// retireRemoved deletes the replicas of removed members once the pair is in
// sync with its current members; a node that does not answer keeps its
// entry (and replica) with a message saying so, and is tried again on the
// next rounds.
func (r *VolumePairReconciler) retireRemoved(ctx context.Context, s *scope) {
	vp := s.vp
	if len(vp.Status.RemovedMembers) == 0 || !s.view.Authority.Exists {
		return
	}
	writer, others := s.view.member(s.view.Authority.Holder), s.view.others(s.view.Authority.Holder)
	if !AllInSync(writer, others) {
		return
	}
	for _, o := range others {
		if !HoldsData(o, s.view.PairUID) {
			return
		}
	}
	purge := vp.Annotations[v1.AnnRetainData] != "true"
	var left []v1.RemovedMember
	for _, m := range vp.Status.RemovedMembers {
		info, err := r.agentInfo(ctx, m.Node)
		if err == nil {
			err = r.NewAgentClient(info.control, r.agentToken()).Delete(ctx, vp.Namespace, vp.Name, purge)
			if agentapi.IsNotFound(err) {
				err = nil // nothing there (any more)
			}
		}
		if err != nil {
			msg := truncate(removedMessage(vp, m.Node, info.dataDir, err), 1024)
			if m.Message != msg {
				r.Recorder.Eventf(vp, nil, corev1.EventTypeWarning, "RemovedMemberPending", "Delete", "%s", msg)
			}
			left = append(left, v1.RemovedMember{Node: m.Node, Message: msg})
			continue
		}
		what := "deleted"
		if !purge {
			what = "closed (retain-data: its files stay)"
		}
		log.FromContext(ctx).Info("Removed member's replica "+what, "node", m.Node)
		r.Recorder.Eventf(vp, nil, corev1.EventTypeNormal, "MemberRemoved", "Delete", "The replica on the replaced member %s was %s; the pair is in sync on %s and %s", m.Node, what, writer.Node, names(others))
	}
	vp.Status.RemovedMembers = left
}

// removedMessage says why a removed member's replica is still there, and
// where.
func removedMessage(vp *v1.VolumePair, node, dataDir string, err error) string {
	if dataDir == "" {
		dataDir = "<agent data dir, default /var/lib/tandem>"
	}
	return fmt.Sprintf("the replica on %s could not be deleted yet (%v): it is tried again while %s stays listed here; "+
		"its files are in %s on that node", node, err, node, agentapi.ReplicaDir(dataDir, vp.Namespace, vp.Name))
}

// writerNotMember is the error observe reports when the authority's holder
// is not a member of the spec: its node was replaced while it was the writer.
func writerNotMember(vp *v1.VolumePair, holder string) error {
	return fmt.Errorf("the writer %s is no longer a member (spec names %s): a writer cannot be replaced; "+
		"set its node back, then move the writer role first (swap spec.primary and spec.backup, or kubectl tandem failover) and replace it afterwards",
		holder, strings.Join(vp.Spec.MemberNodes(), ", "))
}
