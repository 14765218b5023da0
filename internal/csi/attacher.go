package csi

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/workqueue"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
)

// The manager's rules for attaching:
// +kubebuilder:rbac:groups=storage.k8s.io,resources=volumeattachments,verbs=get;list;watch;update;patch
// +kubebuilder:rbac:groups=storage.k8s.io,resources=volumeattachments/status,verbs=update;patch

// AttachFinalizer is the finalizer the attacher keeps on a VolumeAttachment
// until the volume is unpublished from its node (the external-attacher's
// name for csi.tandem.dev).
const AttachFinalizer = "external-attacher/csi-tandem-dev"

// AttachController carries out the VolumeAttachments of csi.tandem.dev volumes: the
// external-attacher sidecar's work, in process. Attaching a volume to a
// node is ControllerPublishVolume (the node becomes the pair's client node,
// enforced by its writer); detaching is ControllerUnpublishVolume (the
// writer refuses that node from then on). A VolumeAttachment is marked
// attached, and its finalizer removed, only after the writer enforces the
// change.
type AttachController struct {
	Client     client.Client
	Controller *Controller
}

// SetupWithManager registers the attacher (leader only).
func (a *AttachController) SetupWithManager(mgr ctrl.Manager) error {
	ours := predicate.NewPredicateFuncs(func(o client.Object) bool {
		va, ok := o.(*storagev1.VolumeAttachment)
		return ok && va.Spec.Attacher == DriverName
	})
	return ctrl.NewControllerManagedBy(mgr).Named("csi-attacher").
		For(&storagev1.VolumeAttachment{}, builder.WithPredicates(ours)).
		WithOptions(controller.Options{MaxConcurrentReconciles: 4,
			RateLimiter: workqueue.NewTypedItemExponentialFailureRateLimiter[reconcile.Request](250*time.Millisecond, 30*time.Second)}).
		Complete(a)
}

// Reconcile publishes or unpublishes one VolumeAttachment's volume.
func (a *AttachController) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	va := &storagev1.VolumeAttachment{}
	if err := a.Client.Get(ctx, req.NamespacedName, va); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if va.Spec.Attacher != DriverName {
		return ctrl.Result{}, nil
	}
	logger := log.FromContext(ctx).WithValues("node", va.Spec.NodeName)
	if !va.DeletionTimestamp.IsZero() {
		if !slices.Contains(va.Finalizers, AttachFinalizer) {
			return ctrl.Result{}, nil
		}
		volID, _, err := a.volume(ctx, va)
		if err == nil {
			_, err = a.Controller.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: volID, NodeId: va.Spec.NodeName})
		}
		if err != nil {
			return ctrl.Result{}, a.recordError(ctx, va, false, err)
		}
		logger.Info("Volume detached: the writer refuses this node's clients", "volume", volID)
		va.Status.Attached = false
		va.Status.DetachError = nil
		if err := a.Client.Status().Update(ctx, va); err != nil && !apierrors.IsNotFound(err) {
			return ctrl.Result{}, err
		}
		va.Finalizers = slices.DeleteFunc(va.Finalizers, func(f string) bool { return f == AttachFinalizer })
		return ctrl.Result{}, client.IgnoreNotFound(a.Client.Update(ctx, va))
	}
	if !slices.Contains(va.Finalizers, AttachFinalizer) {
		va.Finalizers = append(va.Finalizers, AttachFinalizer)
		if err := a.Client.Update(ctx, va); err != nil {
			return ctrl.Result{}, err
		}
	}
	if va.Status.Attached {
		return ctrl.Result{}, nil
	}
	volID, vc, err := a.volume(ctx, va)
	if err == nil {
		_, err = a.Controller.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: volID, NodeId: va.Spec.NodeName, VolumeCapability: vc})
	}
	if err != nil {
		return ctrl.Result{}, a.recordError(ctx, va, true, err)
	}
	logger.Info("Volume attached: the writer serves this node's clients only", "volume", volID)
	va.Status.Attached = true
	va.Status.AttachError = nil
	return ctrl.Result{}, a.Client.Status().Update(ctx, va)
}

// recordError puts the error on the VolumeAttachment (kubectl describe
// shows it; the kubelet's wait for the attachment reports it) and returns
// it for a retry.
func (a *AttachController) recordError(ctx context.Context, va *storagev1.VolumeAttachment, attach bool, err error) error {
	msg := err.Error()
	if st, ok := status.FromError(err); ok {
		msg = st.Message()
	}
	e := &storagev1.VolumeError{Time: metav1.Now(), Message: msg}
	if attach {
		va.Status.AttachError = e
	} else {
		va.Status.DetachError = e
	}
	if uerr := a.Client.Status().Update(ctx, va); uerr != nil && !apierrors.IsNotFound(uerr) {
		log.FromContext(ctx).Info("Could not record the attach error", "error", uerr.Error())
	}
	return fmt.Errorf("%s %s on %s: %s", map[bool]string{true: "attaching", false: "detaching"}[attach], va.Name, va.Spec.NodeName, msg)
}

// volume returns a VolumeAttachment's volume ID and a capability that
// describes how it is used.
func (a *AttachController) volume(ctx context.Context, va *storagev1.VolumeAttachment) (string, *csi.VolumeCapability, error) {
	var src *corev1.CSIPersistentVolumeSource
	var spec *corev1.PersistentVolumeSpec
	switch {
	case va.Spec.Source.PersistentVolumeName != nil:
		pv := &corev1.PersistentVolume{}
		if err := a.Client.Get(ctx, client.ObjectKey{Name: *va.Spec.Source.PersistentVolumeName}, pv); err != nil {
			return "", nil, fmt.Errorf("PersistentVolume %s: %w", *va.Spec.Source.PersistentVolumeName, err)
		}
		spec, src = &pv.Spec, pv.Spec.CSI
	case va.Spec.Source.InlineVolumeSpec != nil:
		spec, src = va.Spec.Source.InlineVolumeSpec, va.Spec.Source.InlineVolumeSpec.CSI
	}
	if src == nil || src.Driver != DriverName {
		return "", nil, fmt.Errorf("VolumeAttachment %s names no %s volume", va.Name, DriverName)
	}
	vc := &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER}}
	if slices.Contains(spec.AccessModes, corev1.ReadWriteOncePod) {
		vc.AccessMode.Mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER
	}
	if spec.VolumeMode != nil && *spec.VolumeMode == corev1.PersistentVolumeBlock {
		vc.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
	} else {
		vc.AccessType = &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: src.FSType}}
	}
	return src.VolumeHandle, vc, nil
}
