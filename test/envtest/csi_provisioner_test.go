package envtest

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/sig-storage-lib-external-provisioner/v13/controller"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/csi"
	"github.com/tandem-storage/tandem/internal/testkit"
)

// readyNodes creates Ready Nodes, each with a current agent Lease in ns
// advertising free bytes.
func readyNodes(t *testing.T, ns string, free string, names ...string) {
	t.Helper()
	ctx := context.Background()
	for _, n := range names {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n, Labels: map[string]string{corev1.LabelHostname: n}}}
		if err := k8s.Create(ctx, node); err != nil {
			t.Fatalf("create Node: %v", err)
		}
		t.Cleanup(func() { _ = k8s.Delete(context.Background(), node) })
		node.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now()}}
		if err := k8s.Status().Update(ctx, node); err != nil {
			t.Fatalf("Node status: %v", err)
		}
		now := metav1.NewMicroTime(time.Now())
		lease := &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: v1.AgentLeaseName(n),
				Labels:      map[string]string{v1.LabelComponent: "agent", v1.LabelNode: n},
				Annotations: map[string]string{v1.AnnFreeBytes: free}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(n), LeaseDurationSeconds: ptr.To(int32(3600)), RenewTime: &now},
		}
		if err := k8s.Create(ctx, lease); err != nil {
			t.Fatalf("create agent Lease: %v", err)
		}
		t.Cleanup(func() { _ = k8s.Delete(context.Background(), lease) })
	}
}

// provNS is the namespace of the provisioner TestMain starts.
var provNS string

// startProvisioner runs the in-process provisioner (the library the
// external-provisioner sidecar is built on, driving csi.Controller) until
// ctx ends, with a new namespace for its VolumePairs, and returns that
// namespace. One for the whole process, started before any test: building
// one adds core/v1 to client-go's global scheme, a map write that the race
// detector rightly reports against every read of that scheme by a client
// goroutine no test waited for (an earlier test's event broadcaster, the
// provisioner of an earlier run with -count).
func startProvisioner(ctx context.Context) (string, error) {
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "prov-"}}
	if err := k8s.Create(ctx, ns); err != nil {
		return "", fmt.Errorf("the provisioner's namespace: %w", err)
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return "", fmt.Errorf("the provisioner's client: %w", err)
	}
	ctrl := &csi.Controller{Client: k8s, Namespace: ns.Name}
	pc := controller.NewProvisionController(ctx, cs, csi.DriverName, &csi.Provisioner{Controller: ctrl, Attachments: k8s},
		controller.LeaderElection(false), controller.ResyncPeriod(time.Second), controller.ExponentialBackOffOnError(false),
		controller.FailedProvisionThreshold(0), controller.RetryIntervalMax(time.Second))
	go pc.Run(ctx)
	return ns.Name, nil
}

// TestCSIProvisioner drives the provisioner TestMain started against the
// test API server. Without a controller-manager nothing binds claims or
// releases volumes, so the test does those steps of the PV controller: the
// storage-provisioner annotation on claims, the Released phase on volumes.
func TestCSIProvisioner(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ns := provNS                                                   // the driver's namespace
	appNS := newNamespace(t)                                       // the claims'
	readyNodes(t, ns, "10737418240", "prov-a", "prov-b", "prov-c") // 10Gi free each

	class := func(name string, mode storagev1.VolumeBindingMode, params map[string]string, allowed ...string) {
		sc := &storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: name + "-" + ns}, Provisioner: csi.DriverName,
			Parameters: params, VolumeBindingMode: &mode, ReclaimPolicy: ptr.To(corev1.PersistentVolumeReclaimDelete)}
		if len(allowed) > 0 {
			sc.AllowedTopologies = []corev1.TopologySelectorTerm{{MatchLabelExpressions: []corev1.TopologySelectorLabelRequirement{{Key: csi.TopologyKey, Values: allowed}}}}
		}
		if err := k8s.Create(ctx, sc); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = k8s.Delete(context.Background(), sc) })
	}
	claim := func(name, class, size, node string, modes ...corev1.PersistentVolumeAccessMode) *corev1.PersistentVolumeClaim {
		if len(modes) == 0 {
			modes = []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce}
		}
		pvc := &corev1.PersistentVolumeClaim{
			ObjectMeta: metav1.ObjectMeta{Namespace: appNS, Name: name, Annotations: map[string]string{
				"volume.kubernetes.io/storage-provisioner": csi.DriverName}},
			Spec: corev1.PersistentVolumeClaimSpec{StorageClassName: ptr.To(class + "-" + ns), AccessModes: modes,
				Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse(size)}}},
		}
		if node != "" {
			pvc.Annotations["volume.kubernetes.io/selected-node"] = node
		}
		if err := k8s.Create(ctx, pvc); err != nil {
			t.Fatal(err)
		}
		return pvc
	}
	pvOf := func(pvc *corev1.PersistentVolumeClaim) *corev1.PersistentVolume {
		pv := &corev1.PersistentVolume{}
		testkit.Eventually(t, 30*time.Second, "the PV of "+pvc.Name, func() (bool, error) {
			err := k8s.Get(ctx, client.ObjectKey{Name: "pvc-" + string(pvc.UID)}, pv)
			return err == nil, client.IgnoreNotFound(err)
		})
		return pv
	}
	failedEvent := func(pvc *corev1.PersistentVolumeClaim, want string) {
		testkit.Eventually(t, 30*time.Second, "a ProvisioningFailed event on "+pvc.Name+" saying "+want, func() (bool, error) {
			var evs corev1.EventList
			if err := k8s.List(ctx, &evs, client.InNamespace(appNS)); err != nil {
				return false, err
			}
			for _, e := range evs.Items {
				if e.InvolvedObject.Name == pvc.Name && e.Reason == "ProvisioningFailed" && strings.Contains(e.Message, want) {
					return true, nil
				}
			}
			return false, nil
		})
	}
	pairs := func() []v1.VolumePair {
		var l v1.VolumePairList
		if err := k8s.List(ctx, &l, client.InNamespace(ns)); err != nil {
			t.Fatal(err)
		}
		return l.Items
	}

	// Immediate binding, parameters applied, size rounded up to regions.
	class("async", storagev1.VolumeBindingImmediate, map[string]string{"mode": "Async", "regionSize": "1Mi", csi.ParamFSType: "xfs"})
	pvc := claim("data", "async", "104857601", "")
	pv := pvOf(pvc)
	vp := &v1.VolumePair{}
	if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: pv.Spec.CSI.VolumeHandle}, vp); err != nil {
		t.Fatalf("the PV's VolumePair: %v", err)
	}
	if vp.Spec.Mode != v1.ModeAsync || vp.Spec.Size.Value() != 101<<20 || vp.Annotations[csi.AnnPVC] != appNS+"/data" {
		t.Fatalf("VolumePair %+v %v", vp.Spec, vp.Annotations)
	}
	if pv.Spec.CSI.FSType != "xfs" || pv.Spec.Capacity.Storage().Value() != 101<<20 || pv.Spec.ClaimRef == nil || pv.Spec.ClaimRef.Name != "data" {
		t.Fatalf("PV %+v", pv.Spec)
	}
	members := pv.Spec.NodeAffinity.Required.NodeSelectorTerms[0].MatchExpressions[0].Values
	if len(members) != 2 || members[0] != vp.Spec.Primary.Node || members[1] != vp.Spec.Backup.Node {
		t.Fatalf("PV node affinity %v, VolumePair members %s/%s", members, vp.Spec.Primary.Node, vp.Spec.Backup.Node)
	}

	// kubectl shows the claim of a pair.
	wide, err := runTool(t, nil, "kubectl", "--kubeconfig", kubeconfig, "get", "vp", vp.Name, "-n", ns, "-o", "wide")
	if err != nil || !strings.Contains(wide, "CLAIM") || !strings.Contains(wide, appNS+"/data") {
		t.Fatalf("kubectl get vp -o wide does not show the claim: %v\n%s", err, wide)
	}

	// WaitForFirstConsumer: the pod's node is the primary; allowedTopologies
	// bound the backup.
	class("wffc", storagev1.VolumeBindingWaitForFirstConsumer, nil, "prov-a", "prov-b")
	pv2 := pvOf(claim("wffc", "wffc", "64Mi", "prov-a"))
	vp2 := &v1.VolumePair{}
	if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: pv2.Spec.CSI.VolumeHandle}, vp2); err != nil {
		t.Fatal(err)
	}
	if vp2.Spec.Primary.Node != "prov-a" || vp2.Spec.Backup.Node != "prov-b" || vp2.Spec.Mode != v1.ModeSync {
		t.Fatalf("WaitForFirstConsumer placed %s/%s (%s)", vp2.Spec.Primary.Node, vp2.Spec.Backup.Node, vp2.Spec.Mode)
	}

	// Bad input: an unknown parameter, a claim no two nodes can hold, a
	// shared access mode, allowedTopologies of one node. Each gets an
	// event naming the cause; no VolumePair is made.
	before := len(pairs())
	class("typo", storagev1.VolumeBindingImmediate, map[string]string{"modes": "Sync"})
	failedEvent(claim("typo", "typo", "64Mi", ""), `unknown parameter "modes"`)
	class("big", storagev1.VolumeBindingImmediate, nil)
	failedEvent(claim("big", "big", "20Gi", ""), "a VolumePair needs two nodes with a running Tandem agent and room for 20Gi")
	failedEvent(claim("rwx", "big", "64Mi", "", corev1.ReadWriteMany), "access mode ReadWriteMany is not supported")
	class("one", storagev1.VolumeBindingImmediate, nil, "prov-c")
	failedEvent(claim("one", "one", "64Mi", ""), "allowedTopologies admit 1 node(s) (prov-c); a VolumePair needs two")
	if n := len(pairs()); n != before {
		t.Fatalf("%d VolumePairs after refused claims, want %d", n, before)
	}

	// Reclaim: a Released PV with reclaimPolicy Delete takes its
	// VolumePair with it, but not while it is still attached to a node
	// (the attach/detach controller could never detach it then).
	va := &storagev1.VolumeAttachment{ObjectMeta: metav1.ObjectMeta{Name: "va-" + ns},
		Spec: storagev1.VolumeAttachmentSpec{Attacher: csi.DriverName, NodeName: "prov-a",
			Source: storagev1.VolumeAttachmentSource{PersistentVolumeName: ptr.To(pv.Name)}}}
	if err := k8s.Create(ctx, va); err != nil {
		t.Fatal(err)
	}
	pv.Status.Phase = corev1.VolumeReleased
	if err := k8s.Status().Update(ctx, pv); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 30*time.Second, "a VolumeFailedDelete event saying the PV is still attached", func() (bool, error) {
		var evs corev1.EventList
		if err := k8s.List(ctx, &evs); err != nil {
			return false, err
		}
		for _, e := range evs.Items {
			if e.InvolvedObject.Name == pv.Name && e.Reason == "VolumeFailedDelete" && strings.Contains(e.Message, "still attached to node prov-a") {
				return true, nil
			}
		}
		return false, nil
	})
	if err := k8s.Get(ctx, client.ObjectKeyFromObject(vp), &v1.VolumePair{}); err != nil {
		t.Fatalf("the VolumePair of a PV still attached: %v", err)
	}
	if err := k8s.Delete(ctx, va); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 30*time.Second, "the VolumePair of a released PV deleted", func() (bool, error) {
		err := k8s.Get(ctx, client.ObjectKeyFromObject(vp), &v1.VolumePair{})
		return apierrors.IsNotFound(err), client.IgnoreNotFound(err)
	})
}
