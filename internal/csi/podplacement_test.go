package csi

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	jsonpatch "github.com/evanphx/json-patch/v5"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

func placementScheme(t *testing.T) *runtime.Scheme {
	t.Helper()
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	if err := v1.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	return s
}

func claimPod(annotations map[string]string, claims ...string) *corev1.Pod {
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "db-0", Namespace: "app", Annotations: annotations}}
	pod.Spec.Containers = []corev1.Container{{Name: "c", Image: "x"}}
	for _, c := range claims {
		pod.Spec.Volumes = append(pod.Spec.Volumes, corev1.Volume{Name: c, VolumeSource: corev1.VolumeSource{
			PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: c}}})
	}
	return pod
}

func TestPodPlacement(t *testing.T) {
	scheme := placementScheme(t)
	bound := func(claim, pv string) *corev1.PersistentVolumeClaim {
		return &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: claim, Namespace: "app"},
			Spec: corev1.PersistentVolumeClaimSpec{VolumeName: pv}}
	}
	volume := func(name, driver, handle string) *corev1.PersistentVolume {
		return &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.PersistentVolumeSpec{PersistentVolumeSource: corev1.PersistentVolumeSource{
				CSI: &corev1.CSIPersistentVolumeSource{Driver: driver, VolumeHandle: handle}}}}
	}
	pair := func(name, writer string) *v1.VolumePair {
		vp := &v1.VolumePair{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "tandem-system"}}
		vp.Status.ActivePrimary = writer
		return vp
	}
	world := []client.Object{
		bound("data", "pv-data"), volume("pv-data", DriverName, "pvc-data"), pair("pvc-data", "node-b"),
		bound("logs", "pv-logs"), volume("pv-logs", DriverName, "pvc-logs"), pair("pvc-logs", "node-b"),
		bound("other", "pv-other"), volume("pv-other", DriverName, "pvc-other"), pair("pvc-other", "node-c"),
		bound("nopair", "pv-nopair"), volume("pv-nopair", DriverName, "pvc-nopair"),
		bound("nowriter", "pv-nowriter"), volume("pv-nowriter", DriverName, "pvc-nowriter"), pair("pvc-nowriter", ""),
		bound("foreign", "pv-foreign"), volume("pv-foreign", "ebs.csi.aws.com", "vol-1"),
		&corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: "pending", Namespace: "app"}},
	}
	withTerm := claimPod(nil, "data")
	Prefer(withTerm, []string{"node-b"})

	for _, tc := range []struct {
		name      string
		pod       *corev1.Pod
		getErr    error
		preferred []string // nodes of the preferred terms after the patch; nil: no patch
		warning   string
	}{
		{name: "no claims", pod: claimPod(nil)},
		{name: "claim not bound yet (WaitForFirstConsumer)", pod: claimPod(nil, "pending")},
		{name: "claim does not exist yet", pod: claimPod(nil, "missing")},
		{name: "another driver's volume", pod: claimPod(nil, "foreign")},
		{name: "VolumePair gone", pod: claimPod(nil, "nopair")},
		{name: "no writer yet", pod: claimPod(nil, "nowriter")},
		{name: "writer preferred", pod: claimPod(nil, "data"), preferred: []string{"node-b"}},
		{name: "two volumes, one writer: one term", pod: claimPod(nil, "data", "logs", "foreign"), preferred: []string{"node-b"}},
		{name: "two writers: a term each", pod: claimPod(nil, "data", "other"), preferred: []string{"node-b", "node-c"}},
		{name: "opted out", pod: claimPod(map[string]string{AnnPreferWriter: "false"}, "data")},
		{name: "term already there (reinvocation)", pod: withTerm},
		{name: "lookup fails: admitted unchanged with a warning", pod: claimPod(nil, "data"), getErr: errors.New("etcd is down"), warning: "could not be looked up"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := fake.NewClientBuilder().WithScheme(scheme).WithObjects(world...)
			if tc.getErr != nil {
				b = b.WithInterceptorFuncs(interceptor.Funcs{Get: func(context.Context, client.WithWatch, client.ObjectKey, client.Object, ...client.GetOption) error {
					return tc.getErr
				}})
			}
			p := &PodPlacement{Reader: b.Build(), Namespace: "tandem-system", Decoder: admission.NewDecoder(scheme)}
			raw, err := json.Marshal(tc.pod)
			if err != nil {
				t.Fatal(err)
			}
			resp := p.Handle(context.Background(), admission.Request{AdmissionRequest: admissionv1.AdmissionRequest{
				Operation: admissionv1.Create, Namespace: "app", Object: runtime.RawExtension{Raw: raw}}})
			if !resp.Allowed {
				t.Fatalf("the Pod was refused: %+v", resp.Result)
			}
			if tc.warning != "" && (len(resp.Warnings) != 1 || !strings.Contains(resp.Warnings[0], tc.warning)) {
				t.Fatalf("warnings %q, want one containing %q", resp.Warnings, tc.warning)
			}
			if tc.preferred == nil {
				if len(resp.Patches) != 0 {
					t.Fatalf("unexpected patch %+v", resp.Patches)
				}
				return
			}
			// Apply the patch as the API server would, and read the result.
			ops, err := json.Marshal(resp.Patches)
			if err != nil {
				t.Fatal(err)
			}
			patch, err := jsonpatch.DecodePatch(ops)
			if err != nil {
				t.Fatal(err)
			}
			patched, err := patch.Apply(raw)
			if err != nil {
				t.Fatalf("apply %s: %v", ops, err)
			}
			got := &corev1.Pod{}
			if err := json.Unmarshal(patched, got); err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(got.Annotations[AnnPreferredNode], strings.Join(tc.preferred, ",")+" (writer of claim ") {
				t.Fatalf("annotation %s = %q", AnnPreferredNode, got.Annotations[AnnPreferredNode])
			}
			var nodes []string
			for _, term := range got.Spec.Affinity.NodeAffinity.PreferredDuringSchedulingIgnoredDuringExecution {
				if e := term.Preference.MatchExpressions; term.Weight == 100 && len(e) == 1 && e[0].Key == TopologyKey && e[0].Operator == corev1.NodeSelectorOpIn {
					nodes = append(nodes, e[0].Values...)
				}
			}
			if strings.Join(nodes, ",") != strings.Join(tc.preferred, ",") {
				t.Fatalf("preferred nodes %v, want %v", nodes, tc.preferred)
			}
		})
	}
}
