package controllers

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// reconcileDelete removes the replicas from every member's agent (kept with the
// storage.tandem.dev/retain-data annotation), the authority Lease and the
// finalizer. Unreachable agents keep their files; an event says so.
func (r *VolumePairReconciler) reconcileDelete(ctx context.Context, vp *v1.VolumePair) (ctrl.Result, error) {
	if !controllerutil.ContainsFinalizer(vp, v1.Finalizer) {
		return ctrl.Result{}, nil
	}
	purge := vp.Annotations[v1.AnnRetainData] != "true"
	nodes := vp.Spec.MemberNodes()
	for _, m := range vp.Status.RemovedMembers {
		nodes = append(nodes, m.Node) // replaced members not deleted yet
	}
	neverStarted := vp.Status.Phase == v1.PhasePending && !vp.Status.DataInitialized
	for _, node := range nodes {
		info, err := r.agentInfo(ctx, node)
		if err == nil {
			err = r.NewAgentClient(info.control, r.agentToken()).Delete(ctx, vp.Namespace, vp.Name, purge)
			if agentapi.IsNotFound(err) {
				err = nil // no replica there: nothing to remove
			}
		}
		if err != nil && neverStarted {
			// No replica was ever created (no writer was given): nothing
			// can be left on a node whose agent never registered.
			continue
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
	dir := agentapi.ReplicaDir(dataDir, vp.Namespace, vp.Name)
	if dataDir == "" {
		dir = agentapi.ReplicaDir("<agent data dir, default /var/lib/tandem>", vp.Namespace, vp.Name)
	}
	if !purge {
		return fmt.Sprintf("Replica on %s not closed: %v. Its files stay (retain-data) in %s on %s", node, err, dir, node)
	}
	return fmt.Sprintf("Replica on %s not removed: %v. Its files stay in %s on node %s: once the pair is gone for good, "+
		"remove that directory on the node (rm -rf %s), with the agent stopped or after it has restarted without a VolumePair of this name",
		node, err, dir, node, dir)
}
