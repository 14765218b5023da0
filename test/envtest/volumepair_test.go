package envtest

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/tandem-storage/tandem/api/v1alpha1"
)

func minimalPair(ns, name string) *v1.VolumePair {
	return &v1.VolumePair{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: v1.VolumePairSpec{
			Size:    resource.MustParse("1Gi"),
			Mode:    v1.ModeAsync,
			Primary: v1.Member{Node: "node-a"},
			Backup:  v1.Member{Node: "node-b"},
		},
	}
}

// TestDefaults creates the smallest valid VolumePair and reads every default
// back from the API server.
func TestDefaults(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	if err := k8s.Create(ctx, minimalPair(ns, "defaults")); err != nil {
		t.Fatalf("create: %v", err)
	}
	var got v1.VolumePair
	if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: "defaults"}, &got); err != nil {
		t.Fatalf("get: %v", err)
	}
	s := got.Spec
	if s.RegionSize == nil || s.RegionSize.Value() != 64<<10 {
		t.Errorf("regionSize = %v, want 64Ki", s.RegionSize)
	}
	if s.Failover.Policy != v1.PolicyAutomatic || s.Failover.ProbePeriodSeconds != 2 || s.Failover.FailureThreshold != 3 || s.Failover.LeaseDurationSeconds != 6 {
		t.Errorf("failover = %+v, want Automatic/2/3/6", s.Failover)
	}
	if s.Failback.Policy != v1.PolicyManual {
		t.Errorf("failback.policy = %q, want Manual", s.Failback.Policy)
	}
	if s.Resync.MergePrimaryBitmap == nil || !*s.Resync.MergePrimaryBitmap || s.Resync.MaxBytesPerSecond != 0 {
		t.Errorf("resync = mergePrimaryBitmap %v maxBytesPerSecond %d, want true/0", s.Resync.MergePrimaryBitmap, s.Resync.MaxBytesPerSecond)
	}
}

// TestAllowedUpdates checks the changes a user may make to a live pair.
func TestAllowedUpdates(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	vp := minimalPair(ns, "updates")
	if err := k8s.Create(ctx, vp); err != nil {
		t.Fatalf("create: %v", err)
	}
	steps := []struct {
		name   string
		mutate func(*v1.VolumePair)
	}{
		{"change mode", func(p *v1.VolumePair) { p.Spec.Mode = v1.ModeSync }},
		{"swap members (planned switchover)", func(p *v1.VolumePair) {
			p.Spec.Primary, p.Spec.Backup = p.Spec.Backup, p.Spec.Primary
		}},
		{"replace the backup's node (a member replaced)", func(p *v1.VolumePair) { p.Spec.Backup.Node = "node-c" }},
		{"replace the primary's node", func(p *v1.VolumePair) { p.Spec.Primary.Node = "node-d" }},
		{"add two backups (three copies, then four)", func(p *v1.VolumePair) {
			p.Spec.AdditionalBackups = []v1.BackupMember{{Node: "node-e", Mode: v1.ModeAsync}, {Node: "node-f"}}
		}},
		{"promote an additional backup to spec.backup (same members)", func(p *v1.VolumePair) {
			p.Spec.Backup.Node, p.Spec.AdditionalBackups[0].Node = p.Spec.AdditionalBackups[0].Node, p.Spec.Backup.Node
		}},
		{"replace an additional backup's node", func(p *v1.VolumePair) { p.Spec.AdditionalBackups[1].Node = "node-g" }},
		{"remove an additional backup", func(p *v1.VolumePair) { p.Spec.AdditionalBackups = p.Spec.AdditionalBackups[:1] }},
		{"same size spelled differently", func(p *v1.VolumePair) { p.Spec.Size = resource.MustParse("1073741824") }},
		{"grow the size (online expansion)", func(p *v1.VolumePair) { p.Spec.Size = resource.MustParse("2Gi") }},
		{"grow it again, spelled in bytes", func(p *v1.VolumePair) { p.Spec.Size = resource.MustParse("3221225472") }},
		{"failover tuning", func(p *v1.VolumePair) {
			p.Spec.Failover.Policy = v1.PolicyManual
			p.Spec.Failover.LeaseDurationSeconds = 10
		}},
		{"resync tuning", func(p *v1.VolumePair) {
			p.Spec.Resync.MergePrimaryBitmap = ptr.To(false)
			p.Spec.Resync.MaxBytesPerSecond = 100 << 20
		}},
	}
	for _, st := range steps {
		var cur v1.VolumePair
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(vp), &cur); err != nil {
			t.Fatalf("%s: get: %v", st.name, err)
		}
		st.mutate(&cur)
		if err := k8s.Update(ctx, &cur); err != nil {
			t.Errorf("%s: update refused: %v", st.name, err)
		}
	}
	var final v1.VolumePair
	if err := k8s.Get(ctx, client.ObjectKeyFromObject(vp), &final); err != nil {
		t.Fatal(err)
	}
	if final.Spec.Primary.Node != "node-d" || final.Spec.Backup.Node != "node-e" || final.Spec.Mode != v1.ModeSync ||
		len(final.Spec.AdditionalBackups) != 1 || final.Spec.AdditionalBackups[0] != (v1.BackupMember{Node: "node-c", Mode: v1.ModeAsync}) ||
		final.Spec.SizeBytes() != 3<<30 {
		t.Errorf("final spec = %+v", final.Spec)
	}
}

// TestStatusSubresource writes a full status through the status subresource
// and checks that the phase enum is enforced there too.
func TestStatusSubresource(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	vp := minimalPair(ns, "status")
	if err := k8s.Create(ctx, vp); err != nil {
		t.Fatalf("create: %v", err)
	}
	now := metav1.Now()
	vp.Status = v1.VolumePairStatus{
		Phase: v1.PhaseSwap, ActivePrimary: "node-b", Epoch: 2,
		Endpoint:       "nbd://198.18.0.12:10809/" + ns + "/status",
		OutOfSyncBytes: 3 << 16,
		Members: []v1.MemberStatus{
			{Node: "node-a", Role: v1.RoleNone, DataState: v1.DataOutdated},
			{Node: "node-b", Role: v1.RolePrimary, DataState: v1.DataUpToDate, Connected: true, LastSeen: &now},
		},
		LastFailoverTime: &now,
		Conditions:       []metav1.Condition{{Type: v1.ConditionReady, Status: metav1.ConditionTrue, Reason: "Serving", Message: "node-b serves", LastTransitionTime: now}},
	}
	if err := k8s.Status().Update(ctx, vp); err != nil {
		t.Fatalf("status update: %v", err)
	}
	var got v1.VolumePair
	if err := k8s.Get(ctx, client.ObjectKeyFromObject(vp), &got); err != nil {
		t.Fatal(err)
	}
	if got.Status.Phase != v1.PhaseSwap || got.Status.Epoch != 2 || len(got.Status.Members) != 2 {
		t.Errorf("status not stored: %+v", got.Status)
	}
	got.Status.Phase = "RESYNC"
	err := k8s.Status().Update(ctx, &got)
	if err == nil || !strings.Contains(err.Error(), `status.phase: Unsupported value: "RESYNC"`) {
		t.Errorf("invalid phase: err = %v, want an Unsupported value error naming status.phase", err)
	}
}

// invalidCase is one file of test/invalid.
type invalidCase struct {
	name   string
	path   string
	expect string
	docs   [][]byte
}

func loadInvalidCases(t *testing.T) []invalidCase {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(repoRoot, "test", "invalid", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no invalid samples found in test/invalid (err %v)", err)
	}
	var cases []invalidCase
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		first, _, _ := strings.Cut(string(raw), "\n")
		expect, ok := strings.CutPrefix(first, "# expect: ")
		if !ok {
			t.Fatalf("%s: first line must be '# expect: <message>'", f)
		}
		c := invalidCase{name: strings.TrimSuffix(filepath.Base(f), ".yaml"), path: f, expect: expect}
		r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(raw)))
		for {
			doc, err := r.Read()
			if err != nil {
				break
			}
			if len(bytes.TrimSpace(doc)) > 0 {
				c.docs = append(c.docs, doc)
			}
		}
		if len(c.docs) == 0 {
			t.Fatalf("%s: no documents", f)
		}
		cases = append(cases, c)
	}
	return cases
}

// TestInvalidRejectedByAPI sends every manifest of test/invalid through a Go
// client and asserts the API server's exact refusal.
//
// It logs a RELIABILITY line (suite bad-input-admission) for make stress: one
// trial, one fault per invalid manifest, one violation per manifest accepted
// or refused with the wrong message.
func TestInvalidRejectedByAPI(t *testing.T) {
	ctx := context.Background()
	cases := loadInvalidCases(t)
	var violations int
	defer func() {
		t.Logf("RELIABILITY suite=bad-input-admission case=%s trials=1 faults=%d violations=%d", t.Name(), len(cases), violations)
	}()
	for _, c := range cases {
		ok := t.Run(c.name, func(t *testing.T) {
			ns := newNamespace(t)
			for i, doc := range c.docs {
				// Unstructured keeps the manifest exactly as written: an
				// omitted field stays omitted.
				vp := &unstructured.Unstructured{}
				if err := utilyaml.Unmarshal(doc, &vp.Object); err != nil {
					t.Fatalf("decode document %d: %v", i, err)
				}
				vp.SetNamespace(ns)
				last := i == len(c.docs)-1
				var err error
				if i == 0 {
					err = k8s.Create(ctx, vp)
				} else {
					cur := &unstructured.Unstructured{}
					cur.SetGroupVersionKind(vp.GroupVersionKind())
					if gerr := k8s.Get(ctx, client.ObjectKeyFromObject(vp), cur); gerr != nil {
						t.Fatal(gerr)
					}
					vp.SetResourceVersion(cur.GetResourceVersion())
					err = k8s.Update(ctx, vp)
				}
				if !last {
					if err != nil {
						t.Fatalf("setup document %d refused: %v", i, err)
					}
					continue
				}
				if err == nil {
					t.Fatalf("accepted; want refusal containing %q", c.expect)
				}
				if !apierrors.IsInvalid(err) {
					t.Errorf("error is not Invalid (422): %v", err)
				}
				if !strings.Contains(err.Error(), c.expect) {
					t.Errorf("refusal = %q\nwant it to contain %q", err.Error(), c.expect)
				}
			}
		})
		if !ok {
			violations++
		}
	}
}

func kubectl(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(filepath.Join(repoRoot, "bin", "kubectl"), append([]string{"--kubeconfig", kubeconfig}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestKubectlUserFlow is the acceptance check a user would do: apply the
// samples with bin/kubectl as the README says (kubectl apply -f
// config/samples/), list them with the printer columns, and see each
// invalid manifest refused with its message.
func TestKubectlUserFlow(t *testing.T) {
	ns := newNamespace(t)
	if out, err := kubectl(t, "apply", "-n", ns, "-f", filepath.Join(repoRoot, "config", "samples")+"/"); err != nil {
		t.Fatalf("kubectl apply -f config/samples/: %v\n%s", err, out)
	}
	out, err := kubectl(t, "get", "vp", "-n", ns)
	if err != nil {
		t.Fatalf("kubectl get vp: %v\n%s", err, out)
	}
	header := strings.Fields(strings.SplitN(out, "\n", 2)[0])
	want := []string{"NAME", "MODE", "PRIMARY", "ACTIVE", "BACKUP", "PHASE", "STATUS", "IN-SYNC", "OUT-OF-SYNC", "AGE"}
	if strings.Join(header, " ") != strings.Join(want, " ") {
		t.Errorf("kubectl get vp header = %v, want %v", header, want)
	}
	for _, row := range []string{"db-async   Async   node-a", "db-sync    Sync    node-b", "db-three   Sync    node-a"} {
		if !strings.Contains(strings.Join(strings.Fields(out), " "), strings.Join(strings.Fields(row), " ")) {
			t.Errorf("kubectl get vp output lacks %q:\n%s", row, out)
		}
	}
	for _, c := range loadInvalidCases(t) {
		t.Run(c.name, func(t *testing.T) {
			ns := newNamespace(t)
			var out string
			var err error
			for i, doc := range c.docs {
				f := filepath.Join(t.TempDir(), "doc.yaml")
				if werr := os.WriteFile(f, doc, 0o600); werr != nil {
					t.Fatal(werr)
				}
				out, err = kubectl(t, "apply", "-n", ns, "-f", f)
				if i < len(c.docs)-1 && err != nil {
					t.Fatalf("setup document %d refused: %v\n%s", i, err, out)
				}
			}
			if err == nil {
				t.Fatalf("kubectl apply accepted %s:\n%s", c.path, out)
			}
			if !strings.Contains(out, c.expect) {
				t.Errorf("kubectl apply output:\n%s\nwant it to contain %q", out, c.expect)
			}
		})
	}
}
