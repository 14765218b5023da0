package envtest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/go-logr/logr/funcr"
	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
	"github.com/tandem-storage/tandem/dataplane/agent"
	"github.com/tandem-storage/tandem/internal/testkit"
	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// TestPlugin builds kubectl-tandem and drives it against the test API server
// (and, for verify, two in-process agents), checking what users see.
func TestPlugin(t *testing.T) {
	testkit.SkipIfShort(t, "builds and runs kubectl-tandem, with in-process agents")
	bin := filepath.Join(t.TempDir(), "kubectl-tandem")
	build := exec.Command("go", "build", "-o", bin, "./cmd/kubectl-tandem")
	build.Dir = repoRoot
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/kubectl-tandem: %v\n%s", err, out)
	}
	t.Run("status", func(t *testing.T) { testPluginStatus(t, bin) })
	t.Run("failover and failback", func(t *testing.T) { testPluginRequests(t, bin) })
	t.Run("verify", func(t *testing.T) { testPluginVerify(t, bin) })
	t.Run("first contact", func(t *testing.T) { testPluginFirstContact(t, bin) })
	t.Run("disaster recovery", func(t *testing.T) { testPluginDisasterRecovery(t, bin) })
}

type pluginResult struct {
	stdout, stderr string
	code           int
}

func runPlugin(t *testing.T, bin string, args ...string) pluginResult {
	t.Helper()
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
		t.Fatalf("run kubectl-tandem %v: %v", args, err)
	}
	return res
}

func (r pluginResult) String() string {
	return fmt.Sprintf("exit %d\n--- stdout ---\n%s--- stderr ---\n%s", r.code, r.stdout, r.stderr)
}

func testPluginStatus(t *testing.T, bin string) {
	ctx := context.Background()
	ns := newNamespace(t)
	vp := minimalPair(ns, "db")
	if err := k8s.Create(ctx, vp); err != nil {
		t.Fatalf("create: %v", err)
	}
	now := metav1.NewTime(time.Now().Add(-time.Minute).Truncate(time.Second))
	vp.Status = v1.VolumePairStatus{
		Phase: v1.PhaseCopy, ActivePrimary: "node-b", Epoch: 4,
		Endpoint: "nbd://198.18.0.12:10809/" + ns + "/db", OutOfSyncBytes: 12 << 20,
		Copy: &v1.CopyProgress{Target: "node-a", TotalBytes: 12 << 20, DoneBytes: 3 << 20, BytesPerSecond: 1 << 20, ETASeconds: 9, StartTime: &now},
		Members: []v1.MemberStatus{
			{Node: "node-a", Role: v1.RoleBackup, DataState: v1.DataInconsistent, Connected: true, LastSeen: &now, Message: "receiving the copy"},
			{Node: "node-b", Role: v1.RolePrimary, DataState: v1.DataUpToDate, Connected: true, LastSeen: &now, OutOfSyncBytes: 9 << 20},
		},
		LastFailoverTime: &now,
		Conditions: []metav1.Condition{
			{Type: v1.ConditionReady, Status: metav1.ConditionTrue, Reason: "Serving", Message: "node-b serves the volume", LastTransitionTime: now},
			{Type: v1.ConditionSynchronized, Status: metav1.ConditionFalse, Reason: "Copying", Message: "copy to node-a running", LastTransitionTime: now},
		},
	}
	if err := k8s.Status().Update(ctx, vp); err != nil {
		t.Fatalf("update status: %v", err)
	}
	ref := corev1.ObjectReference{APIVersion: v1.GroupVersion.String(), Kind: "VolumePair", Namespace: ns, Name: "db", UID: vp.UID}
	for i, e := range []struct{ reason, msg string }{
		{"MemberLost", "node-a stopped answering probes"},
		{"Promoted", "node-b promoted to primary at epoch 4"},
		{"CopyStarted", "copying 12 MiB to node-a"},
	} {
		ts := metav1.NewTime(now.Add(time.Duration(i) * time.Second))
		ev := &corev1.Event{
			ObjectMeta:     metav1.ObjectMeta{Namespace: ns, GenerateName: "db-"},
			InvolvedObject: ref, Type: corev1.EventTypeNormal, Reason: e.reason, Message: e.msg,
			FirstTimestamp: ts, LastTimestamp: ts, Count: 1, Source: corev1.EventSource{Component: "tandem-controller"},
		}
		if err := k8s.Create(ctx, ev); err != nil {
			t.Fatalf("create event: %v", err)
		}
	}
	// An event about another object of the same name must not show up.
	other := &corev1.Event{
		ObjectMeta:     metav1.ObjectMeta{Namespace: ns, GenerateName: "db-"},
		InvolvedObject: corev1.ObjectReference{APIVersion: "v1", Kind: "Pod", Namespace: ns, Name: "db"},
		Type:           corev1.EventTypeWarning, Reason: "BackOff", Message: "pod event", FirstTimestamp: now, LastTimestamp: now, Count: 1,
	}
	if err := k8s.Create(ctx, other); err != nil {
		t.Fatalf("create event: %v", err)
	}

	res := runPlugin(t, bin, "-n", ns, "status", "db")
	if res.code != 0 {
		t.Fatalf("status failed:\n%s", res)
	}
	for _, want := range []string{
		"Mode:             Async",
		"Primary (spec):   node-a",
		"Backup (spec):    node-b",
		"Active primary:   node-b (the backup is acting primary)",
		"Phase:            COPY",
		"Epoch:            4",
		"Endpoint:         nbd://198.18.0.12:10809/" + ns + "/db",
		"Out of sync:      12 MiB (12582912 bytes)",
		"Copy:             to node-a: 3 MiB of 12 MiB (25.0%), 1 MiB/s, ETA 9s",
		"Last failover:    " + now.UTC().Format(time.RFC3339),
		"Last failback:    never",
		"node-a  Backup   Inconsistent  yes", "receiving the copy",
		"node-b  Primary  UpToDate      yes", "9 MiB",
		"Ready         True    Serving", "node-b serves the volume",
		"Synchronized  False   Copying",
		"MemberLost", "Promoted", "CopyStarted", "copying 12 MiB to node-a", "tandem-controller",
	} {
		if !strings.Contains(res.stdout, want) {
			t.Errorf("status output lacks %q", want)
		}
	}
	if strings.Contains(res.stdout, "pod event") {
		t.Error("status shows an event of another object")
	}
	if i, j := strings.Index(res.stdout, "MemberLost"), strings.Index(res.stdout, "CopyStarted"); i < 0 || j < i {
		t.Error("events are not in time order")
	}
	if t.Failed() {
		t.Logf("%s", res)
	}

	res = runPlugin(t, bin, "-n", ns, "status", "db", "-o", "json")
	var got v1.VolumePair
	if res.code != 0 || json.Unmarshal([]byte(res.stdout), &got) != nil {
		t.Fatalf("status -o json:\n%s", res)
	}
	if got.Kind != "VolumePair" || got.APIVersion != v1.GroupVersion.String() || got.Name != "db" || got.Status.Phase != v1.PhaseCopy || len(got.ManagedFields) != 0 {
		t.Errorf("status -o json printed %s %s %s phase %s with %d managed fields", got.APIVersion, got.Kind, got.Name, got.Status.Phase, len(got.ManagedFields))
	}
	res = runPlugin(t, bin, "-n", ns, "status", "db", "-o", "yaml")
	if res.code != 0 || !strings.Contains(res.stdout, "kind: VolumePair") || !strings.Contains(res.stdout, "phase: COPY") {
		t.Errorf("status -o yaml:\n%s", res)
	}
	res = runPlugin(t, bin, "-n", ns, "status", "missing")
	if res.code != 1 || !strings.Contains(res.stderr, "not found") {
		t.Errorf("status of a missing pair:\n%s", res)
	}
	res = runPlugin(t, bin, "-n", ns, "status", "db", "-o", "wide")
	if res.code != 1 || !strings.Contains(res.stderr, `unknown output format "wide"`) {
		t.Errorf("status -o wide:\n%s", res)
	}
}

// setStatus records st as the controller would.
func setStatus(t *testing.T, vp *v1.VolumePair, st v1.VolumePairStatus) {
	t.Helper()
	ctx := context.Background()
	if err := k8s.Get(ctx, client.ObjectKeyFromObject(vp), vp); err != nil {
		t.Fatal(err)
	}
	vp.Status = st
	if err := k8s.Status().Update(ctx, vp); err != nil {
		t.Fatalf("update status: %v", err)
	}
}

// readyCondition is the Ready condition of a pair whose writer serves (ok)
// or is lost.
func readyCondition(ok bool, writer string) metav1.Condition {
	c := metav1.Condition{Type: v1.ConditionReady, Status: metav1.ConditionTrue, Reason: "Serving", Message: writer + " serves the volume", LastTransitionTime: metav1.Now()}
	if !ok {
		c.Status, c.Reason, c.Message = metav1.ConditionFalse, "WriterUnreachable", "the agent on "+writer+" does not answer"
	}
	return c
}

func testPluginRequests(t *testing.T, bin string) {
	ctx := context.Background()
	ns := newNamespace(t)
	vp := minimalPair(ns, "db")
	if err := k8s.Create(ctx, vp); err != nil {
		t.Fatalf("create: %v", err)
	}
	// node-b took over from node-a and is lost in turn: both requests can
	// be acted on.
	setStatus(t, vp, v1.VolumePairStatus{Phase: v1.PhaseSwap, ActivePrimary: "node-b", Epoch: 2, Conditions: []metav1.Condition{readyCondition(false, "node-b")}})
	for _, tc := range []struct{ verb, annotation string }{
		{"failover", v1.AnnotationFailoverRequested},
		{"failback", v1.AnnotationFailbackRequested},
	} {
		before := time.Now().Add(-time.Second)
		res := runPlugin(t, bin, "-n", ns, tc.verb, "db")
		if res.code != 0 {
			t.Fatalf("%s failed:\n%s", tc.verb, res)
		}
		for _, want := range []string{"volumepair " + ns + "/db: " + tc.verb + " requested at", "annotation " + tc.annotation, "Next: ", "kubectl tandem status db -n " + ns} {
			if !strings.Contains(res.stdout, want) {
				t.Errorf("%s output lacks %q:\n%s", tc.verb, want, res)
			}
		}
		var vp v1.VolumePair
		if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: "db"}, &vp); err != nil {
			t.Fatal(err)
		}
		ts, err := time.Parse(time.RFC3339, vp.Annotations[tc.annotation])
		if err != nil {
			t.Fatalf("%s: annotation %s=%q is not RFC 3339: %v", tc.verb, tc.annotation, vp.Annotations[tc.annotation], err)
		}
		if ts.Before(before.Truncate(time.Second)) || ts.After(time.Now().Add(time.Second)) {
			t.Errorf("%s: annotation time %s is not now", tc.verb, ts)
		}
	}
	// Both requests stay; other annotations are untouched by the merge patch.
	if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: "db"}, vp); err != nil {
		t.Fatal(err)
	}
	if len(vp.Annotations) != 2 {
		t.Errorf("annotations = %v, want the two requests", vp.Annotations)
	}
	res := runPlugin(t, bin, "-n", ns, "failover", "db", "-o", "json")
	var got v1.VolumePair
	if res.code != 0 || json.Unmarshal([]byte(res.stdout), &got) != nil || got.Annotations[v1.AnnotationFailoverRequested] == "" {
		t.Errorf("failover -o json:\n%s", res)
	}
	res = runPlugin(t, bin, "-n", ns, "failover", "missing")
	if res.code != 1 || !strings.Contains(res.stderr, "not found") {
		t.Errorf("failover of a missing pair:\n%s", res)
	}
}

// verifyAgent is an in-process agent run by agent.Run on loopback.
type verifyAgent struct {
	a       *agent.Agent
	url     string
	dataDir string
}

func startVerifyAgent(t *testing.T, node, token string) *verifyAgent {
	t.Helper()
	va := &verifyAgent{dataDir: t.TempDir()}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	up := make(chan struct{})
	var closeErrs atomic.Int32
	log := funcr.New(func(prefix, args string) {
		if strings.Contains(args, `"Closing replicas"`) {
			closeErrs.Add(1)
		}
	}, funcr.Options{})
	go func() {
		done <- agent.Run(ctx, agent.Options{
			Config:  agent.Config{Node: node, DataDir: va.dataDir, Token: token, Log: log},
			Control: testkit.Listen(t), Replication: testkit.Listen(t), NBD: testkit.Listen(t),
			Started: func(a *agent.Agent, ep agent.Endpoints) { va.a, va.url = a, ep.Control; close(up) },
		})
	}()
	select {
	case <-up:
	case err := <-done:
		cancel()
		t.Fatalf("agent %s: %v", node, err)
	}
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
		if closeErrs.Load() > 0 {
			t.Errorf("agent %s failed to close its replicas", node)
		}
	})
	return va
}

func testPluginVerify(t *testing.T, bin string) {
	ctx := context.Background()
	const token = "verify-token"
	const size, rs = 8 << 20, 64 << 10 // 128 regions
	opNS, ns := newNamespace(t), newNamespace(t)
	vp := minimalPair(ns, "vol")
	vp.Spec.Size = resource.MustParse("8Mi")
	if err := k8s.Create(ctx, vp); err != nil {
		t.Fatalf("create: %v", err)
	}
	// The plugin finds the token through the agents' DaemonSet: the Secret
	// and key it mounts as the agent's --token-file (as the chart does with
	// agent.tokenSecret.existingSecret).
	if err := k8s.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: opNS, Name: "my-agent-token"}, Data: map[string][]byte{"tok": []byte(token + "\n")}}); err != nil {
		t.Fatal(err)
	}
	if err := k8s.Create(ctx, agentDaemonSet(opNS, "my-agent-token", "tok")); err != nil {
		t.Fatal(err)
	}
	agents := map[string]*verifyAgent{}
	for _, node := range []string{"node-a", "node-b"} {
		va := startVerifyAgent(t, node, token)
		agents[node] = va
		lease := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{
			Namespace: opNS, Name: "tandem-agent-" + node,
			Annotations: map[string]string{"storage.tandem.dev/control-endpoint": va.url + "/"},
		}}
		if err := k8s.Create(ctx, lease); err != nil {
			t.Fatal(err)
		}
	}
	c := func(node string) *agentapi.Client { return agentapi.NewClient(agents[node].url, token) }
	if _, err := c("node-a").Put(ctx, ns, "vol", agentapi.VolumeRequest{Size: size, RegionSize: rs, Spec: agentapi.Spec{Role: agentapi.RolePrimary, Epoch: 1, Initialize: true, Mode: agentapi.ModeAsync, PeerNode: "node-b"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := c("node-b").Put(ctx, ns, "vol", agentapi.VolumeRequest{Size: size, RegionSize: rs, Spec: agentapi.Spec{Role: agentapi.RoleBackup, Epoch: 1, Mode: agentapi.ModeAsync, PeerNode: "node-a"}}); err != nil {
		t.Fatal(err)
	}
	verify := func(extra ...string) pluginResult {
		return runPlugin(t, bin, append([]string{"-n", ns, "verify", "vol", "--operator-namespace", opNS, "--recheck-delay", "100ms"}, extra...)...)
	}

	// Two fresh replicas are identical.
	res := verify()
	if res.code != 0 || !strings.Contains(res.stdout, "No differing regions: the replicas match.") {
		t.Fatalf("verify of identical replicas:\n%s", res)
	}

	// Silent corruption of region 5 on node-b, behind the agent's back.
	f, err := os.OpenFile(filepath.Join(agents["node-b"].dataDir, "volumes", ns, "vol", "data"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("bit rot"), 5*rs+100); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	// A write on node-a that never reached node-b: region 9 differs, but
	// node-a's dirty bitmap says so, so it is expected, not reported.
	exp, err := agents["node-a"].a.Lookup(ns + "/vol")
	if err != nil {
		t.Fatal(err)
	}
	if err := exp.Backend.WriteAt(ctx, []byte("not yet replicated"), 9*rs, false); err != nil {
		t.Fatal(err)
	}

	for _, batch := range []string{"0", "3"} {
		res = verify("--region-batch", batch)
		if res.code != 1 {
			t.Fatalf("verify with a corrupt region (batch %s): want exit 1\n%s", batch, res)
		}
		for _, want := range []string{
			"DIFFERING REGIONS: 1 (64 KiB) in 1 run:",
			"  region 5, bytes 327680-393215 (64 KiB)",
			"1 region in a dirty bitmap (not yet replicated, as expected) also differed; not counted.",
		} {
			if !strings.Contains(res.stdout, want) {
				t.Errorf("batch %s: verify output lacks %q\n%s", batch, want, res)
			}
		}
	}

	// --repair without a writer (the pair has no status) still prints the
	// report, then says why nothing was repaired.
	res = verify("--repair")
	for _, want := range []string{"DIFFERING REGIONS: 1 (64 KiB) in 1 run:", "  region 5, bytes 327680-393215 (64 KiB)"} {
		if res.code != 2 || !strings.Contains(res.stdout, want) {
			t.Errorf("verify --repair without a writer: want exit 2 and the report's %q\n%s", want, res)
		}
	}
	if want := "error: --repair: nothing was repaired: no member is the writer (status.activePrimary is empty), and only the writer's data may be copied over the others'; run kubectl tandem verify --repair vol -n " + ns + " again once kubectl tandem status vol -n " + ns + " shows Ready True"; !strings.Contains(res.stderr, want) {
		t.Errorf("verify --repair without a writer: want %q\n%s", want, res)
	}

	res = verify("-o", "json")
	var rep struct {
		Volume           string `json:"volume"`
		Regions          int    `json:"regions"`
		DifferingRegions int    `json:"differingRegions"`
		DirtyRegions     int    `json:"dirtyRegions"`
		Runs             []struct {
			FirstRegion, LastRegion uint32
			Offset, Length          int64
		} `json:"runs"`
	}
	if res.code != 1 || json.Unmarshal([]byte(res.stdout), &rep) != nil {
		t.Fatalf("verify -o json:\n%s", res)
	}
	if rep.Volume != ns+"/vol" || rep.Regions != 128 || rep.DifferingRegions != 1 || rep.DirtyRegions != 1 ||
		len(rep.Runs) != 1 || rep.Runs[0].FirstRegion != 5 || rep.Runs[0].LastRegion != 5 || rep.Runs[0].Offset != 5*rs || rep.Runs[0].Length != rs {
		t.Errorf("verify -o json report: %+v", rep)
	}

	// Failures to reach or authenticate to the agents exit 2.
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("wrong"), 0o600); err != nil {
		t.Fatal(err)
	}
	res = verify("--token-file", tokenFile)
	if res.code != 2 || !strings.Contains(res.stderr, "401") {
		t.Errorf("verify with a wrong token:\n%s", res)
	}
	res = runPlugin(t, bin, "-n", ns, "verify", "vol", "--operator-namespace", ns)
	if res.code != 2 || !strings.Contains(res.stderr, "found no Tandem agents: no DaemonSet with labels app.kubernetes.io/name=tandem,app.kubernetes.io/component=agent in namespace "+ns) {
		t.Errorf("verify without an install:\n%s", res)
	}
	if err := k8s.Create(ctx, agentDaemonSet(ns, "missing", "token")); err != nil {
		t.Fatal(err)
	}
	res = runPlugin(t, bin, "-n", ns, "verify", "vol", "--operator-namespace", ns)
	if res.code != 2 || !strings.Contains(res.stderr, "secret "+ns+"/missing (key token), which DaemonSet "+ns+"/tandem-agent mounts") {
		t.Errorf("verify without the token secret:\n%s", res)
	}
	if err := os.WriteFile(tokenFile, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	res = runPlugin(t, bin, "-n", ns, "verify", "vol", "--operator-namespace", ns, "--token-file", tokenFile)
	if res.code != 2 || !strings.Contains(res.stderr, `"tandem-agent-node-a" not found`) {
		t.Errorf("verify without agent leases:\n%s", res)
	}

	// A third member (an additional backup) is verified too: a region that
	// differs on it alone is reported.
	va := startVerifyAgent(t, "node-c", token)
	agents["node-c"] = va
	if err := k8s.Create(ctx, &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{
		Namespace: opNS, Name: "tandem-agent-node-c",
		Annotations: map[string]string{"storage.tandem.dev/control-endpoint": va.url + "/"},
	}}); err != nil {
		t.Fatal(err)
	}
	if _, err := c("node-c").Put(ctx, ns, "vol", agentapi.VolumeRequest{Size: size, RegionSize: rs, Spec: agentapi.Spec{Role: agentapi.RoleBackup, Epoch: 1, Mode: agentapi.ModeAsync, PeerNode: "node-a"}}); err != nil {
		t.Fatal(err)
	}
	cur := &v1.VolumePair{}
	if err := k8s.Get(ctx, client.ObjectKeyFromObject(vp), cur); err != nil {
		t.Fatal(err)
	}
	cur.Spec.AdditionalBackups = []v1.BackupMember{{Node: "node-c"}}
	if err := k8s.Update(ctx, cur); err != nil {
		t.Fatal(err)
	}
	// node-c is a new replica (zeros): it matches node-a but in region 9
	// (dirty on node-a) and region 5 (which node-b corrupted); rot region 7
	// on node-c alone.
	f, err = os.OpenFile(filepath.Join(va.dataDir, "volumes", ns, "vol", "data"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("bit rot"), 7*rs); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	res = verify()
	if res.code != 1 {
		t.Fatalf("verify of three replicas, two corrupt regions: want exit 1\n%s", res)
	}
	for _, want := range []string{"on node-a, node-b and node-c", "DIFFERING REGIONS: 2 (128 KiB) in 2 runs:", "  region 5,", "  region 7,"} {
		if !strings.Contains(res.stdout, want) {
			t.Errorf("verify of three replicas lacks %q\n%s", want, res)
		}
	}
}

// agentDaemonSet is an agent DaemonSet as config/agent installs it, its
// token taken from key of Secret secret.
func agentDaemonSet(ns, secret, key string) *appsv1.DaemonSet {
	l := map[string]string{"app.kubernetes.io/name": "tandem", "app.kubernetes.io/component": "agent"}
	return &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "tandem-agent", Labels: l},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: l},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: l},
				Spec: corev1.PodSpec{
					Containers: []corev1.Container{{
						Name: "agent", Image: "tandem:test", Command: []string{"/usr/local/bin/agent"},
						Args:         []string{"--node=$(NODE_NAME)", "--token-file=/etc/tandem/token/token"},
						VolumeMounts: []corev1.VolumeMount{{Name: "agent-token", MountPath: "/etc/tandem/token", ReadOnly: true}},
					}},
					Volumes: []corev1.Volume{{Name: "agent-token", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{
						SecretName: secret, Items: []corev1.KeyToPath{{Key: key, Path: "token"}},
					}}}},
				},
			},
		},
	}
}

// testPluginFirstContact: what a new user types wrong first, against a real
// API server with RBAC: a pair or namespace that does not exist, a failover
// of a healthy pair, verify without the right to read the agents' token, of
// a pair naming a node that does not exist, and with an agent that stopped.
// Each gets the cause and what to do, and nothing is changed.
func testPluginFirstContact(t *testing.T, bin string) {
	ctx := context.Background()
	ns, opNS := newNamespace(t), newNamespace(t)
	vp := minimalPair(ns, "db")
	if err := k8s.Create(ctx, vp); err != nil {
		t.Fatalf("create: %v", err)
	}
	setStatus(t, vp, v1.VolumePairStatus{Phase: v1.PhasePair, ActivePrimary: "node-a", Epoch: 1, Conditions: []metav1.Condition{readyCondition(true, "node-a")}})

	for _, args := range [][]string{{"status", "dbb"}, {"failover", "dbb"}, {"failback", "dbb"}, {"verify", "dbb", "--operator-namespace", opNS}} {
		res := runPlugin(t, bin, append([]string{"-n", ns}, args...)...)
		want := `volumepair "dbb" not found in namespace ` + ns + `: its VolumePairs are db: `
		if res.code == 0 || !strings.Contains(res.stderr, want) {
			t.Errorf("%v of a pair that does not exist: want %q\n%s", args, want, res)
		}
		res = runPlugin(t, bin, append([]string{"-n", ns + "x"}, args[0], "db")...)
		want = "namespace " + ns + "x does not exist (a typo in -n, or in the kubeconfig context's namespace?); kubectl tandem list -A lists the VolumePairs of every namespace"
		if res.code == 0 || !strings.Contains(res.stderr, want) {
			t.Errorf("%s in a namespace that does not exist: want %q\n%s", args[0], want, res)
		}
	}
	res := runPlugin(t, bin, "-n", ns+"x", "list")
	if res.code != 0 || !strings.Contains(res.stderr, "No VolumePairs found in namespace "+ns+"x: namespace "+ns+"x does not exist") {
		t.Errorf("list of a namespace that does not exist:\n%s", res)
	}

	// A failover of a healthy pair is refused and sets nothing.
	res = runPlugin(t, bin, "-n", ns, "failover", "db")
	for _, want := range []string{
		"error: failover of volumepair " + ns + "/db refused, nothing was changed: the writer node-a is serving",
		"failover is for a writer that is lost",
		`swap spec.primary.node and spec.backup.node: kubectl patch volumepair db -n ` + ns + ` --type=merge -p '{"spec":{"primary":{"node":"node-b"},"backup":{"node":"node-a"}}}'`,
	} {
		if res.code != 1 || !strings.Contains(res.stderr, want) {
			t.Errorf("failover of a healthy pair lacks %q\n%s", want, res)
		}
	}
	res = runPlugin(t, bin, "-n", ns, "failback", "db")
	if res.code != 1 || !strings.Contains(res.stderr, "node-a (spec.primary) is already the writer (phase PAIR)") {
		t.Errorf("failback of a healthy pair:\n%s", res)
	}
	if err := k8s.Get(ctx, client.ObjectKeyFromObject(vp), vp); err != nil {
		t.Fatal(err)
	}
	if len(vp.Annotations) != 0 {
		t.Errorf("refused requests left annotations %v", vp.Annotations)
	}

	// verify by a user who may read pairs, the install and the agents'
	// Leases, but not Secrets.
	if err := k8s.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: opNS, Name: "tandem-agent-token"}, Data: map[string][]byte{"token": []byte("t0ken")}}); err != nil {
		t.Fatal(err)
	}
	if err := k8s.Create(ctx, agentDaemonSet(opNS, "tandem-agent-token", "token")); err != nil {
		t.Fatal(err)
	}
	viewer := "viewer-" + ns
	role := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: viewer}, Rules: []rbacv1.PolicyRule{
		{APIGroups: []string{v1.GroupVersion.Group}, Resources: []string{"volumepairs"}, Verbs: []string{"get", "list"}},
		{APIGroups: []string{"apps"}, Resources: []string{"daemonsets"}, Verbs: []string{"get", "list"}},
		{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, Verbs: []string{"get", "list"}},
		{APIGroups: []string{""}, Resources: []string{"namespaces", "events", "nodes"}, Verbs: []string{"get", "list"}},
	}}
	binding := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: viewer},
		RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: viewer},
		Subjects: []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: viewer}}}
	for _, o := range []client.Object{role, binding} {
		if err := k8s.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = k8s.Delete(context.Background(), o) })
	}
	user, err := testEnv.AddUser(envtest.User{Name: viewer}, nil)
	if err != nil {
		t.Fatalf("add user: %v", err)
	}
	kc, err := user.KubeConfig()
	if err != nil {
		t.Fatal(err)
	}
	viewerKC := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(viewerKC, kc, 0o600); err != nil {
		t.Fatal(err)
	}
	want := "read the agents' token from secret " + opNS + "/tandem-agent-token (key token), which DaemonSet " + opNS + "/tandem-agent mounts: you may not read that Secret; pass the token in a file with --token-file"
	// The binding takes effect when the authorizer's cache sees it.
	testkit.Eventually(t, 30*time.Second, "verify without the right to read the token to say so", func() (bool, string) {
		res = runPlugin(t, bin, "--kubeconfig", viewerKC, "-n", ns, "verify", "db", "--operator-namespace", opNS)
		return res.code == 2 && strings.Contains(res.stderr, want), fmt.Sprintf("want exit 2 and %q\n%s", want, res)
	})

	// A member on a node that does not exist; a member whose agent stopped.
	if err := k8s.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a-" + ns}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = k8s.Delete(context.Background(), &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a-" + ns}})
	})
	typo := minimalPair(ns, "typo")
	typo.Spec.Primary.Node, typo.Spec.Backup.Node = "node-a-"+ns, "node-bb-"+ns
	if err := k8s.Create(ctx, typo); err != nil {
		t.Fatal(err)
	}
	stale := metav1.NewMicroTime(time.Now().Add(-10 * time.Minute))
	if err := k8s.Create(ctx, &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Namespace: opNS, Name: v1.AgentLeaseName("node-a-" + ns), Annotations: map[string]string{v1.AnnControlEndpoint: "http://127.0.0.1:1"}},
		Spec:       coordinationv1.LeaseSpec{RenewTime: &stale, LeaseDurationSeconds: ptr.To(int32(15))},
	}); err != nil {
		t.Fatal(err)
	}
	// Both members' problems are reported, each on a line.
	res = runPlugin(t, bin, "-n", ns, "verify", "typo", "--operator-namespace", opNS)
	for _, want := range []string{
		"error: the agent of node node-a-" + ns + " is not running, or cannot reach the API server: it last renewed its Lease " + opNS + "/" + v1.AgentLeaseName("node-a-"+ns) + " 10m ago",
		"\nnode node-bb-" + ns + " (spec.backup.node of volumepair " + ns + "/typo) does not exist in the cluster (kubectl get nodes lists them)",
	} {
		if res.code != 2 || !strings.Contains(res.stderr, want) {
			t.Errorf("verify of a pair naming a node that does not exist, its other agent stopped: want exit 2 and %q\n%s", want, res)
		}
	}
}
