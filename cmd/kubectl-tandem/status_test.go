package main

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

var testNow = time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)

func at(d time.Duration) metav1.Time { return metav1.NewTime(testNow.Add(-d)) }

func ptrTime(d time.Duration) *metav1.Time { t := at(d); return &t }

func testPair() *storagev1alpha1.VolumePair {
	rs := resource.MustParse("64Ki")
	return &storagev1alpha1.VolumePair{
		ObjectMeta: metav1.ObjectMeta{Name: "db", Namespace: "prod", UID: "uid-1", Generation: 2},
		Spec: storagev1alpha1.VolumePairSpec{
			Size: resource.MustParse("1Gi"), RegionSize: &rs, Mode: storagev1alpha1.ModeAsync,
			Primary: storagev1alpha1.Member{Node: "node-a"}, Backup: storagev1alpha1.Member{Node: "node-b"},
			Failover: storagev1alpha1.FailoverSpec{Policy: storagev1alpha1.PolicyAutomatic},
			Failback: storagev1alpha1.FailbackSpec{Policy: storagev1alpha1.PolicyManual},
		},
	}
}

// copyingPair is in COPY: node-b serves after a failover, node-a returns.
func copyingPair() *storagev1alpha1.VolumePair {
	vp := testPair()
	vp.Annotations = map[string]string{storagev1alpha1.AnnotationFailbackRequested: "2026-05-01T11:59:00Z"}
	vp.Status = storagev1alpha1.VolumePairStatus{
		Phase: storagev1alpha1.PhaseCopy, ActivePrimary: "node-b", Epoch: 4,
		Endpoint: "nbd://198.18.0.12:10809/prod/db", OutOfSyncBytes: 12 << 20,
		Copy: &storagev1alpha1.CopyProgress{Target: "node-a", TotalBytes: 12 << 20, DoneBytes: 3 << 20, BytesPerSecond: 1 << 20, StartTime: ptrTime(3 * time.Second)},
		Members: []storagev1alpha1.MemberStatus{
			{Node: "node-b", Role: storagev1alpha1.RolePrimary, DataState: storagev1alpha1.DataUpToDate, Connected: true, LastSeen: ptrTime(time.Second), OutOfSyncBytes: 9 << 20},
			{Node: "node-a", Role: storagev1alpha1.RoleBackup, DataState: storagev1alpha1.DataInconsistent, Connected: true, LastSeen: ptrTime(2 * time.Second), Message: "receiving\nthe copy"},
		},
		LastFailoverTime: ptrTime(10 * time.Minute),
		Conditions: []metav1.Condition{
			{Type: storagev1alpha1.ConditionReady, Status: metav1.ConditionTrue, Reason: "Serving", Message: "node-b serves", LastTransitionTime: at(10 * time.Minute)},
			{Type: storagev1alpha1.ConditionSynchronized, Status: metav1.ConditionFalse, Reason: "Copying", Message: "copy to node-a", LastTransitionTime: at(time.Minute)},
		},
		ObservedGeneration: 2,
	}
	return vp
}

func event(reason, msg string, d time.Duration, count int32) corev1.Event {
	return corev1.Event{
		ObjectMeta:     metav1.ObjectMeta{Name: reason, Namespace: "prod"},
		InvolvedObject: corev1.ObjectReference{Kind: "VolumePair", Name: "db", Namespace: "prod", UID: "uid-1", APIVersion: "storage.tandem.dev/v1alpha1"},
		Type:           corev1.EventTypeNormal, Reason: reason, Message: msg,
		FirstTimestamp: at(d + time.Duration(count)*time.Minute), LastTimestamp: at(d), Count: count,
		Source: corev1.EventSource{Component: "tandem-controller"},
	}
}

func TestRenderStatus(t *testing.T) {
	tests := []struct {
		name    string
		vp      *storagev1alpha1.VolumePair
		events  []corev1.Event
		evErr   error
		want    []string // lines (after trimming trailing blanks) that must appear
		wantNot []string
	}{{
		name:   "copy running after a failover",
		vp:     copyingPair(),
		events: []corev1.Event{event("Promoted", "node-b promoted at epoch 4", 10*time.Minute, 1), event("CopyStarted", "copy of 12 MiB to node-a", 3*time.Second, 2)},
		want: []string{
			"Name:             db",
			"Namespace:        prod",
			"Mode:             Async",
			"Size:             1 GiB in regions of 64 KiB",
			"Primary (spec):   node-a",
			"Backup (spec):    node-b",
			"Phase:            COPY (a copy towards a member is running)",
			"Active primary:   node-b (the backup is acting primary)",
			"Epoch:            4",
			"Endpoint:         nbd://198.18.0.12:10809/prod/db",
			"Out of sync:      12 MiB (12582912 bytes)",
			"Copy:             to node-a: 3 MiB of 12 MiB (25.0%), 1 MiB/s, ETA 9s, started 3s ago",
			"Last failover:    2026-05-01T11:50:00Z (10m ago)",
			"Last failback:    never",
			"Failback request: 2026-05-01T11:59:00Z (annotation storage.tandem.dev/failback-requested)",
			"Members:",
			"  NODE    ROLE     DATA STATE    CONNECTED  LAST SEEN  OUT OF SYNC  MESSAGE",
			"  node-a  Backup   Inconsistent  yes        2s ago     0 B          receiving the copy",
			"  node-b  Primary  UpToDate      yes        1s ago     9 MiB        -",
			"Conditions:",
			"  TYPE          STATUS  REASON   SINCE    MESSAGE",
			"  Ready         True    Serving  10m ago  node-b serves",
			"  Synchronized  False   Copying  1m ago   copy to node-a",
			"Events:",
			"  TYPE    REASON       AGE                FROM               MESSAGE",
			"  Normal  Promoted     10m                tandem-controller  node-b promoted at epoch 4",
			"  Normal  CopyStarted  3s (x2 over 2m3s)  tandem-controller  copy of 12 MiB to node-a",
		},
		wantNot: []string{"Failover request:", "Observed:"},
	}, {
		name: "no status yet",
		vp:   testPair(),
		want: []string{
			"Phase:            <none>: the controller has not reported a status yet",
			"Active primary:   -",
			"Out of sync:      0 B",
			"Copy:             none running",
			"Members:", "  <none reported>",
			"Conditions:", "  <none>",
			"Events:", "  <none>",
		},
	}, {
		name: "being deleted",
		vp: func() *storagev1alpha1.VolumePair {
			vp := healthyPair()
			vp.DeletionTimestamp, vp.Finalizers = ptrTime(2*time.Minute), []string{storagev1alpha1.Finalizer}
			return vp
		}(),
		want: []string{
			"Deleting:         since 2026-05-01T11:58:00Z (2m ago): the controller closes the replicas and deletes their files (finalizer storage.tandem.dev/teardown; annotation storage.tandem.dev/retain-data=true keeps them); a member it cannot reach keeps its files (event TeardownIncomplete). If this stays, is the Tandem manager running (kubectl tandem version)?",
		},
	}, {
		name: "stale status, events unavailable",
		vp: func() *storagev1alpha1.VolumePair {
			vp := testPair()
			vp.Generation = 3
			vp.Status = storagev1alpha1.VolumePairStatus{Phase: storagev1alpha1.PhasePair, ActivePrimary: "node-a", ObservedGeneration: 2, OutOfSyncBytes: 100}
			return vp
		}(),
		evErr: errors.New("events is forbidden:\nno RBAC"),
		want: []string{
			"Phase:            PAIR (the preferred primary serves and mirrors to the backup)",
			"Active primary:   node-a",
			"Out of sync:      100 B",
			"Observed:         generation 2 of 3: the status does not reflect the latest spec yet",
			"  <unavailable: events is forbidden: no RBAC>",
		},
		wantNot: []string{"Unmerged:", "Removed members"},
	}, {
		name: "a member replaced: the new one being copied, the old one listed",
		vp: func() *storagev1alpha1.VolumePair {
			vp := testPair()
			vp.Spec.Backup.Node = "node-c"
			vp.Status = storagev1alpha1.VolumePairStatus{Phase: storagev1alpha1.PhaseCopy, ActivePrimary: "node-a",
				RemovedMembers: []storagev1alpha1.RemovedMember{{Node: "node-b", Message: "deleted once the new member holds the data and the pair is in sync"}}}
			return vp
		}(),
		want: []string{
			"Backup (spec):    node-c",
			"Removed members (replaced; their replicas are still to be deleted):",
			"  NODE    WAITING FOR",
			"  node-b  deleted once the new member holds the data and the pair is in sync",
		},
	}, {
		name: "second embodiment: unmerged regions, full copy to a wiped member",
		vp: func() *storagev1alpha1.VolumePair {
			vp := testPair()
			vp.Status = storagev1alpha1.VolumePairStatus{Phase: storagev1alpha1.PhaseCopy, ActivePrimary: "node-a", UnmergedRegions: 3,
				Copy: &storagev1alpha1.CopyProgress{Target: "node-b", TotalBytes: 1 << 30, DoneBytes: 1 << 29, FullCopy: true,
					Reason: "the replica on node-b is new or was wiped: it holds no data of the pair"}}
			return vp
		}(),
		want: []string{
			"Unmerged:         3 regions differ between the members (writes never copied: spec.resync.mergePrimaryBitmap is false); kubectl tandem verify --repair makes them identical",
			"Copy:             to node-b: 512 MiB of 1 GiB (50.0%), rate not known yet, FULL COPY (the replica on node-b is new or was wiped: it holds no data of the pair)",
		},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			if err := renderStatus(&buf, tt.vp, tt.events, tt.evErr, testNow); err != nil {
				t.Fatal(err)
			}
			lines := map[string]bool{}
			for _, l := range strings.Split(buf.String(), "\n") {
				lines[strings.TrimRight(l, " ")] = true
			}
			for _, w := range tt.want {
				if !lines[w] {
					t.Errorf("missing line %q", w)
				}
			}
			for _, w := range tt.wantNot {
				if strings.Contains(buf.String(), w) {
					t.Errorf("unexpected %q", w)
				}
			}
			if t.Failed() {
				t.Logf("output:\n%s", buf.String())
			}
		})
	}
}

func TestSelectEvents(t *testing.T) {
	vp := testPair()
	var evs []corev1.Event
	for i := range 15 {
		evs = append(evs, event(fmt.Sprintf("R%02d", i), "m", time.Duration(15-i)*time.Minute, 1))
	}
	// Reverse order in, to check the sort.
	for i, j := 0, len(evs)-1; i < j; i, j = i+1, j-1 {
		evs[i], evs[j] = evs[j], evs[i]
	}
	other := event("OldObject", "m", 0, 1)
	other.InvolvedObject.UID = types.UID("uid-0")
	otherKind := event("OtherKind", "m", 0, 1)
	otherKind.InvolvedObject.Kind = "Pod"
	otherGroup := event("OtherGroup", "m", 0, 1)
	otherGroup.InvolvedObject.APIVersion = "example.com/v1"
	// An events.k8s.io-style event: only EventTime and a series.
	series := event("Series", "m", 0, 0)
	series.FirstTimestamp, series.LastTimestamp = metav1.Time{}, metav1.Time{}
	series.EventTime = metav1.NewMicroTime(testNow.Add(-time.Hour))
	series.Series = &corev1.EventSeries{Count: 3, LastObservedTime: metav1.NewMicroTime(testNow.Add(-30 * time.Second))}
	evs = append(evs, other, otherKind, otherGroup, series)

	got := selectEvents(evs, vp, 10)
	var reasons []string
	for _, e := range got {
		reasons = append(reasons, e.Reason)
	}
	want := "R06,R07,R08,R09,R10,R11,R12,R13,R14,Series"
	if strings.Join(reasons, ",") != want {
		t.Fatalf("selected %v, want %s", reasons, want)
	}
	if eventCount(series) != 3 {
		t.Errorf("eventCount(series) = %d", eventCount(series))
	}
}

func TestRequestExplanations(t *testing.T) {
	blocked := testPair()
	blocked.Status = storagev1alpha1.VolumePairStatus{
		Phase: storagev1alpha1.PhasePair, ActivePrimary: "node-a", Epoch: 3,
		Members: []storagev1alpha1.MemberStatus{
			{Node: "node-a", Role: storagev1alpha1.RolePrimary, DataState: storagev1alpha1.DataUpToDate},
			{Node: "node-b", Role: storagev1alpha1.RoleBackup, DataState: storagev1alpha1.DataOutdated},
		},
		Conditions: []metav1.Condition{{Type: storagev1alpha1.ConditionFailoverBlocked, Status: metav1.ConditionTrue, Reason: "BackupOutdated", Message: "node-b is Outdated"}},
	}
	normal := testPair()
	normal.Spec.Failback.Policy = storagev1alpha1.PolicyAutomatic
	normal.Status = storagev1alpha1.VolumePairStatus{Phase: storagev1alpha1.PhaseNormal, ActivePrimary: "node-b", Epoch: 4}

	tests := []struct {
		name string
		r    request
		vp   *storagev1alpha1.VolumePair
		want []string
	}{
		{"failover blocked", failoverRequest, blocked, []string{
			"volumepair prod/db: failover requested at 2026-05-01T12:00:00Z (annotation storage.tandem.dev/failover-requested)",
			"Now:  phase PAIR; node-a serves at epoch 3; node-b is Backup, Outdated, disconnected",
			"Next: the controller promotes node-b once the primary node-a is lost and node-b is UpToDate; otherwise the FailoverBlocked condition says why.",
			"      Warning: node-b is Outdated now; it is not promoted while its data is not UpToDate.",
			"      FailoverBlocked now: BackupOutdated: node-b is Outdated",
			"      spec.failover.policy is Automatic: the controller also fails over without a request.",
			"Follow it with: kubectl tandem status db -n prod",
		}},
		{"failback from NORMAL", failbackRequest, normal, []string{
			"Now:  phase NORMAL; node-b serves at epoch 4",
			"Next: once the pair is NORMAL, the controller holds new writes, drains the last diff, gives the primary role back to node-a and resumes mirroring (PAIR); held writes wait, they do not fail.",
			"      The pair is NORMAL: the failback can start now.",
			"      spec.failback.policy is Automatic: the controller also fails back without a request.",
		}},
		{"failback during COPY", failbackRequest, copyingPair(), []string{
			"Now:  phase COPY; node-b serves at epoch 4; node-a is Backup, Inconsistent, connected",
		}},
		{"no status", failoverRequest, testPair(), []string{
			"Now:  the controller has not reported a status yet",
		}},
	}
	for _, tt := range tests {
		var buf bytes.Buffer
		if err := renderRequest(&buf, tt.r, tt.vp, testNow.Format(time.RFC3339)); err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(buf.String(), "\n")
		for _, w := range tt.want {
			found := false
			for _, l := range lines {
				found = found || l == w
			}
			if !found {
				t.Errorf("%s: missing line %q in:\n%s", tt.name, w, buf.String())
			}
		}
	}
	if got := failbackNext(copyingPair()); len(got) < 2 || !strings.HasPrefix(got[1], "A copy is running (to node-a: 3 MiB of 12 MiB (25.0%)") {
		t.Errorf("failback during COPY: %q", got)
	}
}

// TestRenderStatusDR: status explains PENDING, and shows the last forced
// promotion, a pending force-promote and the held members.
func TestRenderStatusDR(t *testing.T) {
	vp := swappedPair()
	vp.Annotations = map[string]string{
		storagev1alpha1.AnnotationHoldResync:     "node-a",
		storagev1alpha1.AnnotationForcePromote:   "node-a",
		storagev1alpha1.AnnotationForcePromoteBy: "alice",
	}
	vp.Status.LastForcePromotion = &storagev1alpha1.ForcePromotion{Node: "node-b", From: "node-a", Epoch: 4, Time: at(10 * time.Minute), RequestedBy: "alice", BlockedBy: "BackupOutdated"}
	pending := testPair()
	pending.Status.Phase = storagev1alpha1.PhasePending
	growing := testPair()
	growing.Spec.Size = resource.MustParse("2Gi")
	served := resource.MustParse("1Gi")
	growing.Status.Size = &served
	for _, tt := range []struct {
		vp      *storagev1alpha1.VolumePair
		want    []string
		wantNot []string
	}{
		{vp, []string{
			"Forced promotion: node-b at epoch 4, 2026-05-01T11:50:00Z (10m ago), in place of node-a, requested by alice, overriding BackupOutdated",
			"Force request:    node-a, requested by alice (annotation storage.tandem.dev/force-promote): promoted once the writer is lost and its authority expired, even if it lacks acknowledged writes",
			"Held:             node-a (annotation storage.tandem.dev/hold-resync): fenced and kept out of resync, data as it came back; kubectl tandem release db NODE -n prod resyncs one",
		}, nil},
		{pending, []string{"Phase:            PENDING (a new pair waits: a member's node does not exist or has no agent, or spec.primary's agent does not answer; condition Ready says which)"},
			[]string{"Forced promotion:", "Force request:", "Held:"}},
		{growing, []string{"Size:             2 GiB in regions of 64 KiB (the writer serves 1 GiB: growing, see the Expanding condition)"}, nil},
		{testPair(), []string{"Size:             1 GiB in regions of 64 KiB\n"}, []string{"growing"}},
	} {
		var b strings.Builder
		if err := renderStatus(&b, tt.vp, nil, nil, testNow); err != nil {
			t.Fatal(err)
		}
		for _, w := range tt.want {
			if !strings.Contains(b.String(), w) {
				t.Errorf("status lacks %q:\n%s", w, b.String())
			}
		}
		for _, w := range tt.wantNot {
			if strings.Contains(b.String(), w) {
				t.Errorf("status shows %q:\n%s", w, b.String())
			}
		}
	}
}
