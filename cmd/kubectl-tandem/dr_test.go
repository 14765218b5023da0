package main

import (
	"context"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"

	storagev1alpha1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

// outdatedLostPair: node-a, the writer of a Sync pair, is lost after it
// went on alone; node-b is Outdated and lacks 12 MiB, so the controller
// will not promote it without force.
func outdatedLostPair() *storagev1alpha1.VolumePair {
	vp := healthyPair()
	vp.Spec.Mode = storagev1alpha1.ModeSync
	vp.Status.OutOfSyncBytes = 12 << 20
	vp.Status.Members = []storagev1alpha1.MemberStatus{
		{Node: "node-a", Role: storagev1alpha1.RolePrimary, DataState: storagev1alpha1.DataUpToDate, LastSeen: ptrTime(5 * time.Minute), OutOfSyncBytes: 12 << 20},
		{Node: "node-b", Role: storagev1alpha1.RoleBackup, DataState: storagev1alpha1.DataOutdated, LastSeen: ptrTime(time.Second), OutOfSyncBytes: 12 << 20,
			Mode: storagev1alpha1.ModeSync, OutdatedConfirmation: storagev1alpha1.OutdatedSent},
	}
	vp.Status.Conditions = []metav1.Condition{
		{Type: storagev1alpha1.ConditionReady, Status: metav1.ConditionFalse, Reason: "WriterUnreachable", Message: "the agent on node-a does not answer", LastTransitionTime: at(5 * time.Minute)},
		{Type: storagev1alpha1.ConditionSynchronized, Status: metav1.ConditionFalse, Reason: "PeerDisconnected", Message: "node-b is disconnected", LastTransitionTime: at(20 * time.Minute)},
		{Type: storagev1alpha1.ConditionFailoverBlocked, Status: metav1.ConditionTrue, Reason: "BackupOutdated",
			Message: "the replica on node-b is Outdated: the writer may have continued alone after it was lost; promoting it would lose acknowledged writes", LastTransitionTime: at(5 * time.Minute)},
	}
	return vp
}

func getVP(t *testing.T, c client.Client) *storagev1alpha1.VolumePair {
	t.Helper()
	var vp storagev1alpha1.VolumePair
	if err := c.Get(context.Background(), client.ObjectKey{Namespace: "prod", Name: "db"}, &vp); err != nil {
		t.Fatal(err)
	}
	return &vp
}

// TestPromoteRefused: promote refuses, naming the cause, a force-promote
// the controller would ignore or never carry out, and sets nothing; without
// --force it sets nothing either, and says what would be lost.
func TestPromoteRefused(t *testing.T) {
	inconsistent := outdatedLostPair()
	inconsistent.Status.Members[1].DataState = storagev1alpha1.DataInconsistent
	inconsistent.Status.Members[1].Message = "a copy towards it did not finish"
	deleting := outdatedLostPair()
	deleting.DeletionTimestamp = ptrTime(time.Minute)
	deleting.Finalizers = []string{storagev1alpha1.Finalizer}
	const swapCmd = `kubectl patch volumepair db -n prod --type=merge -p '{"spec":{"primary":{"node":"node-b"},"backup":{"node":"node-a"}}}'`
	for _, tt := range []struct {
		name string
		vp   *storagev1alpha1.VolumePair
		args []string
		want []string // in the error
	}{
		{"not a member", outdatedLostPair(), []string{"db", "node-z", "--force"}, []string{
			"promote of node-z in volumepair prod/db refused, nothing was changed: node-z is not a member of the pair; its members are node-a (spec.primary.node), node-b (spec.backup.node)"}},
		{"the lost writer itself", outdatedLostPair(), []string{"db", "node-a", "--force"}, []string{
			"node-a is the writer (it holds the authority at epoch 3): a promotion makes another member the writer in its place. If node-a is lost for good, promote one of node-b"}},
		{"the serving writer itself", healthyPair(), []string{"db", "node-a", "--force"}, []string{"node-a is already the writer and serves (epoch 3, phase PAIR): there is nothing to promote"}},
		{"the writer serves", healthyPair(), []string{"db", "node-b", "--force"}, []string{
			"the writer node-a is serving (condition Ready: Serving, node-a serves the volume): a force-promote replaces a writer that is lost for good, and the controller would ignore it",
			"For a planned switch of the writer to node-b while node-a serves (writes are held and drained: none is lost), swap spec.primary.node and spec.backup.node: " + swapCmd,
			"run this again once kubectl tandem status db -n prod shows Ready False",
		}},
		{"Inconsistent", inconsistent, []string{"db", "node-b", "--force"}, []string{
			"the replica on node-b is Inconsistent (a copy towards it did not finish): a copy towards it did not finish, so it holds no usable image of the volume, and the controller never promotes it, even by force"}},
		{"no status", testPair(), []string{"db", "node-b", "--force"}, []string{"the controller has not reported a status for it yet"}},
		{"never had a writer", waitingPair(), []string{"db", "node-b", "--force"}, []string{"no member has been the writer yet"}},
		{"being deleted", deleting, []string{"db", "node-b", "--force"}, []string{"the VolumePair is being deleted"}},
		{"without --force", outdatedLostPair(), []string{"db", "node-b"}, []string{
			"promote of node-b in volumepair prod/db refused without --force, nothing was changed: it may discard writes node-a acknowledged (above). If node-a is gone for good, run: kubectl tandem promote db node-b -n prod --force"}},
		{"one argument", outdatedLostPair(), []string{"db"}, []string{"promote needs exactly two arguments, the VolumePair's name and a member's node (got 1)"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			res := runPluginFake(t, []client.Object{tt.vp.DeepCopy()}, append([]string{"promote"}, tt.args...)...)
			if res.err == nil {
				t.Fatalf("accepted:\n%s", res.stdout)
			}
			for _, w := range tt.want {
				if !strings.Contains(res.err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, res.err)
				}
			}
			got := getVP(t, res.c)
			for _, a := range []string{storagev1alpha1.AnnotationForcePromote, storagev1alpha1.AnnotationForcePromoteBy} {
				if v, ok := got.Annotations[a]; ok {
					t.Errorf("refused, but %s=%q was set", a, v)
				}
			}
		})
	}
}

// TestPromoteWarning: without --force the warning names what is lost, from
// the pair's status.
func TestPromoteWarning(t *testing.T) {
	res := runPluginFake(t, []client.Object{outdatedLostPair()}, "promote", "db", "node-b")
	if res.err == nil {
		t.Fatal("promote without --force was accepted")
	}
	for _, w := range []string{
		"WARNING: promoting node-b by force makes the data node-b holds now the volume's data, as it is.",
		"Writes that node-a (the lost writer) acknowledged after node-b stopped receiving them are lost for good:",
		"  - node-b is Outdated: node-a went on writing without it after their link broke.",
		"  - node-a last reported that node-b lacks 12 MiB (12582912 bytes) of its data (status.members[].outOfSyncBytes); what it wrote after that report is missing too.",
		"  - the members have not been in sync since ", "; condition Synchronized: PeerDisconnected.",
		"  - the controller last heard from node-a ", " and from node-b ",
		"When node-a returns it is resynced from node-b: what it wrote that node-b lacks is overwritten",
		"To look at its data first, keep it out of resync: add --hold-old-writer (or kubectl tandem hold db node-a -n prod once node-b is promoted, before node-a returns).",
		"Do this only if node-a is gone for good",
	} {
		if !strings.Contains(res.stderr, w) {
			t.Errorf("warning lacks %q:\n%s", w, res.stderr)
		}
	}
	if strings.Contains(res.stderr, "Async backup") {
		t.Errorf("a Sync backup is called Async:\n%s", res.stderr)
	}

	// An Async backup, held: both said; an UpToDate Sync one: nothing lost
	// that the status shows, and what --force overrides.
	async := outdatedLostPair()
	async.Spec.AdditionalBackups = []storagev1alpha1.BackupMember{{Node: "node-c", Mode: storagev1alpha1.ModeAsync}}
	async.Annotations = map[string]string{storagev1alpha1.AnnotationHoldResync: "node-c"}
	async.Status.Members = append(async.Status.Members, storagev1alpha1.MemberStatus{Node: "node-c", Role: storagev1alpha1.RoleNone, DataState: storagev1alpha1.DataUpToDate, LastSeen: ptrTime(time.Second)})
	upToDate := outdatedLostPair()
	upToDate.Status.Members[1].DataState, upToDate.Status.Members[1].OutOfSyncBytes = storagev1alpha1.DataUpToDate, 0
	upToDate.Status.Conditions = upToDate.Status.Conditions[:1]
	upToDate.Status.Conditions = append(upToDate.Status.Conditions, metav1.Condition{Type: storagev1alpha1.ConditionFailoverBlocked, Status: metav1.ConditionTrue, Reason: "ManualPolicy", LastTransitionTime: at(time.Minute)})
	for _, tt := range []struct {
		vp   *storagev1alpha1.VolumePair
		node string
		want []string
	}{
		{async, "node-c", []string{
			"  - node-c is an Async backup: node-a acknowledged each write before node-c held it, so its last writes may never have reached node-c.",
			"  - node-c is held out of resync (storage.tandem.dev/hold-resync): its data is as it came back, without what node-a wrote meanwhile.",
		}},
		{upToDate, "node-b", []string{"  - none that the status shows: node-b was UpToDate and Sync when last seen, so it should hold every write node-a acknowledged; --force overrides what blocks the promotion (FailoverBlocked: ManualPolicy)."}},
	} {
		res := runPluginFake(t, []client.Object{tt.vp}, "promote", "db", tt.node)
		for _, w := range tt.want {
			if !strings.Contains(res.stderr, w) {
				t.Errorf("%s: warning lacks %q:\n%s", tt.node, w, res.stderr)
			}
		}
	}
}

// forcePromoteFuncs answers SelfSubjectReviews as user (an error when
// user is ""), and runs controller after each patch of the VolumePair (the
// controller acting on the request), recording the annotations patched.
func forcePromoteFuncs(user string, patched *map[string]string, controller func(ctx context.Context, c client.WithWatch, vp *storagev1alpha1.VolumePair)) interceptor.Funcs {
	return interceptor.Funcs{
		Get: withManagedFields,
		Create: func(ctx context.Context, c client.WithWatch, obj client.Object, opts ...client.CreateOption) error {
			if r, ok := obj.(*authenticationv1.SelfSubjectReview); ok {
				if user == "" {
					return apierrors.NewForbidden(schema.GroupResource{Group: "authentication.k8s.io", Resource: "selfsubjectreviews"}, "", errors.New("not allowed"))
				}
				r.Status.UserInfo.Username = user
				return nil
			}
			return c.Create(ctx, obj, opts...)
		},
		Patch: func(ctx context.Context, c client.WithWatch, obj client.Object, patch client.Patch, opts ...client.PatchOption) error {
			if err := c.Patch(ctx, obj, patch, opts...); err != nil {
				return err
			}
			vp, ok := obj.(*storagev1alpha1.VolumePair)
			if !ok {
				return nil
			}
			m := map[string]string{}
			for k, v := range vp.Annotations {
				if strings.HasPrefix(k, storagev1alpha1.AnnotationForcePromote) || k == storagev1alpha1.AnnotationHoldResync {
					m[k] = v
				}
			}
			*patched = m
			if controller != nil {
				cur := &storagev1alpha1.VolumePair{}
				if err := c.Get(ctx, client.ObjectKeyFromObject(vp), cur); err != nil {
					return err
				}
				controller(ctx, c, cur)
			}
			return nil
		},
	}
}

func withAnnotations(vp *storagev1alpha1.VolumePair, kv ...string) *storagev1alpha1.VolumePair {
	if vp.Annotations == nil {
		vp.Annotations = map[string]string{}
	}
	for i := 0; i+1 < len(kv); i += 2 {
		vp.Annotations[kv[i]] = kv[i+1]
	}
	return vp
}

func requestIgnoredEvent(name, msg string, count int32) *corev1.Event {
	e := event(reasonRequestIgnored, msg, time.Minute, count)
	e.Name, e.Type = name, corev1.EventTypeWarning
	return &e
}

// TestPromoteForce: --force sets the request and who asked, then reports
// what the controller did with it: promoted, ignored (its RequestIgnored
// event, not an older one), withdrawn, or nothing yet within --wait (exit
// status 2, with why the promotion is blocked).
func TestPromoteForce(t *testing.T) {
	promote := func(ctx context.Context, c client.WithWatch, vp *storagev1alpha1.VolumePair) {
		vp.Status.ActivePrimary, vp.Status.Epoch, vp.Status.Phase = "node-b", 4, storagev1alpha1.PhaseSwap
		vp.Status.Conditions = []metav1.Condition{{Type: storagev1alpha1.ConditionReady, Status: metav1.ConditionTrue, Reason: "Serving", Message: "node-b serves", LastTransitionTime: at(0)}}
		vp.Status.LastForcePromotion = &storagev1alpha1.ForcePromotion{Node: vp.Annotations[storagev1alpha1.AnnotationForcePromote], From: "node-a", Epoch: 4,
			Time: at(0), RequestedBy: vp.Annotations[storagev1alpha1.AnnotationForcePromoteBy], BlockedBy: "BackupOutdated"}
		delete(vp.Annotations, storagev1alpha1.AnnotationForcePromote)
		delete(vp.Annotations, storagev1alpha1.AnnotationForcePromoteBy)
		if err := c.Update(ctx, vp); err != nil {
			panic(err)
		}
	}
	clear := func(withEvent bool) func(ctx context.Context, c client.WithWatch, vp *storagev1alpha1.VolumePair) {
		return func(ctx context.Context, c client.WithWatch, vp *storagev1alpha1.VolumePair) {
			delete(vp.Annotations, storagev1alpha1.AnnotationForcePromote)
			delete(vp.Annotations, storagev1alpha1.AnnotationForcePromoteBy)
			if err := c.Update(ctx, vp); err != nil {
				panic(err)
			}
			if withEvent {
				if err := c.Create(ctx, requestIgnoredEvent("ignored-now", "force-promote request ignored and cleared: the writer node-a serves the volume, and a promotion replaces a lost writer", 1)); err != nil {
					panic(err)
				}
			}
		}
	}
	// node-b writes, but status.lastForcePromotion still records an
	// earlier promotion: not the answer to this request.
	writerWithoutRecord := func(ctx context.Context, c client.WithWatch, vp *storagev1alpha1.VolumePair) {
		vp.Status.ActivePrimary, vp.Status.Epoch = "node-b", 4
		if err := c.Update(ctx, vp); err != nil {
			panic(err)
		}
	}
	// An older RequestIgnored about a force-promote, there before the
	// request: it is not the answer.
	old := requestIgnoredEvent("ignored-before", "force-promote request ignored and cleared: node-a already holds the writer's authority", 3)
	earlierForced := outdatedLostPair()
	earlierForced.Status.LastForcePromotion = &storagev1alpha1.ForcePromotion{Node: "node-b", From: "node-a", Epoch: 2, Time: at(time.Hour)}
	for _, tt := range []struct {
		name       string
		vp         *storagev1alpha1.VolumePair
		user       string
		controller func(context.Context, client.WithWatch, *storagev1alpha1.VolumePair)
		wait       string
		wantCode   int // 0: no error
		wantErr    string
		wantOut    []string
		wantStderr string
		wantBy     string
		extra      []string // more flags
		wantHold   string   // the hold-resync annotation patched ("": none)
	}{
		{name: "promoted", vp: outdatedLostPair(), user: "alice", controller: promote, wait: "10s", wantBy: "alice", wantOut: []string{
			"WARNING: promoting node-b by force",
			"volumepair prod/db: force-promote of node-b requested by alice (annotations storage.tandem.dev/force-promote=node-b, storage.tandem.dev/force-promote-by)",
			"Promoted: node-b is the writer at epoch 4, by force, in place of node-a (requested by alice); it overrode BackupOutdated.",
			"Next: when node-a returns it is resynced from node-b, which overwrites what it wrote that node-b lacks; to keep it out of resync and look at it first: kubectl tandem hold db node-a -n prod",
		}},
		{name: "promoted, the old writer held", vp: withAnnotations(outdatedLostPair(), storagev1alpha1.AnnotationHoldResync, "node-x"), user: "alice", controller: promote, wait: "10s",
			extra: []string{"--hold-old-writer"}, wantBy: "alice", wantHold: "node-x,node-a", wantOut: []string{
				"node-a is held out of resync from the moment node-b is promoted (annotation storage.tandem.dev/hold-resync=node-x,node-a): when it returns it stays fenced with its data as it came back; kubectl tandem release db node-a -n prod resyncs it.",
				"Next: node-a is held out of resync: when it returns it stays fenced with its data as it came back (kubectl tandem verify db -n prod lists the regions where it differs; its files are under the agent's data directory on node-a, volumes/prod/db). kubectl tandem release db node-a -n prod resyncs it from node-b, which overwrites what it wrote that node-b lacks.",
			}},
		{name: "the old writer held already", vp: withAnnotations(outdatedLostPair(), storagev1alpha1.AnnotationHoldResync, "node-a"), user: "alice", controller: promote, wait: "10s",
			extra: []string{"--hold-old-writer"}, wantBy: "alice", wantHold: "node-a", wantOut: []string{"Next: node-a is held out of resync"}},
		{name: "SelfSubjectReview not allowed", vp: outdatedLostPair(), user: "", controller: promote, wait: "10s", wantBy: "unknown",
			wantStderr: `note: could not learn the user your credentials authenticate as (SelfSubjectReview: selfsubjectreviews.authentication.k8s.io is forbidden`,
			wantOut:    []string{"requested by unknown", "Promoted: node-b is the writer at epoch 4, by force, in place of node-a (requested by unknown)"}},
		{name: "ignored", vp: outdatedLostPair(), user: "alice", controller: clear(true), wait: "10s", wantCode: 1, wantBy: "alice",
			wantErr: "the force-promote of node-b in volumepair prod/db was ignored: force-promote request ignored and cleared: the writer node-a serves the volume",
			wantOut: []string{"Not promoted: the controller ignored the request and cleared it (event RequestIgnored): force-promote request ignored and cleared: the writer node-a serves the volume"}},
		{name: "withdrawn, an older ignored event", vp: outdatedLostPair(), user: "alice", controller: clear(false), wait: "10s", wantCode: 1, wantBy: "alice",
			wantErr: "the force-promote of node-b in volumepair prod/db was withdrawn before the controller acted on it",
			wantOut: []string{"Not promoted: the annotation storage.tandem.dev/force-promote no longer names node-b, and the controller recorded no promotion of it."}},
		{name: "an earlier forced promotion is not this one", vp: earlierForced, user: "alice", controller: writerWithoutRecord, wait: "300ms", wantCode: exitPending, wantBy: "alice",
			wantOut: []string{"Still waiting: the controller has not promoted node-b yet."}},
		{name: "still blocked after --wait", vp: outdatedLostPair(), user: "alice", wait: "300ms", wantCode: exitPending, wantBy: "alice", wantOut: []string{
			"Waiting up to 300ms for the controller...",
			"Still waiting: the controller has not promoted node-b yet.",
			"FailoverBlocked: BackupOutdated: the replica on node-b is Outdated",
			"Ready: False, WriterUnreachable: the agent on node-a does not answer",
			"The request stays set: the controller promotes node-b as soon as it can",
			"To withdraw it: kubectl annotate volumepair db -n prod storage.tandem.dev/force-promote- storage.tandem.dev/force-promote-by-",
		}},
		{name: "--wait=0", vp: outdatedLostPair(), user: "bob", wait: "0", wantBy: "bob", wantOut: []string{
			"force-promote of node-b requested by bob",
			"Not waiting (--wait=0): the controller promotes node-b once node-a is lost and its authority expired, or clears the request (event RequestIgnored).",
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var patched map[string]string
			res := runPluginWith(t, []client.Object{tt.vp, old}, forcePromoteFuncs(tt.user, &patched, tt.controller), func(kubeconfig string) []string {
				return append([]string{"--kubeconfig", kubeconfig, "-n", "prod", "promote", "db", "node-b", "--force", "--wait=" + tt.wait}, tt.extra...)
			})
			code := 0
			if res.err != nil {
				code = 1
				var ee *exitError
				if errors.As(res.err, &ee) {
					code = ee.code
				}
			}
			if code != tt.wantCode {
				t.Fatalf("exit status %d (%v), want %d\n%s\n%s", code, res.err, tt.wantCode, res.stdout, res.stderr)
			}
			if tt.wantErr != "" && !strings.Contains(res.err.Error(), tt.wantErr) {
				t.Errorf("error lacks %q: %v", tt.wantErr, res.err)
			}
			for _, w := range tt.wantOut {
				if !strings.Contains(res.stdout, w) {
					t.Errorf("output lacks %q:\n%s", w, res.stdout)
				}
			}
			if !strings.Contains(res.stderr, tt.wantStderr) {
				t.Errorf("stderr lacks %q:\n%s", tt.wantStderr, res.stderr)
			}
			want := map[string]string{storagev1alpha1.AnnotationForcePromote: "node-b", storagev1alpha1.AnnotationForcePromoteBy: tt.wantBy}
			if tt.wantHold != "" {
				want[storagev1alpha1.AnnotationHoldResync] = tt.wantHold
			}
			if !reflect.DeepEqual(patched, want) {
				t.Errorf("annotations patched %v, want %v", patched, want)
			}
		})
	}
}

// TestHoldRelease: hold and release add and remove one node of the
// hold-resync list with a merge patch that keeps the others, refuse what
// cannot be held or released, and say what happens next.
func TestHoldRelease(t *testing.T) {
	withHeld := func(vp *storagev1alpha1.VolumePair, held string) *storagev1alpha1.VolumePair {
		vp.Annotations = map[string]string{storagev1alpha1.AnnotationHoldResync: held, "keep": "me"}
		return vp
	}
	threeMembers := func() *storagev1alpha1.VolumePair {
		vp := swappedPair()
		vp.Spec.AdditionalBackups = []storagev1alpha1.BackupMember{{Node: "node-c"}}
		return vp
	}
	const absent = "<absent>"
	for _, tt := range []struct {
		name    string
		vp      *storagev1alpha1.VolumePair
		args    []string
		want    string // the annotation afterwards
		wantErr string
		wantOut []string
	}{
		{"hold the old writer after a failover", swappedPair(), []string{"hold", "db", "node-a"}, "node-a", "", []string{
			"volumepair prod/db: node-a held out of resync (annotation storage.tandem.dev/hold-resync=node-a)",
			"Next: when node-a returns (at once if it answers now), the controller fences it (role None) and keeps it out of resync: its data stays as it came back.",
			"The pair is Degraded (ResyncHeld), and node-a is never promoted automatically (FailoverBlocked: BackupHeld; kubectl tandem promote --force can still promote it).",
			"To look at its data: kubectl tandem verify db -n prod lists the regions where the members differ; node-a's replica files are on node-a under the agent's data directory, volumes/prod/db (/var/lib/tandem/volumes/prod/db with the default --data-dir).",
			"To resync it, overwriting what it wrote since it left with node-b's data: kubectl tandem release db node-a -n prod",
		}},
		{"hold keeps the other held nodes", withHeld(threeMembers(), "node-c"), []string{"hold", "db", "node-a"}, "node-c,node-a", "", []string{"held out of resync (annotation storage.tandem.dev/hold-resync=node-c,node-a)"}},
		{"hold of a connected backup warns", healthyPair(), []string{"hold", "db", "node-b"}, "node-b", "", []string{
			"Warning: node-b is a connected backup now: the controller fences it at once, so it stops receiving node-a's writes"}},
		{"hold, already held", withHeld(swappedPair(), "node-a"), []string{"hold", "db", "node-a"}, "node-a", "", []string{"node-a is already held out of resync (annotation storage.tandem.dev/hold-resync=node-a); nothing was changed"}},
		{"hold of a non-member", swappedPair(), []string{"hold", "db", "node-z"}, absent,
			"hold of node-z in volumepair prod/db refused, nothing was changed: node-z is not a member of the pair; its members are node-a (spec.primary.node), node-b (spec.backup.node)", nil},
		{"hold of the writer", swappedPair(), []string{"hold", "db", "node-b"}, absent,
			"hold of node-b in volumepair prod/db refused, nothing was changed: node-b is the writer (epoch 4): a hold keeps a member that returns to the writer out of resync, and the writer is never resynced", nil},
		{"release keeps the other held nodes", withHeld(threeMembers(), "node-c, node-a"), []string{"release", "db", "node-a"}, "node-c", "", []string{
			"volumepair prod/db: node-a released (annotation storage.tandem.dev/hold-resync now node-c)",
			"Next: the controller makes node-a a backup of node-b and resyncs it: the regions where it differs are copied from node-b, which overwrites what node-a wrote since it left (those writes are lost).",
		}},
		{"release of the last held node removes the annotation", withHeld(swappedPair(), "node-a"), []string{"release", "db", "node-a"}, absent, "", []string{
			"node-a released (annotation storage.tandem.dev/hold-resync removed: no member is held)"}},
		{"release of a listed node no longer a member", withHeld(swappedPair(), "node-a,node-old"), []string{"release", "db", "node-old"}, "node-a", "", nil},
		{"release of a node not held", withHeld(threeMembers(), "node-c"), []string{"release", "db", "node-a"}, "node-c",
			"release of node-a in volumepair prod/db refused, nothing was changed: node-a is not held (held: node-c): there is nothing to release", nil},
		{"release, none held", swappedPair(), []string{"release", "db", "node-a"}, absent, "node-a is not held (no member is held)", nil},
		{"release of a non-member", swappedPair(), []string{"release", "db", "node-z"}, absent, "node-z is not a member of the pair; its members are node-a (spec.primary.node), node-b (spec.backup.node)", nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			res := runPluginFake(t, []client.Object{tt.vp}, tt.args...)
			switch {
			case tt.wantErr == "" && res.err != nil:
				t.Fatalf("%v\n%s", res.err, res.stdout)
			case tt.wantErr != "" && (res.err == nil || !strings.Contains(res.err.Error(), tt.wantErr)):
				t.Fatalf("error %v, want one containing %q", res.err, tt.wantErr)
			}
			for _, w := range tt.wantOut {
				if !strings.Contains(res.stdout, w) {
					t.Errorf("output lacks %q:\n%s", w, res.stdout)
				}
			}
			got := getVP(t, res.c)
			v, ok := got.Annotations[storagev1alpha1.AnnotationHoldResync]
			if !ok {
				v = absent
			}
			if v != tt.want {
				t.Errorf("annotation %q, want %q", v, tt.want)
			}
			if tt.vp.Annotations["keep"] != "" && got.Annotations["keep"] != "me" {
				t.Errorf("another annotation was dropped: %v", got.Annotations)
			}
		})
	}
}

// TestHoldConflict: a hold list changed by someone else between the read
// and the patch is read again, not overwritten.
func TestHoldConflict(t *testing.T) {
	vp := swappedPair()
	vp.Spec.AdditionalBackups = []storagev1alpha1.BackupMember{{Node: "node-c"}}
	conflicts := 0
	funcs := holdChangedOnce(&conflicts, "node-c")
	res := runPluginWith(t, []client.Object{vp}, funcs, func(kubeconfig string) []string {
		return []string{"--kubeconfig", kubeconfig, "-n", "prod", "hold", "db", "node-a"}
	})
	if res.err != nil {
		t.Fatal(res.err)
	}
	if got := getVP(t, res.c).Annotations[storagev1alpha1.AnnotationHoldResync]; got != "node-c,node-a" || conflicts != 1 {
		t.Errorf("annotation %q after %d conflicts, want node-c,node-a after 1", got, conflicts)
	}
}

// TestCompletionMembers: promote, hold and release complete NAME, then the
// members they may act on.
func TestCompletionMembers(t *testing.T) {
	vp := swappedPair()
	vp.Spec.AdditionalBackups = []storagev1alpha1.BackupMember{{Node: "node-c"}}
	vp.Annotations = map[string]string{storagev1alpha1.AnnotationHoldResync: "node-c"}
	other := testPair()
	other.Name = "web"
	for _, tt := range []struct {
		args []string
		want []string
	}{
		{[]string{"promote", ""}, []string{"db", "web"}},
		{[]string{"promote", "db", ""}, []string{"node-a", "node-c"}},
		{[]string{"promote", "db", "node-a", ""}, nil},
		{[]string{"hold", "db", ""}, []string{"node-a"}},
		{[]string{"release", "db", ""}, []string{"node-c"}},
		{[]string{"release", "missing", ""}, nil},
		{[]string{"hold", "w"}, []string{"web"}},
	} {
		res := runPluginArgs(t, []client.Object{vp, other}, func(kubeconfig string) []string {
			return append([]string{"__complete", "--kubeconfig", kubeconfig, "-n", "prod"}, tt.args...)
		})
		if res.err != nil {
			t.Errorf("%v: %v", tt.args, res.err)
			continue
		}
		if got := completions(res.stdout); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%v: completions %q, want %q", tt.args, got, tt.want)
		}
		if !strings.Contains(res.stdout, ":4\n") {
			t.Errorf("%v: directive is not NoFileComp:\n%s", tt.args, res.stdout)
		}
	}
}

// TestPromoteHoldConflict: --hold-old-writer adds the lost writer to a hold
// list someone changed between the read and the patch without dropping
// their node.
func TestPromoteHoldConflict(t *testing.T) {
	conflicts := 0
	funcs := holdChangedOnce(&conflicts, "node-x")
	res := runPluginWith(t, []client.Object{outdatedLostPair()}, funcs, func(kubeconfig string) []string {
		return []string{"--kubeconfig", kubeconfig, "-n", "prod", "promote", "db", "node-b", "--force", "--hold-old-writer", "--wait=0"}
	})
	if res.err != nil {
		t.Fatal(res.err)
	}
	a := getVP(t, res.c).Annotations
	if a[storagev1alpha1.AnnotationHoldResync] != "node-x,node-a" || a[storagev1alpha1.AnnotationForcePromote] != "node-b" || conflicts != 1 {
		t.Errorf("annotations %v after %d conflicts, want node-x,node-a held and node-b requested after 1", a, conflicts)
	}
}

// holdChangedOnce makes the first patch of the plugin fail with a conflict
// after someone else set the hold list to holder meanwhile (the plugin's
// read is stale); later patches go through. It counts the conflicts.
func holdChangedOnce(conflicts *int, holder string) interceptor.Funcs {
	return interceptor.Funcs{
		Get: withManagedFields,
		Patch: func(ctx context.Context, c client.WithWatch, obj client.Object, patch client.Patch, opts ...client.PatchOption) error {
			if *conflicts > 0 {
				return c.Patch(ctx, obj, patch, opts...)
			}
			*conflicts++
			cur := &storagev1alpha1.VolumePair{}
			if err := c.Get(ctx, client.ObjectKeyFromObject(obj), cur); err != nil {
				return err
			}
			cur.Annotations = map[string]string{storagev1alpha1.AnnotationHoldResync: holder}
			if err := c.Update(ctx, cur); err != nil {
				return err
			}
			return apierrors.NewConflict(schema.GroupResource{Group: storagev1alpha1.GroupVersion.Group, Resource: "volumepairs"}, obj.GetName(), errors.New("the object has been modified"))
		},
	}
}
