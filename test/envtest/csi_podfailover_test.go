package envtest

import (
	"context"
	"slices"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/controllers"
	"github.com/tandem-storage/tandem/internal/csi"
	"github.com/tandem-storage/tandem/internal/testkit"
)

// TestCSIPodFailover: the Pods on a lost node that use a volume are moved
// only once the node is lost (its member does not answer and its node
// plugin's Lease lapsed) and the pair serves from another node; first the
// writer refuses the node (the fence), then the node is tainted, its
// VolumeAttachment and Pods deleted (a Pod that opted out stays, with an
// event); the taint goes when the node plugin is back.
func TestCSIPodFailover(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ns := newNamespace(t)
	appNS := newNamespace(t)
	readyNodes(t, ns, "10737418240", "pf-a", "pf-b")
	mgr, cc := newAttachManager(t, ns, 5*time.Second, ctrl.Options{Cache: controllers.CacheOptions(ns)})
	if err := (&csi.PodFailover{Client: mgr.GetClient(), Controller: cc, Recorder: mgr.GetEventRecorder("test")}).SetupWithManager(mgr); err != nil {
		t.Fatal(err)
	}
	go func() { _ = mgr.Start(ctx) }()
	go mirrorClients(ctx, t, ns)

	plugin := func(node string, renewed time.Time) {
		l := &coordinationv1.Lease{}
		key := client.ObjectKey{Namespace: ns, Name: csi.NodeLeaseName(node)}
		err := k8s.Get(ctx, key, l)
		l.Namespace, l.Name = key.Namespace, key.Name
		l.Labels = map[string]string{v1.LabelComponent: "csi-node", v1.LabelNode: node}
		l.Spec = coordinationv1.LeaseSpec{HolderIdentity: ptr.To(node), LeaseDurationSeconds: ptr.To(int32(6)), RenewTime: &metav1.MicroTime{Time: renewed}}
		if apierrors.IsNotFound(err) {
			err = k8s.Create(ctx, l)
		} else if err == nil {
			err = k8s.Update(ctx, l)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	plugin("pf-a", time.Now().Add(time.Hour)) // current for the whole test, until changed
	plugin("pf-b", time.Now().Add(time.Hour))

	// A volume published on pf-a, its writer moved to pf-b, pf-a's agent
	// gone.
	vp := &v1.VolumePair{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "pf-vol"}, Spec: v1.VolumePairSpec{
		Size: resource.MustParse("64Mi"), Mode: v1.ModeSync, Primary: v1.Member{Node: "pf-a"}, Backup: v1.Member{Node: "pf-b"},
		Clients: &v1.ClientsSpec{Nodes: []string{"pf-a"}}}}
	if err := k8s.Create(ctx, vp); err != nil {
		t.Fatal(err)
	}
	vp.Status = v1.VolumePairStatus{Phase: v1.PhaseSwap, ActivePrimary: "pf-b", Epoch: 2, Endpoint: "nbd://198.18.0.12:10809/x/y",
		Clients: &v1.ClientsSpec{Nodes: []string{"pf-a"}},
		Members: []v1.MemberStatus{{Node: "pf-a", Message: "agent unreachable"}, {Node: "pf-b", Role: v1.RolePrimary, Connected: false}}}
	if err := k8s.Status().Update(ctx, vp); err != nil {
		t.Fatal(err)
	}
	pv := &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: "pf-pv-" + ns}, Spec: corev1.PersistentVolumeSpec{
		Capacity: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("64Mi")}, AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
		ClaimRef:               &corev1.ObjectReference{Namespace: appNS, Name: "data"},
		PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{Driver: csi.DriverName, VolumeHandle: "pf-vol", FSType: "ext4"}}}}
	if err := k8s.Create(ctx, pv); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Delete(context.Background(), pv) })
	va := &storagev1.VolumeAttachment{ObjectMeta: metav1.ObjectMeta{Name: "pf-va-" + ns}, Spec: storagev1.VolumeAttachmentSpec{
		Attacher: csi.DriverName, NodeName: "pf-a", Source: storagev1.VolumeAttachmentSource{PersistentVolumeName: ptr.To(pv.Name)}}}
	if err := k8s.Create(ctx, va); err != nil {
		t.Fatal(err)
	}
	pod := func(name string, optOut bool) *corev1.Pod {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: appNS, Name: name}, Spec: corev1.PodSpec{
			NodeName:   "pf-a",
			Containers: []corev1.Container{{Name: "c", Image: "x"}},
			Volumes:    []corev1.Volume{{Name: "d", VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "data"}}}}}}
		if optOut {
			p.Annotations = map[string]string{csi.AnnPodFailoverOptOut: "false"}
		}
		if err := k8s.Create(ctx, p); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// The lost node's kubelet last reported the volume in use.
	unique := corev1.UniqueVolumeName("kubernetes.io/csi/csi.tandem.dev^pf-vol")
	nodeA := &corev1.Node{}
	if err := k8s.Get(ctx, client.ObjectKey{Name: "pf-a"}, nodeA); err != nil {
		t.Fatal(err)
	}
	nodeA.Status.VolumesInUse = []corev1.UniqueVolumeName{unique, "kubernetes.io/csi/other^x"}
	nodeA.Status.VolumesAttached = []corev1.AttachedVolume{{Name: unique}}
	if err := k8s.Status().Update(ctx, nodeA); err != nil {
		t.Fatal(err)
	}
	mover := pod("db-0", false)
	stayer := pod("pinned", true)
	gone := func(o client.Object) func() (bool, error) {
		return func() (bool, error) {
			err := k8s.Get(ctx, client.ObjectKeyFromObject(o), o.DeepCopyObject().(client.Object))
			return apierrors.IsNotFound(err), client.IgnoreNotFound(err)
		}
	}
	tainted := func() bool {
		n := &corev1.Node{}
		if err := k8s.Get(ctx, client.ObjectKey{Name: "pf-a"}, n); err != nil {
			t.Fatal(err)
		}
		return slices.ContainsFunc(n.Spec.Taints, func(t corev1.Taint) bool { return t.Key == csi.TaintLost })
	}

	// The agent is gone but the node plugin renews: an agent restart, not
	// a lost node. Nothing moves (checked after the attachment was taken
	// up, which shows the controllers ran).
	testkit.Eventually(t, 20*time.Second, "pf-a's attachment attached", func() (bool, error) {
		cur := &storagev1.VolumeAttachment{}
		err := k8s.Get(ctx, client.ObjectKeyFromObject(va), cur)
		return err == nil && cur.Status.Attached, err
	})
	time.Sleep(2 * time.Second) // several of the failover's 1 s re-checks
	if ok, _ := gone(mover)(); ok || tainted() {
		t.Fatal("a Pod was moved off a node whose node plugin still renews its Lease")
	}

	// The node plugin's Lease lapses: the node is lost.
	plugin("pf-a", time.Now().Add(-time.Minute))
	testkit.Eventually(t, 30*time.Second, "db-0 deleted from the lost node", gone(mover))
	testkit.Eventually(t, 30*time.Second, "pf-a's VolumeAttachment deleted", gone(va))
	cur := &v1.VolumePair{}
	if err := k8s.Get(ctx, client.ObjectKeyFromObject(vp), cur); err != nil {
		t.Fatal(err)
	}
	if len(cur.Spec.Clients.Nodes) != 0 || cur.Status.Clients == nil || len(cur.Status.Clients.Nodes) != 0 {
		t.Fatalf("after the failover the client nodes are %v (writer enforces %v), want none: the fence first", cur.Spec.Clients.Nodes, cur.Status.Clients)
	}
	if !tainted() {
		t.Fatal("the lost node is not tainted")
	}
	if err := k8s.Get(ctx, client.ObjectKey{Name: "pf-a"}, nodeA); err != nil {
		t.Fatal(err)
	}
	if slices.Contains(nodeA.Status.VolumesInUse, unique) || len(nodeA.Status.VolumesAttached) != 0 || !slices.Contains(nodeA.Status.VolumesInUse, "kubernetes.io/csi/other^x") {
		t.Fatalf("the lost node still reports the volume (or lost another): in use %v, attached %v", nodeA.Status.VolumesInUse, nodeA.Status.VolumesAttached)
	}
	if ok, _ := gone(stayer)(); ok {
		t.Fatal("the Pod that opted out was deleted")
	}
	testkit.Eventually(t, 10*time.Second, "a PodFailoverSkipped event on the Pod that opted out", func() (bool, error) {
		var evs corev1.EventList
		if err := k8s.List(ctx, &evs, client.InNamespace(appNS)); err != nil {
			return false, err
		}
		return slices.ContainsFunc(evs.Items, func(e corev1.Event) bool {
			return e.Reason == "PodFailoverSkipped" && e.InvolvedObject.Name == "pinned"
		}), nil
	})

	// The node plugin is back: the taint goes.
	plugin("pf-a", time.Now().Add(time.Hour))
	testkit.Eventually(t, 20*time.Second, "pf-a untainted", func() (bool, error) { return !tainted(), nil })

	// A pair whose StorageClass opted out: its Pod on the lost node stays,
	// and so does the node's publication, until the Pod is deleted by
	// hand; then the node is released, so that the Pod's replacement can
	// stage the volume elsewhere (no attach/detach controller does that
	// without VolumeAttachments).
	held := &v1.VolumePair{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "pf-held", Annotations: map[string]string{csi.AnnPodFailover: "false"}},
		Spec: v1.VolumePairSpec{Size: resource.MustParse("64Mi"), Mode: v1.ModeSync, Primary: v1.Member{Node: "pf-a"}, Backup: v1.Member{Node: "pf-b"},
			Clients: &v1.ClientsSpec{Nodes: []string{"pf-a"}}}}
	if err := k8s.Create(ctx, held); err != nil {
		t.Fatal(err)
	}
	// mirrorClients may write the new pair's status first: retried on a
	// conflict with the object as it is then.
	if err := retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(held), held); err != nil {
			return err
		}
		held.Status = vp.Status
		held.Status.Clients = &v1.ClientsSpec{Nodes: []string{"pf-a"}}
		return k8s.Status().Update(ctx, held)
	}); err != nil {
		t.Fatal(err)
	}
	heldPV := pv.DeepCopy()
	heldPV.ObjectMeta = metav1.ObjectMeta{Name: "pf-held-pv-" + ns}
	heldPV.Spec.ClaimRef = &corev1.ObjectReference{Namespace: appNS, Name: "held"}
	heldPV.Spec.CSI.VolumeHandle = "pf-held"
	if err := k8s.Create(ctx, heldPV); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Delete(context.Background(), heldPV) })
	user := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: appNS, Name: "held-0"}, Spec: corev1.PodSpec{
		NodeName:   "pf-a",
		Containers: []corev1.Container{{Name: "c", Image: "x"}},
		Volumes:    []corev1.Volume{{Name: "d", VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "held"}}}}}}
	if err := k8s.Create(ctx, user); err != nil {
		t.Fatal(err)
	}
	clientsOf := func() []string {
		cur := &v1.VolumePair{}
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(held), cur); err != nil {
			t.Fatal(err)
		}
		return cur.Spec.Clients.Nodes
	}
	plugin("pf-a", time.Now().Add(-time.Minute))
	time.Sleep(3 * time.Second) // several of the failover's re-checks
	if ok, _ := gone(user)(); ok || !slices.Equal(clientsOf(), []string{"pf-a"}) {
		t.Fatalf("an opted-out pair's Pod or publication was moved (Pod gone %v, client nodes %v)", ok, clientsOf())
	}
	if err := k8s.Delete(ctx, user, client.GracePeriodSeconds(0)); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 30*time.Second, "the lost node released once no Pod on it uses the opted-out volume", func() (bool, error) {
		return len(clientsOf()) == 0, nil
	})
	testkit.Eventually(t, 10*time.Second, "a ConsumerReleased event", func() (bool, error) {
		var evs eventsv1.EventList
		if err := k8s.List(ctx, &evs, client.InNamespace(ns)); err != nil {
			return false, err
		}
		return slices.ContainsFunc(evs.Items, func(e eventsv1.Event) bool {
			return e.Reason == "ConsumerReleased" && e.Regarding.Name == "pf-held"
		}), nil
	})
}
