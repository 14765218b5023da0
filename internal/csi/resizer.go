package csi

import (
	"context"
	"fmt"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/events"
	"k8s.io/client-go/util/workqueue"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
)

// The manager's rules for resizing:
// +kubebuilder:rbac:groups=core,resources=persistentvolumeclaims,verbs=get;list;watch;patch;update
// +kubebuilder:rbac:groups=core,resources=persistentvolumeclaims/status,verbs=patch;update
// +kubebuilder:rbac:groups=core,resources=persistentvolumes,verbs=get;list;watch;patch;update
// +kubebuilder:rbac:groups=core;events.k8s.io,resources=events,verbs=create;patch

// Events the resizer records on a PersistentVolumeClaim (the
// external-resizer's reasons).
const (
	// EventResizing: the volume is being grown (ControllerExpandVolume).
	EventResizing = "Resizing"
	// EventFileSystemResizeRequired: the volume grew; the kubelet grows
	// the device and filesystem on the node (NodeExpandVolume).
	EventFileSystemResizeRequired = "FileSystemResizeRequired"
	// EventVolumeResizeFailed: growing the volume failed (Warning).
	EventVolumeResizeFailed = "VolumeResizeFailed"
)

// ResizerName is the resizer's name in events and the kube-controller-
// manager's volume.kubernetes.io/storage-resizer annotation: the driver's.
const ResizerName = DriverName

// VolumeExpander grows volumes: the controller service's
// ControllerExpandVolume.
type VolumeExpander interface {
	ControllerExpandVolume(context.Context, *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error)
}

// Resizer grows the volumes of csi.tandem.dev PersistentVolumeClaims whose
// request exceeds their capacity: the external-resizer sidecar's work, in
// process, with its status protocol. For a bound claim whose
// spec.resources.requests.storage exceeds status.capacity:
//
//  1. status.allocatedResources[storage] becomes the request,
//     allocatedResourceStatuses[storage] ControllerResizeInProgress, and
//     the condition Resizing is set (event Resizing);
//  2. ControllerExpandVolume grows the VolumePair (spec.size);
//  3. the PersistentVolume's spec.capacity becomes the volume's new size;
//  4. allocatedResourceStatuses[storage] becomes NodeResizePending and the
//     condition FileSystemResizePending replaces Resizing (event
//     FileSystemResizeRequired): the kubelet of the node using the volume
//     calls NodeExpandVolume (online) and then sets status.capacity and
//     clears both.
//
// A failure is an event VolumeResizeFailed and the condition
// ControllerResizeError; a request the driver refuses for good (above the
// largest volume, say) is ControllerResizeInfeasible and is not retried
// until the claim's request changes; other failures are retried with
// backoff. A PersistentVolume already at the requested size skips to 4,
// so a resize interrupted after step 3 finishes.
type Resizer struct {
	Client     client.Client
	Controller VolumeExpander
	Recorder   events.EventRecorder
}

// SetupWithManager registers the resizer (leader only).
func (r *Resizer) SetupWithManager(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).Named("csi-resizer").
		For(&corev1.PersistentVolumeClaim{}).
		WithOptions(controller.Options{MaxConcurrentReconciles: 4,
			RateLimiter: workqueue.NewTypedItemExponentialFailureRateLimiter[reconcile.Request](time.Second, 5*time.Minute)}).
		Complete(r)
}

// Reconcile takes one claim a step further towards its requested size.
func (r *Resizer) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	pvc := &corev1.PersistentVolumeClaim{}
	if err := r.Client.Get(ctx, req.NamespacedName, pvc); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if pvc.Status.Phase != corev1.ClaimBound || pvc.Spec.VolumeName == "" || !pvc.DeletionTimestamp.IsZero() {
		return ctrl.Result{}, nil
	}
	want, ok := pvc.Spec.Resources.Requests[corev1.ResourceStorage]
	if !ok {
		return ctrl.Result{}, nil
	}
	if have, ok := pvc.Status.Capacity[corev1.ResourceStorage]; !ok || want.Cmp(have) <= 0 {
		return ctrl.Result{}, nil // nothing to grow (or the kubelet finished)
	}
	pv := &corev1.PersistentVolume{}
	if err := r.Client.Get(ctx, client.ObjectKey{Name: pvc.Spec.VolumeName}, pv); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if pv.Spec.CSI == nil || pv.Spec.CSI.Driver != DriverName {
		return ctrl.Result{}, nil
	}
	logger := log.FromContext(ctx).WithValues("volume", pv.Name, "size", want.String())
	st := pvc.Status.AllocatedResourceStatuses[corev1.ResourceStorage]
	if alloc, ok := pvc.Status.AllocatedResources[corev1.ResourceStorage]; ok && alloc.Cmp(want) == 0 {
		switch st {
		case corev1.PersistentVolumeClaimControllerResizeInfeasible:
			return ctrl.Result{}, nil // refused for good: waits for another request
		case corev1.PersistentVolumeClaimNodeResizePending, corev1.PersistentVolumeClaimNodeResizeInProgress,
			corev1.PersistentVolumeClaimNodeResizeInfeasible:
			return ctrl.Result{}, nil // the kubelet's turn
		}
	}
	if pvCap, ok := pv.Spec.Capacity[corev1.ResourceStorage]; ok && pvCap.Cmp(want) >= 0 {
		// The volume has grown (an earlier round got this far).
		return ctrl.Result{}, r.nodePending(ctx, pvc, want)
	}

	if st != corev1.PersistentVolumeClaimControllerResizeInProgress || !allocatedIs(pvc, want) {
		if err := r.patchStatus(ctx, pvc, func(s *corev1.PersistentVolumeClaimStatus) {
			setAllocated(s, want, corev1.PersistentVolumeClaimControllerResizeInProgress)
			setResizeCondition(s, corev1.PersistentVolumeClaimResizing, "")
		}); err != nil {
			return ctrl.Result{}, err
		}
		r.Recorder.Eventf(pvc, pv, corev1.EventTypeNormal, EventResizing, "Resize", "Resizer %s is growing volume %s to %s", ResizerName, pv.Name, want.String())
	}
	resp, err := r.Controller.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{
		VolumeId:         pv.Spec.CSI.VolumeHandle,
		CapacityRange:    &csi.CapacityRange{RequiredBytes: want.Value()},
		VolumeCapability: pvCapability(pv),
	})
	if err != nil {
		msg := status.Convert(err).Message()
		infeasible := finalExpandError(err)
		r.Recorder.Eventf(pvc, pv, corev1.EventTypeWarning, EventVolumeResizeFailed, "Resize", "Growing volume %s to %s failed: %s", pv.Name, want.String(), msg)
		perr := r.patchStatus(ctx, pvc, func(s *corev1.PersistentVolumeClaimStatus) {
			if infeasible {
				setAllocated(s, want, corev1.PersistentVolumeClaimControllerResizeInfeasible)
			}
			setResizeCondition(s, corev1.PersistentVolumeClaimControllerResizeError, msg)
		})
		if infeasible {
			logger.Info("Volume cannot grow to the requested size", "error", msg)
			return ctrl.Result{}, perr
		}
		return ctrl.Result{}, fmt.Errorf("growing volume %s to %s: %w", pv.Name, want.String(), err)
	}
	size := *resource.NewQuantity(resp.GetCapacityBytes(), resource.BinarySI)
	if size.Cmp(want) < 0 {
		return ctrl.Result{}, fmt.Errorf("growing volume %s to %s: the driver returned %s", pv.Name, want.String(), size.String())
	}
	pvBefore := pv.DeepCopy()
	if pv.Spec.Capacity == nil {
		pv.Spec.Capacity = corev1.ResourceList{}
	}
	pv.Spec.Capacity[corev1.ResourceStorage] = size
	if err := r.Client.Patch(ctx, pv, client.MergeFrom(pvBefore)); err != nil {
		return ctrl.Result{}, fmt.Errorf("recording the new capacity %s of PersistentVolume %s: %w", size.String(), pv.Name, err)
	}
	logger.Info("Volume grown; the node grows its device and filesystem", "capacity", size.String())
	return ctrl.Result{}, r.nodePending(ctx, pvc, want)
}

// nodePending hands the claim to the kubelet: NodeResizePending and the
// condition FileSystemResizePending (the driver always asks for node
// expansion: the attached device learns the new size there).
func (r *Resizer) nodePending(ctx context.Context, pvc *corev1.PersistentVolumeClaim, want resource.Quantity) error {
	if pvc.Status.AllocatedResourceStatuses[corev1.ResourceStorage] == corev1.PersistentVolumeClaimNodeResizePending && allocatedIs(pvc, want) {
		return nil
	}
	if err := r.patchStatus(ctx, pvc, func(s *corev1.PersistentVolumeClaimStatus) {
		setAllocated(s, want, corev1.PersistentVolumeClaimNodeResizePending)
		setResizeCondition(s, corev1.PersistentVolumeClaimFileSystemResizePending,
			"Waiting for the kubelet to grow the volume's device and filesystem on the node that uses it (or for a Pod to use it).")
	}); err != nil {
		return err
	}
	r.Recorder.Eventf(pvc, nil, corev1.EventTypeNormal, EventFileSystemResizeRequired, "Resize", "Volume %s grew to %s; the node grows its device and filesystem", pvc.Spec.VolumeName, want.String())
	return nil
}

// patchStatus changes the claim's status with f (a merge patch guarded by
// the claim's resourceVersion: a conflict is retried by the queue).
func (r *Resizer) patchStatus(ctx context.Context, pvc *corev1.PersistentVolumeClaim, f func(*corev1.PersistentVolumeClaimStatus)) error {
	before := pvc.DeepCopy()
	f(&pvc.Status)
	if err := r.Client.Status().Patch(ctx, pvc, client.MergeFromWithOptions(before, client.MergeFromWithOptimisticLock{})); err != nil {
		if apierrors.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("updating the status of PersistentVolumeClaim %s/%s: %w", pvc.Namespace, pvc.Name, err)
	}
	return nil
}

func allocatedIs(pvc *corev1.PersistentVolumeClaim, want resource.Quantity) bool {
	a, ok := pvc.Status.AllocatedResources[corev1.ResourceStorage]
	return ok && a.Cmp(want) == 0
}

func setAllocated(s *corev1.PersistentVolumeClaimStatus, want resource.Quantity, st corev1.ClaimResourceStatus) {
	if s.AllocatedResources == nil {
		s.AllocatedResources = corev1.ResourceList{}
	}
	s.AllocatedResources[corev1.ResourceStorage] = want
	if s.AllocatedResourceStatuses == nil {
		s.AllocatedResourceStatuses = map[corev1.ResourceName]corev1.ClaimResourceStatus{}
	}
	s.AllocatedResourceStatuses[corev1.ResourceStorage] = st
}

// resizeConditions are the claim conditions a resize sets; one at a time.
var resizeConditions = []corev1.PersistentVolumeClaimConditionType{
	corev1.PersistentVolumeClaimResizing,
	corev1.PersistentVolumeClaimFileSystemResizePending,
	corev1.PersistentVolumeClaimControllerResizeError,
}

// setResizeCondition makes t the claim's only resize condition (True,
// with msg), keeping its transition time when it was set already.
func setResizeCondition(s *corev1.PersistentVolumeClaimStatus, t corev1.PersistentVolumeClaimConditionType, msg string) {
	now := metav1.Now()
	var kept []corev1.PersistentVolumeClaimCondition
	for _, c := range s.Conditions {
		isResize := false
		for _, rt := range resizeConditions {
			isResize = isResize || c.Type == rt
		}
		if c.Type == t && c.Status == corev1.ConditionTrue {
			now = c.LastTransitionTime
		}
		if !isResize {
			kept = append(kept, c)
		}
	}
	s.Conditions = append(kept, corev1.PersistentVolumeClaimCondition{Type: t, Status: corev1.ConditionTrue, LastTransitionTime: now, Message: msg})
}

// finalExpandError says whether ControllerExpandVolume refused the request
// for good (retrying the same size cannot succeed).
func finalExpandError(err error) bool {
	switch status.Code(err) {
	case codes.InvalidArgument, codes.OutOfRange, codes.NotFound, codes.Unimplemented:
		return true
	}
	return false
}

// pvCapability is the volume capability a PersistentVolume was made with,
// as ControllerExpandVolume checks it.
func pvCapability(pv *corev1.PersistentVolume) *csi.VolumeCapability {
	mode := csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER
	for _, m := range pv.Spec.AccessModes {
		if m == corev1.ReadWriteOncePod {
			mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER
		}
	}
	vc := &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode}}
	if pv.Spec.VolumeMode != nil && *pv.Spec.VolumeMode == corev1.PersistentVolumeBlock {
		vc.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
	} else {
		vc.AccessType = &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: pv.Spec.CSI.FSType}}
	}
	return vc
}
