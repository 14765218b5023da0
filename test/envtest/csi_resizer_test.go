package envtest

import (
	"context"
	"testing"

	csispec "github.com/container-storage-interface/spec/lib/go/csi"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/tandem-storage/tandem/internal/csi"
)

// grower answers ControllerExpandVolume with the requested size.
type grower struct{ calls int }

func (g *grower) ControllerExpandVolume(_ context.Context, req *csispec.ControllerExpandVolumeRequest) (*csispec.ControllerExpandVolumeResponse, error) {
	g.calls++
	return &csispec.ControllerExpandVolumeResponse{CapacityBytes: req.GetCapacityRange().GetRequiredBytes(), NodeExpansionRequired: true}, nil
}

type noEvents struct{}

func (noEvents) Eventf(runtime.Object, runtime.Object, string, string, string, string, ...interface{}) {
}

// TestCSIResizer: the API server accepts the resizer's claim status
// protocol (allocatedResources, allocatedResourceStatuses, the resize
// conditions) and its PersistentVolume capacity, and the claim ends where
// the kubelet takes over: NodeResizePending, FileSystemResizePending, the
// PV at the new size. (No kubelet runs: the test then does its part, and
// the resizer leaves the finished claim alone.)
func TestCSIResizer(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	// Admission lets a claim grow only in a class that allows it.
	sc := &storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: "resize-" + ns}, Provisioner: csi.DriverName, AllowVolumeExpansion: ptr.To(true)}
	if err := k8s.Create(ctx, sc); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Delete(context.Background(), sc) })
	pv := &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: "pv-resize-" + ns}}
	pv.Spec.Capacity = corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}
	pv.Spec.AccessModes = []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce}
	pv.Spec.PersistentVolumeSource.CSI = &corev1.CSIPersistentVolumeSource{Driver: csi.DriverName, VolumeHandle: "pvc-x", FSType: "ext4"}
	pv.Spec.ClaimRef = &corev1.ObjectReference{Namespace: ns, Name: "data"}
	pv.Spec.StorageClassName = sc.Name
	if err := k8s.Create(ctx, pv); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Delete(context.Background(), pv) })
	pvc := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "data"}}
	pvc.Spec.AccessModes = []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce}
	pvc.Spec.VolumeName = pv.Name
	pvc.Spec.StorageClassName = &sc.Name
	pvc.Spec.Resources.Requests = corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}
	if err := k8s.Create(ctx, pvc); err != nil {
		t.Fatal(err)
	}
	pvc.Status.Phase = corev1.ClaimBound
	pvc.Status.AccessModes = pvc.Spec.AccessModes
	pvc.Status.Capacity = corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}
	if err := k8s.Status().Update(ctx, pvc); err != nil {
		t.Fatal(err)
	}
	pvc.Spec.Resources.Requests[corev1.ResourceStorage] = resource.MustParse("2Gi")
	if err := k8s.Update(ctx, pvc); err != nil {
		t.Fatalf("growing the claim's request: %v", err)
	}

	g := &grower{}
	r := &csi.Resizer{Client: k8s, Controller: g, Recorder: noEvents{}}
	req := reconcile.Request{NamespacedName: client.ObjectKeyFromObject(pvc)}
	for round := 0; round < 2; round++ {
		if _, err := r.Reconcile(ctx, req); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
	}
	if g.calls != 1 {
		t.Fatalf("%d ControllerExpandVolume calls, want 1", g.calls)
	}
	if err := k8s.Get(ctx, req.NamespacedName, pvc); err != nil {
		t.Fatal(err)
	}
	if st := pvc.Status.AllocatedResourceStatuses[corev1.ResourceStorage]; st != corev1.PersistentVolumeClaimNodeResizePending {
		t.Fatalf("allocatedResourceStatuses %v, want NodeResizePending", pvc.Status.AllocatedResourceStatuses)
	}
	if a := pvc.Status.AllocatedResources[corev1.ResourceStorage]; a.Cmp(resource.MustParse("2Gi")) != 0 {
		t.Fatalf("allocatedResources %v, want 2Gi", pvc.Status.AllocatedResources)
	}
	if len(pvc.Status.Conditions) != 1 || pvc.Status.Conditions[0].Type != corev1.PersistentVolumeClaimFileSystemResizePending {
		t.Fatalf("conditions %+v, want FileSystemResizePending", pvc.Status.Conditions)
	}
	if err := k8s.Get(ctx, client.ObjectKeyFromObject(pv), pv); err != nil {
		t.Fatal(err)
	}
	if c := pv.Spec.Capacity[corev1.ResourceStorage]; c.Cmp(resource.MustParse("2Gi")) != 0 {
		t.Fatalf("PV capacity %s, want 2Gi", c.String())
	}

	// The kubelet's part after NodeExpandVolume.
	pvc.Status.Capacity[corev1.ResourceStorage] = resource.MustParse("2Gi")
	pvc.Status.Conditions = nil
	pvc.Status.AllocatedResourceStatuses = nil
	if err := k8s.Status().Update(ctx, pvc); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Reconcile(ctx, req); err != nil || g.calls != 1 {
		t.Fatalf("a finished claim: %v, %d calls", err, g.calls)
	}
}
