package csi

import (
	"context"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/tools/events"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	ctrl "sigs.k8s.io/controller-runtime/pkg/reconcile"
)

// fakeExpander records ControllerExpandVolume calls and answers with err,
// or with the requested size.
type fakeExpander struct {
	calls []*csi.ControllerExpandVolumeRequest
	err   error
}

func (f *fakeExpander) ControllerExpandVolume(_ context.Context, req *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	f.calls = append(f.calls, req)
	if f.err != nil {
		return nil, f.err
	}
	return &csi.ControllerExpandVolumeResponse{CapacityBytes: req.GetCapacityRange().GetRequiredBytes(), NodeExpansionRequired: true}, nil
}

// fakeRecorder keeps the events' reasons.
type fakeRecorder struct{ reasons []string }

func (r *fakeRecorder) Eventf(_ runtime.Object, _ runtime.Object, _, reason, _, _ string, _ ...interface{}) {
	r.reasons = append(r.reasons, reason)
}

var _ events.EventRecorder = (*fakeRecorder)(nil)

func resizeWorld(driver, request, capacity, pvCapacity string, block bool) (*corev1.PersistentVolumeClaim, *corev1.PersistentVolume) {
	pvc := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Namespace: "app", Name: "data"}}
	pvc.Spec.VolumeName = "pvc-1"
	pvc.Spec.Resources.Requests = corev1.ResourceList{corev1.ResourceStorage: resource.MustParse(request)}
	pvc.Status.Phase = corev1.ClaimBound
	pvc.Status.Capacity = corev1.ResourceList{corev1.ResourceStorage: resource.MustParse(capacity)}
	pv := &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: "pvc-1"}}
	pv.Spec.Capacity = corev1.ResourceList{corev1.ResourceStorage: resource.MustParse(pvCapacity)}
	pv.Spec.AccessModes = []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce}
	pv.Spec.CSI = &corev1.CSIPersistentVolumeSource{Driver: driver, VolumeHandle: "pvc-1", FSType: "xfs"}
	if block {
		m := corev1.PersistentVolumeBlock
		pv.Spec.VolumeMode = &m
	}
	return pvc, pv
}

// TestResizer walks a claim through the external-resizer's protocol: a
// claim asking for more than it has gets allocatedResources and
// ControllerResizeInProgress, its volume grows (ControllerExpandVolume
// with the PV's handle and capability), the PV's capacity follows, and the
// claim ends NodeResizePending with FileSystemResizePending for the
// kubelet; repeating changes nothing. Claims of other drivers, claims
// already at their size, and an interrupted resize (PV grown already) are
// handled; a refusal for good is ControllerResizeInfeasible and is not
// retried, a transient failure is retried.
func TestResizer(t *testing.T) {
	for _, c := range []struct {
		name                 string
		driver               string
		request, cap, pvCap  string
		block                bool
		expandErr            error
		wantCalls            int
		wantErr              bool
		wantStatus           corev1.ClaimResourceStatus
		wantCondition        corev1.PersistentVolumeClaimConditionType
		wantPVCap            string
		wantReasons          []string
		wantCallsAfterRepeat int
	}{
		{name: "grows", driver: DriverName, request: "2Gi", cap: "1Gi", pvCap: "1Gi", wantCalls: 1, wantCallsAfterRepeat: 1,
			wantStatus: corev1.PersistentVolumeClaimNodeResizePending, wantCondition: corev1.PersistentVolumeClaimFileSystemResizePending,
			wantPVCap: "2Gi", wantReasons: []string{EventResizing, EventFileSystemResizeRequired}},
		{name: "block volume", driver: DriverName, request: "3Gi", cap: "1Gi", pvCap: "1Gi", block: true, wantCalls: 1, wantCallsAfterRepeat: 1,
			wantStatus: corev1.PersistentVolumeClaimNodeResizePending, wantCondition: corev1.PersistentVolumeClaimFileSystemResizePending,
			wantPVCap: "3Gi", wantReasons: []string{EventResizing, EventFileSystemResizeRequired}},
		{name: "another driver", driver: "other.csi", request: "2Gi", cap: "1Gi", pvCap: "1Gi", wantPVCap: "1Gi"},
		{name: "at its size", driver: DriverName, request: "1Gi", cap: "1Gi", pvCap: "1Gi", wantPVCap: "1Gi"},
		{name: "PV grown already", driver: DriverName, request: "2Gi", cap: "1Gi", pvCap: "2Gi",
			wantStatus: corev1.PersistentVolumeClaimNodeResizePending, wantCondition: corev1.PersistentVolumeClaimFileSystemResizePending,
			wantPVCap: "2Gi", wantReasons: []string{EventFileSystemResizeRequired}},
		{name: "refused for good", driver: DriverName, request: "2Gi", cap: "1Gi", pvCap: "1Gi", expandErr: status.Error(codes.OutOfRange, "too big"),
			wantCalls: 1, wantCallsAfterRepeat: 1, wantStatus: corev1.PersistentVolumeClaimControllerResizeInfeasible,
			wantCondition: corev1.PersistentVolumeClaimControllerResizeError, wantPVCap: "1Gi",
			wantReasons: []string{EventResizing, EventVolumeResizeFailed}},
		{name: "transient failure", driver: DriverName, request: "2Gi", cap: "1Gi", pvCap: "1Gi", expandErr: status.Error(codes.Unavailable, "API server away"),
			wantCalls: 1, wantCallsAfterRepeat: 2, wantErr: true, wantStatus: corev1.PersistentVolumeClaimControllerResizeInProgress,
			wantCondition: corev1.PersistentVolumeClaimControllerResizeError, wantPVCap: "1Gi",
			wantReasons: []string{EventResizing, EventVolumeResizeFailed, EventVolumeResizeFailed}},
	} {
		t.Run(c.name, func(t *testing.T) {
			pvc, pv := resizeWorld(c.driver, c.request, c.cap, c.pvCap, c.block)
			cl := fake.NewClientBuilder().WithScheme(placementScheme(t)).WithObjects(pvc, pv).
				WithStatusSubresource(&corev1.PersistentVolumeClaim{}).Build()
			exp := &fakeExpander{err: c.expandErr}
			rec := &fakeRecorder{}
			r := &Resizer{Client: cl, Controller: exp, Recorder: rec}
			req := ctrl.Request{NamespacedName: client.ObjectKeyFromObject(pvc)}
			_, err := r.Reconcile(context.Background(), req)
			if (err != nil) != c.wantErr {
				t.Fatalf("Reconcile: %v, want an error %t", err, c.wantErr)
			}
			if len(exp.calls) != c.wantCalls {
				t.Fatalf("%d ControllerExpandVolume calls, want %d", len(exp.calls), c.wantCalls)
			}
			if c.wantCalls > 0 {
				call := exp.calls[0]
				wantBytes := resource.MustParse(c.request)
				if call.GetVolumeId() != "pvc-1" || call.GetCapacityRange().GetRequiredBytes() != wantBytes.Value() {
					t.Errorf("ControllerExpandVolume(%s, %d)", call.GetVolumeId(), call.GetCapacityRange().GetRequiredBytes())
				}
				if got := call.GetVolumeCapability().GetBlock() != nil; got != c.block {
					t.Errorf("capability block %t, want %t", got, c.block)
				}
				if !c.block && call.GetVolumeCapability().GetMount().GetFsType() != "xfs" {
					t.Errorf("capability %v, want the PV's xfs", call.GetVolumeCapability())
				}
			}
			// A second round (the status patch requeues the claim).
			_, err = r.Reconcile(context.Background(), req)
			if (err != nil) != c.wantErr {
				t.Fatalf("second Reconcile: %v, want an error %t", err, c.wantErr)
			}
			if len(exp.calls) != c.wantCallsAfterRepeat {
				t.Fatalf("%d ControllerExpandVolume calls after a second round, want %d", len(exp.calls), c.wantCallsAfterRepeat)
			}

			got := &corev1.PersistentVolumeClaim{}
			if err := cl.Get(context.Background(), req.NamespacedName, got); err != nil {
				t.Fatal(err)
			}
			if st := got.Status.AllocatedResourceStatuses[corev1.ResourceStorage]; st != c.wantStatus {
				t.Errorf("allocatedResourceStatuses[storage] %q, want %q", st, c.wantStatus)
			}
			if c.wantStatus != "" {
				if a := got.Status.AllocatedResources[corev1.ResourceStorage]; a.Cmp(resource.MustParse(c.request)) != 0 {
					t.Errorf("allocatedResources[storage] %s, want %s", a.String(), c.request)
				}
			}
			var conds []string
			for _, cd := range got.Status.Conditions {
				conds = append(conds, string(cd.Type))
			}
			if want := string(c.wantCondition); strings.Join(conds, ",") != want {
				t.Errorf("conditions %v, want [%s]", conds, want)
			}
			if have := got.Status.Capacity[corev1.ResourceStorage]; have.Cmp(resource.MustParse(c.cap)) != 0 {
				t.Errorf("status.capacity %s changed: the kubelet sets it after NodeExpandVolume", have.String())
			}
			gotPV := &corev1.PersistentVolume{}
			if err := cl.Get(context.Background(), client.ObjectKeyFromObject(pv), gotPV); err != nil {
				t.Fatal(err)
			}
			if q := gotPV.Spec.Capacity[corev1.ResourceStorage]; q.Cmp(resource.MustParse(c.wantPVCap)) != 0 {
				t.Errorf("PV capacity %s, want %s", q.String(), c.wantPVCap)
			}
			if strings.Join(rec.reasons, ",") != strings.Join(c.wantReasons, ",") {
				t.Errorf("events %v, want %v", rec.reasons, c.wantReasons)
			}
		})
	}
}

// TestResizerRetriesANewRequest: after a refusal for good, a claim asking
// for another size is tried again.
func TestResizerRetriesANewRequest(t *testing.T) {
	pvc, pv := resizeWorld(DriverName, "2Ti", "1Gi", "1Gi", false)
	cl := fake.NewClientBuilder().WithScheme(placementScheme(t)).WithObjects(pvc, pv).
		WithStatusSubresource(&corev1.PersistentVolumeClaim{}).Build()
	exp := &fakeExpander{err: status.Error(codes.OutOfRange, "too big")}
	r := &Resizer{Client: cl, Controller: exp, Recorder: &fakeRecorder{}}
	req := ctrl.Request{NamespacedName: client.ObjectKeyFromObject(pvc)}
	if _, err := r.Reconcile(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if err := cl.Get(context.Background(), req.NamespacedName, pvc); err != nil {
		t.Fatal(err)
	}
	pvc.Spec.Resources.Requests[corev1.ResourceStorage] = resource.MustParse("2Gi")
	if err := cl.Update(context.Background(), pvc); err != nil {
		t.Fatal(err)
	}
	exp.err = nil
	if _, err := r.Reconcile(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if len(exp.calls) != 2 || exp.calls[1].GetCapacityRange().GetRequiredBytes() != 2<<30 {
		t.Fatalf("calls %v: the new request was not tried", exp.calls)
	}
	if err := cl.Get(context.Background(), req.NamespacedName, pvc); err != nil {
		t.Fatal(err)
	}
	if st := pvc.Status.AllocatedResourceStatuses[corev1.ResourceStorage]; st != corev1.PersistentVolumeClaimNodeResizePending {
		t.Errorf("status %q after the new request, want NodeResizePending", st)
	}
}
