package envtest

import (
	"context"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrlconfig "sigs.k8s.io/controller-runtime/pkg/config"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/csi"
	"github.com/tandem-storage/tandem/internal/testkit"
)

// TestCSIAttach runs the in-process attacher against the test API server:
// a VolumeAttachment for a node makes that node the pair's only client node
// and is marked attached once the writer enforces it (a stand-in reports
// status.clients, as the writer's agent would); a second node's attachment
// waits, with the reason on its status, until the first is deleted; a
// deleted attachment keeps its finalizer until the writer refuses its node.
func TestCSIAttach(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ns := newNamespace(t)
	readyNodes(t, ns, "10737418240", "att-a", "att-b")
	mgr, _ := newAttachManager(t, ns, 2*time.Second, ctrl.Options{})
	go func() { _ = mgr.Start(ctx) }()
	// The writer's report is held back while enforced is false.
	enforce := make(chan bool, 1)
	enforce <- true
	go func() {
		on := true
		for ctx.Err() == nil {
			select {
			case on = <-enforce:
			default:
			}
			if on {
				var l v1.VolumePairList
				if err := k8s.List(ctx, &l, client.InNamespace(ns)); err == nil {
					for i := range l.Items {
						vp := &l.Items[i]
						if vp.Spec.Clients != nil && (vp.Status.Clients == nil || !slices.Equal(vp.Status.Clients.Nodes, vp.Spec.Clients.Nodes)) {
							vp.Status.Clients = vp.Spec.Clients.DeepCopy()
							_ = k8s.Status().Update(ctx, vp)
						}
					}
				}
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()

	vp := &v1.VolumePair{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "att-vol"}, Spec: v1.VolumePairSpec{
		Size: resource.MustParse("64Mi"), Mode: v1.ModeSync, Primary: v1.Member{Node: "att-a"}, Backup: v1.Member{Node: "att-b"},
		Clients: &v1.ClientsSpec{Nodes: []string{}}}}
	if err := k8s.Create(ctx, vp); err != nil {
		t.Fatal(err)
	}
	pv := &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: "att-pv-" + ns}, Spec: corev1.PersistentVolumeSpec{
		Capacity: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("64Mi")}, AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
		PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{Driver: csi.DriverName, VolumeHandle: "att-vol", FSType: "ext4"}}}}
	if err := k8s.Create(ctx, pv); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Delete(context.Background(), pv) })
	attach := func(node string) *storagev1.VolumeAttachment {
		va := &storagev1.VolumeAttachment{ObjectMeta: metav1.ObjectMeta{Name: "att-" + node + "-" + ns}, Spec: storagev1.VolumeAttachmentSpec{
			Attacher: csi.DriverName, NodeName: node, Source: storagev1.VolumeAttachmentSource{PersistentVolumeName: ptr.To(pv.Name)}}}
		if err := k8s.Create(ctx, va); err != nil {
			t.Fatal(err)
		}
		return va
	}
	waitVA := func(va *storagev1.VolumeAttachment, what string, cond func(*storagev1.VolumeAttachment) bool) {
		testkit.Eventually(t, 20*time.Second, what, func() (bool, error) {
			cur := &storagev1.VolumeAttachment{}
			if err := k8s.Get(ctx, client.ObjectKeyFromObject(va), cur); err != nil {
				if apierrors.IsNotFound(err) {
					return cond(nil), nil
				}
				return false, err
			}
			return cond(cur), nil
		})
	}
	clientNodes := func() []string {
		cur := &v1.VolumePair{}
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(vp), cur); err != nil {
			t.Fatal(err)
		}
		return cur.Spec.Clients.Nodes
	}

	vaA := attach("att-a")
	waitVA(vaA, "att-a attached", func(va *storagev1.VolumeAttachment) bool {
		return va != nil && va.Status.Attached && slices.Contains(va.Finalizers, csi.AttachFinalizer)
	})
	if got := clientNodes(); !slices.Equal(got, []string{"att-a"}) {
		t.Fatalf("client nodes %v after attaching to att-a", got)
	}

	// Another node while att-a holds it: refused, and said why.
	vaB := attach("att-b")
	waitVA(vaB, "att-b's attach error naming att-a", func(va *storagev1.VolumeAttachment) bool {
		return va != nil && !va.Status.Attached && va.Status.AttachError != nil &&
			va.Status.AttachError.Message == "volume att-vol is published on node att-a; a Tandem volume is used from one node at a time"
	})

	// Detaching att-a waits for the writer to refuse it.
	enforce <- false
	if err := k8s.Delete(ctx, vaA); err != nil {
		t.Fatal(err)
	}
	waitVA(vaA, "a detach error while the writer still serves att-a", func(va *storagev1.VolumeAttachment) bool {
		return va != nil && va.Status.DetachError != nil
	})
	enforce <- true
	waitVA(vaA, "att-a's attachment gone", func(va *storagev1.VolumeAttachment) bool { return va == nil })
	waitVA(vaB, "att-b attached once att-a is detached", func(va *storagev1.VolumeAttachment) bool {
		return va != nil && va.Status.Attached && va.Status.AttachError == nil
	})
	if got := clientNodes(); !slices.Equal(got, []string{"att-b"}) {
		t.Fatalf("client nodes %v after moving to att-b", got)
	}
	if err := k8s.Delete(ctx, vaB); err != nil {
		t.Fatal(err)
	}
	waitVA(vaB, "att-b's attachment gone", func(va *storagev1.VolumeAttachment) bool { return va == nil })
	if got := clientNodes(); len(got) != 0 {
		t.Fatalf("client nodes %v after the last detach", got)
	}
}

// newAttachManager is a manager running the CSI attacher for the driver
// namespace ns (opts add to the test defaults), and the driver's
// controller service it calls.
func newAttachManager(t *testing.T, ns string, publishWait time.Duration, opts ctrl.Options) (ctrl.Manager, *csi.Controller) {
	t.Helper()
	opts.Scheme = scheme
	opts.Metrics = metricsserver.Options{BindAddress: "0"}
	opts.Controller = ctrlconfig.Controller{SkipNameValidation: ptr.To(true)}
	mgr, err := ctrl.NewManager(cfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	cc := &csi.Controller{Client: k8s, Namespace: ns, PublishWait: publishWait}
	if err := (&csi.AttachController{Client: mgr.GetClient(), Controller: cc}).SetupWithManager(mgr); err != nil {
		t.Fatal(err)
	}
	return mgr, cc
}
