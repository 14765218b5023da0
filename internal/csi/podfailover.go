package csi

import (
	"context"
	"fmt"
	"slices"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/tools/events"
	"k8s.io/utils/clock"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/container-storage-interface/spec/lib/go/csi"
	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// The manager's rules for the workload failover:
// +kubebuilder:rbac:groups=core,resources=pods,verbs=get;list;watch;delete
// +kubebuilder:rbac:groups=storage.k8s.io,resources=volumeattachments,verbs=delete
// +kubebuilder:rbac:groups=core,resources=nodes,verbs=patch;update
// +kubebuilder:rbac:groups=core,resources=nodes/status,verbs=patch

// Workload failover (the Pods that use a volume follow its writer when
// their node is lost; what piraeus-ha-controller does for DRBD).
const (
	// AnnPodFailoverOptOut on a Pod ("false") keeps it where it is.
	AnnPodFailoverOptOut = DriverName + "/pod-failover"
	// TaintLost keeps new Pods off a node whose Tandem node plugin and agent
	// are both gone, until the node plugin renews its Lease again (the
	// scheduler would otherwise put a replaced Pod back on the lost node
	// while its Node still looks Ready).
	TaintLost = DriverName + "/lost"
)

// PodFailover moves the Pods off a lost node. A volume's client node X is
// lost when the pair's member on X (if X is a member) does not answer the
// controller and X's node plugin has not renewed its Lease within its
// duration. Then, while the pair has a serving writer on another node:
//
//  1. X stops being the pair's client node, and the call returns only once
//     the writer refuses X (ControllerUnpublishVolume): whatever a Pod left
//     on X does, it can no longer write. This is the fence; nothing below
//     happens before it holds.
//  2. X is tainted NoSchedule (TaintLost), so the replacement is not put
//     back on X while its Node still looks Ready.
//  3. X's VolumeAttachment of the volume is deleted (the attacher removes
//     its finalizer: the volume is unpublished already), and the Pods on X
//     that use the volume's claim are deleted at once (grace period 0) so
//     their controllers (StatefulSet, Deployment) recreate them; the
//     scheduler puts them on a member (the PV's node affinity), the acting
//     primary preferred... when it is the one left.
//
// Without it, Kubernetes leaves such Pods Terminating on the lost node for
// minutes (eviction after 5 minutes, then a 6-minute force-detach).
// StorageClass parameter podFailover: "false" or the Pod annotation
// csi.tandem.dev/pod-failover: "false" opt out. A pair opted out is left
// alone until no Pod on the lost node uses it any more (they were deleted
// by hand); then the node is released (unpublished), so that their
// replacements can stage the volume elsewhere.
type PodFailover struct {
	Client     client.Client
	Controller *Controller
	Recorder   events.EventRecorder
	Clock      clock.PassiveClock
}

func (p *PodFailover) now() time.Time {
	if p.Clock == nil {
		return time.Now()
	}
	return p.Clock.Now()
}

// SetupWithManager registers the workload failover (leader only): it looks
// at VolumePairs with client nodes, again when a node plugin's Lease
// changes, and untaints nodes whose node plugin is back.
func (p *PodFailover) SetupWithManager(mgr ctrl.Manager) error {
	byNode := handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, o client.Object) []reconcile.Request {
		l, ok := o.(*coordinationv1.Lease)
		if !ok || l.Labels[v1.LabelComponent] != componentNode {
			return nil
		}
		var vps v1.VolumePairList
		if err := p.Client.List(ctx, &vps); err != nil {
			return nil
		}
		var out []reconcile.Request
		for _, vp := range vps.Items {
			if vp.Spec.Clients != nil && slices.Contains(vp.Spec.Clients.Nodes, l.Labels[v1.LabelNode]) {
				out = append(out, reconcile.Request{NamespacedName: client.ObjectKeyFromObject(&vp)})
			}
		}
		return out
	})
	if err := ctrl.NewControllerManagedBy(mgr).Named("csi-pod-failover").
		For(&v1.VolumePair{}).
		Watches(&coordinationv1.Lease{}, byNode).
		Complete(p); err != nil {
		return err
	}
	plugins := predicate.NewPredicateFuncs(func(o client.Object) bool { return o.GetLabels()[v1.LabelComponent] == componentNode })
	return ctrl.NewControllerManagedBy(mgr).Named("csi-node-untaint").
		For(&coordinationv1.Lease{}, builder.WithPredicates(plugins)).
		Complete(reconcile.Func(p.untaint))
}

// Reconcile looks at one VolumePair's client node.
func (p *PodFailover) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	vp := &v1.VolumePair{}
	if err := p.Client.Get(ctx, req.NamespacedName, vp); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if vp.Spec.Clients == nil || len(vp.Spec.Clients.Nodes) == 0 || !vp.DeletionTimestamp.IsZero() {
		return ctrl.Result{}, nil
	}
	optedOut := vp.Annotations[AnnPodFailover] == "false"
	node := vp.Spec.Clients.Nodes[0]
	lost, why, err := p.lost(ctx, vp, node)
	if err != nil {
		return ctrl.Result{}, err
	}
	if !lost {
		if why != "" {
			// Something is wrong with the node: look again soon.
			return ctrl.Result{RequeueAfter: time.Second}, nil
		}
		return ctrl.Result{}, nil
	}
	writer := vp.Status.ActivePrimary
	if writer == "" || writer == node || vp.Status.Endpoint == "" {
		// The pair has no serving writer elsewhere yet (its failover may be
		// under way): nothing to move the Pods to.
		return ctrl.Result{RequeueAfter: time.Second}, nil
	}
	logger := log.FromContext(ctx).WithValues("node", node, "writer", writer)
	volID := vp.Name
	if vp.Namespace != p.Controller.Namespace {
		volID = vp.Namespace + "/" + vp.Name
	}
	pvs, claims, err := p.claims(ctx, volID)
	if err != nil {
		return ctrl.Result{}, err
	}
	if optedOut {
		// The Pods stay where they are. Once none on the lost node uses
		// the volume any more (deleted by hand), the node is released, so
		// that their replacement can stage the volume elsewhere: what the
		// attach/detach controller's force-detach does for attachable
		// volumes.
		used, err := p.usedOn(ctx, node, claims)
		if err != nil || used {
			return ctrl.Result{RequeueAfter: 5 * time.Second}, err
		}
		if _, err := p.Controller.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: volID, NodeId: node}); err != nil {
			return ctrl.Result{}, fmt.Errorf("releasing lost node %s from %s: %w", node, volID, err)
		}
		p.Recorder.Eventf(vp, nil, corev1.EventTypeWarning, "ConsumerReleased", "PodFailover",
			"Node %s is lost (%s) and no Pod on it uses the volume any more: the writer %s refuses it now, and another node may use the volume", node, why, writer)
		return ctrl.Result{}, nil
	}
	// 1. The fence.
	if _, err := p.Controller.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: volID, NodeId: node}); err != nil {
		return ctrl.Result{}, fmt.Errorf("fencing lost node %s from %s: %w", node, volID, err)
	}
	p.Recorder.Eventf(vp, nil, corev1.EventTypeWarning, "ConsumerFenced", "PodFailover",
		"Node %s is lost (%s): the writer %s refuses its clients now; its Pods using the volume are moved", node, why, writer)
	// 2. Keep replacements off the lost node.
	if err := p.taint(ctx, node); err != nil {
		return ctrl.Result{}, err
	}
	// 3. The attachment (a cluster whose CSIDriver still has
	// attachRequired: true) and the Pods.
	var vas storagev1.VolumeAttachmentList
	if err := p.Client.List(ctx, &vas); err != nil {
		return ctrl.Result{}, err
	}
	for i := range vas.Items {
		va := &vas.Items[i]
		if va.Spec.Attacher == DriverName && va.Spec.NodeName == node && va.Spec.Source.PersistentVolumeName != nil && slices.Contains(pvs, *va.Spec.Source.PersistentVolumeName) {
			if err := p.Client.Delete(ctx, va); client.IgnoreNotFound(err) != nil {
				return ctrl.Result{}, fmt.Errorf("deleting VolumeAttachment %s: %w", va.Name, err)
			}
		}
	}
	// The lost node's kubelet never reports the volume unmounted: the
	// attach-detach controller would keep it "in use" there and hold the
	// attachment to the new node for up to a minute (its periodic sync).
	// The writer refuses the node already; say the volume is not in use
	// there any more.
	if err := p.releaseVolumeInUse(ctx, node, volID); err != nil {
		return ctrl.Result{}, err
	}
	for _, claim := range claims {
		var pods corev1.PodList
		if err := p.Client.List(ctx, &pods, client.InNamespace(claim.Namespace)); err != nil {
			return ctrl.Result{}, err
		}
		for i := range pods.Items {
			pod := &pods.Items[i]
			if pod.Spec.NodeName != node || !usesClaim(pod, claim.Name) || !pod.DeletionTimestamp.IsZero() && pod.DeletionGracePeriodSeconds != nil && *pod.DeletionGracePeriodSeconds == 0 {
				continue
			}
			if pod.Annotations[AnnPodFailoverOptOut] == "false" {
				p.Recorder.Eventf(pod, vp, corev1.EventTypeWarning, "PodFailoverSkipped", "PodFailover",
					"Node %s is lost; the volume's writer is %s now; this Pod opted out of moving (annotation %s)", node, writer, AnnPodFailoverOptOut)
				continue
			}
			if err := p.Client.Delete(ctx, pod, client.GracePeriodSeconds(0), client.Preconditions{UID: &pod.UID}); client.IgnoreNotFound(err) != nil {
				return ctrl.Result{}, fmt.Errorf("deleting Pod %s/%s: %w", pod.Namespace, pod.Name, err)
			}
			p.Recorder.Eventf(pod, vp, corev1.EventTypeWarning, "PodFailover", "PodFailover",
				"Node %s is lost (%s); the volume %s fails over to %s: deleted so that its controller starts it there", node, why, volID, writer)
			logger.Info("Pod moved off a lost node", "pod", client.ObjectKeyFromObject(pod).String())
		}
	}
	return ctrl.Result{}, nil
}

// lost says whether node is lost for vp: its member (if any) does not
// answer and its node plugin's Lease has lapsed. why names what was seen
// (also when only one of the two holds, to look again soon).
func (p *PodFailover) lost(ctx context.Context, vp *v1.VolumePair, node string) (bool, string, error) {
	agentGone := true
	for _, m := range vp.Status.Members {
		if m.Node == node {
			agentGone = m.Role == "" && !m.Connected
		}
	}
	l := &coordinationv1.Lease{}
	err := p.Client.Get(ctx, client.ObjectKey{Namespace: p.Controller.Namespace, Name: NodeLeaseName(node)}, l)
	switch {
	case apierrors.IsNotFound(err):
		l = nil
	case err != nil:
		return false, "", err
	}
	pluginGone := l == nil || !leaseCurrent(l, p.now())
	switch {
	case agentGone && pluginGone:
		return true, "its Tandem agent does not answer and its node plugin's Lease lapsed", nil
	case agentGone:
		return false, "its agent does not answer, its node plugin still renews", nil
	case pluginGone:
		return false, "its node plugin's Lease lapsed, its agent answers", nil
	}
	return false, "", nil
}

// claims returns the PVs and claims of a volume.
func (p *PodFailover) claims(ctx context.Context, volID string) ([]string, []client.ObjectKey, error) {
	var pvs corev1.PersistentVolumeList
	if err := p.Client.List(ctx, &pvs); err != nil {
		return nil, nil, err
	}
	var names []string
	var claims []client.ObjectKey
	for _, pv := range pvs.Items {
		if pv.Spec.CSI == nil || pv.Spec.CSI.Driver != DriverName || pv.Spec.CSI.VolumeHandle != volID {
			continue
		}
		names = append(names, pv.Name)
		if ref := pv.Spec.ClaimRef; ref != nil {
			claims = append(claims, client.ObjectKey{Namespace: ref.Namespace, Name: ref.Name})
		}
	}
	return names, claims, nil
}

// usedOn says whether a Pod on node uses one of claims (a Pod being
// deleted counts until it is gone: its containers may still run).
func (p *PodFailover) usedOn(ctx context.Context, node string, claims []client.ObjectKey) (bool, error) {
	for _, claim := range claims {
		var pods corev1.PodList
		if err := p.Client.List(ctx, &pods, client.InNamespace(claim.Namespace)); err != nil {
			return false, err
		}
		for i := range pods.Items {
			if pods.Items[i].Spec.NodeName == node && usesClaim(&pods.Items[i], claim.Name) {
				return true, nil
			}
		}
	}
	return false, nil
}

func usesClaim(pod *corev1.Pod, claim string) bool {
	for _, v := range pod.Spec.Volumes {
		if v.PersistentVolumeClaim != nil && v.PersistentVolumeClaim.ClaimName == claim {
			return true
		}
	}
	return false
}

// taint adds TaintLost to node (idempotent).
func (p *PodFailover) taint(ctx context.Context, node string) error {
	n := &corev1.Node{}
	if err := p.Client.Get(ctx, client.ObjectKey{Name: node}, n); err != nil {
		return client.IgnoreNotFound(err)
	}
	if slices.ContainsFunc(n.Spec.Taints, func(t corev1.Taint) bool { return t.Key == TaintLost }) {
		return nil
	}
	base := n.DeepCopy()
	n.Spec.Taints = append(n.Spec.Taints, corev1.Taint{Key: TaintLost, Effect: corev1.TaintEffectNoSchedule, Value: "true"})
	if err := p.Client.Patch(ctx, n, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{})); err != nil {
		return fmt.Errorf("tainting lost node %s: %w", node, err)
	}
	p.Recorder.Eventf(n, nil, corev1.EventTypeWarning, "TandemNodeLost", "Taint", "Tainted %s NoSchedule: its Tandem agent and node plugin are gone; removed when the node plugin is back", TaintLost)
	return nil
}

// untaint removes TaintLost from a node whose node plugin renews its Lease
// again.
func (p *PodFailover) untaint(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	l := &coordinationv1.Lease{}
	if err := p.Client.Get(ctx, req.NamespacedName, l); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	if l.Labels[v1.LabelComponent] != componentNode || !leaseCurrent(l, p.now()) {
		return reconcile.Result{}, nil
	}
	n := &corev1.Node{}
	if err := p.Client.Get(ctx, client.ObjectKey{Name: l.Labels[v1.LabelNode]}, n); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	if !slices.ContainsFunc(n.Spec.Taints, func(t corev1.Taint) bool { return t.Key == TaintLost }) {
		return reconcile.Result{}, nil
	}
	base := n.DeepCopy()
	n.Spec.Taints = slices.DeleteFunc(n.Spec.Taints, func(t corev1.Taint) bool { return t.Key == TaintLost })
	if err := p.Client.Patch(ctx, n, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{})); err != nil {
		return reconcile.Result{}, err
	}
	p.Recorder.Eventf(n, nil, corev1.EventTypeNormal, "TandemNodeBack", "Untaint", "Removed %s: the Tandem node plugin renews its Lease again", TaintLost)
	return reconcile.Result{}, nil
}

// releaseVolumeInUse removes the volume from a fenced node's
// status.volumesInUse and status.volumesAttached.
func (p *PodFailover) releaseVolumeInUse(ctx context.Context, node, volID string) error {
	unique := corev1.UniqueVolumeName("kubernetes.io/csi/" + DriverName + "^" + volID)
	n := &corev1.Node{}
	if err := p.Client.Get(ctx, client.ObjectKey{Name: node}, n); err != nil {
		return client.IgnoreNotFound(err)
	}
	inUse := slices.Contains(n.Status.VolumesInUse, unique)
	attached := slices.ContainsFunc(n.Status.VolumesAttached, func(a corev1.AttachedVolume) bool { return a.Name == unique })
	if !inUse && !attached {
		return nil
	}
	base := n.DeepCopy()
	n.Status.VolumesInUse = slices.DeleteFunc(n.Status.VolumesInUse, func(v corev1.UniqueVolumeName) bool { return v == unique })
	n.Status.VolumesAttached = slices.DeleteFunc(n.Status.VolumesAttached, func(a corev1.AttachedVolume) bool { return a.Name == unique })
	if err := p.Client.Status().Patch(ctx, n, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{})); err != nil {
		return fmt.Errorf("releasing %s on lost node %s: %w", unique, node, err)
	}
	return nil
}
