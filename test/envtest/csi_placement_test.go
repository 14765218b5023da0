package envtest

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/webhook"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/csi"
	"github.com/tandem-storage/tandem/internal/webhookcert"
)

// TestCSIPodPlacement runs the Pod placement webhook behind the test API
// server as the manager does: the serving certificate from the Secret the
// manager creates, the CA patched into the configuration's caBundle (the
// API server refuses to talk to the webhook otherwise). A Pod created with
// a claim bound to a Tandem volume gets a preferred term for the writer's
// node; after the writer moves, the next Pod prefers the new writer; a Pod
// without Tandem volumes is left alone.
func TestCSIPodPlacement(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ns := newNamespace(t)
	appNS := newNamespace(t)

	// The certificate, as the manager makes it (the URL names localhost:
	// the test API server calls the webhook directly, not via a Service).
	b, err := webhookcert.Ensure(ctx, k8s, client.ObjectKey{Namespace: ns, Name: "tandem-webhook-tls"}, []string{"localhost"}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	holder := &webhookcert.Holder{}
	holder.Set(b)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	_ = ln.Close()
	srv := webhook.NewServer(webhook.Options{Host: "127.0.0.1", Port: port,
		TLSOpts: []func(*tls.Config){func(c *tls.Config) { c.GetCertificate = holder.GetCertificate }}})
	srv.Register(csi.PodPlacementPath, &webhook.Admission{Handler: &csi.PodPlacement{Reader: k8s, Namespace: ns, Decoder: admission.NewDecoder(scheme)}})
	go func() { _ = srv.Start(ctx) }()

	name := "tandem-pod-placement-" + ns
	mwc := &admissionregistrationv1.MutatingWebhookConfiguration{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Webhooks: []admissionregistrationv1.MutatingWebhook{{
			Name:                    "pod-placement.csi.tandem.dev",
			AdmissionReviewVersions: []string{"v1"},
			SideEffects:             ptr.To(admissionregistrationv1.SideEffectClassNone),
			FailurePolicy:           ptr.To(admissionregistrationv1.Fail), // here: a call that fails fails the test
			TimeoutSeconds:          ptr.To(int32(5)),
			ClientConfig:            admissionregistrationv1.WebhookClientConfig{URL: ptr.To(fmt.Sprintf("https://localhost:%d%s", port, csi.PodPlacementPath))},
			Rules: []admissionregistrationv1.RuleWithOperations{{
				Operations: []admissionregistrationv1.OperationType{admissionregistrationv1.Create},
				Rule:       admissionregistrationv1.Rule{APIGroups: []string{""}, APIVersions: []string{"v1"}, Resources: []string{"pods"}},
			}},
			NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": appNS}},
		}},
	}
	if err := k8s.Create(ctx, mwc); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Delete(context.Background(), mwc) })
	if installed, err := webhookcert.PatchCABundle(ctx, k8s, name, b.CA); err != nil || !installed {
		t.Fatalf("PatchCABundle: installed %v, %v", installed, err)
	}
	if installed, err := webhookcert.PatchCABundle(ctx, k8s, "not-installed-"+ns, b.CA); err != nil || installed {
		t.Fatalf("PatchCABundle of an absent configuration: installed %v, %v", installed, err)
	}

	// A claim bound to a Tandem volume whose writer is node-b.
	vp := &v1.VolumePair{ObjectMeta: metav1.ObjectMeta{Name: "pvc-place", Namespace: ns}, Spec: v1.VolumePairSpec{
		Size: resource.MustParse("64Mi"), Mode: v1.ModeSync, Primary: v1.Member{Node: "place-a"}, Backup: v1.Member{Node: "place-b"}}}
	if err := k8s.Create(ctx, vp); err != nil {
		t.Fatal(err)
	}
	setWriter := func(node string) {
		t.Helper()
		vp.Status.ActivePrimary = node
		if err := k8s.Status().Update(ctx, vp); err != nil {
			t.Fatal(err)
		}
	}
	setWriter("place-b")
	pv := &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: "pv-place-" + ns}, Spec: corev1.PersistentVolumeSpec{
		Capacity:                      corev1.ResourceList{corev1.ResourceStorage: vp.Spec.Size},
		AccessModes:                   []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
		PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimRetain,
		PersistentVolumeSource:        corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{Driver: csi.DriverName, VolumeHandle: "pvc-place"}},
	}}
	if err := k8s.Create(ctx, pv); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Delete(context.Background(), pv) })
	pvc := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: "data", Namespace: appNS}, Spec: corev1.PersistentVolumeClaimSpec{
		AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
		Resources:   corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: vp.Spec.Size}},
		VolumeName:  pv.Name,
	}}
	if err := k8s.Create(ctx, pvc); err != nil {
		t.Fatal(err)
	}

	newPod := func(name string, claim string) *corev1.Pod {
		t.Helper()
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: appNS},
			Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "app"}}}}
		if claim != "" {
			pod.Spec.Volumes = []corev1.Volume{{Name: "data", VolumeSource: corev1.VolumeSource{
				PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: claim}}}}
		}
		// The server's first answers may come before the listener is up.
		var err error
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			p := pod.DeepCopy()
			if err = k8s.Create(ctx, p); err == nil {
				return p
			}
			if !strings.Contains(err.Error(), "connection refused") || time.Now().After(deadline) {
				t.Fatalf("create Pod %s: %v", name, err)
			}
		}
	}
	preferred := func(pod *corev1.Pod) []string {
		var nodes []string
		if a := pod.Spec.Affinity; a != nil && a.NodeAffinity != nil {
			for _, term := range a.NodeAffinity.PreferredDuringSchedulingIgnoredDuringExecution {
				for _, e := range term.Preference.MatchExpressions {
					if e.Key == csi.TopologyKey && e.Operator == corev1.NodeSelectorOpIn {
						nodes = append(nodes, e.Values...)
					}
				}
			}
		}
		return nodes
	}

	p1 := newPod("first", "data")
	if got := preferred(p1); len(got) != 1 || got[0] != "place-b" {
		t.Fatalf("the Pod prefers %v, want the writer [place-b]; affinity %+v", got, p1.Spec.Affinity)
	}
	if a := p1.Annotations[csi.AnnPreferredNode]; a != "place-b (writer of claim data)" {
		t.Fatalf("annotation %s = %q", csi.AnnPreferredNode, a)
	}
	setWriter("place-a") // a failover
	if got := preferred(newPod("second", "data")); len(got) != 1 || got[0] != "place-a" {
		t.Fatalf("after the writer moved, the Pod prefers %v, want [place-a]", got)
	}
	if p := newPod("plain", ""); p.Spec.Affinity != nil || p.Annotations[csi.AnnPreferredNode] != "" {
		t.Fatalf("a Pod without Tandem volumes was changed: %+v %v", p.Spec.Affinity, p.Annotations)
	}
}
