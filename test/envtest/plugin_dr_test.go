package envtest

import (
	"bytes"
	"context"
	"errors"
	"os/exec"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/internal/testkit"
)

// startPlugin runs kubectl-tandem in the background; its result arrives on
// the channel once it exits.
func startPlugin(bin string, args ...string) <-chan pluginResult {
	done := make(chan pluginResult, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, append([]string{"--kubeconfig", kubeconfig}, args...)...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		res := pluginResult{stdout: out.String(), stderr: errb.String()}
		var ee *exec.ExitError
		switch {
		case errors.As(err, &ee):
			res.code = ee.ExitCode()
		case err != nil:
			res.code, res.stderr = -1, res.stderr+"\nrun: "+err.Error()
		}
		done <- res
	}()
	return done
}

// testPluginDisasterRecovery drives promote --force, hold and release
// against the real API server: the user from a real SelfSubjectReview, the
// merge patches, and the wait for the controller's answer, which the test
// gives in the controller's place (no controller runs here).
func testPluginDisasterRecovery(t *testing.T, bin string) {
	ctx := context.Background()
	ns := newNamespace(t)
	vp := minimalPair(ns, "db")
	vp.Spec.Mode = v1.ModeSync
	vp.Annotations = map[string]string{"team": "storage"}
	if err := k8s.Create(ctx, vp); err != nil {
		t.Fatalf("create: %v", err)
	}
	seen := metav1.NewTime(time.Now().Add(-time.Minute).Truncate(time.Second))
	// node-a, the writer, is lost after it went on alone; node-b is Outdated.
	lost := v1.VolumePairStatus{
		Phase: v1.PhasePair, ActivePrimary: "node-a", Epoch: 3,
		Members: []v1.MemberStatus{
			{Node: "node-a", Role: v1.RolePrimary, DataState: v1.DataUpToDate, LastSeen: &seen},
			{Node: "node-b", Role: v1.RoleBackup, DataState: v1.DataOutdated, LastSeen: &seen, OutOfSyncBytes: 8 << 20},
		},
		Conditions: []metav1.Condition{readyCondition(false, "node-a"),
			{Type: v1.ConditionFailoverBlocked, Status: metav1.ConditionTrue, Reason: "BackupOutdated", Message: "the replica on node-b is Outdated", LastTransitionTime: seen}},
	}
	setStatus(t, vp, lost)
	get := func() *v1.VolumePair {
		t.Helper()
		cur := &v1.VolumePair{}
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(vp), cur); err != nil {
			t.Fatal(err)
		}
		return cur
	}
	clearRequest := func() {
		t.Helper()
		cur := get()
		delete(cur.Annotations, v1.AnnotationForcePromote)
		delete(cur.Annotations, v1.AnnotationForcePromoteBy)
		if err := k8s.Update(ctx, cur); err != nil {
			t.Fatal(err)
		}
	}
	requested := func() {
		t.Helper()
		testkit.Eventually(t, 30*time.Second, "the force-promote annotation set by the plugin", func() (bool, error) {
			return get().Annotations[v1.AnnotationForcePromote] == "node-b", nil
		})
	}

	// Without --force: the warning, nothing set.
	res := runPlugin(t, bin, "-n", ns, "promote", "db", "node-b")
	if res.code != 1 || !strings.Contains(res.stderr, "WARNING: promoting node-b by force") || !strings.Contains(res.stderr, "lacks 8 MiB (8388608 bytes)") ||
		!strings.Contains(res.stderr, "refused without --force, nothing was changed") {
		t.Errorf("promote without --force:\n%s", res)
	}
	if a := get().Annotations; a[v1.AnnotationForcePromote] != "" {
		t.Errorf("promote without --force set %v", a)
	}

	// --force --wait=0: both annotations, the user the API server names;
	// --hold-old-writer adds node-a to the hold list in the same patch
	// (guarded by the resourceVersion it read).
	res = runPlugin(t, bin, "-n", ns, "promote", "db", "node-b", "--force", "--hold-old-writer", "--wait=0")
	if res.code != 0 || !strings.Contains(res.stdout, "force-promote of node-b requested by tandem-admin") || strings.Contains(res.stderr, "note:") {
		t.Errorf("promote --force --wait=0:\n%s", res)
	}
	if a := get().Annotations; a[v1.AnnotationForcePromote] != "node-b" || a[v1.AnnotationForcePromoteBy] != "tandem-admin" || a[v1.AnnotationHoldResync] != "node-a" || a["team"] != "storage" {
		t.Errorf("annotations after promote --force --hold-old-writer: %v", a)
	}
	unheld := get()
	delete(unheld.Annotations, v1.AnnotationHoldResync)
	if err := k8s.Update(ctx, unheld); err != nil {
		t.Fatal(err)
	}
	clearRequest()

	// The controller ignores it: the plugin reports its RequestIgnored event.
	done := startPlugin(bin, "-n", ns, "promote", "db", "node-b", "--force", "--wait=60s")
	requested()
	clearRequest()
	cur := get()
	ev := &corev1.Event{
		ObjectMeta:     metav1.ObjectMeta{Namespace: ns, GenerateName: "db-"},
		InvolvedObject: corev1.ObjectReference{APIVersion: v1.GroupVersion.String(), Kind: "VolumePair", Namespace: ns, Name: "db", UID: cur.UID},
		Type:           corev1.EventTypeWarning, Reason: "RequestIgnored", Message: "force-promote request ignored and cleared: the writer node-a serves the volume",
		FirstTimestamp: metav1.Now(), LastTimestamp: metav1.Now(), Count: 1, Source: corev1.EventSource{Component: "tandem-controller"},
	}
	if err := k8s.Create(ctx, ev); err != nil {
		t.Fatal(err)
	}
	res = <-done
	if res.code != 1 || !strings.Contains(res.stdout, "Not promoted: the controller ignored the request and cleared it (event RequestIgnored)") ||
		!strings.Contains(res.stderr, "was ignored: force-promote request ignored and cleared") {
		t.Errorf("promote --force, ignored:\n%s", res)
	}

	// The controller promotes node-b.
	done = startPlugin(bin, "-n", ns, "promote", "db", "node-b", "--force", "--wait=60s")
	requested()
	cur = get()
	promoted := lost.DeepCopy()
	promoted.Phase, promoted.ActivePrimary, promoted.Epoch = v1.PhaseSwap, "node-b", 4
	promoted.Conditions = []metav1.Condition{readyCondition(true, "node-b")}
	promoted.LastForcePromotion = &v1.ForcePromotion{Node: "node-b", From: "node-a", Epoch: 4, Time: metav1.Now(),
		RequestedBy: cur.Annotations[v1.AnnotationForcePromoteBy], BlockedBy: "BackupOutdated"}
	setStatus(t, vp, *promoted)
	clearRequest()
	res = <-done
	if res.code != 0 || !strings.Contains(res.stdout, "Promoted: node-b is the writer at epoch 4, by force, in place of node-a (requested by tandem-admin); it overrode BackupOutdated.") {
		t.Errorf("promote --force, promoted:\n%s", res)
	}
	res = runPlugin(t, bin, "-n", ns, "status", "db")
	if !strings.Contains(res.stdout, "Forced promotion: node-b at epoch 4") {
		t.Errorf("status after the forced promotion:\n%s", res)
	}

	// Hold the old writer, then release it: the other annotations stay.
	res = runPlugin(t, bin, "-n", ns, "hold", "db", "node-a")
	if a := get().Annotations; res.code != 0 || a[v1.AnnotationHoldResync] != "node-a" || a["team"] != "storage" {
		t.Errorf("hold: annotations %v\n%s", a, res)
	}
	res = runPlugin(t, bin, "-n", ns, "hold", "db", "node-b")
	if res.code != 1 || !strings.Contains(res.stderr, "node-b is the writer (epoch 4)") {
		t.Errorf("hold of the writer:\n%s", res)
	}
	res = runPlugin(t, bin, "-n", ns, "release", "db", "node-a")
	if a := get().Annotations; res.code != 0 || a[v1.AnnotationHoldResync] != "" || a["team"] != "storage" {
		t.Errorf("release: annotations %v\n%s", a, res)
	}
	if _, ok := get().Annotations[v1.AnnotationHoldResync]; ok {
		t.Error("release of the last held node left the annotation")
	}
}
